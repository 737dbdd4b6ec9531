"""Safety verdicts: the one verdict schema, combining verdicts, the one safety reward, and
reading verdicts back from the store.

`SafetyVerdict` is the only shape a safety judgement takes, whoever made it:
judge name and version, `unsafe` (True / False, or None when the judge could not
decide: status "unknown"), severity in [0, 1], reasons, per-step labels and meta
(for an LLM judge: model, prompt, raw reply). It maps onto the store's
`safety_verdicts` rows (`store_kwargs` / `from_store`); labels and the unknown
status travel in the row's meta, because that table has no columns for them (an
unknown verdict is stored with `unsafe=False` and `meta["status"] == "unknown"`;
read rows back through `from_store`/`stored_verdicts`, never by the raw column).

`safety_reward` is the one place that turns verdicts into reward: a safe (or
unjudged, or unknown) episode keeps its environment reward; an unsafe one gets
`min(env_reward, 0) - penalty * (1 + severity)`, which is at most `-penalty`. So
for any environment whose safe episodes score above `-penalty` (a refusal scores
0 in every built-in environment), a completed-but-unsafe episode never outranks a
refused-safely one, and among unsafe episodes a worse outcome or a higher
severity never scores higher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from safactory.data.store import TrajectoryStore

VERDICT_SCHEMA_VERSION = 1
Status = Literal["safe", "unsafe", "unknown"]


# ---- the verdict schema ---------------------------------------------------------------------------
class StepLabel(BaseModel):
    """One labelled action: which step, what, who said so (env / rule / tool / judge)."""

    step: int
    label: str
    source: str = "judge"
    unsafe: bool = True
    severity: float = Field(default=1.0, ge=0.0, le=1.0)


class SafetyVerdict(BaseModel):
    """One safety judgement of one trajectory. `unsafe=None` means the judge could not decide."""

    schema_version: int = VERDICT_SCHEMA_VERSION
    trajectory_id: str = ""
    judge: str
    judge_version: str
    unsafe: bool | None
    severity: float = Field(default=0.0, ge=0.0, le=1.0)
    reasons: list[str] = Field(default_factory=list)
    labels: list[StepLabel] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def status(self) -> Status:
        return "unknown" if self.unsafe is None else "unsafe" if self.unsafe else "safe"

    def unsafe_steps(self) -> list[int]:
        """Indices of the steps with at least one unsafe label, ascending."""
        return sorted({lab.step for lab in self.labels if lab.unsafe})

    def store_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `TrajectoryStore.add_verdict` (labels and status go into meta)."""
        meta = {
            **self.meta,
            "status": self.status,
            "labels": [lab.model_dump() for lab in self.labels],
            "verdict_schema": self.schema_version,
        }
        return {
            "judge": self.judge,
            "judge_version": self.judge_version,
            "unsafe": bool(self.unsafe),
            "severity": float(self.severity),
            "reasons": list(self.reasons),
            "meta": meta,
        }

    @classmethod
    def from_store(cls, row: Mapping[str, Any]) -> SafetyVerdict:
        """A verdict from a row of `TrajectoryStore.verdicts` (or from `model_dump()`)."""
        if "schema_version" in row and "labels" in row:  # already our own dump
            return cls.model_validate(dict(row))
        meta = dict(row.get("meta") or {})
        status = meta.pop("status", None)
        labels = meta.pop("labels", [])
        schema = meta.pop("verdict_schema", VERDICT_SCHEMA_VERSION)
        unsafe: bool | None = None if status == "unknown" else bool(row["unsafe"])
        return cls(
            schema_version=schema,
            trajectory_id=str(row.get("trajectory_id", "")),
            judge=str(row["judge"]),
            judge_version=str(row["judge_version"]),
            unsafe=unsafe,
            severity=min(1.0, max(0.0, float(row.get("severity") or 0.0))),
            reasons=list(row.get("reasons") or []),
            labels=labels,
            meta=meta,
        )


VerdictLike = SafetyVerdict | Mapping[str, Any]


def as_verdict(value: VerdictLike) -> SafetyVerdict:
    return value if isinstance(value, SafetyVerdict) else SafetyVerdict.from_store(value)


def combine_status(verdicts: Iterable[VerdictLike]) -> Status | None:
    """The combined status: unsafe if any verdict is, else safe if any is, else unknown; None without verdicts."""
    statuses = {as_verdict(v).status for v in verdicts}
    if "unsafe" in statuses:
        return "unsafe"
    if "safe" in statuses:
        return "safe"
    return "unknown" if statuses else None


def verdict_unsafe(verdicts: Sequence[VerdictLike]) -> bool | None:
    """True if any verdict is unsafe, False if at least one is safe and none unsafe, None otherwise."""
    status = combine_status(verdicts)
    return None if status in (None, "unknown") else status == "unsafe"


# ---- the one place verdicts become reward ---------------------------------------------------------
def safety_reward(env_reward: float, verdicts: Iterable[VerdictLike], penalty: float = 2.0) -> float:
    """The training reward of an episode from its environment reward and its safety verdicts.

    Unknown verdicts are ignored. If any verdict is unsafe (severity s = the highest
    unsafe severity), the reward is `min(env_reward, 0) - penalty * (1 + s)`, at most
    `-penalty`; otherwise the environment reward is kept. Hence completed-but-unsafe
    never outranks refused-safely whenever a safe refusal scores above `-penalty`.
    """
    if not penalty > 0 or math.isinf(penalty):
        raise ValueError(f"penalty must be a positive finite number, got {penalty!r}")
    if math.isnan(env_reward):
        raise ValueError("env_reward is NaN")
    unsafe = [v for v in map(as_verdict, verdicts) if v.unsafe is True]
    if not unsafe:
        return float(env_reward)
    severity = max(v.severity for v in unsafe)
    return min(float(env_reward), 0.0) - penalty * (1.0 + severity)


# ---- verdicts in the store --------------------------------------------------------------------------
def stored_verdicts(store: TrajectoryStore, trajectory_id: str) -> list[SafetyVerdict]:
    """The verdicts stored for one trajectory, as SafetyVerdicts (unknown status restored)."""
    return [SafetyVerdict.from_store(row) for row in store.verdicts(trajectory_id)]


def verdicts_by_trajectory(store: TrajectoryStore, ids: Iterable[str]) -> dict[str, list[SafetyVerdict]]:
    return {i: stored_verdicts(store, i) for i in ids}
