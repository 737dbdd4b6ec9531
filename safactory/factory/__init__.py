"""The closed loop: `Factory` runs a `RunConfig` (warm start, safety-aware async RL, gate, distillation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from safactory._exports import lazy_exports

if TYPE_CHECKING:
    from safactory.factory.loop import Factory
    from safactory.factory.report import write_report

_EXPORTS = {"Factory": "safactory.factory.loop", "write_report": "safactory.factory.report"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
