"""Built-in environments, one file each."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from safactory.sim.env import EnvRegistry


def register_builtins(registry: EnvRegistry) -> None:
    from safactory.sim import remote
    from safactory.sim.env import EnvEntry
    from safactory.sim.envs import arith, gym, maze, mcp, ops

    registry.register(
        arith.ENV_ID,
        EnvEntry(factory=arith.ArithEnv, tasks=arith.ArithTasks, expert=arith.ArithExpert, spec=arith.SPEC),
    )
    remote.register(registry)
    maze.register(registry)
    ops.register(registry)
    gym.register(registry)
    mcp.register(registry)
