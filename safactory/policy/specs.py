"""Policy specs: the text a user gives for a policy (`--policy`) turned into a Policy.

`random` (`RandomPolicy`), `scripted` (the environment's registered expert), `smollm2` or a
saved model directory run in-process (`LocalPolicy`, on the device and in the dtype asked for),
or `openai:<base_url>#<model>` (any OpenAI-compatible endpoint, `EndpointPolicy`).

`placement` checks and resolves the `--device` / `--dtype` options that every command
loading a model takes (`safactory train`, `rollout`, `serve-policy`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from safactory.policy.base import Policy
from safactory.policy.random import RandomPolicy

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_HELP = "Torch device of the model: cpu, cuda, cuda:N or auto (CUDA where there is one)"
DTYPE_HELP = "Weights dtype of an HF model: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16, float16"


class ExpertSource(Protocol):
    """What a spec needs of an environment: its scripted expert (if any) and its spec, for messages
    (`safactory.sim.EnvEntry` is one)."""

    expert: Callable[..., Any] | None
    spec: Any


def check_dtype(dtype: str) -> None:
    """Raise ValueError unless `dtype` is one of `DTYPES`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def check_device(device: str) -> str:
    """The torch device `device` names ('auto' resolved); ValueError if it is none, or is CUDA where there is none."""
    import torch

    from safactory.config import resolve_device

    resolved = resolve_device(device.strip())
    try:
        parsed = torch.device(resolved)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"device {device!r} is not a torch device: use cpu, cuda, cuda:N or auto") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine (or this torch build) has no CUDA device; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return resolved


def placement(device: str, dtype: str) -> tuple[str, Any]:
    """(torch device, torch dtype) for a model from the `--device` / `--dtype` options; ValueError says
    what is wrong and what is accepted."""
    from safactory.config import resolve_dtype

    check_dtype(dtype)
    resolved = check_device(device)
    return resolved, resolve_dtype(dtype, resolved)


def make_policy(spec: str, env_entry: ExpertSource, seed: int, *, device: str = "cpu", dtype: str = "auto") -> Policy:
    """The Policy a spec names: `random`, `scripted`, `smollm2`, a model directory or `openai:<base_url>#<model>`;
    a model runs in-process on `device` with weights in `dtype` (see `placement`).

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
        from safactory.policy.routing import endpoint_from_spec

        return endpoint_from_spec(spec)  # `openai:<url>,<url>#<model>`: several servers, routed
    if spec == "smollm2":
        return _local_policy(spec, seed, device, dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _local_policy(str(path), seed, device, dtype)
    if "/" in spec or spec.startswith("."):
        raise ValueError(f"policy {spec!r}: no such model directory")
    raise ValueError(
        f"unknown policy {spec!r}: use random, scripted, smollm2, a saved model directory or openai:<base_url>#<model>"
    )


def _local_policy(spec: str, seed: int, device: str, dtype: str) -> Policy:
    """`smollm2` or a saved model directory (tiny, HF with a chat template, or LoRA adapter) run in-process."""
    from safactory.policy.local import LocalPolicy
    from safactory.policy.models import load_policy_model

    where, torch_dtype = placement(device, dtype)
    loaded = load_policy_model(spec, seed=seed, dtype=torch_dtype)
    return LocalPolicy(loaded.model.to(where), loaded.chat, seed=seed)
