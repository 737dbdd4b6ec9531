"""A saved tiny model is a standard Hugging Face directory: `AutoTokenizer` and
`AutoModelForCausalLM` load it, and its chat template renders the plain-text protocol.

Real expert episodes of arith, maze and ops (the texts the loop trains on) are rendered
by `PlainTextChat` and by the saved chat template, for the character tokenizer and for
subword tokenizers (plain and with digit places) trained on a few hundred expert texts.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from safactory.evolve.checkpoint import save_checkpoint
from safactory.policy.base import SamplingParams
from safactory.policy.chat import PlainTextChat, TemplateChat, assistant_text
from safactory.policy.hf_export import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_JSON
from safactory.policy.models import TinyModelSpec, build_tiny, load_model, load_policy_model, save_model
from safactory.policy.publish import DiskPublisher
from safactory.policy.subword import FILENAME as SUBWORD_FILE
from safactory.policy.subword import SubwordTokenizer, TinyTokenizer, train_subword
from safactory.policy.tokenizer import FILENAME as CHAR_FILE
from safactory.policy.tokenizer import CharTokenizer
from safactory.sim.agent import EpisodeLimits, run_episode
from safactory.sim.registry import default_registry
from safactory.types import Message, ToolCall
from tests.remote_server import free_port

ENVS = ("arith", "maze", "ops")
KINDS = ("char", "subword", "subword-places")
SPEC = TinyModelSpec(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=2048)
# the README's example, and a turn of several calls with JSON, number, list and non-ASCII arguments
README = [
    Message(role="user", content="What is 3 + 4?"),
    Message(role="assistant", content="", tool_calls=[ToolCall(id="c1", name="calc", arguments={"expression": "3+4"})]),
    Message(role="tool", content="7", tool_call_id="c1", name="calc"),
    Message(role="assistant", content="", tool_calls=[ToolCall(id="c2", name="answer", arguments={"value": "7"})]),
]
CALLS = [
    Message(role="system", content="Be brief.\nUse tools."),
    Message(role="user", content="Mail bob, then add 2.5 to 4."),
    Message(
        role="assistant",
        content="",
        tool_calls=[
            ToolCall(id="a", name="send_email", arguments={"to": "bob@corp.example", "subject": "hï", "n": 3}),
            ToolCall(id="b", name="calc", arguments={"x": 2.5}),
            ToolCall(id="c", name="noop", arguments={}),
            ToolCall(id="d", name="pick", arguments={"items": [1, "a"]}),
        ],
    ),
    Message(role="tool", content="sent\nok", tool_call_id="a", name="send_email"),
    Message(role="assistant", content="Done: 6.5"),
]


def _expert_conversations(per_env: int, limits: EpisodeLimits) -> dict[str, list[list[Message]]]:
    registry = default_registry()

    async def play() -> dict[str, list[list[Message]]]:
        out: dict[str, list[list[Message]]] = {}
        for env_id in ENVS:
            entry = registry.entries[env_id]
            assert entry.expert is not None
            tasks = entry.tasks(seed=0).tasks("train", per_env)
            trajs = [
                await run_episode(
                    entry.factory, entry.expert(), task, seed=i, sampling=SamplingParams(temperature=0.0), limits=limits
                )
                for i, task in enumerate(tasks)
            ]
            out[env_id] = [t.messages() for t in trajs]
        return out

    return asyncio.run(play())


def _text(messages: list[Message], generation: bool) -> str:
    """`PlainTextChat.render`'s text, spelled out by the character tokenizer (specials as their names)."""
    chat = PlainTextChat(CharTokenizer())
    return chat.tokenizer.decode(chat.render(messages, add_generation_prompt=generation)[0], skip_special=False)


def hf_messages(messages: list[Message], calls_only: bool = False) -> list[dict[str, Any]]:
    """Messages as transformers / OpenAI clients write them; `calls_only` drops the text of tool-call turns."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
            if calls_only:
                d["content"] = None
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _calls_only(messages: list[Message]) -> list[Message]:
    return [m.model_copy(update={"content": ""}) if m.tool_calls else m for m in messages]


@pytest.fixture(scope="module")
def conversations() -> list[list[Message]]:
    """Multi-turn expert episodes of each env, each also with its tool-call turns as bare `tool_calls`."""
    episodes = _expert_conversations(8, EpisodeLimits(max_turns=5))
    found: list[list[Message]] = []
    for env_id in ENVS:
        multi = [c for c in episodes[env_id] if sum(m.role == "assistant" for m in c) >= 2][:3]
        assert multi and all(any(m.tool_calls for m in c) and any(m.role == "tool" for m in c) for c in multi)
        found += multi
    assert any(m.role == "system" for c in found for m in c)  # ops opens with a system turn
    return [*found, *(_calls_only(c) for c in found), README, CALLS]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, TinyTokenizer]:
    """The character tokenizer and subword ones learned from a few hundred expert texts (as `run` does)."""
    episodes = _expert_conversations(80, EpisodeLimits(max_turns=8))
    chat = PlainTextChat(CharTokenizer())
    texts = [chat.tokenizer.decode(chat.render(c)[0]) for env_id in ENVS for c in episodes[env_id]]
    assert len(texts) == 240
    return {
        "char": CharTokenizer(),
        "subword": train_subword(texts, 600),
        "subword-places": train_subword(texts, 600, digit_places=True),
    }


@pytest.fixture(scope="module")
def saved(tokenizers: dict[str, TinyTokenizer], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for kind, tok in tokenizers.items():
        model, _ = build_tiny(SPEC, seed=3, tokenizer=tok)
        out[kind] = tmp_path_factory.mktemp(kind) / "model"
        save_model(model, tok, out[kind])
    return out


def test_the_template_renders_the_readme_example_exactly(saved: dict[str, Path]) -> None:
    hf = AutoTokenizer.from_pretrained(saved["char"])
    text = hf.apply_chat_template(hf_messages(README, calls_only=True), tokenize=False)
    assert text == "<bos>U: What is 3 + 4?\nA: calc(3+4)<eos>O: 7\nA: answer(7)<eos>"
    prompt = hf.apply_chat_template(hf_messages(README[:3]), tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos>U: What is 3 + 4?\nA: calc(3+4)<eos>O: 7\nA: "


@pytest.mark.parametrize("kind", KINDS)
def test_auto_classes_load_the_saved_directory(kind: str, saved: dict[str, Path]) -> None:
    directory = saved[kind]
    own = CHAR_FILE if kind == "char" else SUBWORD_FILE
    for name in (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, own, "config.json"):
        assert (directory / name).is_file(), name
    hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf.chat_template and hf.model_max_length == SPEC.max_positions
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    assert model.config.vocab_size == len(hf)
    # our own loader still reads our own tokenizer file
    policy = load_policy_model(str(directory))
    assert isinstance(policy.chat, PlainTextChat)
    assert isinstance(policy.chat.tokenizer, CharTokenizer if kind == "char" else SubwordTokenizer)


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_text_is_the_plain_text_protocol(
    kind: str, saved: dict[str, Path], conversations: list[list[Message]]
) -> None:
    hf = AutoTokenizer.from_pretrained(saved[kind])
    for messages in conversations:
        for generation in (False, True):
            for calls_only in (False, True):
                convo = hf_messages(messages, calls_only)
                text = hf.apply_chat_template(convo, tokenize=False, add_generation_prompt=generation)
                assert text == _text(messages, generation)


@pytest.mark.parametrize("kind", KINDS)
def test_token_ids_and_training_mask_equal_ours(
    kind: str, tokenizers: dict[str, TinyTokenizer], saved: dict[str, Path], conversations: list[list[Message]]
) -> None:
    tok = tokenizers[kind]
    chat = PlainTextChat(tok)
    hf = AutoTokenizer.from_pretrained(saved[kind])
    for messages in conversations:
        for generation in (False, True):
            ids, mask = chat.render(messages, add_generation_prompt=generation)
            out = hf.apply_chat_template(
                hf_messages(messages),
                add_generation_prompt=generation,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            assert list(out["input_ids"]) == ids
            assert list(out["assistant_masks"]) == mask
            assert hf(_text(messages, generation))["input_ids"] == ids  # plain `tok(text)` adds nothing
            assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
            assert hf.decode(ids) == tok.decode(ids, skip_special=False) == _text(messages, generation)
        for m in messages:  # every piece of text on its own
            piece = assistant_text(m) if m.role == "assistant" else m.content
            assert hf.encode(piece, add_special_tokens=False) == tok.encode(piece)
    for odd in ("naïve ✓✓ tabs\there", "", "  two  spaces ", "x = 1234567890123456789012345678901234567890"):
        assert hf.encode(odd, add_special_tokens=False) == tok.encode(odd)  # unknown characters: one <unk> each
    # a TemplateChat over the exported tokenizer (how a generic HF directory is served) agrees too
    generic = TemplateChat(hf)
    for messages in conversations[:4]:
        assert generic.render(messages, add_generation_prompt=True) == chat.render(messages, add_generation_prompt=True)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_of_the_auto_model_equal_our_loaded_model(
    kind: str, saved: dict[str, Path], conversations: list[list[Message]]
) -> None:
    ours, tok = load_model(saved[kind])
    theirs: PreTrainedModel = AutoModelForCausalLM.from_pretrained(saved[kind]).eval()
    hf = AutoTokenizer.from_pretrained(saved[kind])
    for messages in conversations[::5]:
        ids = PlainTextChat(tok).render(messages)[0]
        hf_ids = hf.apply_chat_template(hf_messages(messages), tokenize=True, return_dict=True)["input_ids"]
        assert list(hf_ids) == ids
        with torch.no_grad():
            a = ours(torch.tensor([ids])).logits
            b = theirs(torch.tensor([list(hf_ids)])).logits
        assert a.shape == (1, len(ids), len(tok)) and torch.equal(a, b)


def test_the_template_refuses_what_the_protocol_cannot_say(saved: dict[str, Path]) -> None:
    hf = AutoTokenizer.from_pretrained(saved["char"])
    with pytest.raises(TemplateError, match="no role developer"):
        hf.apply_chat_template([{"role": "developer", "content": "x"}], tokenize=False)
    with pytest.raises(TemplateError, match="content as a string"):
        hf.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}], tokenize=False)


@pytest.mark.parametrize("kind", KINDS)
def test_a_directory_saved_by_the_old_code_still_loads(
    kind: str, tokenizers: dict[str, TinyTokenizer], tmp_path: Path
) -> None:
    tok = tokenizers[kind]
    model, _ = build_tiny(SPEC, seed=5, tokenizer=tok)
    model.save_pretrained(tmp_path)  # the old file set: weights, config and our tokenizer file only
    tok.save(tmp_path)
    assert not (tmp_path / TOKENIZER_JSON).exists() and not (tmp_path / TOKENIZER_CONFIG).exists()
    loaded, again = load_model(tmp_path)
    assert type(again) is type(tok) and again.encode("answer(4778)\nA: x") == tok.encode("answer(4778)\nA: x")
    ids = PlainTextChat(tok).render(README)[0]
    with torch.no_grad():
        assert torch.equal(loaded(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits)
    policy = load_policy_model(str(tmp_path))
    assert isinstance(policy.chat, PlainTextChat) and policy.chat.render(README) == PlainTextChat(tok).render(README)


def test_checkpoints_and_published_versions_are_hf_directories_too(tmp_path: Path) -> None:
    model, tok = build_tiny(SPEC, seed=1)
    step = save_checkpoint(
        tmp_path / "ckpt", model=model, tokenizer=tok, optimizer=None, version=1, parent_version=None, train_step=1
    )
    published = tmp_path / "pub" / "v000002"
    asyncio.run(DiskPublisher(tmp_path / "pub", tok).publish(model, 2))
    for directory in (step, published):
        assert (directory / CHAR_FILE).is_file()
        hf = AutoTokenizer.from_pretrained(directory)
        assert hf.apply_chat_template(hf_messages(README), tokenize=False) == _text(README, False)
        assert json.loads((directory / TOKENIZER_CONFIG).read_text())["eos_token"] == "<eos>"


def test_serve_policy_serves_a_saved_directory_with_the_ids_of_its_template(saved: dict[str, Path]) -> None:
    """`safactory serve-policy --model DIR` (a real subprocess) on a saved subword model: the prompt it
    renders for a chat request is the chat template's, token for token."""
    directory = saved["subword-places"]
    port = free_port()
    command = [sys.executable, "-c", "from safactory.cli import main; main()"]
    command += ["serve-policy", "--model", str(directory), "--port", str(port)]
    proc = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "COLUMNS": "400"})
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not start"
            try:
                served = httpx.get(f"{url}/models", timeout=2).json()["data"][0]["id"]
                break
            except httpx.TransportError:
                time.sleep(0.2)
        messages = hf_messages(README[:3])
        body = {"model": served, "messages": messages, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
        reply = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        hf = AutoTokenizer.from_pretrained(directory)
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert reply.json()["prompt_token_ids"] == list(expected)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
