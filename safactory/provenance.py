"""Provenance stamps: the hash of a model's weights and the version of the code that ran.

Both go on every trajectory and checkpoint, so a stored episode names exactly which
weights produced it and under which code.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def code_version(path: Path | None = None) -> str:
    """The git commit of the code (with '+dirty' for local changes), else the package version."""
    root = path or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "safactory " + version("safactory")
        except PackageNotFoundError:
            return "unknown"
