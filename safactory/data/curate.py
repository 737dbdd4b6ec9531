"""Curation filters: small composable functions that decide which stored episodes become training data.

A filter takes a list of groups (a group is the list of trajectories sampled for
one task: `group_batch` computes advantages within it) and returns the groups to
keep. Trajectory-level filters drop trajectories inside groups and then drop
groups left empty; with `whole_group=True` they drop a group as soon as one of
its members fails, so the advantages of the survivors are not computed against a
changed group. `curate(groups, *filters)` applies filters in order and reports
what each one removed.

Filters:

* `staleness(current_version, max_gap)`: the gap between the current policy
  version and the oldest version that produced a turn of the episode is at most
  `max_gap` (episodes without token traces have no version and pass);
* `equal_rewards()`: drops groups whose rewards are all equal (no GRPO signal;
  a group of one is all equal);
* `duplicates()`: drops an episode whose task hash and action texts equal an
  earlier one's (pass a shared `seen` set to deduplicate across calls);
* `length(min_steps, max_steps, max_tokens)`: by number of steps and training
  tokens (the length of the token-exact training sequences, see `n_tokens`);
* `safety(verdicts)`: drops episodes with an unsafe verdict or an environment
  safety label (for SFT and distillation sets; for RL prefer keeping them with a
  penalised reward from `verdicts.safety_reward`, or the policy never sees the
  negative example).

Use `group_by_id` to turn a flat list of trajectories into groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safactory.data.judges import unsafe_by_env
from safactory.data.verdicts import VerdictLike, as_verdict
from safactory.policy.chat import assistant_text
from safactory.types import Trajectory, canonical_json, sha256_hex

Group = list[Trajectory]
Filter = Callable[[list[Group]], list[Group]]


# ---- measures ---------------------------------------------------------------------------------------
def version_gap(traj: Trajectory, current_version: int) -> int:
    """How many versions behind `current_version` the oldest turn of the episode is (0 without traces)."""
    versions = traj.policy_versions()
    return max(current_version - min(versions), 0) if versions else 0


def n_tokens(traj: Trajectory) -> int:
    """Tokens of the episode's training sequences: turns that extend the previous turn's tokens join it."""
    total = 0
    previous: list[int] | None = None
    for step in traj.steps:
        tr = step.trace
        if tr is None:
            continue
        if previous is not None and tr.prompt_ids[: len(previous)] == previous:
            total += len(tr.prompt_ids) - len(previous) + len(tr.completion_ids)
        else:
            total += len(tr.prompt_ids) + len(tr.completion_ids)
        previous = tr.prompt_ids + tr.completion_ids
    return total


def action_key(traj: Trajectory) -> str:
    """Identity of an episode for deduplication: its task hash and the text of every action."""
    actions = [assistant_text(s.action) for s in traj.steps]
    calls = [[(c.name, c.arguments) for c in s.action.tool_calls] for s in traj.steps]
    return sha256_hex(canonical_json([traj.task_hash or traj.task.hash(), actions, calls]))


# ---- composition -----------------------------------------------------------------------------------
def per_trajectory(keep: Callable[[Trajectory], bool], whole_group: bool = False) -> Filter:
    """A filter from a predicate on trajectories (True = keep); empty groups are dropped."""

    def apply(groups: list[Group]) -> list[Group]:
        out: list[Group] = []
        for group in groups:
            kept = [t for t in group if keep(t)]
            if kept and (not whole_group or len(kept) == len(group)):
                out.append(kept)
        return out

    return apply


def per_group(keep: Callable[[Group], bool]) -> Filter:
    """A filter from a predicate on whole groups (True = keep)."""

    def apply(groups: list[Group]) -> list[Group]:
        return [list(g) for g in groups if keep(g)]

    return apply


@dataclass
class CurationReport:
    """What each filter removed, in order: (name, groups before, after, trajectories before, after)."""

    stages: list[tuple[str, int, int, int, int]] = field(default_factory=list)

    def dropped(self, name: str) -> int:
        """Trajectories the named filter removed."""
        return sum(before - after for n, _, _, before, after in self.stages if n == name)

    def as_dict(self) -> dict[str, Any]:
        return {
            n: {"groups_in": gi, "groups_out": go, "trajectories_in": ti, "trajectories_out": to}
            for n, gi, go, ti, to in self.stages
        }


def filter_name(f: Filter) -> str:
    return str(getattr(f, "filter_name", getattr(f, "__name__", type(f).__name__)))


def _named(f: Filter, name: str) -> Filter:
    f.filter_name = name  # type: ignore[attr-defined]
    return f


def curate(groups: Iterable[Sequence[Trajectory]], *filters: Filter) -> tuple[list[Group], CurationReport]:
    """Apply `filters` in order; returns the kept groups and a report of what each removed."""
    current = [list(g) for g in groups]
    report = CurationReport()
    for f in filters:
        n_groups, n_trajs = len(current), sum(map(len, current))
        current = f(current)
        report.stages.append((filter_name(f), n_groups, len(current), n_trajs, sum(map(len, current))))
    return current, report


def group_by_id(trajs: Iterable[Trajectory]) -> list[Group]:
    """Trajectories grouped by `group_id` in order of first appearance (no group id: a group of its own)."""
    groups: dict[str, Group] = {}
    out: list[Group] = []
    for traj in trajs:
        if not traj.group_id:
            out.append([traj])
            continue
        if traj.group_id not in groups:
            groups[traj.group_id] = []
            out.append(groups[traj.group_id])
        groups[traj.group_id].append(traj)
    return out


# ---- the filters -----------------------------------------------------------------------------------
def staleness(current_version: int, max_gap: int, whole_group: bool = True) -> Filter:
    """Keep episodes at most `max_gap` policy versions behind `current_version`."""
    if max_gap < 0:
        raise ValueError("max_gap must be >= 0")
    return _named(per_trajectory(lambda t: version_gap(t, current_version) <= max_gap, whole_group), "staleness")


def equal_rewards(tolerance: float = 0.0) -> Filter:
    """Drop groups whose rewards are all equal (within `tolerance`): they carry no group-relative signal."""

    def varied(group: Group) -> bool:
        rewards = [t.reward for t in group]
        return bool(rewards) and max(rewards) - min(rewards) > tolerance

    return _named(per_group(varied), "equal_rewards")


def duplicates(seen: set[str] | None = None, whole_group: bool = False) -> Filter:
    """Drop episodes whose task and actions repeat an earlier kept one's (the first is kept).

    With `whole_group=True` a group goes if any member repeats, and a dropped group's episodes
    are not remembered as seen.
    """

    def apply(groups: list[Group]) -> list[Group]:
        local = seen if seen is not None else set()
        if not whole_group:

            def fresh(traj: Trajectory) -> bool:
                key = action_key(traj)
                if key in local:
                    return False
                local.add(key)
                return True

            return per_trajectory(fresh)(groups)
        out: list[Group] = []
        for group in groups:  # a dropped group's episodes were never kept, so they mark nothing as seen
            keys = [action_key(t) for t in group]
            if group and len(set(keys)) == len(keys) and local.isdisjoint(keys):
                local.update(keys)
                out.append(list(group))
        return out

    return _named(apply, "duplicates")


def length(
    *, min_steps: int = 0, max_steps: int | None = None, max_tokens: int | None = None, whole_group: bool = False
) -> Filter:
    """Keep episodes with `min_steps <= steps <= max_steps` and at most `max_tokens` training tokens."""

    def ok(traj: Trajectory) -> bool:
        steps = len(traj.steps)
        if steps < min_steps or (max_steps is not None and steps > max_steps):
            return False
        return max_tokens is None or n_tokens(traj) <= max_tokens

    return _named(per_trajectory(ok, whole_group), "length")


def is_unsafe(
    traj: Trajectory,
    verdicts: Mapping[str, Sequence[VerdictLike]] | None = None,
    *,
    use_env_labels: bool = True,
    drop_unknown: bool = False,
) -> bool:
    """Whether an episode counts as unsafe: an unsafe verdict, an env label, or (optionally) only unknowns."""
    if use_env_labels and unsafe_by_env(traj):
        return True
    mine = [as_verdict(v) for v in (verdicts or {}).get(traj.id, [])]
    if any(v.unsafe is True for v in mine):
        return True
    return drop_unknown and bool(mine) and all(v.unsafe is None for v in mine)


def safety(
    verdicts: Mapping[str, Sequence[VerdictLike]] | None = None,
    *,
    use_env_labels: bool = True,
    drop_unknown: bool = False,
    whole_group: bool = False,
) -> Filter:
    """Drop episodes with an unsafe verdict (`verdicts`: trajectory id -> verdicts) or env label."""

    def ok(traj: Trajectory) -> bool:
        return not is_unsafe(traj, verdicts, use_env_labels=use_env_labels, drop_unknown=drop_unknown)

    return _named(per_trajectory(ok, whole_group), "safety")
