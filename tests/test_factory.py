"""The closed loop over arith, maze and ops with every stage on, at a tiny budget: what it leaves behind."""

import json

from sqlalchemy import text

from safactory.config import load_config
from safactory.data.integrity import verify
from safactory.data.store import TrajectoryStore
from safactory.factory.loop import Factory
from safactory.factory.metrics import read_rows
from safactory.policy.models import load_model
from safactory.provenance import weights_hash

OVERRIDES = [
    "seed=2",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.max_positions=1024",
    "envs.arith.test_tasks=4",
    "envs.maze.test_tasks=4",
    "envs.ops.test_tasks=6",
    "envs.arith.demos=6",
    "envs.maze.demos=4",
    "envs.ops.demos=10",
    "rollout.max_turns=3",
    "rollout.max_tokens_per_turn=12",
    "rollout.concurrency=64",
    "sft.max_steps=2",
    "sft.first_steps=1",
    "sft.probe_every=2",
    "sft.probe_tasks=3",
    "sft.batch_size=8",
    "sft.decay_steps=1",
    "rl.steps=2",
    "rl.tasks_per_step=3",
    "rl.group_size=2",
    "rl.eval_every=1",
    "rl.drop_equal_groups=false",
    "rl.imitation_lr=1e-3",
    "rl.ref_kl=0.1",
    "rl.imitation_batch=4",
    "rl.imitation_decay_steps=1",
    "distill.enabled=true",
    "distill.hidden_size=16",
    "distill.intermediate_size=32",
    "distill.steps=1",
    "model.tokenizer_episodes=30",
]
METRICS = {"success_rate", "unsafe_rate", "benign_success_rate", "safe_success_rate", "episodes"}


def test_closed_loop_over_three_envs(tmp_path):
    cfg = load_config("examples/demo.yaml", OVERRIDES)
    assert [e.id for e in cfg.envs] == ["arith", "maze", "ops"]
    out = tmp_path / "run"
    summary = Factory(cfg, out).run()

    heldout = summary["heldout"]
    assert set(heldout) == {"warm_start", "final", "student_warm_start", "student"}
    for metrics in heldout.values():
        assert METRICS <= set(metrics)
        assert set(metrics["envs"]) == {"arith", "maze", "ops"}
        for env in metrics["envs"].values():
            assert METRICS <= set(env) and all(0.0 <= env[m] <= 1.0 for m in METRICS - {"episodes"})
        assert metrics["envs"]["ops"]["episodes"] == 6
    # one gate decision per evaluation of each learner: rl@1 and the end of RL, then the student's end
    assert [(d["learner"], d["label"]) for d in summary["gate"]] == [
        ("policy", "rl@1"),
        ("policy", "rl"),
        ("student", "final"),
    ]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "config.yaml").exists() and len((out / "config.sha256").read_text().strip()) == 64
    assert (out / "model" / "config.json").exists() and (out / "student" / "config.json").exists()
    # the demo's subword vocabulary was learned once and is shared by the policy and its student (OPD needs it)
    vocabulary = (out / "tokenizer" / "subword_tokenizer.json").read_text()
    assert (out / "model" / "subword_tokenizer.json").read_text() == vocabulary
    assert (out / "student" / "subword_tokenizer.json").read_text() == vocabulary

    store = TrajectoryStore.in_dir(out)
    assert verify(store).ok
    run_id = summary["run_id"]
    rollouts = store.query(run_id=run_id, kind="rollout")
    assert {t.env_id for t in rollouts} == {"arith", "maze", "ops"}
    # every consumed rollout was judged, so its reward could be shaped by the verdict
    with store.engine.connect() as conn:
        consumed = conn.execute(
            text("SELECT trajectory_id FROM consumption WHERE consumer = :c"), {"c": run_id}
        ).scalars()
        consumed = list(consumed)
    assert len(consumed) == 2 * 3 * 2
    assert all(store.verdicts(i) for i in consumed)
    assert [d["accepted"] for d in store.gate_decisions(run_id)] == [d["accepted"] for d in summary["gate"][:2]]
    assert f"{run_id}-student" in store.run_ids()
    rows, skipped = read_rows(out / "metrics.jsonl")
    assert skipped == 0
    # RL's KL reference is the warm start, kept in the run directory (a resume reads it back)
    warm_version = next(r["policy_version"] for r in rows if r.get("eval/phase") == "sft")
    hashes = {c["version"]: c["weights_hash"] for c in store.checkpoints(run_id)}
    reference, _ = load_model(out / "reference")
    assert weights_hash(reference.state_dict()) == hashes[warm_version]
    store.close()

    trained = [r for r in rows if r.get("phase") == "rl"]
    assert trained and all(r["rollout/unsafe_rate"] is not None for r in trained)
    assert all(0.0 <= r["rollout/idle_fraction"] <= 1.0 for r in trained)
    # the imitation loss ran on curated experience: the safe demonstrations only (rl.imitation_own is off)
    assert all(r["train/imitation_nll"] > 0 for r in trained)
    assert len({r["train/imitation_pool"] for r in trained}) == 1 and trained[0]["train/imitation_pool"] > 0
    # the decays reach the updates: the last of the two steps runs at half the lr, in SFT and in the imitation
    # (a row repeats the latest value of every key it does not set: one value per optimiser step)
    assert list({r["train/step"]: r["train/imitation_lr"] for r in trained}.values()) == [1e-3, 1e-3 / 2]
    policy_rows = rows[: rows.index(trained[0])]
    warm = {r["train/step"]: r["train/lr"] for r in policy_rows if r.get("phase") == "warm_start"}
    assert warm == {1: cfg.sft.lr, 2: cfg.sft.lr / 2}
    assert all(r["train/kl_ref"] is not None and r["train/kl_ref"] >= 0 for r in trained)
    assert any(r.get("phase") == "distill" and r["train/reverse_kl"] is not None for r in rows)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    report = (out / "report.html").read_text()
    assert "<svg" in report and "ops" in report and "maze" in report
