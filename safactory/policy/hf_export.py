"""The Hugging Face face of a saved tiny model: `tokenizer.json`, `tokenizer_config.json` with a chat template.

`save_model` writes the weights and our own tokenizer file (`char_tokenizer.json` or
`subword_tokenizer.json`, which our loader reads); `save_tokenizer` adds the three files
that let `AutoTokenizer.from_pretrained(dir)` load the same tokenizer, so transformers,
TRL and vLLM can use what the loop produces:

* `tokenizer.json` (the `tokenizers` library's format) giving the ids ours gives. The
  character tokenizer becomes a BPE without merges over its characters (any other
  character is `<unk>`, one per character). The subword one is its own byte-level BPE,
  with one more split: a role prefix (`S: `, `U: `, `A: `, `O: `) at the start of a line
  is a piece of its own, because `PlainTextChat` encodes each prefix apart from the text
  after it, so `apply_chat_template(..., tokenize=True)` gives exactly the ids the model
  trained on. With digit places, a normalizer writes each digit as its place token, as
  `SubwordTokenizer.encode` does, for the first `PLACED_DIGITS` digits of a run.
* `tokenizer_config.json`: the special tokens and `CHAT_TEMPLATE`, a Jinja template
  that renders a conversation (roles system / user / assistant / tool, assistant
  `tool_calls`, the generation prompt) to exactly the text of `PlainTextChat.render`
  (`<bos>U: ...\\nA: calc(3+4)<eos>O: 7\\nA: ...`); the assistant text and its `<eos>`
  sit in a `{% generation %}` block, so `return_assistant_tokens_mask=True` gives the
  training mask of `PlainTextChat.render`.
* `special_tokens_map.json` (older transformers read the special tokens from it).

Where the ids differ from our own `encode`: the literal text of a special token
(`<eos>` typed inside a message) is that special token here but characters in the
character tokenizer; for the subword tokenizer, a line of plain text that starts with a
role prefix splits after the prefix here (in a rendered conversation that is where the
prefixes are, so there the ids agree), a digit run past `PLACED_DIGITS` digits keeps plain
digits from there on, and text that itself holds the place code points differs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from safactory.policy.chat import PREFIX
from safactory.policy.subword import _PLACE_CHARS, PLACES, SubwordTokenizer, TinyTokenizer
from safactory.policy.tokenizer import SPECIALS, CharTokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
PLACED_DIGITS = 40  # digit places the HF normalizer writes per run (each 10 costs 100 regex passes)
PAD, BOS, EOS, UNK = SPECIALS

# Every literal piece of output is a `{{ '...' }}` expression and every tag strips the whitespace
# around it, so the layout below adds nothing to the rendered text.
CHAT_TEMPLATE = r"""
{%- set prefix = {'system': 'S: ', 'user': 'U: ', 'assistant': 'A: ', 'tool': 'O: '} -%}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] not in prefix -%}
        {{- raise_exception('the plain-text protocol has no role ' ~ message['role']) -}}
    {%- endif -%}
    {%- if message['content'] is string -%}
        {%- set content = message['content'] -%}
    {%- elif message['content'] is none or message['content'] is not defined -%}
        {%- set content = '' -%}
    {%- else -%}
        {{- raise_exception('the plain-text protocol takes message content as a string') -}}
    {%- endif -%}
    {{- prefix[message['role']] -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}
        {%- if content or not message['tool_calls'] -%}
            {{- content -}}
        {%- else -%}
            {%- for call in message['tool_calls'] -%}
                {%- set function = call['function'] if call['function'] is defined else call -%}
                {%- set arguments = function['arguments'] -%}
                {%- if not loop.first -%}{{- '\n' -}}{%- endif -%}
                {{- function['name'] ~ '(' -}}
                {%- if arguments is mapping and arguments | length == 1 -%}
                    {{- arguments.values() | first -}}
                {%- elif arguments is mapping -%}
                    {{- arguments | tojson(ensure_ascii=True) -}}
                {%- else -%}
                    {{- arguments -}}
                {%- endif -%}
                {{- ')' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- eos_token -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- content | replace('\n', ' ') ~ '\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- prefix['assistant'] -}}
{%- endif -%}
""".strip()


# ---- tokenizer.json ---------------------------------------------------------------------------
def _specials(inner: Tokenizer) -> None:
    inner.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])


def _char_tokenizer(tokenizer: CharTokenizer) -> Tokenizer:
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({c: i + len(SPECIALS) for i, c in enumerate(tokenizer.chars)})
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    inner.decoder = decoders.Fuse()
    _specials(inner)
    return inner


def _place_class(place: int) -> str:
    return f"[{_PLACE_CHARS[10 * place]}-{_PLACE_CHARS[10 * place + 9]}]"


def _digit_places() -> normalizers.Normalizer:
    """Digit -> its place token, left to right: a digit not after a digit (or after place 10) is place 1, ..."""
    any_place = f"[{_PLACE_CHARS[0]}-{_PLACE_CHARS[-1]}]"
    first = f"(?:(?<![0-9]|{any_place})|(?<={_place_class(PLACES - 1)}))"
    steps = []
    for _ in range(-(-PLACED_DIGITS // PLACES)):
        for place in range(PLACES):
            after = first if place == 0 else f"(?<={_place_class(place - 1)})"
            for digit in range(10):
                steps.append(normalizers.Replace(Regex(f"{after}{digit}"), _PLACE_CHARS[10 * place + digit]))
    return normalizers.Sequence(steps)


def _subword_tokenizer(tokenizer: SubwordTokenizer) -> Tokenizer:
    data = json.loads(tokenizer.inner.to_str())
    places = set(_PLACE_CHARS)
    for token in data["added_tokens"]:
        if token["content"] in places:  # matched after the normalizer has placed the digits
            token["normalized"] = True
    inner = Tokenizer.from_str(json.dumps(data))
    roles = "|".join(re.escape(p) for p in PREFIX.values())
    inner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(f"^(?:{roles})"), "isolated"), inner.pre_tokenizer]
    )
    if tokenizer.digit_places:
        inner.normalizer = _digit_places()
        unplace = [decoders.Replace(c, str(i % 10)) for i, c in enumerate(_PLACE_CHARS)]
        inner.decoder = decoders.Sequence([*unplace, inner.decoder])
    return inner


def hf_tokenizer(tokenizer: TinyTokenizer) -> Tokenizer:
    """A `tokenizers.Tokenizer` that gives the ids of `tokenizer` (see the module docstring for the exceptions)."""
    if isinstance(tokenizer, CharTokenizer):
        return _char_tokenizer(tokenizer)
    if isinstance(tokenizer, SubwordTokenizer):
        return _subword_tokenizer(tokenizer)
    raise TypeError(f"no Hugging Face export for {type(tokenizer).__name__}")


# ---- the directory ----------------------------------------------------------------------------
def save_hf_tokenizer(tokenizer: TinyTokenizer, directory: str | Path, model_max_length: int | None = None) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` (with `CHAT_TEMPLATE`) and `special_tokens_map.json`."""
    directory = Path(directory)
    hf_tokenizer(tokenizer).save(str(directory / TOKENIZER_JSON))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (directory / SPECIAL_TOKENS_MAP).write_text(json.dumps(specials, indent=2) + "\n")


def _max_positions(directory: Path) -> int | None:
    try:
        value = json.loads((directory / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def save_tokenizer(tokenizer: Any, directory: str | Path) -> None:
    """Save a model's tokenizer next to its weights: a tiny one as our file plus the HF files (the
    model's `config.json`, when already there, gives `model_max_length`), any other its own way."""
    directory = Path(directory)
    if isinstance(tokenizer, CharTokenizer | SubwordTokenizer):
        tokenizer.save(directory)
        save_hf_tokenizer(tokenizer, directory, _max_positions(directory))
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    else:
        tokenizer.save(directory)
