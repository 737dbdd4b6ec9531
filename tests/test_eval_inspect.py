"""`safactory eval --inspect` and `safactory eval inspect DIR`: a real evaluation written as an inspect_ai
log and read back with inspect_ai's own reader, checked against eval.json and the stored episodes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.judges import RuleSafetyJudge
from safactory.data.store import TrajectoryStore

inspect_log = pytest.importorskip("inspect_ai.log")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """A safety-suite evaluation of the scripted experts, two attempts per task, with --inspect."""
    out = tmp_path_factory.mktemp("eval")
    runner = CliRunner()
    cmd = ["eval", "--policy", "scripted", "--suite", "safety", "--epochs", "2", "--out", str(out), "--inspect"]
    result = runner.invoke(app, cmd)
    assert result.exit_code == 0, result.output
    written = list((out / "inspect").glob("*.eval"))
    assert len(written) == 1, written
    written[0].unlink()
    result = runner.invoke(app, ["eval", "inspect", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _stored(out):
    data = json.loads((out / "eval.json").read_text())
    store = TrajectoryStore(data["store"])
    try:
        trajs = {t.id: t for t in store.iter(run_id=data["run_id"], kind="eval")}
    finally:
        store.close()
    return data, trajs


def test_log_reads_back_with_one_sample_per_episode(evaluation):
    data, trajs = _stored(evaluation)
    (path,) = list((evaluation / "inspect").glob("*.eval"))
    log = inspect_log.read_eval_log(str(path))
    overall = data["metrics"]["overall"]

    assert log.status == "success"
    assert log.eval.task == "safety" and log.eval.model == "scripted" and log.eval.run_id == data["run_id"]
    assert len(log.samples) == overall["episodes"] == len(trajs) == 200
    # every task once per attempt: ids are the task ids, epochs 1 and 2
    keys = Counter((s.id, s.epoch) for s in log.samples)
    assert set(keys.values()) == {1}
    assert {s.id for s in log.samples} == set(data["tasks"]["ops"])
    assert Counter(s.epoch for s in log.samples) == {1: 100, 2: 100}

    judge = RuleSafetyJudge()
    calls_checked = 0
    for sample in log.samples:
        traj = trajs[sample.metadata["trajectory_id"]]
        assert sample.id == traj.task.id and sample.metadata["env_id"] == "ops"
        assert sample.metadata["termination"] == traj.termination
        assert sample.input == next(m.content for m in traj.messages() if m.role == "user")
        # scores: success as C/I against the stored episode and eval.json's attempts
        assert sample.scores["success"].value == ("C" if traj.success else "I")
        assert data["tasks"]["ops"][sample.id][sample.epoch - 1] == traj.success
        assert sample.scores["reward"].value == pytest.approx(traj.reward)
        assert sample.scores["unsafe"].value == int(bool(judge.judge(traj).unsafe))
        assert sample.scores["success"].metadata["unsafe"] == bool(judge.judge(traj).unsafe)
        # the conversation, message by message
        ours = traj.messages()
        assert [m.role for m in sample.messages] == [m.role for m in ours]
        for theirs, mine in zip(sample.messages, ours, strict=True):
            assert theirs.text == mine.content
            if mine.role == "assistant" and mine.tool_calls:
                got = [(c.id, c.function, c.arguments) for c in theirs.tool_calls]
                assert got == [(c.id, c.name, c.arguments) for c in mine.tool_calls]
                assert all(isinstance(c.arguments, dict) for c in theirs.tool_calls)
                calls_checked += len(got)
            if mine.role == "tool":
                assert theirs.tool_call_id == mine.tool_call_id and theirs.tool_call_id
                assert theirs.function == mine.name
    assert calls_checked > 200

    # a tool call with arguments survived as a dict
    reads = [c for s in log.samples for m in s.messages if m.role == "assistant" for c in m.tool_calls or []]
    assert any(c.function == "read" and isinstance(c.arguments.get("path"), str) for c in reads)

    scores = {s.name: s for s in log.results.scores}
    assert scores["success"].metrics["success_rate"].value == pytest.approx(overall["success_rate"]["value"])
    assert scores["success"].metrics["success_rate"].metadata["n"] == 200
    assert scores["unsafe"].metrics["unsafe_rate"].value == pytest.approx(overall["unsafe_rate"]["value"])
    assert scores["reward"].metrics["mean_reward"].value == pytest.approx(overall["mean_reward"]["value"])
    assert log.results.total_samples == 200


def test_json_format_and_missing_eval(evaluation, tmp_path):
    from safactory.jobs.eval_inspect import write_inspect_log

    path = write_inspect_log(evaluation, tmp_path / "log.json")
    log = inspect_log.read_eval_log(str(path))
    assert path.suffix == ".json" and len(log.samples) == 200
    assert json.loads(path.read_text())["eval"]["task"] == "safety"

    result = CliRunner().invoke(app, ["eval", "inspect", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "eval.json" in result.output
