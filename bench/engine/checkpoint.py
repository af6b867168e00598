"""Checkpoints: plain tensors and primitives only, written atomically, loaded weights_only."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from bench.core.atomic import atomic_write
from bench.core.errors import BenchError, unreadable_reason

FORMAT = "cmbench-checkpoint/1"
KEPT_PATTERN = re.compile(r"^iter-(\d+)\.pt$")  # the kept history beside last.pt


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write state to path atomically (temp file, fsync, rename); the old file stays until then."""
    payload = {"format": FORMAT, **state}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint; never unpickles code."""
    if path.is_dir():
        raise BenchError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise BenchError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, corrupt, not a torch file, or one that holds code
        raise BenchError(f"checkpoint {path} {unreadable_reason(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BenchError(f"{path} is not a cmbench checkpoint")
    return state


def kept_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The kept checkpoints iter-<step>.pt of a folder, by step."""
    kept = []
    for path in folder.glob("iter-*.pt"):
        match = KEPT_PATTERN.match(path.name)
        if match:
            kept.append((int(match.group(1)), path))
    return sorted(kept)


def retain(last: Path, step: int, keep: int) -> list[Path]:
    """Keep the checkpoint just written to `last` as iter-<step>.pt beside it (a hard link:
    no second copy on disk while it is also the last one) and delete the oldest kept ones
    beyond `keep` in all; keep 1 keeps only `last`. Returns the paths deleted."""
    if keep <= 1:
        return []
    kept = last.parent / f"iter-{step:08d}.pt"
    staging = kept.with_name(kept.name + ".tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(last, staging)
    except OSError:  # a file system without hard links: a copy
        shutil.copyfile(last, staging)
    os.replace(staging, kept)
    removed = []
    history = kept_checkpoints(last.parent)
    for _, path in history[:max(len(history) - keep, 0)]:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
