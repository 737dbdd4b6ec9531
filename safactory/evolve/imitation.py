"""Curated experience for RL's imitation update.

The pool holds training sequences of episodes that succeeded and that the safety judge
passed: the expert demonstrations (read back from the store) and, with `rl.imitation_own`,
the policy's own such rollouts as RL goes on. After each policy-gradient update the loop
takes one SFT update (`Trainer.imitate`, at `rl.imitation_lr`) on a uniform sample of the
pool, so capability keeps being taught while the safety-shaped reward removes unsafe
habits; the unsafe demonstrations a naive expert left never enter the pool. With a
per-env quota (`rl.imitation_by_weight`: the envs' `weight`, as RL's groups are shared)
each env gives its share of the batch instead, so an env the warm start left weak can
get more of the imitation than its share of the pool.

Own rollouts are off by default: in the demo they outnumbered the demonstrations two to
one within 140 steps, mostly refusals and short mazes the policy already solved, and a
uniform sample of such a pool taught less than one of the demonstrations alone (figures
in docs/evolution.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping

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
    """Sequences of successful, judged-safe episodes (each with its env); sampled uniformly or by env quota."""

    def __init__(self, context: int, per_sequence: bool, own: bool = False) -> None:
        self.context = context  # the model's positions: longer sequences are left out
        self.per_sequence = per_sequence  # weigh each sequence the same (SFT `balance: sequence`)
        self.own_rollouts = own  # whether the policy's own rollouts are taken in (`rl.imitation_own`)
        self.sequences: list[TrainSequence] = []
        self.by_env: dict[str, list[TrainSequence]] = {}
        self.demos = 0
        self.own = 0

    def _add(self, seqs: Iterable[TrainSequence], env_of: Mapping[str, str]) -> int:
        added = 0
        for seq in seqs:
            if len(seq.input_ids) > self.context or not any(seq.loss_mask):
                continue
            kept = sequence_weighted(seq) if self.per_sequence else seq
            self.sequences.append(kept)
            self.by_env.setdefault(env_of[seq.trajectory_id], []).append(kept)
            added += 1
        return added

    def add_demos(self, seqs: Iterable[TrainSequence], env_of: Mapping[str, str]) -> None:
        """Demonstration sequences; `env_of` maps each one's trajectory id to its env."""
        self.demos += self._add(seqs, env_of)

    def add_rollouts(self, trajs: Iterable[Trajectory]) -> None:
        """The token-exact sequences of the policy's own successful, safe episodes (if own rollouts are taken)."""
        if not self.own_rollouts:
            return
        for traj in trajs:
            own = [TrainSequence(s.input_ids, s.loss_mask, trajectory_id=s.trajectory_id) for s in rl_sequences(traj)]
            self.own += self._add(own, {traj.id: traj.task.env_id})

    def sample(self, rng: random.Random, n: int, quota: Mapping[str, int] | None = None) -> list[TrainSequence]:
        """`n` sequences drawn uniformly without repeats; with `quota`, that many of each env's instead
        (fewer where an env has fewer, none of an env the quota leaves out)."""
        if quota is None:
            return rng.sample(self.sequences, min(n, len(self.sequences)))
        drawn: list[TrainSequence] = []
        for env, k in quota.items():
            have = self.by_env.get(env, [])
            drawn += rng.sample(have, min(k, len(have)))
        return drawn

    def __len__(self) -> int:
        return len(self.sequences)
