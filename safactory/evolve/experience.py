"""Stored trajectories -> training data: token-exact RL sequences with group advantages, SFT sequences.

RL sequences are built only from stored token ids: the turns of an episode join
into one sequence when each turn's prompt starts with the previous turn's prompt
and completion token for token (the chat renderer guarantees this); otherwise the
turn starts a new sequence. Only sampled tokens carry loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from safactory.evolve.losses import group_advantages
from safactory.policy.chat import ChatRenderer
from safactory.types import Trajectory


@dataclass
class TrainSequence:
    """One training sequence; lists are aligned with `input_ids`."""

    input_ids: list[int]
    loss_mask: list[float]  # 1/0 per token, or weights (see `sequence_weighted`)
    behaviour_logprobs: list[float] = field(default_factory=list)
    advantage: float = 0.0
    temperature: float = 1.0
    trajectory_id: str = ""
    policy_version: int = 0
    proximal_logprobs: list[float] | None = None
    token_advantages: list[float] | None = None
    behaviour_known: bool = True  # False when a turn came without log-probs (zeros stand in for them)


def rl_sequences(traj: Trajectory) -> list[TrainSequence]:
    """Token-exact sequences of one trajectory (usually one per episode). A turn recorded without
    behaviour log-probs gets zeros in their place and marks its sequence `behaviour_known=False`,
    which the RL objectives refuse (the importance ratio would be meaningless)."""
    out: list[TrainSequence] = []
    current: TrainSequence | None = None
    for step in traj.steps:
        tr = step.trace
        if tr is None:
            continue
        logprobs = tr.logprobs if tr.logprobs is not None else [0.0] * len(tr.completion_ids)
        n_prev = len(current.input_ids) if current else 0
        if current is not None and tr.prompt_ids[:n_prev] == current.input_ids:
            extra = tr.prompt_ids[n_prev:]
        else:
            current = TrainSequence([], [], [], temperature=tr.temperature, trajectory_id=traj.id)
            out.append(current)
            extra = tr.prompt_ids
        current.input_ids += extra + tr.completion_ids
        current.loss_mask += [0] * len(extra) + [1] * len(tr.completion_ids)
        current.behaviour_logprobs += [0.0] * len(extra) + list(logprobs)
        current.behaviour_known = current.behaviour_known and tr.logprobs is not None
        current.policy_version = max(current.policy_version, tr.policy_version)
    return out


def sft_sequence(traj: Trajectory, chat: ChatRenderer) -> TrainSequence:
    """The rendered conversation of a (demonstration) trajectory with its tools, loss on assistant tokens."""
    ids, mask = chat.render(traj.messages(), tools=traj.tools)
    return TrainSequence(ids, mask, [0.0] * len(ids), trajectory_id=traj.id)


def sequence_weighted(seq: TrainSequence) -> TrainSequence:
    """The same sequence with loss weights that sum to 1 (a mean over its own tokens), so that a
    batch's loss is the mean over sequences rather than over tokens."""
    total = sum(seq.loss_mask)
    if total:
        seq.loss_mask = [m / total for m in seq.loss_mask]
    return seq


@dataclass
class GroupBatch:
    sequences: list[TrainSequence]
    groups_used: int
    groups_dropped: int
    mean_reward: float
    prefix_breaks: int = 0  # extra sequences: turns whose prompt did not continue the episode's tokens


def group_batch(
    groups: list[list[Trajectory]],
    normalize_std: bool = True,
    drop_equal: bool = True,
    reward_of: Callable[[Trajectory], float] | None = None,
) -> GroupBatch:
    """RL sequences with GRPO advantages; groups whose rewards are all equal carry no signal.

    `reward_of` gives each episode's training reward (default: the env reward), e.g. the
    safety-shaped reward of `safactory.data.verdicts.safety_reward`.
    """
    sequences: list[TrainSequence] = []
    used = dropped = breaks = 0
    rewards_all: list[float] = []
    for group in groups:
        rewards_G = torch.tensor([reward_of(t) if reward_of else t.reward for t in group], dtype=torch.float64)
        rewards_all += rewards_G.tolist()
        if drop_equal and bool((rewards_G == rewards_G[0]).all()):
            dropped += 1
            continue
        used += 1
        adv_G = group_advantages(rewards_G, normalize_std=normalize_std)
        for traj, adv in zip(group, adv_G.tolist(), strict=True):
            seqs = rl_sequences(traj)
            breaks += max(len(seqs) - 1, 0)
            for seq in seqs:
                seq.advantage = adv
                sequences.append(seq)
    mean = sum(rewards_all) / len(rewards_all) if rewards_all else 0.0
    return GroupBatch(sequences, used, dropped, mean, breaks)
