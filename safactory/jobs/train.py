"""`safactory train`: SFT, RL or on-policy distillation on data already in a store, resumable.

The job is one consumer of the store: each optimiser step takes trajectories this
consumer has not used, trains on them, then records their consumption with the step
number. Every `checkpoint_every` steps it writes a checkpoint, recorded in the store with
the checkpoint before it as parent. After a crash (even kill -9), `resume` loads the last
checkpoint (none yet: the initial weights) and releases the consumption of later steps,
whose updates were lost with the process; so the final model has seen every eligible
trajectory exactly once.

The model is `tiny`, `smollm2` or a model directory (a saved tiny model or any HF chat
model), rendered with its own chat format, on `device` in `dtype`. With `lora_r > 0` only a
LoRA adapter trains: checkpoints hold the adapter alone, and at the end the adapter is
written to OUT/adapter (its base recorded as the model spec; for `tiny`, the initial
weights saved in OUT/base) and, with `merge`, the adapter folded into its base as a
standard HF directory OUT/model. A full fine-tune's final model is its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
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
from safactory.policy.models import add_lora, load_policy_model, merge_lora, save_adapter, save_model
from safactory.policy.specs import check_device, check_dtype, placement
from safactory.policy.weights import is_adapter_model
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
    # fields added later keep defaults, so that an older train.json still resumes
    device: str = "cpu"
    dtype: str = "auto"
    lora_r: int = 0  # 0: full fine-tuning
    lora_alpha: int | None = None  # None: 2 * lora_r
    merge: bool = False  # a LoRA job also writes its adapter merged into the base (OUT/model)

    def default_kind(self) -> str:
        return self.kind or ("expert" if self.mode == "sft" else "rollout")

    def check(self) -> None:
        """Raise ValueError naming the first option that cannot work."""
        check_dtype(self.dtype)
        check_device(self.device)
        if self.lora_r < 0:
            raise ValueError(f"--lora-r must be >= 0 (0: full fine-tuning), not {self.lora_r}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"--lora-alpha must be > 0, not {self.lora_alpha}")
        if self.merge and not self.lora_r:
            raise ValueError(
                "--merge folds a LoRA adapter into its base and needs --lora-r > 0 "
                "(a full fine-tune's last checkpoint is already a whole model)"
            )


def model_spec(spec: str, option: str = "--model") -> str:
    """A model spec as a job keeps it: `tiny` / `smollm2` as they are, a directory as an absolute path
    (so that a resume from elsewhere, or an adapter's recorded base, still finds it)."""
    if spec in ("tiny", "smollm2"):
        return spec
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(f"{option} {spec!r}: expected tiny, smollm2 or a model directory")
    return str(path.resolve())


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
        job.check()
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{JOB_FILE}.tmp"  # written whole or not at all: a kill never leaves half a job file
        tmp.write_text(json.dumps(asdict(job), indent=2))
        os.replace(tmp, self.out / JOB_FILE)
        torch.manual_seed(job.seed)
        device, dtype = placement(job.device, job.dtype)
        start = load_policy_model(job.model, seed=job.seed, dtype=dtype)
        self.chat = start.chat
        self.tokenizer = start.chat.tokenizer
        model = start.model
        self.base = job.model
        if job.lora_r:
            if job.model == "tiny":  # a random init: keep it, so that the adapter's base can be loaded again
                self.base = str((self.out / "base").resolve())
                if not (self.out / "base" / "config.json").is_file():
                    _write_dir(self.out / "base", lambda d: save_model(model, self.tokenizer, d))
            alpha = job.lora_alpha if job.lora_alpha is not None else 2 * job.lora_r
            model = add_lora(model, r=job.lora_r, alpha=alpha)
            for config in model.peft_config.values():  # checkpoints are adapters of this base
                config.base_model_name_or_path = self.base
        model = model.to(device)
        self.trainer = Trainer(model, lr=job.lr, pad_id=self.tokenizer.pad_id)
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
            teacher = load_policy_model(job.teacher, seed=job.seed, dtype=dtype)
            self.teacher = LocalTeacher(
                teacher.model.to(device), teacher.chat.tokenizer, self.tokenizer, pad_id=self.tokenizer.pad_id
            )

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
        written = self._write_final()
        return {"checkpoint": str(path), "consumer": job.consumer, "step": self.trainer.step, **written, **last}

    def _write_final(self) -> dict[str, str]:
        """A LoRA job's final model: the adapter in OUT/adapter and, with `merge`, the merged model in
        OUT/model (each replaced whole: a resumed, finished job writes the same again)."""
        model = self.trainer.model
        if not is_adapter_model(model):
            return {}
        written = {"adapter": str(self.out / "adapter")}
        _write_dir(self.out / "adapter", lambda d: save_adapter(model, d, base=self.base))
        if self.job.merge:
            merged = merge_lora(copy.deepcopy(model))
            _write_dir(self.out / "model", lambda d: save_model(merged, self.tokenizer, d))
            written["model"] = str(self.out / "model")
        for name, where in written.items():
            self.log(f"{name}: {where}")
        return written

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


def _write_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a directory next to `target`, then put it in place of `target` (a kill leaves the old one or none)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
