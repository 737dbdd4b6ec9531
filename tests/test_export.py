"""Export -> import round trips; TRL-format exports load with `datasets`."""

import asyncio
import json

import pytest
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.export import export, import_trajectories
from safactory.data.integrity import verify
from safactory.data.store import TrajectoryStore
from safactory.policy.base import SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv, ArithExpert
from safactory.sim.runner import RolloutRunner


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
    assert call["name"] == "calc" and "expression" in json.loads(call["arguments"])
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
