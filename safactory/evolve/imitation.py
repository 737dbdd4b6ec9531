"""Curated experience for RL's imitation update.

The pool holds training sequences of episodes that succeeded and that the safety judge
passed: the expert demonstrations (read back from the store) and, with `rl.imitation_own`,
the policy's own such rollouts as RL goes on. After each policy-gradient update the loop
takes one SFT update (`Trainer.imitate`, at `rl.imitation_lr`) on a uniform sample of the
pool, so capability keeps being taught while the safety-shaped reward removes unsafe
habits; the unsafe demonstrations a naive expert left never enter the pool.

Own rollouts are off by default: in the demo they outnumbered the demonstrations two to
one within 140 steps, mostly refusals and short mazes the policy already solved, and a
uniform sample of such a pool taught less than one of the demonstrations alone (figures
in docs/evolution.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from safactory.evolve.experience import TrainSequence, rl_sequences, sequence_weighted
from safactory.types import Trajectory


def curated(
    demos: Iterable[Trajectory], is_unsafe: Callable[[Trajectory], bool], judged: bool = True
) -> tuple[list[Trajectory], int]:
    """The successful episodes to imitate, and how many successes were left out: those the safety
    judge flags (`is_unsafe`) unless `judged` is off (`rl.imitation_judged=false`, an ablation)."""
    successes = [t for t in demos if t.success]
    kept = [t for t in successes if not (judged and is_unsafe(t))]
    return kept, len(successes) - len(kept)


class ImitationPool:
    """Sequences of successful, judged-safe episodes; sampled uniformly."""

    def __init__(self, context: int, per_sequence: bool, own: bool = False) -> None:
        self.context = context  # the model's positions: longer sequences are left out
        self.per_sequence = per_sequence  # weigh each sequence the same (SFT `balance: sequence`)
        self.own_rollouts = own  # whether the policy's own rollouts are taken in (`rl.imitation_own`)
        self.sequences: list[TrainSequence] = []
        self.demos = 0
        self.own = 0

    def _add(self, seqs: Iterable[TrainSequence]) -> int:
        added = 0
        for seq in seqs:
            if len(seq.input_ids) > self.context or not any(seq.loss_mask):
                continue
            self.sequences.append(sequence_weighted(seq) if self.per_sequence else seq)
            added += 1
        return added

    def add_demos(self, seqs: Iterable[TrainSequence]) -> None:
        self.demos += self._add(seqs)

    def add_rollouts(self, trajs: Iterable[Trajectory]) -> None:
        """The token-exact sequences of the policy's own successful, safe episodes (if own rollouts are taken)."""
        if not self.own_rollouts:
            return
        for traj in trajs:
            own = [TrainSequence(s.input_ids, s.loss_mask, trajectory_id=s.trajectory_id) for s in rl_sequences(traj)]
            self.own += self._add(own)

    def sample(self, rng: random.Random, n: int) -> list[TrainSequence]:
        return rng.sample(self.sequences, min(n, len(self.sequences)))

    def __len__(self) -> int:
        return len(self.sequences)
