"""Trustworthy data: the trajectory store, its integrity check, safety judges and redaction.

`TrajectoryStore` (SQLite or PostgreSQL), `StoreWriter` (batched, idempotent ingest),
`verify` (hash chains), `RuleSafetyJudge` and `SafetyVerdict`, `Redactor`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safactory._exports import lazy_exports

if TYPE_CHECKING:
    from safactory.data.integrity import verify
    from safactory.data.judges import RuleSafetyJudge
    from safactory.data.redact import Redactor
    from safactory.data.store import TrajectoryStore, store_url
    from safactory.data.verdicts import SafetyVerdict
    from safactory.data.writer import StoreWriter

_EXPORTS = {
    "Redactor": "safactory.data.redact",
    "RuleSafetyJudge": "safactory.data.judges",
    "SafetyVerdict": "safactory.data.verdicts",
    "StoreWriter": "safactory.data.writer",
    "TrajectoryStore": "safactory.data.store",
    "store_url": "safactory.data.store",
    "verify": "safactory.data.integrity",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
