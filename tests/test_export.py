"""Export -> import round trips; TRL-format exports load with `datasets`."""

import asyncio
import json
import math

import pytest
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.integrity import verify
from safactory.data.store import TrajectoryStore
from safactory.jobs.export import export, import_trajectories, read_trajectories
from safactory.policy.base import SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv, ArithExpert
from safactory.sim.runner import RolloutRunner
from safactory.types import Message, Step, Task, Trajectory


def small(i: int = 0, **fields: object) -> Trajectory:
    """A one-step episode built by hand (no model needed)."""
    step = Step(index=0, action=Message(role="assistant", content=f"answer {i}"), reward=1.0)
    task = Task(id=f"t{i}", env_id="toy", split="train", prompt="p")
    return Trajectory(run_id="r", task=task, env_id="toy", steps=[step], **fields)


@pytest.fixture
def source(tmp_path, policy, arith_tasks):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'src.db'}")
    store.create_run("r", {})
    tasks = arith_tasks.tasks("train", 4)
    model = RolloutRunner(ArithEnv, policy, limits=EpisodeLimits(max_tokens_per_turn=10), run_id="r")
    expert = RolloutRunner(ArithEnv, ArithExpert(), limits=EpisodeLimits(), run_id="r")
    groups = asyncio.run(model.run_groups(tasks, 2, SamplingParams(temperature=1.0)))
    groups += asyncio.run(expert.run_groups(tasks, 1, SamplingParams(), kind="expert"))
    store.add([t for g in groups for t in g])
    yield store
    store.close()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_lossless_round_trip(source, store_url, tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    original = source.query()
    assert export(original, fmt, path) == len(original)
    target = TrajectoryStore(store_url)
    assert import_trajectories(target, path) == len(original)
    assert import_trajectories(target, path) == 0  # idempotent
    back = target.query()
    assert [t.model_dump() for t in back] == [t.model_dump() for t in original]
    assert verify(target).ok
    target.close()


def test_import_refuses_a_tampered_export(source, tmp_path):
    path = tmp_path / "out.jsonl"
    export(source.query(), "jsonl", path)
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["reward"] = 42.0
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    target = TrajectoryStore(f"sqlite:///{tmp_path / 'dst.db'}")
    with pytest.raises(ValueError, match="content hash"):
        import_trajectories(target, path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_round_trip_keeps_nan_and_infinities(tmp_path, fmt: str) -> None:
    """Non-finite floats in free-form dicts are written as such, so the hash still matches on import."""
    source = TrajectoryStore(f"sqlite:///{tmp_path / 'src.db'}")
    source.create_run("r", {})
    traj = small()
    traj.steps[0].info = {"loss": float("nan"), "hi": float("inf"), "lo": float("-inf")}
    source.add([traj])
    path = tmp_path / f"out.{fmt}"
    export(source.query(), fmt, path)
    target = TrajectoryStore(f"sqlite:///{tmp_path / 'dst.db'}")
    assert import_trajectories(target, path) == 1
    info = target.query()[0].steps[0].info
    assert math.isnan(info["loss"]) and info["hi"] == math.inf and info["lo"] == -math.inf
    assert verify(target).ok
    source.close()
    target.close()


def test_parquet_column_null_in_the_first_batch(tmp_path) -> None:
    """A column all null in the first 1000 rows still takes the strings of later rows."""
    trajs = [small(i) for i in range(1001)]
    trajs[-1].error = "env crashed"
    path = tmp_path / "out.parquet"
    assert export(trajs, "parquet", path) == 1001
    back = list(read_trajectories(path))
    assert [t.error for t in back[-2:]] == [None, "env crashed"]


def test_import_refuses_a_record_without_hash(source, tmp_path) -> None:
    """Blanking the hash of an edited record does not get it past the import check."""
    path = tmp_path / "out.jsonl"
    export(source.query(), "jsonl", path)
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["reward"] = 42.0
    record["content_hash"] = ""
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    target = TrajectoryStore(f"sqlite:///{tmp_path / 'dst.db'}")
    with pytest.raises(ValueError, match=f"out.jsonl:2: trajectory {record['id']} has no content hash"):
        import_trajectories(target, path)
    assert record["id"] not in {t.id for t in target.query()}
    target.close()


def test_trl_export_loads_with_datasets(source, tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "trl.jsonl"
    export(source.query(kind="expert"), "trl", path)
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert len(ds) == 4
    row = ds[0]
    roles = [m["role"] for m in row["messages"]]
    assert roles[:3] == ["user", "assistant", "tool"]
    call = row["messages"][1]["tool_calls"][0]["function"]
    assert call["name"] == "calc" and "expression" in call["arguments"]
    assert {t["function"]["name"] for t in row["tools"]} == {"calc", "answer"}
    assert row["success"] is True


def test_rl_export_is_token_exact(source, tmp_path):
    path = tmp_path / "rl.jsonl"
    rollouts = source.query(kind="rollout")
    export(rollouts, "rl", path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    sampled: dict[str, list[int]] = {}
    for row in rows:  # a trajectory gives several rows when a turn hit the token limit
        ids = [i for i, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m]
        sampled.setdefault(row["trajectory_id"], []).extend(ids)
    assert sampled == {t.id: [i for s in t.steps for i in s.trace.completion_ids] for t in rollouts}


def test_cli_export_import_stats(source, tmp_path):
    src = source.url
    out = tmp_path / "cli.jsonl"
    result = CliRunner().invoke(app, ["data", "export", "--db", src, "--out", str(out), "--kind", "expert"])
    assert result.exit_code == 0, result.output
    dst = f"sqlite:///{tmp_path / 'cli.db'}"
    result = CliRunner().invoke(app, ["data", "import", "--db", dst, str(out)])
    assert result.exit_code == 0 and "imported 4" in result.output
    result = CliRunner().invoke(app, ["data", "query", "--db", dst, "--json", "--limit", "2"])
    assert result.exit_code == 0 and len(result.output.strip().splitlines()) == 2
    result = CliRunner().invoke(app, ["data", "stats", "--db", dst])
    assert result.exit_code == 0 and "expert" in result.output
