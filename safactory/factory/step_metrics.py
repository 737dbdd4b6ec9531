"""What one online training step reports: a typed record, written to the metrics log as one row.

The row's keys (`train/*`, `rollout/*`) are what `metrics.jsonl`, TensorBoard and the
report read; `Occupancy` measures the rollout side's idle time that one of them reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


class Occupancy:
    """Rollout-side idle time: wall time during which no group of the stage was in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.start = self.idle_since = time.perf_counter()
        self.idle_s = 0.0

    def started(self) -> None:
        if self.in_flight == 0:
            self.idle_s += time.perf_counter() - self.idle_since
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle_since = time.perf_counter()

    def fraction(self) -> float:
        now = time.perf_counter()
        idle = self.idle_s + (now - self.idle_since if self.in_flight == 0 else 0.0)
        return idle / max(now - self.start, 1e-9)


@dataclass(frozen=True)
class StepMetrics:
    """One RL (or distillation) step: the update, the groups it used, and the rollouts behind it."""

    phase: str
    policy_version: int
    step: int
    loss: float
    lr: float
    groups_used: int
    groups_dropped: int
    groups_discarded: int
    groups_stale: int
    trainer_idle_fraction: float
    rollout_idle_fraction: float
    episodes: int
    episodes_per_s: float
    success_rate: float
    unsafe_rate: float
    mean_reward: float
    version_gaps: tuple[int, ...]
    prefix_breaks: int = 0
    imitation_pool: int | None = None
    clip_frac: float | None = None
    approx_kl: float | None = None
    reverse_kl: float | None = None
    proximal_behaviour_mismatch: float | None = None
    kl_ref: float | None = None
    imitation_nll: float | None = None
    imitation_lr: float | None = None

    def row(self) -> dict[str, Any]:
        """The metrics-log row (key names as the report and TensorBoard read them)."""
        gaps = list(self.version_gaps)
        return {
            "phase": self.phase,
            "policy_version": self.policy_version,
            "train/step": self.step,
            "train/loss": self.loss,
            "train/lr": self.lr,
            "train/clip_frac": self.clip_frac,
            "train/approx_kl": self.approx_kl,
            "train/reverse_kl": self.reverse_kl,
            "train/proximal_behaviour_mismatch": self.proximal_behaviour_mismatch,
            "train/kl_ref": self.kl_ref,
            "train/imitation_nll": self.imitation_nll,
            "train/imitation_lr": self.imitation_lr,
            "train/imitation_pool": self.imitation_pool,
            "train/groups_used": self.groups_used,
            "train/groups_dropped": self.groups_dropped,
            "train/groups_discarded": self.groups_discarded,
            "train/groups_stale": self.groups_stale,
            "train/idle_fraction": self.trainer_idle_fraction,
            "rollout/idle_fraction": self.rollout_idle_fraction,
            "rollout/episodes": self.episodes,
            "rollout/episodes_per_s": self.episodes_per_s,
            "rollout/success_rate": self.success_rate,
            "rollout/unsafe_rate": self.unsafe_rate,
            "rollout/mean_reward": self.mean_reward,
            "rollout/prefix_breaks": self.prefix_breaks,
            "rollout/version_gap_max": max(gaps, default=0),
            "rollout/version_gap_hist": {str(g): gaps.count(g) for g in sorted(set(gaps))},
            "rollout/version_gap_mean": sum(gaps) / max(len(gaps), 1),
        }

    def status(self) -> str:
        """One line for the progress bar."""
        return (
            f"v{self.policy_version}  {self.episodes_per_s:.1f} ep/s  success "
            f"{self.success_rate:.2f}  unsafe {self.unsafe_rate:.2f}"
        )
