"""Which rows of each global batch a process owns (one process: all of them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.core.errors import UsageError

if TYPE_CHECKING:  # no torch import: the CLI reads the shard before torch loads
    import torch


@dataclass(frozen=True)
class Shard:
    """Which rows of each global batch this process owns: all of them in one process."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that tracks, checkpoints and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def local_size(self, global_size: int) -> int:
        """Rows per rank of a global batch; it must split evenly."""
        if global_size % self.world_size:
            raise UsageError(f"train.batch_size {global_size} does not split over "
                             f"{self.world_size} processes (make it a multiple)")
        return global_size // self.world_size

    def rows(self, global_size: int) -> slice:
        """This rank's contiguous rows of a global batch."""
        n = self.local_size(global_size)
        return slice(self.rank * n, (self.rank + 1) * n)

    def draw(self, fn: Callable[[int], torch.Tensor], local_size: int) -> torch.Tensor:
        """fn(n) draws n rows; return this rank's rows of the global draw (local_size each), so
        every random value equals the one a single process draws for the same row."""
        if not self.distributed:
            return fn(local_size)
        full = fn(local_size * self.world_size)
        return full[self.rank * local_size:(self.rank + 1) * local_size]
