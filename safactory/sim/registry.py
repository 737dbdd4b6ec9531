"""The default environment registry: the built-in environments and adapters, wired in one place.

Env modules know nothing of the registry; this file imports them and registers each
(`EnvRegistry` itself, and the `safactory.envs` entry-point plugins, live in `sim/env.py`).
"""

from __future__ import annotations

from safactory.sim.env import EnvEntry, EnvRegistry
from safactory.sim.envs import agentdojo_entry, arith, gym, http, maze, mcp, ops


def default_registry() -> EnvRegistry:
    """A registry holding the built-in environments (plus installed plugins on first use)."""
    registry = EnvRegistry()
    registry.register(
        arith.ENV_ID,
        EnvEntry(factory=arith.ArithEnv, tasks=arith.ArithTasks, expert=arith.ArithExpert, spec=arith.SPEC),
    )
    http.register(registry)
    maze.register(registry)
    ops.register(registry)
    gym.register(registry)
    mcp.register(registry)
    agentdojo_entry.register(registry)
    return registry
