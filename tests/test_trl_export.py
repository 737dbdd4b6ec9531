"""The `trl` export through real chat templates, and one TRL `SFTTrainer` step on it.

Two tool episodes are stored in a SQLite store and exported with `format="trl"`. Qwen3's
template must write each tool call once, arguments as a JSON object, with the tool results;
SmolLM2's template (no tool support) must still render every plain message. Then TRL's
`SFTTrainer` takes one optimiser step on the exported file with a tiny random Qwen3 model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from safactory.data.store import TrajectoryStore
from safactory.jobs.export import export
from safactory.types import Message, Step, Task, ToolCall, ToolSpec, Trajectory
from tests.real_tokenizers import qwen3_tokenizer, random_qwen3, smollm2_tokenizer

datasets = pytest.importorskip("datasets")

CALC = ToolSpec(
    name="calc",
    description="Evaluate an arithmetic expression.",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
)
LOOKUP = ToolSpec(
    name="lookup",
    description="Translate a word into German.",
    parameters={
        "type": "object",
        "properties": {"word": {"type": "string"}, "lang": {"type": "string"}},
        "required": ["word"],
    },
)
# a Qwen3 rendering writes each call as `<tool_call>\n{"name": "NAME", ...`; its tools preamble
# shows the shape with an unquoted `<function-name>`, which this does not match
RENDERED_CALL = re.compile(r'<tool_call>\n\{"name": "([^"]+)"')


def call_block(call: ToolCall) -> str:
    """A call as our agent stores it in the assistant's reply text."""
    return "<tool_call>\n" + json.dumps({"name": call.name, "arguments": call.arguments}) + "\n</tool_call>"


def calc_then_lookup() -> Trajectory:
    """Free text before a `<tool_call>` block, then a plain-text call, then the answer."""
    calc = ToolCall(id="call_0", name="calc", arguments={"expression": "3+4"})
    lookup = ToolCall(id="call_1", name="lookup", arguments={"word": "seven"})
    steps = [
        Step(
            index=0,
            action=Message(role="assistant", content="Let me compute that.\n" + call_block(calc), tool_calls=[calc]),
            observation=[Message(role="tool", content="7", tool_call_id="call_0", name="calc")],
        ),
        Step(
            index=1,
            action=Message(role="assistant", content="lookup(seven)", tool_calls=[lookup]),
            observation=[Message(role="tool", content="sieben", tool_call_id="call_1", name="lookup")],
        ),
        Step(index=2, action=Message(role="assistant", content="3+4 is seven, in German sieben."), reward=1.0),
    ]
    prompt = [
        Message(role="system", content="You are a careful assistant."),
        Message(role="user", content="What is 3+4, in German?"),
    ]
    task = Task(id="t0", env_id="toy", split="train", prompt=prompt[1].content)
    return Trajectory(
        run_id="r", task=task, env_id="toy", prompt=prompt, tools=[CALC, LOOKUP], steps=steps, reward=1.0, success=True
    )


def parallel_calls() -> Trajectory:
    """Two calls in one turn written as a bare JSON list, then the answer."""
    calls = [
        ToolCall(id="call_0", name="calc", arguments={"expression": "2*5"}),
        ToolCall(id="call_1", name="calc", arguments={"expression": "9-1"}),
    ]
    bare = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
    steps = [
        Step(
            index=0,
            action=Message(role="assistant", content=bare, tool_calls=calls),
            observation=[
                Message(role="tool", content="10", tool_call_id="call_0", name="calc"),
                Message(role="tool", content="8", tool_call_id="call_1", name="calc"),
            ],
        ),
        Step(index=1, action=Message(role="assistant", content="They are 10 and 8."), reward=0.5),
    ]
    prompt = [Message(role="user", content="What are 2*5 and 9-1?")]
    task = Task(id="t1", env_id="toy", split="train", prompt=prompt[0].content)
    return Trajectory(run_id="r", task=task, env_id="toy", prompt=prompt, tools=[CALC], steps=steps, reward=0.5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Trajectory], Path]:
    """The stored trajectories by id and the `trl` export of the store."""
    work = tmp_path_factory.mktemp("trl")
    store = TrajectoryStore(f"sqlite:///{work / 'store.db'}")
    store.create_run("r", {})
    store.add([calc_then_lookup(), parallel_calls()])
    stored = store.query()
    path = work / "trl.jsonl"
    assert export(stored, "trl", path) == 2
    store.close()
    return {t.id: t for t in stored}, path


@pytest.fixture(scope="module")
def rows(exported: tuple[dict[str, Trajectory], Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in exported[1].read_text().splitlines()]


@pytest.fixture(scope="module")
def qwen3() -> Any:
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def smollm2() -> Any:
    return smollm2_tokenizer()


def render(tokenizer: Any, row: dict[str, Any]) -> str:
    return str(tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False))


def test_rows_hold_argument_objects_and_no_call_text(exported, rows) -> None:
    stored, _ = exported
    assert len(rows) == 2
    for row in rows:
        traj = stored[row["trajectory_id"]]
        assert (row["reward"], row["success"], row["env_id"], row["task_id"]) == (
            traj.reward,
            traj.success,
            "toy",
            traj.task.id,
        )
        assert [t["function"]["name"] for t in row["tools"]] == [t.name for t in traj.tools]
        assert [m["role"] for m in row["messages"]] == [m.role for m in traj.messages()]
        for out, message in zip(row["messages"], traj.messages(), strict=True):
            if message.tool_calls:
                assert "<tool_call>" not in out["content"]
                assert [c["function"]["arguments"] for c in out["tool_calls"]] == [
                    c.arguments for c in message.tool_calls
                ]
                assert all(isinstance(c["function"]["arguments"], dict) for c in out["tool_calls"])
            else:
                assert out["content"] == message.content
            if message.role == "tool":
                assert (out["tool_call_id"], out["name"]) == (message.tool_call_id, message.name)
    contents = {row["task_id"]: [m["content"] for m in row["messages"] if m.get("tool_calls")] for row in rows}
    assert contents == {"t0": ["Let me compute that.", ""], "t1": [""]}


def test_qwen3_template_writes_each_call_once(exported, rows, qwen3) -> None:
    stored, path = exported
    loaded = datasets.load_dataset("json", data_files=str(path), split="train")
    for row, back in zip(rows, loaded, strict=True):
        traj = stored[row["trajectory_id"]]
        text = render(qwen3, row)
        assert render(qwen3, back) == text  # what TRL reads through `datasets` renders the same
        calls = [c for m in traj.messages() for c in m.tool_calls]
        assert RENDERED_CALL.findall(text) == [c.name for c in calls]
        for call in calls:
            assert text.count(json.dumps({"name": call.name, "arguments": call.arguments})) == 1
        assert '"arguments": "' not in text  # never an escaped JSON string
        for message in traj.messages():
            if message.role == "tool":
                assert f"<tool_response>\n{message.content}\n</tool_response>" in text
        for spec in traj.tools:
            assert f'"name": "{spec.name}", "description": "{spec.description}"' in text
    first = render(qwen3, next(r for r in rows if r["task_id"] == "t0"))
    assert first.count("Let me compute that.") == 1
    assert "lookup(seven)" not in first


def test_smollm2_template_renders_every_plain_message(exported, rows, smollm2) -> None:
    stored, _ = exported
    for row in rows:
        text = render(smollm2, row)
        for message in stored[row["trajectory_id"]].messages():
            if not message.tool_calls:
                assert message.content in text
        assert "<tool_call>" not in text


def test_sft_trainer_takes_a_step_on_the_export(exported, qwen3, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    trl = pytest.importorskip("trl")
    stored, path = exported
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    model = random_qwen3(qwen3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        activation_checkpointing=False,
        # the Qwen3 template shipped by the npm package has no `{% generation %}` markers and TRL
        # cannot patch it, so the loss covers the whole conversation
        assistant_only_loss=False,
    )
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=qwen3)
    # `messages` and `tools` reached the template: the tokenised rows hold the tool list and the calls
    for example in trainer.train_dataset:
        text = qwen3.decode(example["input_ids"])
        traj = stored[example["trajectory_id"]]
        assert "<tools>" in text and all(f'"name": "{t.name}"' in text for t in traj.tools)
        for call in (c for m in traj.messages() for c in m.tool_calls):
            assert text.count(json.dumps({"name": call.name, "arguments": call.arguments})) == 1
    result = trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert changed
