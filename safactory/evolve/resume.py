"""Resuming a trainer after a crash, shared by the closed loop and `safactory train`.

A trainer resumes from its latest checkpoint (weights, optimiser state, step) and the
store forgets the consumption recorded by later steps, whose updates died with the
process; so those trajectories train the resumed model, once.
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
    """Where a trainer resumed from: the checkpoint, its metadata and how many consumptions were released."""

    path: Path
    meta: CheckpointMeta
    released: int


def resume_trainer(root: Path, trainer: Trainer, ledger: ConsumptionLedger, consumer: str) -> Resumed | None:
    """Load the latest checkpoint under `root` into `trainer` and release `consumer`'s later
    consumption; None (and nothing changed) when there is no checkpoint."""
    path = latest_checkpoint(root)
    if path is None:
        return None
    _, meta = load_checkpoint(path, trainer.model, trainer.optimizer)
    trainer.step = meta.train_step
    released = ledger.release_consumed_after(consumer, meta.train_step)
    return Resumed(path, meta, released)
