"""The method-agnostic training loop: optimizer, LR warm-up, gradient clipping, eval EMA,
periodic atomic checkpoints, exact resume and a progress bar. It never branches on a method."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.averaging import ParamAverage
from bench.config import TrainConfig
from bench.errors import BenchError
from bench.rng import sample_seed
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
        torch._foreach_add_(steps, 1)
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
        return (params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states])


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
    """Batch k is a pure function of (seed, k): epoch-wise permutations, so resume is exact."""

    def __init__(
        self,
        fetch: Callable[[torch.Tensor], torch.Tensor],
        size: int,
        labels: torch.Tensor | None,
        batch_size: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.fetch = fetch  # dataset indices -> float32 samples
        self.size = size
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
            self._perm = torch.randperm(self.size, generator=g)
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
        idx = self.indices(step)
        x = self.fetch(idx).to(self.device, non_blocking=True)
        y = None if self.labels is None else self.labels[idx].to(self.device)
        return x, y


class NonFiniteLoss(BenchError):
    """The loss became NaN or infinite."""


@dataclass
class LoopState:
    """Everything the loop mutates; what a checkpoint stores."""

    step: int
    optimizer: torch.optim.Optimizer | None
    ema: nn.Module | None
    generator: torch.Generator


def new_loop_state(method: Method, cfg: TrainConfig, seed: int, device: torch.device,
                   ) -> LoopState:
    """Fresh optimizer, EMA copy of the student and training generator."""
    student = method.student
    optimizer = None
    ema = None
    if student is not None and method.trains:
        optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad], cfg)
        if cfg.ema_rate > 0:
            ema = copy.deepcopy(student).eval().requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(sample_seed(seed, 2**31))
    return LoopState(0, optimizer, ema, generator)


def loop_state_dict(state: LoopState) -> dict[str, Any]:
    """The loop's part of a checkpoint."""
    return {
        "step": state.step,
        "optimizer": state.optimizer.state_dict() if state.optimizer is not None else {},
        "ema": state.ema.state_dict() if state.ema is not None else {},
        "generator": state.generator.get_state(),
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


@dataclass
class LoopHooks:
    """Callbacks the loop calls; all optional."""

    log: Callable[[dict[str, float], int], None] | None = None  # metrics, step
    checkpoint: Callable[[LoopState], None] | None = None  # write a checkpoint
    evaluate: Callable[[LoopState], None] | None = None  # intermediate evaluation
    progress: Callable[[int, int, float], None] | None = None  # step, total, loss


def train_loop(
    method: Method,
    cfg: TrainConfig,
    stream: BatchStream,
    state: LoopState,
    hooks: LoopHooks,
    until: int | None = None,
) -> LoopState:
    """Run optimizer iterations from state.step to method.total_steps() (or `until`).

    train.nonfinite = "stop" never waits for the device inside an iteration: the first
    non-finite iteration is kept on the device and checked where the loop syncs anyway (the
    log), before a checkpoint or an evaluation, and when the loop ends or is interrupted, so
    weights that went non-finite are never kept. "skip" needs the answer at once (one sync).
    """
    unchecked: list[tuple[int, torch.Tensor]] = []  # (iteration, finite) not yet looked at
    try:
        _iterate(method, cfg, stream, state, hooks, until, unchecked)
    except KeyboardInterrupt:
        _check_finite(unchecked)
        raise
    _check_finite(unchecked)
    return state


def _check_finite(unchecked: list[tuple[int, torch.Tensor]]) -> None:
    """Raise NonFiniteLoss naming the first non-finite iteration among the unchecked ones (one
    sync for all of them); forget them when all were finite."""
    if not unchecked:
        return
    finite = torch.stack([flag for _, flag in unchecked]).cpu()
    if not bool(finite.all()):
        first = unchecked[int(finite.logical_not().nonzero()[0, 0])][0]
        raise NonFiniteLoss(f"non-finite loss at iteration {first}")
    unchecked.clear()


def _iterate(
    method: Method,
    cfg: TrainConfig,
    stream: BatchStream,
    state: LoopState,
    hooks: LoopHooks,
    until: int | None,
    unchecked: list[tuple[int, torch.Tensor]],
) -> None:
    """The iterations of train_loop; with train.nonfinite = "stop" each one's finiteness
    flag is appended to unchecked (on the device)."""
    student = method.student
    total = method.total_steps()
    stop = total if until is None else min(until, total)
    if student is None or state.optimizer is None or state.step >= stop:
        return
    optimizer = state.optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer_step = FusedAdamStep(optimizer)
    ema = ParamAverage(state.ema, student) if state.ema is not None else None
    student.train()
    loss_sum = torch.zeros((), device=stream.device)
    loss_count = 0
    deferred = cfg.nonfinite == "stop"
    window_start = time.perf_counter()
    window_steps = 0
    while state.step < stop:
        step = state.step
        lr = lr_at(step, cfg, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, labels = stream.batch(step)
        optimizer.zero_grad(set_to_none=True)  # before the forward: no old gradients at its peak
        loss = method.loss(x0, labels, step, state.generator).mean()
        loss.backward()
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
            finite = torch.isfinite(grad_norm)
        else:
            finite = torch.isfinite(loss.detach())
        if deferred:
            unchecked.append((step, finite))
            if len(unchecked) >= 1024:  # however rarely the loop logs
                _check_finite(unchecked)
        if not deferred and not bool(finite):
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer_step()
            if ema is not None:
                ema.update(cfg.ema_rate)
            method.after_step(step, state.ema)
            loss_sum += loss.detach()
            loss_count += 1
        state.step = step + 1
        window_steps += 1
        if state.step % cfg.log_every == 0 or state.step == total:
            _check_finite(unchecked)
            mean_loss = float(loss_sum) / max(loss_count, 1)
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            metrics = {"loss": mean_loss, "lr": lr, "iters_per_second": window_steps / elapsed,
                       "images_per_second": window_steps * stream.batch_size / elapsed}
            metrics.update(method.schedule_values(step))
            if hooks.log is not None:
                hooks.log(metrics, state.step)
            if hooks.progress is not None:
                hooks.progress(state.step, total, mean_loss)
            loss_sum.zero_()
            loss_count = 0
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
