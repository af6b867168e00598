"""Checkpoints: atomic writes, weights_only loads, one-line errors for damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.core.errors import BenchError
from bench.engine.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_and_no_temporary_left(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "last.pt"
    state = {"step": 3, "modules": {"student": {"w": torch.arange(4.0)}}, "name": "x"}
    save_checkpoint(state, path)
    save_checkpoint({**state, "step": 4}, path)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 4 and torch.equal(loaded["modules"]["student"]["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_truncated_and_foreign_files_are_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(BenchError, match="unreadable") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.ones(2)}, foreign)
    with pytest.raises(BenchError, match="not a cmbench checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(BenchError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
