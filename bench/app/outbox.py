"""Tracking writes that a tracking server could not take, kept on disk until it can.

One JSON-lines file per run, `runs/outbox/<run_id>.jsonl`, in the order the writes were made:
metrics (with their own timestamps and steps), params, tags, artifacts (the local path, sent
when delivered) and the run's end. `Tracker` appends to it while its server is unreachable and
delivers it, in order, when the server answers again; `bench sync` delivers what a run left
when the server never came back before it ended.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

from bench.core.atomic import atomic_write

Record = dict[str, Any]


class Outbox:
    """The undelivered tracking writes of each run, under one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.jsonl"

    def append(self, run_id: str, records: list[Record]) -> None:
        """Add writes at the end, on disk before this returns."""
        if not records:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path(run_id).open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def records(self, run_id: str) -> list[Record]:
        """The run's writes in order (a torn last line, from a crash mid-write, is dropped)."""
        path = self.path(run_id)
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def replace(self, run_id: str, records: list[Record]) -> None:
        """Keep only these writes (the ones not delivered yet); none: remove the file."""
        path = self.path(run_id)
        if not records:
            path.unlink(missing_ok=True)
            return
        text = "".join(json.dumps(r) + "\n" for r in records).encode()

        def write(fh: BinaryIO) -> None:
            fh.write(text)

        atomic_write(path, write)

    def pending(self, run_id: str) -> bool:
        return self.path(run_id).is_file()

    def runs(self) -> list[str]:
        """Runs with undelivered writes."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.jsonl"))

    def count(self, run_id: str) -> int:
        """Metric values and other writes waiting for the run."""
        return sum(len(r.get("metrics", ())) or 1 for r in self.records(run_id))
