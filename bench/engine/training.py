"""The method-agnostic training loop: optimizer, LR warm-up, gradient clipping, eval EMA,
periodic atomic checkpoints, exact resume and a progress bar. It never branches on a method."""

from __future__ import annotations

import contextlib
import copy
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
from bench.nets.averaging import ParamAverage, flat_view, flatten_parameters
from methods.base import Method


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or RAdam with the configured betas and decoupled weight decay.

    Adam and AdamW use the fused kernels where PyTorch has them (CPU and CUDA, float
    parameters): one kernel over all parameters, about 3x faster than the foreach path on a
    small MLP on the CPU. RAdam has no fused kernel and uses foreach.
    """
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay,
                                 decoupled_weight_decay=cfg.weight_decay > 0, foreach=True)
    fused = _can_fuse(params)
    speed: dict[str, bool] = {"fused": True} if fused else {"foreach": True}
    if cfg.weight_decay > 0:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay,
                                 **speed)
    return torch.optim.Adam(params, lr=cfg.lr, betas=betas, **speed)


def _can_fuse(params: list[nn.Parameter]) -> bool:
    """Fused Adam needs floating-point parameters on one CPU or CUDA device."""
    devices = {p.device.type for p in params}
    return (len(devices) == 1 and devices <= {"cpu", "cuda"}
            and all(p.is_floating_point() for p in params))


class FusedAdamStep:
    """optimizer.step() of a fused Adam or AdamW with one parameter group, calling torch's own
    kernels with the tensor lists built once: torch's step regroups every tensor on every call,
    which on a small net takes about as long as the kernel itself. Anything else (RAdam, an
    unfused optimizer, parameters without gradients) goes through optimizer.step(). Build a new
    one whenever the optimizer's state is replaced (load_state_dict)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._lists: tuple[list[torch.Tensor], ...] | None = None
        self._steps = torch.zeros(0)
        self._first = True

    def __call__(self) -> None:
        """One optimizer step."""
        lists = self._lists
        if lists is None:
            self.optimizer.step()
            if self._first:  # the first step creates the state the lists point at
                self._first = False
                self._lists = self._fast_lists()
            return
        params, exp_avgs, exp_avg_sqs, steps = lists
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            self.optimizer.step()
            return
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        fused = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        self._steps.add_(1)  # every parameter's step count (views of this one tensor)
        fused(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
              beta1=float(beta1), beta2=float(beta2), weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)

    def _fast_lists(self) -> tuple[list[torch.Tensor], ...] | None:
        """(params, exp_avgs, exp_avg_sqs, steps) when the fast path applies, else None."""
        opt = self.optimizer
        if not isinstance(opt, torch.optim.Adam) or len(opt.param_groups) != 1:
            return None
        group = opt.param_groups[0]
        if (not group.get("fused") or group["amsgrad"] or group["maximize"]
                or group["capturable"] or group["differentiable"]
                or isinstance(group["lr"], torch.Tensor)
                or any(isinstance(b, torch.Tensor) for b in group["betas"])
                or "decoupled_weight_decay" not in group):
            return None
        params = list(group["params"])
        states = [opt.state.get(p, {}) for p in params]
        if not params or not all({"exp_avg", "exp_avg_sq", "step"} <= set(s) for s in states):
            return None
        if len({(p.device, p.dtype) for p in params}) != 1:
            return None
        steps = [s["step"] for s in states]
        if any(t.dim() != 0 for t in steps) or len({(t.device, t.dtype) for t in steps}) != 1:
            return None
        flat = flat_view(steps)
        if flat is None:  # one tensor of all step counts, each parameter's a view of it
            flat = torch.stack([t.detach() for t in steps])
            for i, s in enumerate(states):
                s["step"] = flat[i]
            steps = [s["step"] for s in states]
        self._steps = flat
        return (params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                steps)


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
    ) -> None:
        self.fetch = fetch  # dataset indices -> float32 samples
        self.size = size
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.rows = shard.rows(batch_size)  # this process's rows of each global batch
        self.channels_last = channels_last  # image batches in NHWC memory order
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
        parts = []
        while sum(p.numel() for p in parts) < self.batch_size:
            epoch, offset = divmod(start, n)
            take = min(self.batch_size - sum(p.numel() for p in parts), n - offset)
            parts.append(self._permutation(epoch)[offset:offset + take])
            start += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0, labels) of batch `step` on the device."""
        idx = self.indices(step)[self.rows]
        x = self.fetch(idx).to(self.device, non_blocking=True)
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
    # the loop's optimizer step and EMA average, kept from one train_loop call to the next
    # (not checkpointed; load_loop_state drops them)
    helpers: tuple[FusedAdamStep, ParamAverage | None] | None = field(default=None, repr=False)


def new_loop_state(method: Method, cfg: TrainConfig, seed: int, device: torch.device,
                   ) -> LoopState:
    """Fresh optimizer, EMA copy of the student and training generator."""
    student = method.student
    optimizer = None
    ema = None
    if student is not None and method.trains:
        flatten_parameters(student)  # one buffer: averages and the optimizer's steps are cheap
        optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad], cfg)
        if cfg.ema_rate > 0:
            ema = copy.deepcopy(student).eval().requires_grad_(False)
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
    }


def load_loop_state(state: LoopState, saved: dict[str, Any]) -> None:
    """Restore what loop_state_dict saved."""
    state.step = int(saved["step"])
    if state.optimizer is not None and saved.get("optimizer"):
        state.optimizer.load_state_dict(saved["optimizer"])
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
    state.helpers = None  # their tensor lists point at the replaced optimizer state


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
    if state.helpers is None or state.helpers[0].optimizer is not optimizer:
        state.helpers = (FusedAdamStep(optimizer),
                         ParamAverage(state.ema, student) if state.ema is not None else None)
    optimizer_step, ema = state.helpers
    scaler = state.scaler
    if not student.training:  # Module.train() walks every submodule: ~0.1 ms on a small MLP
        student.train()
    critical = hooks.critical or contextlib.nullcontext
    deferred = cfg.nonfinite == "stop"
    window_start = time.perf_counter()
    window_steps = 0
    while state.step < stop:
        with critical():
            step = state.step
            lr = lr_at(step, cfg, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x0, labels = stream.batch(step)
            for p in params:  # before the forward: no old gradients at its peak
                p.grad = None
            with autocast(cfg.precision, x0.device):
                loss = method.loss(x0, labels, step, state.generator).float().mean()
            (loss if scaler is None else scaler.scale(loss)).backward()
            seen = loss.detach() if hooks.reduce is None else hooks.reduce(loss)
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
                    optimizer_step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
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


def _due(step: int, every: int, total: int) -> bool:
    """True on every `every`-th iteration before the last (0 = never)."""
    return every > 0 and step % every == 0 and step < total
