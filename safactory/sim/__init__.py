"""Parallel simulation: the environment protocol and registry, the agent loop and the runner.

What an environment author needs: `EnvSpec`, `Environment` (or the `ToolEnvironment`
base class with `ToolError`), `TaskSource` and `draw_tasks` for tasks, `EnvEntry` and
`EnvRegistry` to register it; what a caller needs: `default_registry`, `run_episode`,
`RolloutRunner`, `EpisodeLimits`; for tools that run untrusted code: `Sandbox`, `Limits`, `SandboxResult`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safactory._exports import lazy_exports

if TYPE_CHECKING:
    from safactory.sim.agent import EpisodeLimits, run_episode
    from safactory.sim.env import (
        EnvEntry,
        Environment,
        EnvRegistry,
        EnvSpec,
        TaskSource,
        ToolEnvironment,
        ToolError,
        draw_tasks,
    )
    from safactory.sim.registry import default_registry
    from safactory.sim.runner import Admission, RolloutRunner
    from safactory.sim.sandbox import Limits, Sandbox, SandboxResult

_EXPORTS = {
    "Admission": "safactory.sim.runner",
    "EnvEntry": "safactory.sim.env",
    "EnvRegistry": "safactory.sim.env",
    "EnvSpec": "safactory.sim.env",
    "Environment": "safactory.sim.env",
    "EpisodeLimits": "safactory.sim.agent",
    "Limits": "safactory.sim.sandbox",
    "RolloutRunner": "safactory.sim.runner",
    "Sandbox": "safactory.sim.sandbox",
    "SandboxResult": "safactory.sim.sandbox",
    "TaskSource": "safactory.sim.env",
    "ToolEnvironment": "safactory.sim.env",
    "ToolError": "safactory.sim.env",
    "default_registry": "safactory.sim.registry",
    "draw_tasks": "safactory.sim.env",
    "run_episode": "safactory.sim.agent",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
