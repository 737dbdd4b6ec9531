"""`safactory train`: SFT, RL or on-policy distillation on data already in a store, resumable.

The job is one consumer of the store: each optimiser step takes trajectories this
consumer has not used, trains on them, then records their consumption with the step
number. Every `checkpoint_every` steps it writes a checkpoint, recorded in the store with
the checkpoint before it as parent. After a crash (even kill -9), `resume` loads the last
checkpoint (none yet: the initial weights) and releases the consumption of later steps,
whose updates were lost with the process; so the final model has seen every eligible
trajectory exactly once.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from safactory.data.store import TrajectoryStore
from safactory.evolve.checkpoint import save_checkpoint
from safactory.evolve.experience import TrainSequence, group_batch, rl_sequences, sft_sequence
from safactory.evolve.resume import resume_trainer
from safactory.evolve.teacher import LocalTeacher, distill
from safactory.evolve.trainer import Trainer
from safactory.policy.chat import PlainTextChat
from safactory.policy.models import TinyModelSpec, build_tiny, load_model
from safactory.types import Trajectory, uuid7

Mode = Literal["sft", "rl", "opd"]
JOB_FILE = "train.json"


@dataclass
class TrainJob:
    """One offline training job (saved as OUT/train.json so `--resume` needs only OUT)."""

    db: str
    out: str
    mode: Mode = "sft"
    model: str = "tiny"
    teacher: str | None = None
    data_run: str | None = None
    kind: str | None = None
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    clip_eps: float = 0.2
    kl_coef: float = 1.0
    checkpoint_every: int = 10
    seed: int = 0
    consumer: str = field(default_factory=lambda: f"train-{uuid7()}")

    def default_kind(self) -> str:
        return self.kind or ("expert" if self.mode == "sft" else "rollout")


class OfflineTrainer:
    def __init__(self, job: TrainJob, log: Callable[[str], None] = print) -> None:
        self.job = job
        self.log = log
        self.out = Path(job.out)
        self.ckpt_root = self.out / "checkpoints"
        self.store = TrajectoryStore(job.db)
        self.rng = random.Random(job.seed)

    @classmethod
    def resume(cls, out: Path, log: Callable[[str], None] = print) -> OfflineTrainer:
        data = json.loads((out / JOB_FILE).read_text())
        return cls(TrainJob(**data), log)

    def _setup(self) -> None:
        job = self.job
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{JOB_FILE}.tmp"  # written whole or not at all: a kill never leaves half a job file
        tmp.write_text(json.dumps(asdict(job), indent=2))
        os.replace(tmp, self.out / JOB_FILE)
        torch.manual_seed(job.seed)
        if job.model == "tiny":
            model, tokenizer = build_tiny(TinyModelSpec(), job.seed)
        else:
            model, tokenizer = load_model(job.model)
        self.tokenizer = tokenizer
        self.chat = PlainTextChat(tokenizer)
        self.trainer = Trainer(model, lr=job.lr, pad_id=tokenizer.pad_id)
        self.version = 0
        self.saved: tuple[int, Path] | None = None  # the version of the latest checkpoint, and where it is
        resumed = resume_trainer(self.ckpt_root, self.trainer, self.store, job.consumer)
        if resumed.path is not None and resumed.meta is not None:
            self.version = resumed.meta.version
            self.saved = (self.version, resumed.path)
            # a kill between writing the checkpoint and recording it left it out of the store: record it now
            self._record(resumed.path, resumed.meta.version, resumed.meta.parent_version, resumed.meta.train_step)
            self.log(
                f"resumed from {resumed.path.name} (step {resumed.step}); "
                f"{resumed.released} consumptions of lost steps released"
            )
        elif resumed.released:  # stopped before its first checkpoint: those steps start again from the initial weights
            self.log(f"no checkpoint to resume from: starting again; {resumed.released} consumptions released")
        self.teacher = None
        if job.mode == "opd":
            if not job.teacher:
                raise ValueError("on-policy distillation needs --teacher (a saved model directory)")
            teacher_model, teacher_tok = load_model(job.teacher)
            self.teacher = LocalTeacher(teacher_model, teacher_tok, tokenizer, pad_id=tokenizer.pad_id)

    def _next_batch(self) -> list[Trajectory]:
        job = self.job
        kind = job.default_kind()
        if job.mode == "sft":
            rows = (t for t in self.store.iter(run_id=job.data_run, kind=kind, unconsumed_by=job.consumer) if t.success)
            batch: list[Trajectory] = []
            for t in rows:
                batch.append(t)
                if len(batch) >= job.batch_size:
                    break
            return batch
        groups: dict[str, list[Trajectory]] = {}
        for t in self.store.iter(run_id=job.data_run, kind=kind, unconsumed_by=job.consumer):
            if t.group_id not in groups and len(groups) >= job.batch_size:
                break
            groups.setdefault(t.group_id, []).append(t)
        return [t for g in groups.values() for t in g]

    def _sequences(self, batch: list[Trajectory]) -> tuple[list[TrainSequence], str, dict[str, float]]:
        job = self.job
        if job.mode == "sft":
            return [sft_sequence(t, self.chat) for t in batch], "sft", {}
        groups: dict[str, list[Trajectory]] = {}
        for t in batch:
            groups.setdefault(t.group_id, []).append(t)
        if job.mode == "rl":
            gb = group_batch(list(groups.values()))
            return gb.sequences, "ppo", {"groups_used": gb.groups_used, "mean_reward": gb.mean_reward}
        seqs = [s for t in batch for s in rl_sequences(t)]
        self.trainer.fill_proximal(seqs)  # the student's own log-probs: stored ones are whoever sampled them
        assert self.teacher is not None
        stats = distill(seqs, self.teacher.score(seqs), kl_coef=job.kl_coef)
        return seqs, "opd", stats

    def run(self) -> dict[str, Any]:
        self._setup()
        job = self.job
        last: dict[str, Any] = {}
        while self.trainer.step < job.steps:
            batch = self._next_batch()
            if not batch:
                if self.trainer.step == 0:  # nothing at all to train on: say what the store does hold
                    raise ValueError(self._no_data())
                self.log(f"no unconsumed {job.default_kind()} data left after step {self.trainer.step}")
                break
            seqs, objective, extra = self._sequences(batch)
            if seqs:
                stats = self.trainer.train_step(seqs, objective, job.clip_eps)  # type: ignore[arg-type]
            else:  # e.g. RL groups with equal rewards: no signal, but the data is used up
                self.trainer.step += 1
                stats = {"loss": 0.0}
            self.store.mark_consumed([t.id for t in batch], self.trainer.step, consumer=job.consumer)
            self.version += 1
            last = {"step": self.trainer.step, "trajectories": len(batch), **stats, **extra}
            self.log(json.dumps(last))
            if self.trainer.step % job.checkpoint_every == 0:
                self._checkpoint()
        path = self._checkpoint()
        self.store.close()
        return {"checkpoint": str(path), "consumer": job.consumer, "step": self.trainer.step, **last}

    def _no_data(self) -> str:
        job = self.job
        run = f" of run {job.data_run}" if job.data_run else ""
        held = {k: self.store.count(run_id=job.data_run, kind=k) for k in ("expert", "rollout", "eval")}
        others = ", ".join(f"{n} {k}" for k, n in held.items() if n and k != job.default_kind())
        hint = f"; the store holds {others}: choose them with --kind" if others else ""
        return f"no unconsumed {job.default_kind()} trajectories{run} to train on{hint}"

    def _checkpoint(self) -> Path:
        """Save the current version (once); its parent is the checkpoint it was trained from
        (None for the first, trained from the initial weights)."""
        if self.saved is not None and self.saved[0] == self.version:
            return self.saved[1]
        parent = self.saved[0] if self.saved is not None else None
        path = save_checkpoint(
            self.ckpt_root,
            model=self.trainer.model,
            tokenizer=self.tokenizer,
            optimizer=self.trainer.optimizer,
            version=self.version,
            parent_version=parent,
            train_step=self.trainer.step,
            extra={"consumer": self.job.consumer, "mode": self.job.mode},
        )
        self._record(path, self.version, parent, self.trainer.step)
        self.saved = (self.version, path)
        return path

    def _record(self, path: Path, version: int, parent: int | None, train_step: int) -> None:
        """Record a checkpoint in the store (once: a version already recorded is left as it is)."""
        self.store.add_checkpoint(
            self.job.consumer,
            version,
            weights_hash=json.loads((path / "checkpoint.json").read_text())["weights_hash"],
            train_step=train_step,
            parent_version=parent,
            path=str(path),
        )
