"""The subword tokenizer of the tiny models: lossless, digit-wise, saved and reloaded with the model."""

import pytest

from safactory.policy.chat import PlainTextChat
from safactory.policy.models import TinyModelSpec, build_tiny, load_policy_model, save_model
from safactory.policy.subword import FILENAME, SubwordTokenizer, train_subword
from safactory.policy.tokenizer import FILENAME as CHAR_FILENAME
from safactory.policy.tokenizer import CharTokenizer
from safactory.types import Message

CORPUS = [
    "U: Compute 34-20*66.\nA: calc(34-20*66)O: -1286\nA: answer(-1286)O: correct\n",
    "U: Look up timeout_ms in /data/gateway.conf and report its value with finish.\n"
    "A: read(/data/gateway.conf)O: timeout_ms = 6934 db_port = 54064\nA: finish(6934)O: finished\n",
    "U: Maze 5x5. ##### #...# #.#.# #G.A# #####\nA: move(left)O: moved left\n",
] * 20


def test_round_trip_is_lossless_and_digits_stay_single_tokens():
    tok = train_subword(CORPUS, vocab_size=400)
    assert len(tok) <= 400 and tok.vocab_size == len(tok)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    for text in [*CORPUS[:3], "naïve → ünïcode ✓ text never seen", "", "   spaces\tand\ttabs\n"]:
        assert tok.decode(tok.encode(text)) == text
    # words it saw often become one token; every digit is its own token, wherever it stands
    assert len(tok.encode("gateway")) == 1 and len(tok.encode(" finish")) == 1
    for number in ("6934", "54064", "1286"):
        assert len(tok.encode(number)) == len(number)
        assert len(tok.encode(f"finish({number})")) == len(tok.encode("finish()")) + len(number)
    # shorter than characters on the texts it learned from
    assert sum(len(tok.encode(t)) for t in CORPUS[:3]) < 0.6 * sum(len(t) for t in CORPUS[:3])
    # specials are decoded away unless asked for
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"
    assert "<eos>" in tok.decode([*tok.encode("hi"), tok.eos_id], skip_special=False)


def test_training_is_deterministic_and_refuses_a_vocabulary_below_the_bytes():
    a, b = train_subword(CORPUS, 300), train_subword(CORPUS, 300)
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        train_subword(CORPUS, 100)


def test_a_tiny_model_with_it_saves_and_reloads_through_the_model_factory(tmp_path):
    tok = train_subword(CORPUS, 300)
    model, same = build_tiny(TinyModelSpec(32, 1, 2, 64, 256), seed=0, tokenizer=tok)
    assert same is tok and model.config.vocab_size == len(tok)
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / FILENAME).is_file() and not (tmp_path / "m" / CHAR_FILENAME).exists()
    loaded = load_policy_model(str(tmp_path / "m"))
    assert isinstance(loaded.chat, PlainTextChat) and isinstance(loaded.chat.tokenizer, SubwordTokenizer)
    assert loaded.chat.tokenizer.get_vocab() == tok.get_vocab()
    messages = [Message(role="user", content="Compute 2+2.")]
    assert loaded.chat.prompt_ids(messages) == PlainTextChat(tok).prompt_ids(messages)
    # the character tokenizer stays the default
    _, char = build_tiny(TinyModelSpec(32, 1, 2, 64, 256), seed=0)
    assert isinstance(char, CharTokenizer)


def test_digit_places_tell_each_digit_its_place_and_round_trip(tmp_path):
    plain, placed = train_subword(CORPUS, 300), train_subword(CORPUS, 300, digit_places=True)
    assert not plain.digit_places and placed.digit_places and len(placed) == len(plain) + 100
    # the same digit at another place is another token; the same place in another number is the same token
    a, b = placed.encode("636"), placed.encode("x 6 36")
    assert len(a) == 3 and a[0] != a[2] and a[1] != b[-2] and a[0] == b[-4]  # 6@0 3@1 6@2 / x ' ' 6@0 ' ' 3@0 6@1
    assert placed.encode("6") == placed.encode("60")[:1] and placed.encode("12345678901")[10] == placed.encode("1")[0]
    assert placed.encode("finish(6934)")[: len(placed.encode("finish("))] == placed.encode("finish(")
    for text in [*CORPUS[:3], "naïve → ünïcode ✓ 2024-01-15", "0", "", "a1b22c333"]:
        assert placed.decode(placed.encode(text)) == text
    assert placed.decode(placed.encode("x 6 36")[-2:]) == "36"  # a lone token decodes to its digit
    placed.save(tmp_path)
    again = SubwordTokenizer.load(tmp_path)
    assert again.digit_places and again.encode("answer(4778)") == placed.encode("answer(4778)")
