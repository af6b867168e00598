"""The method-agnostic training loop: optimizer, LR warm-up, gradient clipping, eval EMA,
periodic atomic checkpoints, exact resume and a progress bar. It never branches on a method."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bench.core.config import TrainConfig
from bench.core.errors import BenchError
from bench.data.shard import Shard
from bench.diffusion.rng import sample_seed
from bench.nets.averaging import ParamAverage
from methods.base import Method


def make_optimizer(params: list[nn.Parameter] | list[dict[str, Any]], cfg: TrainConfig,
                   ) -> torch.optim.Optimizer:
    """Adam (AdamW with weight decay) or RAdam with the configured betas and decoupled weight
    decay, in torch's fused implementation where torch has one for that optimizer and the
    parameters' device (Adam and AdamW on the CPU and CUDA: one kernel over all parameters),
    else in its foreach implementation. params: parameters, or torch.optim parameter groups
    (Method.parameters()); a group's "lr_scale" multiplies the scheduled learning rate."""
    groups: list[dict[str, Any]] = (
        [g for g in params if isinstance(g, dict)] if params and isinstance(params[0], dict)
        else [{"params": list(params)}])
    every = [p for g in groups for p in g["params"]]
    betas = (cfg.beta1, cfg.beta2)
    options: dict[str, Any] = {}
    optimizer: type[torch.optim.Optimizer]
    if cfg.optimizer == "radam":
        optimizer = torch.optim.RAdam
        options["decoupled_weight_decay"] = cfg.weight_decay > 0
    else:
        optimizer = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
    options["fused" if _can_fuse(optimizer, every) else "foreach"] = True
    return optimizer(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, **options)


def _can_fuse(optimizer: type[torch.optim.Optimizer], params: list[nn.Parameter]) -> bool:
    """The optimizer has a fused implementation (a `fused` argument) and the parameters are
    floating point on one CPU or CUDA device, where torch's fused kernels run."""
    devices = {p.device.type for p in params}
    return ("fused" in inspect.signature(optimizer).parameters
            and len(devices) == 1 and devices <= {"cpu", "cuda"}
            and all(p.is_floating_point() for p in params))


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate at iteration step of total: linear warm-up to cfg.lr, then constant, or
    decaying to 0 at the last iteration (cosine or linear) over the iterations after warm-up."""
    warm = max(cfg.warmup_steps, 0)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.lr_schedule == "constant" or total <= warm:
        return cfg.lr
    progress = min(1.0, (step - warm) / max(total - warm, 1))
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)


FLIP_STREAM = 0x666C6970  # the flips' stream key next to the epoch permutations' (seed, epoch)


class BatchStream:
    """Batch k is a pure function of (seed, k): epoch-wise permutations, so resume is exact.
    Under several processes each takes its shard's rows of the same global batch."""

    def __init__(
        self,
        fetch: Callable[[torch.Tensor], torch.Tensor],
        size: int,
        labels: torch.Tensor | None,
        batch_size: int,
        seed: int,
        device: torch.device,
        shard: Shard = Shard(),
        channels_last: bool = False,
        hflip: bool = False,
    ) -> None:
        self.fetch = fetch  # dataset indices -> float32 samples
        self.size = size
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.rows = shard.rows(batch_size)  # this process's rows of each global batch
        self.channels_last = channels_last  # image batches in NHWC memory order
        self.hflip = hflip  # random horizontal flips, a function of (seed, step) per sample
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
            # int32 where it fits: the same permutation (randperm's draws do not depend on the
            # dtype) in half the memory, which the loop holds for a whole epoch
            dtype = torch.int32 if self.size <= torch.iinfo(torch.int32).max else torch.int64
            self._perm = torch.randperm(self.size, generator=g, dtype=dtype)
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """Dataset indices of batch `step`."""
        n = self.size
        start = step * self.batch_size
        parts: list[torch.Tensor] = []
        while sum(p.numel() for p in parts) < self.batch_size:
            epoch, offset = divmod(start, n)
            take = min(self.batch_size - sum(p.numel() for p in parts), n - offset)
            parts.append(self._permutation(epoch)[offset:offset + take])
            start += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def flips(self, step: int) -> torch.Tensor:
        """Which rows of global batch `step` are flipped: its own stream of (seed, step), so
        a resumed run and any number of processes flip the same images."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, FLIP_STREAM, step))
        return torch.rand(self.batch_size, generator=g) < 0.5

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0, labels) of batch `step` on the device."""
        idx = self.indices(step)[self.rows]
        x = self.fetch(idx)
        if self.hflip:
            flip = self.flips(step)[self.rows].view(-1, *([1] * (x.ndim - 1)))
            x = torch.where(flip, x.flip(-1), x)
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = None if self.labels is None else self.labels[idx].to(self.device)
        return x, y


class NonFiniteLoss(BenchError):
    """The loss became NaN or infinite at iteration `iteration`."""

    def __init__(self, message: str, iteration: int) -> None:
        super().__init__(message)
        self.iteration = iteration


@dataclass
class LoopState:
    """Everything the loop mutates; what a checkpoint stores."""

    step: int
    optimizer: torch.optim.Optimizer | None
    ema: nn.Module | None
    generator: torch.Generator
    # the loss logged next is the mean over the iterations since the last log: kept here so
    # that a run resumed between two logs logs the same values as one never interrupted
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))
    loss_count: int = 0
    skipped: int = 0  # iterations skipped for a non-finite loss (train.nonfinite = "skip")
    scaler: torch.amp.GradScaler | None = None  # train.precision = "fp16": the loss scale
    scaler_skips: int = 0  # iterations the gradient scaler skipped (overflow), retried
    # the loop's update of `ema`, kept from one train_loop call to the next (not checkpointed)
    ema_average: ParamAverage | None = field(default=None, repr=False)


def new_loop_state(method: Method, cfg: TrainConfig, seed: int, device: torch.device,
                   ) -> LoopState:
    """Fresh optimizer, EMA copy of the student and training generator."""
    student = method.student
    optimizer = None
    ema = None
    if student is not None and method.trains:
        optimizer = make_optimizer(method.parameters(), cfg)
        if cfg.ema_rate > 0:
            ema = copy.deepcopy(student).eval().requires_grad_(False)
            start = method.initial_average()
            if start is not None:
                ema.load_state_dict(start)
    generator = torch.Generator(device=device).manual_seed(sample_seed(seed, 2**31))
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    return LoopState(0, optimizer, ema, generator,
                     torch.zeros((), dtype=torch.float32, device=device), scaler=scaler)


def loop_state_dict(state: LoopState) -> dict[str, Any]:
    """The loop's part of a checkpoint."""
    return {
        "step": state.step,
        "optimizer": state.optimizer.state_dict() if state.optimizer is not None else {},
        "ema": state.ema.state_dict() if state.ema is not None else {},
        "generator": state.generator.get_state(),
        "loss_sum": state.loss_sum.detach().cpu(),
        "loss_count": state.loss_count,
        "skipped": state.skipped,
        "scaler": state.scaler.state_dict() if state.scaler is not None else {},
        "scaler_skips": state.scaler_skips,
    }


def load_loop_state(state: LoopState, saved: dict[str, Any]) -> None:
    """Restore what loop_state_dict saved."""
    state.step = int(saved["step"])
    if state.optimizer is not None and saved.get("optimizer"):
        state.optimizer.load_state_dict(_own_step_counts(saved["optimizer"]))
    if state.ema is not None and saved.get("ema"):
        state.ema.load_state_dict(saved["ema"])
    if saved["generator"].numel():  # empty: an imported run, no RNG state to restore
        state.generator.set_state(saved["generator"].cpu()
                                  if state.generator.device.type == "cpu"
                                  else saved["generator"])
    if "loss_sum" in saved:
        state.loss_sum = saved["loss_sum"].to(state.loss_sum.device, state.loss_sum.dtype)
        state.loss_count = int(saved["loss_count"])
        state.skipped = int(saved.get("skipped", 0))
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    state.scaler_skips = int(saved.get("scaler_skips", 0))


def _own_step_counts(saved: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict whose per-parameter step counts are tensors of their own, as
    torch's optimizers keep them (checkpoints of earlier versions hold them as views of one
    shared tensor: the same values)."""
    state = {key: {**values, "step": values["step"].clone()}
             if isinstance(values.get("step"), torch.Tensor) else values
             for key, values in saved["state"].items()}
    return {**saved, "state": state}


@dataclass
class LoopHooks:
    """Callbacks the loop calls; all optional."""

    log: Callable[[dict[str, float], int], None] | None = None  # metrics, step
    checkpoint: Callable[[LoopState], None] | None = None  # write a checkpoint
    evaluate: Callable[[LoopState], None] | None = None  # intermediate evaluation
    progress: Callable[[int, int, float], None] | None = None  # step, total, loss
    # entered around each iteration and its checkpoint: a block that must not be cut in half
    # (the runner holds SIGINT/SIGTERM back until it ends)
    critical: Callable[[], AbstractContextManager[None]] | None = None
    # the loss over all processes (a mean over the ranks), so every rank takes the same
    # skip/stop decision and rank 0 logs the global batch's loss
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """Autocast of the forward passes at train.precision ("fp32": none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def train_loop(
    method: Method,
    cfg: TrainConfig,
    stream: BatchStream,
    state: LoopState,
    hooks: LoopHooks,
    until: int | None = None,
) -> LoopState:
    """Run optimizer iterations from state.step to method.total_steps() (or `until`).

    train.nonfinite = "stop" never waits for the device inside an iteration: each iteration's
    finiteness stays on the device and is checked where the loop syncs anyway (the log),
    before a checkpoint or an evaluation, and when the loop ends or is interrupted, so weights
    that went non-finite are never kept. "skip" needs the answer at once (one sync).
    """
    unchecked: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (iteration, checked, loss)
    try:
        _iterate(method, cfg, stream, state, hooks, until, unchecked)
    except KeyboardInterrupt:
        _check_finite(unchecked)
        raise
    _check_finite(unchecked)
    return state


def _check_finite(unchecked: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
    """Raise NonFiniteLoss naming the first iteration among the unchecked ones whose checked
    value (its loss, or its gradient norm when clipping) is not finite: one isfinite and one
    sync for all of them; forget them when all were finite."""
    if not unchecked:
        return
    flags = torch.isfinite(torch.stack([value for _, value, _ in unchecked])).cpu()
    if not bool(flags.all()):
        first = int(flags.logical_not().nonzero()[0, 0])
        step, _, loss = unchecked[first]
        raise NonFiniteLoss(f"non-finite loss ({float(loss):g}) at iteration {step}; "
                            f"train.nonfinite = \"skip\" skips such iterations", iteration=step)
    unchecked.clear()


def _iterate(
    method: Method,
    cfg: TrainConfig,
    stream: BatchStream,
    state: LoopState,
    hooks: LoopHooks,
    until: int | None,
    unchecked: list[tuple[int, torch.Tensor, torch.Tensor]],
) -> None:
    """The iterations of train_loop; with train.nonfinite = "stop" each one's value to check
    (its loss, or its gradient norm when clipping without a scaler) and loss are appended to
    unchecked, on the device, checked all at once by _check_finite."""
    student = method.student
    total = method.total_steps()
    stop = total if until is None else min(until, total)
    if student is None or state.optimizer is None or state.step >= stop:
        return
    optimizer = state.optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # a method's own parameters (Method.parameters() beyond the student): DDP averages only
    # the gradients of what it wraps (the student, or its raw network), so with several
    # processes the loop averages the others itself
    in_parallel = {id(p) for p in (method.parallel_module() or student).parameters()}
    reduce = hooks.reduce
    own = [p for p in params if id(p) not in in_parallel] if reduce is not None else []
    if state.ema is not None and state.ema_average is None:
        state.ema_average = ParamAverage(state.ema, student)
    ema = state.ema_average
    scaler = state.scaler
    if not student.training:  # Module.train() walks every submodule: ~0.1 ms on a small MLP
        student.train()
    critical = hooks.critical or contextlib.nullcontext
    deferred = cfg.nonfinite == "stop"
    window_start = time.perf_counter()
    window_steps = 0
    skips_in_a_row = 0
    while state.step < stop:
        with critical():
            step = state.step
            lr = lr_at(step, cfg, total) * method.lr_factor(step)
            if method.resets_optimizer(step):
                optimizer.state.clear()
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            x0, labels = stream.batch(step)
            for p in params:  # before the forward: no old gradients at its peak
                p.grad = None
            with autocast(cfg.precision, x0.device):
                loss = method.loss(x0, labels, step, state.generator).float().mean()
            (loss if scaler is None else scaler.scale(loss)).backward()
            seen = loss.detach() if hooks.reduce is None else hooks.reduce(loss)
            for p in own:
                if p.grad is not None and reduce is not None:
                    p.grad.copy_(reduce(p.grad))
            if scaler is not None:
                scaler.unscale_(optimizer)  # an overflow is the scaler's to skip, not an error
            checked = seen
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
                checked = grad_norm if scaler is None else seen
            if deferred:
                unchecked.append((step, checked, seen))
                if len(unchecked) >= 1024:  # however rarely the loop logs
                    _check_finite(unchecked)
            if not deferred and not bool(torch.isfinite(checked)):
                optimizer.zero_grad(set_to_none=True)
                state.skipped += 1
            else:
                if scaler is None:
                    optimizer.step()
                elif not _scaled_step(scaler, optimizer):
                    # an overflow: no update, so neither the averages nor the iteration
                    # counter (the schedules' k) move; the iteration is retried, as the
                    # official loops do (openai/consistency_models, `took_step`)
                    state.scaler_skips += 1
                    skips_in_a_row += 1
                    if skips_in_a_row >= MAX_SCALER_SKIPS:
                        raise NonFiniteLoss(
                            f"the fp16 gradient scaler skipped {skips_in_a_row} updates in a "
                            f"row at iteration {step} (loss scale {scaler.get_scale():.3g}): "
                            f"the gradients overflow at every scale; use train.precision = "
                            f"\"bf16\" or a lower train.lr", iteration=step)
                    continue
                skips_in_a_row = 0
                if ema is not None:
                    ema.update(cfg.ema_rate)
                method.after_step(step, state.ema)
                state.loss_sum += seen
                state.loss_count += 1
            state.step = step + 1
            window_steps += 1
            if state.step % cfg.log_every == 0 or state.step == total:
                _check_finite(unchecked)
                mean_loss = float(state.loss_sum) / max(state.loss_count, 1)
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                metrics = {"loss": mean_loss, "lr": lr, "iters_per_second": window_steps / elapsed,
                           "images_per_second": window_steps * stream.batch_size / elapsed}
                metrics.update(method.schedule_values(step))
                if state.skipped:
                    metrics["skipped_iterations"] = state.skipped
                if state.scaler_skips:
                    metrics["fp16_skipped_updates"] = state.scaler_skips
                if hooks.log is not None:
                    hooks.log(metrics, state.step)
                if hooks.progress is not None:
                    hooks.progress(state.step, total, mean_loss)
                state.loss_sum.zero_()
                state.loss_count = 0
                window_start = time.perf_counter()
                window_steps = 0
            if hooks.checkpoint is not None and _due(state.step, cfg.checkpoint_every, total):
                _check_finite(unchecked)
                hooks.checkpoint(state)
        if hooks.evaluate is not None and _due(state.step, cfg.eval_every, total):
            _check_finite(unchecked)
            hooks.evaluate(state)
            student.train()


MAX_SCALER_SKIPS = 64  # halving the loss scale 64 times reaches 2^-48: no fp16 step can pass


def _scaled_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """The gradient scaler's step and update; whether it updated the parameters. The scaler
    lowers its scale exactly when it found an overflow and skipped the step (one host sync)."""
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale


def _due(step: int, every: int, total: int) -> bool:
    """True on every `every`-th iteration before the last (0 = never)."""
    return every > 0 and step % every == 0 and step < total
