"""Policy specs: the text a user gives for a policy (`--policy`) turned into a Policy.

`random` (`RandomPolicy`), `scripted` (the environment's registered expert), a saved
model directory run in-process (`LocalPolicy`), or `openai:<base_url>#<model>` (any
OpenAI-compatible endpoint, `EndpointPolicy`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from safactory.policy.base import Policy
from safactory.policy.random import RandomPolicy


class ExpertSource(Protocol):
    """What a spec needs of an environment: its scripted expert (if any) and its spec, for messages
    (`safactory.sim.EnvEntry` is one)."""

    expert: Callable[..., Any] | None
    spec: Any


def make_policy(spec: str, env_entry: ExpertSource, seed: int) -> Policy:
    """The Policy a spec names: `random`, `scripted`, a model directory or `openai:<base_url>#<model>`.

    Raises ValueError with a message that says what is wrong and what is accepted.
    """
    spec = spec.strip()
    if spec == "random":
        return RandomPolicy(seed=seed)
    if spec == "scripted":
        env_id = env_entry.spec.id if env_entry.spec is not None else "this environment"
        if env_entry.expert is None:
            raise ValueError(
                f"environment {env_id!r} has no scripted expert; use --policy random, a model directory "
                "or openai:<base_url>#<model>"
            )
        try:
            return env_entry.expert()
        except TypeError as exc:
            raise ValueError(f"the scripted expert of {env_id!r} cannot be built without arguments: {exc}") from exc
    if spec.startswith("openai:"):
        from safactory.policy.endpoint import EndpointPolicy

        return EndpointPolicy.from_spec(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _local_policy(path, seed)
    if "/" in spec or spec.startswith("."):
        raise ValueError(f"policy {spec!r}: no such model directory")
    raise ValueError(
        f"unknown policy {spec!r}: use random, scripted, a saved model directory or openai:<base_url>#<model>"
    )


def _local_policy(path: Path, seed: int) -> Policy:
    """A saved model directory (tiny, HF with a chat template, or LoRA adapter) run in-process."""
    from safactory.policy.local import LocalPolicy
    from safactory.policy.models import load_policy_model

    loaded = load_policy_model(str(path), seed=seed)
    return LocalPolicy(loaded.model, loaded.chat, seed=seed)
