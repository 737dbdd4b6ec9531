"""Learning-rate schedules: constant, then a linear decay over the last steps.

The demo's imitation update (`rl.imitation_decay_steps`) and the SFT warm start
(`sft.decay_steps`, which the SFT-only baseline of the ablation uses to match it) share it.
"""

from __future__ import annotations


def decayed_lr(lr: float, step: int, last: int, decay: int) -> float:
    """`lr` at step `step` (1-based) of `last`: constant, then over the last `decay` steps falling
    linearly towards 0 (lr * decay / (decay + 1) first, lr / (decay + 1) at the last step)."""
    if decay <= 0 or step <= last - decay:
        return lr
    return lr * (last - step + 1) / (decay + 1)
