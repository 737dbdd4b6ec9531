"""`safactory train`: resume after kill -9 without repeating or skipping data; OPD and decoupled checks."""

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.integrity import verify
from safactory.data.store import TrajectoryStore
from safactory.evolve.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from safactory.evolve.experience import rl_sequences
from safactory.evolve.teacher import LocalTeacher, check_tokenizers, distill
from safactory.evolve.trainer import Trainer
from safactory.policy.base import SamplingParams
from safactory.policy.models import save_model
from safactory.policy.tokenizer import CharTokenizer
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv, ArithExpert
from safactory.sim.runner import RolloutRunner

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from safactory.cli import main; main()"]


@pytest.fixture
def demo_store(tmp_path, arith_tasks):
    url = f"sqlite:///{tmp_path / 'data.db'}"
    store = TrajectoryStore(url)
    store.create_run("data", {})
    runner = RolloutRunner(ArithEnv, ArithExpert(), limits=EpisodeLimits(), run_id="data")
    groups = asyncio.run(runner.run_groups(arith_tasks.tasks("train", 40), 1, SamplingParams(), kind="expert"))
    store.add([t for g in groups for t in g])
    store.close()
    return url


@pytest.fixture(scope="module")
def hf_chat_dir(tmp_path_factory):
    """A random-init tiny Llama saved with SmolLM2's real tokenizer and chat template."""
    from tests.real_tokenizers import random_llama, smollm2_tokenizer

    directory = tmp_path_factory.mktemp("hf-chat")
    tokenizer = smollm2_tokenizer()
    random_llama(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("model", ["tiny", "hf-lora"])
def test_resume_after_kill_9_neither_repeats_nor_skips(model, demo_store, tmp_path, request):
    out = tmp_path / "job"
    args = ["train", "--db", demo_store, "--out", str(out), "--mode", "sft", "--steps", "50"]
    args += ["--batch-size", "4", "--checkpoint-every", "2"]
    if model == "hf-lora":  # an HF chat model with its own template, training a LoRA adapter
        args += ["--model", str(request.getfixturevalue("hf_chat_dir")), "--lora-r", "4"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(CLI + args, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    while True:
        line = proc.stdout.readline()
        assert line, "trainer ended before step 5"
        if line.startswith("{") and json.loads(line)["step"] == 5:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert read_meta(latest_checkpoint(out / "checkpoints")).train_step == 4
    if model == "hf-lora":  # the checkpoint is the adapter alone
        assert (latest_checkpoint(out / "checkpoints") / "adapter_model.safetensors").is_file()

    done = subprocess.run(
        CLI + ["train", "--out", str(out), "--resume"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "resumed from step-000004" in done.stdout and "4 consumptions of lost steps released" in done.stdout
    steps = [json.loads(line)["step"] for line in done.stdout.splitlines() if line.startswith("{")]
    assert steps == list(range(5, 11))  # continues at the step after the checkpoint, to the end of the data

    consumer = json.loads((out / "train.json").read_text())["consumer"]
    store = TrajectoryStore(demo_store)
    with store.engine.connect() as conn:
        from sqlalchemy import text

        rows = conn.execute(
            text("SELECT trajectory_id, train_step FROM consumption WHERE consumer = :c"), {"c": consumer}
        ).all()
    assert len(rows) == 40 and len({r[0] for r in rows}) == 40  # every demo exactly once
    assert {r[1] for r in rows} == set(range(1, 11))
    assert store.query(unconsumed_by=consumer) == []
    assert verify(store).ok
    # each checkpoint row names the checkpoint it was trained from, across the kill too
    lineage = [(c["version"], c["parent_version"]) for c in store.checkpoints(consumer)]
    assert lineage == [(2, None), (4, 2), (6, 4), (8, 6), (10, 8)]
    store.close()


class Killed(BaseException):
    """Stands for a kill -9: nothing after it runs (not even `finally` cleanup that matters here)."""


def test_resume_before_the_first_checkpoint_trains_every_trajectory_once(demo_store, tmp_path):
    from safactory.jobs.train import OfflineTrainer, TrainJob

    def killed_after_step_3(line: str) -> None:
        if line.startswith("{") and json.loads(line)["step"] == 3:
            raise Killed  # steps 1-3 are recorded as consumed, but no checkpoint holds their updates

    job = TrainJob(db=demo_store, out=str(tmp_path / "job"), steps=50, batch_size=4, checkpoint_every=4)
    with pytest.raises(Killed):
        OfflineTrainer(job, log=killed_after_step_3).run()
    assert latest_checkpoint(tmp_path / "job" / "checkpoints") is None

    said: list[str] = []
    result = OfflineTrainer.resume(tmp_path / "job", log=said.append).run()
    assert "12 consumptions released" in said[0]
    steps = [json.loads(line)["step"] for line in said if line.startswith("{")]
    assert steps == list(range(1, 11)) and result["step"] == 10  # all 40 demos train the final model
    store = TrajectoryStore(demo_store)
    with store.engine.connect() as conn:
        from sqlalchemy import text

        rows = conn.execute(
            text("SELECT trajectory_id, train_step FROM consumption WHERE consumer = :c"), {"c": job.consumer}
        ).all()
    assert len(rows) == len({r[0] for r in rows}) == 40
    assert sorted(Counter(r[1] for r in rows).items()) == [(step, 4) for step in range(1, 11)]
    lineage = [(c["version"], c["parent_version"]) for c in store.checkpoints(job.consumer)]
    assert lineage == [(4, None), (8, 4), (10, 8)]
    assert read_meta(Path(result["checkpoint"])).parent_version == 8
    store.close()


def test_checkpoint_round_trip_and_atomic_latest(tiny, tmp_path):
    model, tok = tiny
    trainer = Trainer(copy.deepcopy(model), pad_id=tok.pad_id)
    path = save_checkpoint(
        tmp_path,
        model=trainer.model,
        tokenizer=tok,
        optimizer=trainer.optimizer,
        version=3,
        parent_version=2,
        train_step=7,
        consumed_ids=["a", "b"],
    )
    assert latest_checkpoint(tmp_path) == path
    again, meta = load_checkpoint(path)
    assert meta.version == 3 and meta.parent_version == 2 and meta.consumed_count == 2
    assert all(
        torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), again.state_dict().values(), strict=True)
    )
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(Exception):  # noqa: B017 - corrupt weights never load silently
        load_checkpoint(path)


def _rollouts(policy, arith_tasks, temperature=1.0):
    runner = RolloutRunner(ArithEnv, policy, limits=EpisodeLimits(max_tokens_per_turn=12))
    groups = asyncio.run(runner.run_groups(arith_tasks.tasks("train", 3), 2, SamplingParams(temperature=temperature)))
    return [s for g in groups for t in g for s in rl_sequences(t)]


def test_opd_with_the_student_as_teacher_changes_nothing(policy, tiny, arith_tasks):
    seqs = _rollouts(policy, arith_tasks)
    student = Trainer(copy.deepcopy(policy.model), pad_id=tiny[1].pad_id)
    teacher = LocalTeacher(copy.deepcopy(policy.model), tiny[1], tiny[1], pad_id=tiny[1].pad_id)
    stats = distill(seqs, teacher.score(seqs))
    assert abs(stats["reverse_kl"]) < 1e-4
    result = student.train_step(seqs, "opd")
    # only float32 round-off is left (trace log-probs are stored at float32 precision)
    assert abs(result["loss"]) < 1e-6 and result["grad_norm"] < 1e-4


def test_mismatched_tokenizers_are_refused(tiny):
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_tokenizers(tiny[1], CharTokenizer("abc"))


def test_decoupled_equals_ppo_on_fresh_data_and_differs_on_stale(policy, tiny, arith_tasks):
    """eta = 0: proximal == behaviour, so the decoupled objective reproduces synchronous PPO."""
    seqs = _rollouts(policy, arith_tasks, temperature=0.8)
    grads = {}
    for objective in ("ppo", "decoupled"):
        trainer = Trainer(copy.deepcopy(policy.model), pad_id=tiny[1].pad_id, grad_clip=1e9)
        for s in seqs:
            s.advantage = 1.0 if s.trajectory_id < seqs[len(seqs) // 2].trajectory_id else -1.0
        trainer.fill_proximal(seqs)
        stats = trainer.train_step(seqs, objective)
        grads[objective] = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
        if objective == "decoupled":
            assert stats["proximal_behaviour_mismatch"] < 1e-4
    assert torch.allclose(grads["ppo"], grads["decoupled"], atol=1e-6)
    # stale data: the proximal policy moved away from the behaviour policy -> different update
    stale = Trainer(copy.deepcopy(policy.model), pad_id=tiny[1].pad_id, lr=1e-2)
    stale.train_step(seqs, "ppo")
    stale.fill_proximal(seqs)
    stats = stale.train_step(seqs, "decoupled")
    assert stats["proximal_behaviour_mismatch"] > 1e-3


def test_saved_model_dir_trains_as_model(demo_store, tiny, tmp_path):
    save_model(tiny[0], tiny[1], tmp_path / "m")
    from safactory.jobs.train import OfflineTrainer, TrainJob

    job = TrainJob(db=demo_store, out=str(tmp_path / "j"), model=str(tmp_path / "m"), steps=2, batch_size=8)
    result = OfflineTrainer(job, log=lambda _: None).run()
    assert result["step"] == 2 and Path(result["checkpoint"]).exists()


def test_training_on_a_store_without_that_kind_of_data_says_what_it_holds(demo_store, tmp_path):
    result = CliRunner().invoke(app, ["train", "--db", demo_store, "--out", str(tmp_path / "j"), "--mode", "rl"])
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)
    assert "no unconsumed rollout trajectories" in str(result.exception) and "40 expert" in str(result.exception)
