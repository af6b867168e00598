"""Samplers as pure functions over a descending sigma schedule (k-diffusion style).

`model(x, sigma)` is any D(x; sigma) -> x0 (a Denoiser, an AnalyticDenoiser, or a consistency
function f(x, sigma)); the schedule is an argument, so any sampler runs on any schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from bench.diffusion.denoiser import append_dims
from bench.diffusion.rng import StackedGenerator

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """PF-ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def _level(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x.new_full((x.shape[0],), sigma)


@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler steps of the PF ODE = deterministic DDIM in sigma space; NFE = len(sigmas) - 1."""
    levels = [float(s) for s in sigmas]
    for s, s_next in zip(levels[:-1], levels[1:], strict=True):
        denoised = model(x, _level(x, s))
        x = denoised if s_next == 0 else x + (s_next - s) * (x - denoised) / s
    return x


@torch.no_grad()
def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Implements Algorithm 1 (deterministic Heun) of Karras et al. (2022): 2n - 1 NFE."""
    levels = [float(s) for s in sigmas]
    for s, s_next in zip(levels[:-1], levels[1:], strict=True):
        d = (x - model(x, _level(x, s))) / s
        x_euler = x + (s_next - s) * d
        if s_next == 0:
            x = x_euler
            continue
        d_next = (x_euler - model(x_euler, _level(x, s_next))) / s_next
        x = x + (s_next - s) * 0.5 * (d + d_next)
    return x


def heun_step(model: Model, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              ) -> torch.Tensor:
    """One Heun step of the PF ODE between per-sample levels (both > 0): 2 model calls."""
    d = to_d(x, sigma, model(x, sigma))
    x_euler = x + append_dims(sigma_next - sigma, x.ndim) * d
    d_next = to_d(x_euler, sigma_next, model(x_euler, sigma_next))
    return x + append_dims(sigma_next - sigma, x.ndim) * 0.5 * (d + d_next)


def euler_step(model: Model, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
               ) -> torch.Tensor:
    """One Euler (DDIM) step of the PF ODE between per-sample levels: 1 model call."""
    return x + append_dims(sigma_next - sigma, x.ndim) * to_d(x, sigma, model(x, sigma))


@torch.no_grad()
def sample_consistency(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    rng: StackedGenerator,
    sigma_min: float,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Implements Algorithm 1 (multistep consistency sampling) of Song et al. (2023).

    x starts at level sigmas[0]; each later t re-noises x0 to level t; NFE = len(sigmas).
    """
    levels = [float(s) for s in sigmas]
    x0 = model(x, _level(x, levels[0]))
    if clamp is not None:
        x0 = x0.clamp(*clamp)
    for t in levels[1:]:
        x = x0 + (t**2 - sigma_min**2) ** 0.5 * rng.randn_like(x0)
        x0 = model(x, _level(x, t))
        if clamp is not None:
            x0 = x0.clamp(*clamp)
    return x0


class CallCounter:
    """Counts network calls (batched forwards) so that NFE is measured, not assumed."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x, sigma)
