"""Checkpoints: weights in safetensors plus the optimiser state and metadata, written atomically.

A checkpoint is a directory `step-000042/` holding the model (HF `save_pretrained`,
safetensors), the tokenizer, `optimizer.pt` and `checkpoint.json` (version, parent
version, training step, weights hash, the trajectories consumed so far as a count
and a hash of their ids, and free-form metadata). It is written to a temporary
directory and renamed into place, and `latest` is replaced atomically afterwards,
so a kill -9 at any moment leaves the previous checkpoint intact; a step written again
(same name) keeps `latest` on a complete copy throughout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from safactory.policy.hf_export import save_tokenizer
from safactory.policy.weights import is_adapter_model, load_version_state, version_state
from safactory.provenance import weights_hash

META = "checkpoint.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft's save_pretrained writes
_TMP_NAME = re.compile(r"^\.tmp-(step-\d+)-\d+$")  # a new copy of step-N being written


@dataclass
class CheckpointMeta:
    version: int
    parent_version: int | None
    train_step: int
    weights_hash: str
    consumed_count: int = 0
    consumed_ids_sha256: str = ""
    created_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    *,
    model: PreTrainedModel,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    version: int,
    parent_version: int | None,
    train_step: int,
    consumed_ids: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint under `root` and point `root/latest` at it; returns its directory."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{train_step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tokenizer, tmp)  # a tiny one also as tokenizer.json + chat template (hf_export)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    ids = consumed_ids or []
    meta = CheckpointMeta(
        version=version,
        parent_version=parent_version,
        train_step=train_step,
        weights_hash=weights_hash(version_state(model, copy=False)),
        consumed_count=len(ids),
        consumed_ids_sha256=ids_digest(ids),
        extra=extra or {},
    )
    (tmp / META).write_text(json.dumps(asdict(meta), indent=2))
    for path in tmp.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # the same step again (say, the periodic checkpoint, then the gate's)
        # `latest` may point at `final`: point it at the complete new copy before `final` goes,
        # so a kill at any moment below leaves it on a complete checkpoint (see latest_checkpoint)
        _point_latest(root, tmp.name)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point_latest(root, final.name)
    return final


def _point_latest(root: Path, name: str) -> None:
    pointer = root / ".latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    _fsync_dir(root)


def latest_checkpoint(root: Path) -> Path | None:
    """The directory `root/latest` points at, if it is a complete checkpoint.

    While a step's checkpoint is rewritten, `latest` names the new copy's temporary
    directory until that is renamed into place; a pointer left naming it finds the step's
    directory instead.
    """
    pointer = root / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    for candidate in (name, *_TMP_NAME.findall(name)):
        path = root / candidate
        if (path / META).exists():
            return path
    return None


def read_meta(path: Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((path / META).read_text()))


def load_checkpoint(
    path: Path, model: PreTrainedModel | None = None, optimizer: torch.optim.Optimizer | None = None
) -> tuple[PreTrainedModel, CheckpointMeta]:
    """Load weights (into `model` if given) and optimiser state; checks the weights hash."""
    meta = read_meta(path)
    if (path / ADAPTER_WEIGHTS).is_file():  # a LoRA model's checkpoint holds its adapter only
        if model is None or not is_adapter_model(model):
            raise ValueError(f"checkpoint {path} holds a LoRA adapter: load it into the model with that adapter")
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(path / ADAPTER_WEIGHTS), device=str(model.device)))
    elif model is None:
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        load_version_state(model, AutoModelForCausalLM.from_pretrained(path).state_dict())
    if weights_hash(version_state(model, copy=False)) != meta.weights_hash:
        raise ValueError(f"checkpoint {path} does not match its recorded weights hash")
    if optimizer is not None and (path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return model, meta


def prune_checkpoints(root: Path, keep: set[str]) -> None:
    """Delete the checkpoint directories under `root` except `latest` and those named in `keep`."""
    pointer = root / "latest"
    if pointer.exists():
        keep = keep | {pointer.read_text().strip()}
    for path in root.glob("step-*"):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
