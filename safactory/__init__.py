"""Safactory: parallel agent simulation, a trustworthy trajectory store and asynchronous RL in one closed loop.

The public API, by who needs it (each name is loaded on first use):

- everyone: the records `Message`, `ToolCall`, `ToolSpec`, `Task`, `Observation`,
  `StepResult`, `Step`, `TokenTrace`, `Trajectory`;
- an environment author: `Environment` (or `ToolEnvironment` + `ToolError`), `EnvSpec`,
  `TaskSource`, `draw_tasks`, `EnvEntry`, `EnvRegistry`, `default_registry`;
- a policy author: `Policy`, `Completion`, `SamplingParams`, `PolicyError`;
- a run-config author: `RunConfig`, `load_config`, `Factory`; episodes only: `rollout`, `RolloutJob`;
- data: `TrajectoryStore`, `SafetyVerdict`.

The platforms' own public names are in `safactory.sim`, `safactory.policy`,
`safactory.data` and `safactory.evolve`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safactory._exports import lazy_exports

if TYPE_CHECKING:
    from safactory.config import RunConfig, load_config
    from safactory.data.store import TrajectoryStore
    from safactory.data.verdicts import SafetyVerdict
    from safactory.factory.loop import Factory
    from safactory.jobs.rollout import RolloutJob, rollout
    from safactory.policy.base import Completion, Policy, PolicyError, SamplingParams
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
    from safactory.types import Message, Observation, Step, StepResult, Task, TokenTrace, ToolCall, ToolSpec, Trajectory

_RECORDS = ("Message", "Observation", "Step", "StepResult", "Task", "TokenTrace", "ToolCall", "ToolSpec", "Trajectory")
_ENV = ("EnvEntry", "EnvRegistry", "EnvSpec", "Environment", "TaskSource", "ToolEnvironment", "ToolError", "draw_tasks")
_EXPORTS = {
    **{name: "safactory.types" for name in _RECORDS},
    **{name: "safactory.sim.env" for name in _ENV},
    "default_registry": "safactory.sim.registry",
    **{name: "safactory.policy.base" for name in ("Completion", "Policy", "PolicyError", "SamplingParams")},
    "RunConfig": "safactory.config",
    "load_config": "safactory.config",
    "Factory": "safactory.factory.loop",
    "RolloutJob": "safactory.jobs.rollout",
    "rollout": "safactory.jobs.rollout",
    "TrajectoryStore": "safactory.data.store",
    "SafetyVerdict": "safactory.data.verdicts",
}
__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
