"""What one version of a model's weights is: the whole state dict, or only a LoRA adapter.

A fully fine-tuned model's version is its state dict. A LoRA model (a peft `PeftModel`)
trains only its adapter, so a version is the adapter's weights (keyed as in the model's
own `state_dict`): that is what a hot swap sends, a checkpoint hashes and a rollback
loads, and the base weights are never copied.
"""

from __future__ import annotations

from typing import Any

import torch


def is_adapter_model(model: Any) -> bool:
    """Whether `model` is a peft model carrying a (LoRA) adapter."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def version_state(model: Any, copy: bool = True) -> dict[str, torch.Tensor]:
    """The weights that make up a version of `model` (adapter only for a LoRA model), detached;
    cloned unless `copy` is False (then they alias the live weights: hash them, do not keep them)."""
    if is_adapter_model(model):
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in model.state_dict().items() if k in names}
    else:
        state = model.state_dict()
    return {k: (v.detach().clone() if copy else v.detach()) for k, v in state.items()}


def load_version_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load a version into `model`: the whole state dict, or an adapter's weights into a LoRA model.

    Unknown keys, and for a full model missing ones, raise `RuntimeError` before any weight changes.
    """
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise RuntimeError(f"weights not in this model: {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    if not is_adapter_model(model):
        missing = sorted(set(own) - set(state))
        if missing:
            raise RuntimeError(f"weights missing for this model: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    shapes = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise RuntimeError(f"weights of another shape: {shapes[:3]}")
    model.load_state_dict(state, strict=False)
