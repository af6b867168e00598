"""Checkpoints: plain tensors and primitives only, written atomically, loaded weights_only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.core.atomic import atomic_write
from bench.core.errors import BenchError

FORMAT = "cmbench-checkpoint/1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write state to path atomically (temp file, fsync, rename); the old file stays until then."""
    payload = {"format": FORMAT, **state}
    atomic_write(path, lambda fh: torch.save(payload, fh))


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
