"""Several processes, one run: `torchrun --nproc-per-node G -m bench run ...` trains with
DistributedDataParallel (NCCL on GPUs, gloo on the CPU).

The run stays a function of (seed, iteration) whatever the number of processes: batch k is the
same global batch, rank r takes the contiguous rows [r B/W, (r+1) B/W) of it, and every random
draw a method makes for the batch is drawn for the whole global batch and sliced the same way.
Each rank's loss is the mean over its rows, and DDP averages the gradients over the ranks, so
the update is the gradient of the global batch's mean loss, as in one process. Rank 0 alone
talks to MLflow (creates the run, logs, writes checkpoints) and evaluates.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from bench.core.errors import BenchError, UsageError
from bench.data.shard import Shard

if TYPE_CHECKING:  # torch is imported where used: the CLI reads the shard before torch loads
    import torch
    from torch import nn

# rank 0 evaluates alone while the others wait in their next collective: give it time
COLLECTIVE_TIMEOUT = timedelta(hours=6)


def shard_from_env() -> Shard:
    """The shard torchrun describes in RANK and WORLD_SIZE (one process when they are unset)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError("RANK and WORLD_SIZE must be integers") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"RANK {rank} is not in [0, WORLD_SIZE {world_size})")
    return Shard(rank, world_size)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA ranks use cuda:LOCAL_RANK; other devices are unchanged."""
    import torch

    if device.type != "cuda" or "LOCAL_RANK" not in os.environ:
        return device
    local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(local)
    return local


@contextmanager
def process_group(shard: Shard, device: torch.device) -> Iterator[None]:
    """Join the process group for the block (NCCL on CUDA, else gloo); no-op in one process."""
    import torch.distributed as dist

    if not shard.distributed or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=shard.rank, world_size=shard.world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the process group, first freeing the DistributedDataParallel wrappers nothing
    refers to any more: their reference cycles otherwise last until the interpreter shuts down,
    and one destroyed then ends the process in `terminate called without an active exception`
    (SIGABRT; about one gloo process in six, torch 2.14)."""
    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (a copy)."""
    import torch.distributed as dist

    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def broadcast(value: Any, shard: Shard) -> Any:
    """Rank 0's value on every rank (a picklable object)."""
    if not shard.distributed:
        return value
    import torch.distributed as dist

    box = [value if shard.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: Any, shard: Shard) -> list[Any]:
    """Every rank's value, in rank order, on rank 0; an empty list on the others."""
    import torch.distributed as dist

    out: list[Any] | None = [None] * shard.world_size if shard.is_main else None
    dist.gather_object(value, out, dst=0)
    return out if out is not None else []


def main_first(shard: Shard, fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0, then on the others: caches rank 0 fills (a teacher, a feature
    classifier) are read, never written twice. An error on rank 0 stops the others too."""
    if not shard.distributed:
        return fn()
    if shard.is_main:
        try:
            result = fn()
        except BaseException as exc:
            broadcast(f"{type(exc).__name__}: {exc}", shard)
            raise
        broadcast(None, shard)
        return result
    error = broadcast(None, shard)
    if error is not None:

        raise BenchError(f"rank 0 failed: {error.splitlines()[0]}")
    return fn()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """The module inside DistributedDataParallel (its gradients are averaged over the ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
