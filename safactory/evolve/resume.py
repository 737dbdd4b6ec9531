"""Resuming a trainer after a crash, shared by the closed loop and `safactory train`.

A trainer resumes from its latest checkpoint (weights, optimiser state, step) and the
store forgets the consumption recorded by later steps, whose updates died with the
process; so those trajectories train the resumed model, once. Without a checkpoint the
trainer keeps the weights it was built with (step 0), so all of its consumption is forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from safactory.evolve.checkpoint import CheckpointMeta, latest_checkpoint, load_checkpoint
from safactory.evolve.trainer import Trainer


class ConsumptionLedger(Protocol):
    """What resuming needs of the store (`TrajectoryStore` is one)."""

    def release_consumed_after(self, consumer: str, step: int) -> int: ...


@dataclass(frozen=True)
class Resumed:
    """Where a trainer resumed from: the checkpoint and its metadata (both None when there was
    none), the step it continues after and how many consumptions of lost steps were released."""

    path: Path | None
    meta: CheckpointMeta | None
    step: int
    released: int


def resume_trainer(root: Path, trainer: Trainer, ledger: ConsumptionLedger, consumer: str) -> Resumed:
    """Load the latest checkpoint under `root` into `trainer` and release `consumer`'s consumption
    by later steps. Without a checkpoint the trainer keeps its weights and step (0 when new), and
    the consumption of every step after that is released: those updates were lost too."""
    path = latest_checkpoint(root)
    meta = None
    if path is not None:
        _, meta = load_checkpoint(path, trainer.model, trainer.optimizer)
        trainer.step = meta.train_step
    released = ledger.release_consumed_after(consumer, trainer.step)
    return Resumed(path, meta, trainer.step, released)
