"""Property-based fuzzing (hypothesis) of every parser that reads untrusted input.

Targets: the tool-call parsers of each chat format (the plain-text protocol, JSON /
Hermes-style `<tool_call>` blocks, `TemplateChat.parse`, and the OpenAI wire format an
endpoint answers in), the run-config loader (YAML file + `--set` overrides), and
`data import` of a corrupted, truncated or mutated JSONL export.

Invariants only: a parser never raises anything but its documented error, a record
that is refused is refused with a clear error naming its row and leaves the store as it
was, and round trips give back what went in. Each target runs twice: a seeded subset in
the default tier (`derandomize=True`, a few hundred examples) and 10,000 examples under
`-m slow`. Figures of the full campaign: docs/reliability.md.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_core import to_json

from safactory.config import RunConfig, load_config, save_config
from safactory.data.codec import content_hash
from safactory.data.integrity import verify
from safactory.data.store import TrajectoryStore
from safactory.jobs.export import export, import_trajectories, read_trajectories
from safactory.policy.base import Completion, SamplingParams
from safactory.policy.chat import (
    TemplateChat,
    assistant_text,
    parse_json_tool_calls,
    parse_tool_calls,
    tool_call_text,
)
from safactory.policy.endpoint import EndpointError, completion_from_response
from safactory.types import Message, Step, Task, ToolCall, ToolSpec, Trajectory
from tests.synthetic import synthetic_trajectory

FULL = 10_000


def tiers(seeded: int) -> list[Any]:
    """The example counts a target runs with: `seeded` in the default tier, FULL under -m slow."""
    return [pytest.param(seeded, id="seeded"), pytest.param(FULL, id="full", marks=pytest.mark.slow)]


def fuzz(examples: int) -> Callable[[Any], Any]:
    """Hypothesis settings of one run: derandomized (the same examples every time), no deadline."""
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def run_property(prop: Any, target: str, examples: int, found: dict[str, int] | None = None) -> None:
    """Run a hypothesis property, counting the examples it was called with; with
    $SAFACTORY_CAMPAIGN_LOG set, append the count (and `found`) to that file (docs/reliability.md)."""
    calls = 0
    inner = prop.hypothesis.inner_test

    def counting(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        inner(*args, **kwargs)

    prop.hypothesis.inner_test = counting
    prop()
    log = os.environ.get("SAFACTORY_CAMPAIGN_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            row = {"fuzz": target, "max_examples": examples, "examples": calls, **(found or {})}
            f.write(json.dumps(row) + "\n")
    assert calls >= examples // 2, f"only {calls} examples ran"


# ---- strategies -----------------------------------------------------------------------------------

# pieces of the formats being parsed, so that random text often comes close to a real call
FRAGMENTS = [
    "<tool_call>", "</tool_call>", "```json\n", "```", "{", "}", "[", "]", '"name"', '"arguments"',
    '"parameters"', '"function"', '"type"', ":", ",", "(", ")", "\n", "\r\n", "\u2028", "\x85", " ", '"',
    "\\", "calc", "answer", "fs.read-file", "null", "true", "1e999", "NaN", "-0", "9" * 5000, "[" * 3000,
    '{"name": "calc", "arguments": {"expression": "1+2"}}', 'calc(1+2)', 'answer({"value": "3"})',
]  # fmt: skip
fragment_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=24).map("".join)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["</tool_call>", "<tool_call>", "\n", ")", "(", "```", '"', "\\", "\u2028"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
arguments = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
tool_names = st.from_regex(r"[A-Za-z_][\w.-]{0,12}", fullmatch=True)
schemas = st.one_of(
    st.builds(
        lambda names, required: {
            "type": "object",
            "properties": {n: {"type": "string"} for n in names},
            "required": required,
        },
        st.lists(st.text(max_size=6), max_size=3),
        st.lists(st.text(max_size=6), max_size=2),
    ),
    st.dictionaries(st.sampled_from(["type", "properties", "required"]), json_values, max_size=3),
)
tool_specs = st.builds(ToolSpec, name=st.one_of(tool_names, st.sampled_from(["calc", "answer"])), parameters=schemas)
CALL_NAME = re.compile(r"[A-Za-z_][\w.-]*")


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON texts with sorted keys (how a parser's arguments are compared with what was sent)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ---- 1. tool-call parsers -------------------------------------------------------------------------


def check_parse_result(result: Any) -> tuple[list[ToolCall], str | None]:
    """A parser's answer is (calls, None) with calls, or ([], a non-empty reason)."""
    calls, error = result
    assert isinstance(calls, list) and all(isinstance(c, ToolCall) for c in calls)
    if error is not None:
        assert isinstance(error, str) and error and calls == []
    for i, call in enumerate(calls):
        assert call.id == f"call_{i}" and isinstance(call.arguments, dict) and call.name
    return calls, error


@pytest.mark.parametrize("examples", tiers(300))
def test_plain_text_parser_never_raises(examples: int) -> None:
    @fuzz(examples)
    @given(text=st.one_of(fragment_text, st.text()), tools=st.lists(tool_specs, max_size=3))
    def prop(text: str, tools: list[ToolSpec]) -> None:
        calls, error = check_parse_result(parse_tool_calls(text, tools))
        if error is None:
            assert calls, "no error, so at least one call"
            lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
            assert [c.name for c in calls] == [line.split("(", 1)[0] for line in lines]
            assert all(CALL_NAME.fullmatch(c.name) for c in calls)

    run_property(prop, "plain_text_parser_never_raises", examples)


# one line of argument text that the plain-text protocol writes and reads back as is
plain_argument = st.text(
    st.characters(blacklist_categories=["Cs", "Cc", "Zl", "Zp"], blacklist_characters="\x1c\x1d\x1e\x85"), min_size=1
).filter(lambda s: s == s.strip() and not s.startswith("{"))


@pytest.mark.parametrize("examples", tiers(200))
def test_plain_text_calls_round_trip(examples: int) -> None:
    """Calls written by `assistant_text` (as SFT demos are rendered) parse back to the same calls."""
    tool = ToolSpec(name="t", parameters={"type": "object", "properties": {"x": {}, "y": {}}, "required": ["x"]})
    single = st.builds(lambda v: {"x": v}, plain_argument)
    several = st.dictionaries(st.text(max_size=6), json_values, max_size=4).filter(lambda d: len(d) != 1)

    calls_ = st.one_of(st.builds(lambda a: ("t", a), single), st.tuples(tool_names, several))

    @fuzz(examples)
    @given(st.lists(calls_, min_size=1, max_size=3))
    def prop(items: list[tuple[str, dict[str, Any]]]) -> None:
        sent = [ToolCall(id=f"c{i}", name=name, arguments=args) for i, (name, args) in enumerate(items)]
        text = assistant_text(Message(role="assistant", tool_calls=sent))
        calls, error = check_parse_result(parse_tool_calls(text, [tool]))
        assert error is None, (text, error)
        assert [c.name for c in calls] == [c.name for c in sent]
        assert all(same_json(a.arguments, b.arguments) for a, b in zip(calls, sent, strict=True)), text

    run_property(prop, "plain_text_calls_round_trip", examples)


@pytest.mark.parametrize("examples", tiers(300))
def test_json_tool_call_parser_never_raises(examples: int) -> None:
    wrapped = st.builds(
        lambda v, open_, close: open_ + json.dumps(v) + close,
        json_values,
        st.sampled_from(["", "<tool_call>", "```json\n", "["]),
        st.sampled_from(["", "</tool_call>", "\n```", "]"]),
    )

    @fuzz(examples)
    @given(st.one_of(fragment_text, wrapped, st.text()))
    def prop(text: str) -> None:
        found = parse_json_tool_calls(text)
        if found is None:
            assert "<tool_call>" not in text
            return
        calls, error = check_parse_result(found)
        assert error is not None or calls

    run_property(prop, "json_tool_call_parser_never_raises", examples)


@pytest.mark.parametrize("examples", tiers(200))
def test_json_tool_calls_round_trip(examples: int) -> None:
    """`tool_call_text` (calls rendered into a template's history) parses back to the same calls."""

    @fuzz(examples)
    @given(st.lists(st.tuples(st.text(min_size=1, max_size=12), arguments), min_size=1, max_size=3))
    def prop(items: list[tuple[str, dict[str, Any]]]) -> None:
        sent = [ToolCall(id=f"c{i}", name=name, arguments=args) for i, (name, args) in enumerate(items)]
        found = parse_json_tool_calls(tool_call_text(sent))
        assert found is not None
        calls, error = check_parse_result(found)
        assert error is None, error
        assert [c.name for c in calls] == [c.name for c in sent]
        assert all(same_json(a.arguments, b.arguments) for a, b in zip(calls, sent, strict=True))

    run_property(prop, "json_tool_calls_round_trip", examples)


@pytest.fixture(scope="module")
def template_chat() -> TemplateChat:
    from tests.test_models import PLAIN_TEMPLATE, make_tokenizer

    return TemplateChat(make_tokenizer(PLAIN_TEMPLATE))


@pytest.mark.parametrize("examples", tiers(300))
def test_template_chat_parse_never_raises(template_chat: TemplateChat, examples: int) -> None:
    @fuzz(examples)
    @given(text=st.one_of(fragment_text, st.text()), tools=st.lists(tool_specs, max_size=3))
    def prop(text: str, tools: list[ToolSpec]) -> None:
        calls, error = check_parse_result(template_chat.parse(text, tools))
        if calls and parse_json_tool_calls(text) is None:  # plain-text calls count only for offered tools
            assert {c.name for c in calls} <= {t.name for t in tools}

    run_property(prop, "template_chat_parse_never_raises", examples)


# ---- the OpenAI wire format an endpoint answers in -------------------------------------------------


def near_valid_response() -> st.SearchStrategy[dict[str, Any]]:
    """A chat completion response with some of its parts replaced by arbitrary JSON."""
    tool_call = st.fixed_dictionaries(
        {"id": st.text(max_size=4), "type": st.just("function")},
        optional={
            "function": st.one_of(
                json_values, st.fixed_dictionaries({"name": json_values}, optional={"arguments": json_values})
            )
        },
    )
    message = st.fixed_dictionaries(
        {"role": st.just("assistant")},
        optional={
            "content": json_values,
            "tool_calls": st.one_of(json_values, st.lists(st.one_of(tool_call, json_values), max_size=3)),
        },
    )
    entry = st.fixed_dictionaries({"token": json_values, "logprob": json_values})
    logprobs = st.one_of(
        json_values,
        st.fixed_dictionaries({"content": st.one_of(json_values, st.lists(st.one_of(json_values, entry), max_size=3))}),
    )
    choice = st.fixed_dictionaries(
        {"index": st.one_of(st.just(0), json_values)},
        optional={
            "message": st.one_of(message, json_values),
            "finish_reason": json_values,
            "logprobs": logprobs,
            "token_ids": json_values,
            "prompt_token_ids": json_values,
        },
    )
    ours = st.fixed_dictionaries(
        {},
        optional={
            "choices": st.one_of(
                json_values,
                st.lists(
                    st.one_of(
                        json_values,
                        st.fixed_dictionaries(
                            {"index": st.just(0)},
                            optional={
                                k: json_values
                                for k in (
                                    "token_ids",
                                    "logprobs",
                                    "policy_version",
                                    "policy_versions",
                                    "finish_reason",
                                    "parse_error",
                                )
                            },
                        ),
                    ),
                    max_size=2,
                ),
            ),
            "prompt_token_ids": json_values,
            "policy_version": json_values,
        },
    )
    return st.fixed_dictionaries(
        {"choices": st.one_of(st.lists(st.one_of(choice, json_values), max_size=2), json_values)},
        optional={"safactory": st.one_of(ours, json_values), "prompt_token_ids": json_values},
    )


@pytest.mark.parametrize("examples", tiers(300))
def test_endpoint_response_mapping_returns_a_completion_or_an_endpoint_error(examples: int) -> None:
    """Whatever JSON an endpoint answers with: a Completion, or an EndpointError that says what was wrong."""

    @fuzz(examples)
    @given(st.one_of(near_valid_response(), json_values))
    def prop(data: Any) -> None:
        try:
            completion = completion_from_response(data, SamplingParams())
        except EndpointError as exc:
            assert str(exc)
            return
        assert isinstance(completion, Completion) and isinstance(completion.text, str)
        assert all(isinstance(c.arguments, dict) and c.name for c in completion.tool_calls)
        assert not (completion.tool_calls and completion.parse_error)

    run_property(prop, "endpoint_response_mapping_returns_a_completion_or_an_endpoint_error", examples)


# ---- 2. the run-config loader -----------------------------------------------------------------------

SECTIONS = {name: cls for name, field in RunConfig.model_fields.items() if isinstance(cls := field.annotation, type)}
KEY_PATHS = [
    *RunConfig.model_fields,
    *(
        f"{section}.{key}"
        for section, model in SECTIONS.items()
        if hasattr(model, "model_fields")
        for key in model.model_fields
    ),
    *("envs.0.id", "envs.arith.weight", "env.id", "env.options.n", "nope", "rl.nope", "a.b.c", ".", "..rl", "rl."),
]
yaml_values = st.one_of(
    st.sampled_from(
        [
            "1",
            "-1",
            "0.5",
            "true",
            "null",
            "~",
            "[1, 2]",
            "{a: 1}",
            "arith",
            "[",
            "{",
            "'",
            '"',
            "*x",
            "&x 1",
            "!!python/object:os.system",
            "1e999",
            ".nan",
            "2020-01-01",
            "\t",
            ": :",
            "- -",
        ]
    ),
    st.text(max_size=12),
)
overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEY_PATHS), yaml_values),
        st.text(max_size=20),
    ),
    max_size=4,
)


def yaml_documents() -> st.SearchStrategy[str]:
    """Run files: valid-looking mappings over the real field names with arbitrary values, or any text."""
    value = st.one_of(json_values, st.sampled_from([[{"id": "arith"}], [{"id": "arith"}, {"id": "arith"}], {}]))
    section = st.dictionaries(st.sampled_from([k.split(".")[-1] for k in KEY_PATHS]), value, max_size=4)
    mapping = st.dictionaries(
        st.sampled_from(list(RunConfig.model_fields) + ["extra"]), st.one_of(value, section), max_size=5
    )
    return st.one_of(
        mapping.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
        mapping.map(json.dumps),
        st.lists(
            st.one_of(
                st.sampled_from(
                    [
                        "rl:\n",
                        "  steps: 3\n",
                        "env: {id: arith}\n",
                        "- 1\n",
                        "x: [\n",
                        "\t",
                        ":",
                        "&a [*a]\n",
                        "env: {options: {x: &b [*b]}}\n",
                        "!!binary AAA\n",
                        "\x00",
                    ]
                ),
                st.text(max_size=10),
            ),
            max_size=8,
        ).map("".join),
    )


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="safactory-fuzz-") as d:
        yield Path(d)


@pytest.mark.parametrize("examples", tiers(300))
def test_config_loader_gives_a_run_config_or_a_clear_error(scratch: Path, examples: int) -> None:
    path = scratch / "run.yaml"

    @fuzz(examples)
    @given(document=yaml_documents(), sets=overrides)
    def prop(document: str, sets: list[str]) -> None:
        path.write_text(document, encoding="utf-8", errors="surrogatepass")
        try:
            config = load_config(path, sets)
        except ValidationError:
            return
        except ValueError as exc:
            assert str(exc)
            return
        assert isinstance(config, RunConfig) and config.env is None and config.envs
        # a loaded config saves and loads back to the same config
        save_config(config, scratch / "saved")
        assert load_config(scratch / "saved" / "config.yaml").hash() == config.hash()

    run_property(prop, "config_loader_gives_a_run_config_or_a_clear_error", examples)


@pytest.mark.parametrize("examples", tiers(200))
def test_an_override_sets_exactly_its_field(scratch: Path, examples: int) -> None:
    """`--set section.key=value` with a value of the field's type sets that field and nothing else."""
    base = RunConfig()
    fields = [
        (section, key, type(getattr(getattr(base, section), key)))
        for section in ("rollout", "sft", "rl", "gate", "distill", "model")
        for key in type(getattr(base, section)).model_fields
        if type(getattr(getattr(base, section), key)) in (int, float, bool)
    ]
    by_type = {int: st.integers(0, 10**6), float: st.floats(0.01, 1e6), bool: st.booleans()}

    @fuzz(examples)
    @given(st.sampled_from(fields).flatmap(lambda f: st.tuples(st.just(f), by_type[f[2]])))
    def prop(item: tuple[tuple[str, str, type], Any]) -> None:
        (section, key, _), value = item
        try:
            config = load_config(None, [f"{section}.{key}={yaml.safe_dump(value).splitlines()[0]}"])
        except ValidationError:  # a bound of the field (gt=0, ...)
            return
        assert getattr(getattr(config, section), key) == value
        changed = config.model_dump()
        changed[section][key] = getattr(getattr(base, section), key)
        assert changed == base.model_dump()

    run_property(prop, "an_override_sets_exactly_its_field", examples)


# ---- 3. data import of a damaged export -------------------------------------------------------------


def source_trajectories() -> list[Trajectory]:
    """Six records of two runs: traced multi-turn episodes, unicode, NaN and infinities in info."""
    rng = random.Random(7)
    trajs = [synthetic_trajectory("src-a", rng, turns=2, tokens_per_turn=4) for _ in range(4)]
    odd = Trajectory(
        run_id="src-b",
        task=Task(id="ü", env_id="toy", split="train", prompt="naïve ✓"),
        env_id="toy",
        steps=[
            Step(
                index=0,
                action=Message(role="assistant", tool_calls=[ToolCall(id="c", name="f", arguments={"k": [1, "é"]})]),
                observation=[Message(role="tool", content="\u2028x\n", tool_call_id="c")],
                info={"loss": math.nan, "hi": math.inf},
            )
        ],
        error="line\nbreak",
        tags={"attempts": 1},
    )
    return [*trajs, odd, synthetic_trajectory("src-b", rng, turns=1, tokens_per_turn=3)]


@pytest.fixture(scope="module")
def export_lines(scratch: Path) -> list[bytes]:
    """A clean jsonl export (as stored, so with content hashes), line by line."""
    store = TrajectoryStore(f"sqlite:///{scratch / 'source.db'}")
    for run_id in ("src-a", "src-b"):
        store.create_run(run_id, {})
    store.add(source_trajectories())
    path = scratch / "clean.jsonl"
    export(store.query(), "jsonl", path)
    store.close()
    return path.read_bytes().splitlines(keepends=True)


def rehash(line: bytes) -> bytes:
    """The record with its content hash recomputed (a consistent edit), or the line as it was."""
    try:
        traj = Trajectory.model_validate_json(line)
        traj.content_hash = content_hash(traj)
    except Exception:  # not a record any more: leave it to the import to refuse
        return line
    return to_json(traj.model_dump(), inf_nan_mode="constants") + b"\n"


def set_path(node: Any, path: list[Any], value: Any) -> Any:
    """A copy of a JSON value with the element at `path` (indices taken modulo the sizes) replaced."""
    if not path or not isinstance(node, dict | list) or not node:
        return value
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    key = keys[path[0] % len(keys)]
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[key] = set_path(copy[key], path[1:], value)
    return copy


@st.composite
def damaged_exports(draw: st.DrawFn, lines: list[bytes]) -> bytes:
    """The clean export with one to three mutations: truncation, byte flips and insertions, lines
    dropped, doubled or swapped, a field set to another JSON value (with or without a rehash)."""
    out = list(lines)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "drop", "double", "swap", "field", "rehash"]))
        i = draw(st.integers(0, max(0, len(out) - 1)))
        if not out:
            out = [b""]
        if kind in ("truncate", "flip", "insert"):
            blob = b"".join(out)
            at = draw(st.integers(0, max(0, len(blob) - 1)))
            if kind == "truncate":
                blob = blob[:at]
            elif kind == "flip":
                blob = blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1 :]
            else:
                blob = blob[:at] + draw(st.binary(min_size=1, max_size=8)) + blob[at:]
            out = blob.splitlines(keepends=True)
        elif kind == "drop":
            del out[i]
        elif kind == "double":
            out.insert(i, out[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(out) - 1))
            out[i], out[j] = out[j], out[i]
        else:
            try:
                record = json.loads(out[i])
            except ValueError:
                continue
            path = draw(st.lists(st.integers(0, 50), min_size=1, max_size=5))
            line = (json.dumps(set_path(record, path, draw(json_values)), ensure_ascii=False) + "\n").encode()
            out[i] = rehash(line) if kind == "rehash" else line
    return b"".join(out)


def snapshot(store: TrajectoryStore) -> dict[str, str]:
    """id -> content hash of everything stored."""
    from sqlalchemy import select

    from safactory.data.schema import trajectories

    with store.engine.connect() as conn:
        return dict(conn.execute(select(trajectories.c.id, trajectories.c.content_hash)).all())  # type: ignore[arg-type]


@pytest.mark.parametrize("examples", tiers(150))
def test_a_damaged_export_is_refused_whole_or_imported_exactly(
    scratch: Path, export_lines: list[bytes], examples: int
) -> None:
    """Refused: a ValueError naming the row, and the store exactly as it was (nothing half-imported,
    nothing lost). Imported: every record stored once, as in the file, and the store verifies."""
    target = TrajectoryStore(f"sqlite:///{scratch / f'target-{examples}.db'}")
    target.create_run("kept", {})
    target.add([synthetic_trajectory("kept", random.Random(i)) for i in range(3)])
    path = scratch / "damaged.jsonl"
    outcomes = {"refused": 0, "imported": 0}

    @fuzz(examples)
    @given(damaged_exports(export_lines))
    def prop(data: bytes) -> None:
        path.write_bytes(data)
        before, runs_before = snapshot(target), set(target.run_ids())
        try:
            added = import_trajectories(target, path, batch_size=2)
        except ValueError as exc:
            outcomes["refused"] += 1
            assert re.match(rf"{re.escape(str(path))}:\d+: ", str(exc)), str(exc)
            assert snapshot(target) == before and set(target.run_ids()) == runs_before
            return
        outcomes["imported"] += 1
        after = snapshot(target)
        assert {k: after[k] for k in before} == before  # nothing already stored changed
        records = {t.id: t for t in read_trajectories(path)}
        assert set(after) - set(before) == set(records) - set(before) and added == len(set(after) - set(before))
        for traj in records.values():
            assert after[traj.id] == traj.content_hash or traj.id in before
        assert verify(target).ok

    run_property(prop, "a_damaged_export_is_refused_whole_or_imported_exactly", examples, outcomes)
    target.close()
    assert outcomes["refused"] and outcomes["imported"]  # both sides of the property were exercised


@pytest.mark.parametrize("examples", tiers(100))
def test_export_import_round_trip(scratch: Path, examples: int) -> None:
    """Any trajectory the store accepts comes back from a jsonl export + import exactly as stored."""
    texts = st.text(max_size=20)
    message = st.builds(Message, role=st.sampled_from(["user", "assistant", "tool", "system"]), content=texts)
    action = st.builds(
        Message,
        role=st.just("assistant"),
        content=texts,
        tool_calls=st.lists(st.builds(ToolCall, id=texts, name=texts, arguments=arguments), max_size=2),
    )
    info = st.dictionaries(texts, st.one_of(json_values, st.floats()), max_size=3)
    step = st.builds(
        Step,
        index=st.just(0),
        action=action,
        observation=st.lists(message, max_size=2),
        reward=st.one_of(st.none(), st.floats(-1e9, 1e9)),
        info=info,
        error=st.none() | texts,
    )
    task = st.builds(
        Task,
        id=texts,
        env_id=texts,
        split=st.sampled_from(["train", "test"]),
        prompt=texts,
        data=st.dictionaries(texts, json_scalars, max_size=2),
    )
    trajectory = st.builds(
        Trajectory,
        task=task,
        steps=st.lists(step, max_size=3),
        reward=st.floats(-1e9, 1e9),
        success=st.booleans(),
        termination=texts,
        error=st.none() | texts,
        tags=st.dictionaries(texts, json_scalars, max_size=2),
    )
    source = TrajectoryStore(f"sqlite:///{scratch / f'rt-src-{examples}.db'}")
    target = TrajectoryStore(f"sqlite:///{scratch / f'rt-dst-{examples}.db'}")
    path = scratch / "rt.jsonl"
    runs = iter(range(10**9))

    @fuzz(examples)
    @given(st.lists(trajectory, min_size=1, max_size=3))
    def prop(trajs: list[Trajectory]) -> None:
        run_id = f"rt-{next(runs)}"
        for i, traj in enumerate(trajs):
            traj.run_id, traj.id = run_id, f"{run_id}-{i}"
            traj.steps = [s.model_copy(update={"index": k}) for k, s in enumerate(traj.steps)]
        source.create_run(run_id, {})
        source.add(trajs)
        stored = source.query(run_id=run_id)
        export(stored, "jsonl", path)
        assert import_trajectories(target, path) == len(trajs)
        assert [json_form(t) for t in target.query(run_id=run_id)] == [json_form(t) for t in stored]

    run_property(prop, "export_import_round_trip", examples)
    report = verify(target)
    assert report.ok and report.checked == source.count(), report.problems
    source.close()
    target.close()


def json_form(traj: Trajectory) -> bytes:
    """A trajectory as comparable text (NaN equals NaN here), its chain link left out."""
    return to_json(traj.model_dump(exclude={"prev_hash"}), inf_nan_mode="constants")


# ---- regressions: the inputs the fuzzing found ------------------------------------------------------------


def test_regression_a_tool_call_whose_text_holds_the_closing_tag() -> None:
    """chat.py: the block ended at the first `</tool_call>`, also one inside a JSON string."""
    sent = [
        ToolCall(id="c", name="write", arguments={"text": "a </tool_call> b"}),
        ToolCall(id="d", name="</tool_call>"),
    ]
    calls, error = parse_json_tool_calls(tool_call_text(sent))
    assert error is None and [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in sent]
    calls, error = parse_json_tool_calls('<tool_call>{"name": "f", "arguments": {</tool_call> tail')
    assert calls == [] and error and error.startswith("malformed tool call JSON")


@pytest.mark.parametrize(
    "data",
    [{"choices": "nope"}, {"choices": ["nope"]}, [1, 2], None, {"choices": [{"message": "hi"}]},
     {"choices": [{"message": {"content": 5}}]}, {"choices": [{"message": {}, "logprobs": {"content": [{}]}}]},
     {"choices": [{"message": {}}], "safactory": {"choices": ["x"]}}],
)  # fmt: skip
def test_regression_a_malformed_chat_completion_is_an_endpoint_error(data: Any) -> None:
    """endpoint.py: a response of the wrong shape raised AttributeError, TypeError, KeyError, ..."""
    with pytest.raises(EndpointError, match="malformed chat completion"):
        completion_from_response(data, SamplingParams())


@pytest.mark.parametrize(
    "document, sets",
    [("x: [\n", []), ("a: *undefined\n", []), ("\x00", []), ("!!binary AAA\n", []), ("rl: {}\n", ["rl.lr=["]),
     ("", ["rl.lr=.nan"]), ("", ["env.options.n=.inf"]), ("", ["rl.lr=1e999"]),
     ("env: {options: {x: &a [*a]}}\n", [])],
)  # fmt: skip
def test_regression_config_errors_are_value_errors(scratch: Path, document: str, sets: list[str]) -> None:
    """config.py: YAML errors came out as yaml.YAMLError; NaN or infinity loaded, then failed to save."""
    path = scratch / "regression.yaml"
    path.write_text(document)
    with pytest.raises(ValueError):
        load_config(path, sets)


def test_regression_a_bad_row_leaves_nothing_imported(scratch: Path, export_lines: list[bytes]) -> None:
    """export.py: rows before a bad one were stored (batch by batch), and a row that is not UTF-8 or
    holds a token id past int32 raised UnicodeDecodeError or struct.error without naming its line."""
    record = json.loads(export_lines[0])
    record["steps"][0]["trace"]["completion_ids"][0] = 2**40
    too_big = rehash(json.dumps(record).encode() + b"\n")
    cases = {b"\xff\xfe\n": "not UTF-8", too_big: "cannot be encoded", b'{"id": 1}\n': "not a trajectory record"}
    for bad, why in cases.items():
        target = TrajectoryStore(f"sqlite:///{scratch / 'regression.db'}")
        path = scratch / "regression.jsonl"
        path.write_bytes(b"".join(export_lines[:5]) + bad + export_lines[5])
        with pytest.raises(ValueError, match=rf"regression.jsonl:6: .*{why}"):
            import_trajectories(target, path, batch_size=2)
        assert target.count() == 0 and target.run_ids() == []
        target.close()
