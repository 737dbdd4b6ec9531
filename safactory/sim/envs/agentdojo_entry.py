"""The `agentdojo:` scheme: an env entry (env, tasks, scripted experts) per `agentdojo:<suite>[@<version>]`."""

from __future__ import annotations

from functools import partial

from safactory.sim.env import EnvEntry, EnvRegistry
from safactory.sim.envs.agentdojo import SCHEME, AgentDojoEnv, AgentDojoTasks, profile
from safactory.sim.envs.agentdojo_expert import AgentDojoExpert


def make_entry(rest: str) -> EnvEntry:
    """The EnvEntry for `agentdojo:<rest>` (raises AgentDojoEnvError when it cannot be served)."""
    p = profile(rest)
    return EnvEntry(
        factory=partial(AgentDojoEnv, p),
        tasks=partial(AgentDojoTasks, p),
        expert=partial(AgentDojoExpert, p),
        spec=p.spec,
    )


def register(registry: EnvRegistry) -> None:
    """Add the `agentdojo:` scheme to a registry (the package itself is imported only when an id is resolved)."""
    registry.register_scheme(SCHEME, make_entry)
