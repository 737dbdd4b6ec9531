"""kill -9 in the middle of RL, then `safactory run --resume`: nothing lost, nothing repeated, versions go on."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from rich.console import Console
from sqlalchemy import text
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.integrity import verify
from safactory.data.store import TrajectoryStore
from tests.factory_runs import ARITH

STEPS, GROUPS, G, KILL_AFTER = 30, 4, 4, 7
OVERRIDES = [
    *ARITH,
    "sft.enabled=false",
    f"rl.steps={STEPS}",
    f"rl.tasks_per_step={GROUPS}",
    f"rl.group_size={G}",
    "rl.eta=1",
    "rl.eval_every=0",
    "rl.drop_equal_groups=false",
    "rl.temperature=1.5",
    "checkpoint_every=3",
    "gate.enabled=false",
    "model.tokenizer=subword",
    "model.tokenizer_episodes=100",
]
CLI = "from safactory.cli import app; app()"


def rl_step(out):
    """The last RL training step recorded in metrics.jsonl (0 before RL)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("phase") == "rl":
            step = max(step, row["train/step"])
    return step


def test_kill_9_then_resume(tmp_path):
    out = tmp_path / "run"
    args = ["run", "examples/arith.yaml", "--out", str(out)]
    for o in OVERRIDES:
        args += ["--set", o]
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while rl_step(out) < KILL_AFTER:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = rl_step(out)
    assert killed_at < STEPS, "the run finished before it could be killed"
    assert not (out / "summary.json").exists()

    store = TrajectoryStore.in_dir(out)
    run_id = store.run_ids()[0]
    versions_before = [c["version"] for c in store.checkpoints(run_id)]
    store.close()
    vocabulary = out / "tokenizer" / "subword_tokenizer.json"
    learned = vocabulary.stat().st_mtime_ns, vocabulary.read_text()

    result = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == run_id and summary["rl"]["steps"] == STEPS

    store = TrajectoryStore.in_dir(out)
    assert verify(store).ok
    rollouts = store.query(run_id=run_id, kind="rollout")
    ids = [t.id for t in rollouts]
    assert len(ids) == len(set(ids))
    # every group is complete and no episode was run twice under the same group
    sizes = Counter(t.group_id for t in rollouts)
    assert set(sizes.values()) == {G}
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT trajectory_id, train_step FROM consumption WHERE consumer = :c"), {"c": run_id}
        ).all()
    consumed = [r[0] for r in rows]
    assert len(consumed) == len(set(consumed)) == STEPS * GROUPS * G
    # each RL step consumed exactly one batch: lost steps were released and trained again
    per_step = Counter(r[1] for r in rows)
    assert sorted(per_step) == list(range(1, STEPS + 1)) and set(per_step.values()) == {GROUPS * G}
    # the version sequence continues: no number reused, the first new version names a checkpoint as parent
    checkpoints = store.checkpoints(run_id)
    versions = [c["version"] for c in checkpoints]
    assert versions == list(range(len(versions)))
    resumed = checkpoints[len(versions_before)]
    assert resumed["version"] == max(versions_before) + 1
    assert resumed["parent_version"] in versions_before
    store.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in rows]
    assert times == sorted(times)
    # the resumed run kept the vocabulary it had learned (not relearned), and the saved model carries it
    assert (vocabulary.stat().st_mtime_ns, vocabulary.read_text()) == learned
    assert (out / "model" / "subword_tokenizer.json").read_text() == learned[1]


class Killed(BaseException):
    """Stands for a kill -9 at that point: nothing is saved after it."""


def test_a_resumed_summary_counts_the_episodes_the_store_consumed(tmp_path, monkeypatch):
    """Killed after the last RL step's checkpoint but before the milestone that saves the summary:
    the resumed run has no step left to take, and its episode count still matches the store."""
    import safactory.factory.online as online
    from safactory.config import load_config
    from safactory.factory.loop import Factory
    from safactory.factory.run_state import RunState

    steps, groups, size = 4, 2, 2
    overrides = [*ARITH, "sft.enabled=false", f"rl.steps={steps}", f"rl.tasks_per_step={groups}"]
    overrides += [f"rl.group_size={size}", "rl.eval_every=0", "checkpoint_every=2", "gate.enabled=false"]
    config = load_config("examples/arith.yaml", overrides)
    out = tmp_path / "run"
    real_checkpoint = online.checkpoint

    def checkpoint_then_killed(learner, step):
        real_checkpoint(learner, step)
        if step == steps:
            monkeypatch.setattr(RunState, "save", lambda self, out: None)
            raise Killed

    monkeypatch.setattr(online, "checkpoint", checkpoint_then_killed)
    with pytest.raises(Killed):
        Factory(config, out, console=Console(file=io.StringIO())).run()
    monkeypatch.undo()
    assert json.loads((out / "state.json").read_text())["summary"]["rl_episodes"] < steps * groups * size

    summary = Factory(config, out, console=Console(file=io.StringIO()), resume=True).run()
    store = TrajectoryStore.in_dir(out)
    with store.engine.connect() as conn:
        consumed = conn.execute(
            text("SELECT count(*) FROM consumption WHERE consumer = :c"), {"c": summary["run_id"]}
        ).scalar_one()
    store.close()
    assert consumed == steps * groups * size
    assert summary["rl_episodes"] == summary["rl"]["episodes"] == consumed
