"""Autonomous evolution: training sequences from stored data, losses, the trainer, checkpoints, the gate.

`Trainer` (SFT, PPO / decoupled PPO, OPD steps), `rl_sequences` / `sft_sequence` /
`group_batch` (token-exact sequences from stored traces), `Gate`, `save_checkpoint` /
`load_checkpoint`, `resume_trainer`. The losses are pure functions in `evolve.losses`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safactory._exports import lazy_exports

if TYPE_CHECKING:
    from safactory.evolve.checkpoint import load_checkpoint, save_checkpoint
    from safactory.evolve.experience import TrainSequence, group_batch, rl_sequences, sft_sequence
    from safactory.evolve.gate import Gate
    from safactory.evolve.resume import resume_trainer
    from safactory.evolve.trainer import Trainer

_EXPORTS = {
    "Gate": "safactory.evolve.gate",
    "TrainSequence": "safactory.evolve.experience",
    "Trainer": "safactory.evolve.trainer",
    "group_batch": "safactory.evolve.experience",
    "load_checkpoint": "safactory.evolve.checkpoint",
    "resume_trainer": "safactory.evolve.resume",
    "rl_sequences": "safactory.evolve.experience",
    "save_checkpoint": "safactory.evolve.checkpoint",
    "sft_sequence": "safactory.evolve.experience",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
