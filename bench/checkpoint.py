"""Checkpoints: plain tensors and primitives only, written atomically, loaded weights_only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError

FORMAT = "cmbench-checkpoint/1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write state to path atomically (temp file, fsync, rename); the old file stays until then."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint; never unpickles code."""
    if not path.is_file():
        raise BenchError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, corrupt or not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(f"checkpoint {path} is unreadable (corrupt or truncated): {first}"
                         ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BenchError(f"{path} is not a cmbench checkpoint")
    return state
