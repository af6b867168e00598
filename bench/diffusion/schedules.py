"""Noise-level grids and training curricula as small pure functions."""

from __future__ import annotations

import math

import torch

SIGMA_MIN = 0.002  # smallest noise level (Karras et al. 2022)
SIGMA_MAX = 80.0  # largest noise level
RHO = 7.0  # grid curvature


def karras_sigmas(
    n: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Ascending Karras grid of n levels, sigma_0 = sigma_min ... sigma_{n-1} = sigma_max.

    n = 1 is the single level sigma_max (one step from pure noise).
    """
    if n < 1:
        raise ValueError(f"a noise grid needs at least one level, got {n}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=dtype)
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return ((lo + i / (n - 1) * (hi - lo)) ** rho).to(dtype)


def sampling_sigmas(
    n_steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> torch.Tensor:
    """Descending schedule of n_steps + 1 values for an ODE sampler: the Karras grid, then 0."""
    grid = karras_sigmas(n_steps, sigma_min, sigma_max, rho).flip(0)
    return torch.cat([grid, grid.new_zeros(1)])


def ct_n_schedule(k: int, total_k: int, s0: int, s1: int) -> int:
    """N(k) of consistency training (Song et al. 2023, Appendix C): grows from s0 to s1 + 1."""
    frac = min(max(k, 0), total_k) / max(total_k, 1)
    return math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_mu_schedule(n_scales: int, s0: int, mu0: float, official: bool = False) -> float:
    """mu(k) = exp(s0 ln(mu0) / N(k)); `official` uses N(k) - 1 as the official code does."""
    denom = n_scales - 1 if official else n_scales
    return math.exp(s0 * math.log(mu0) / max(denom, 1))


def ict_n_schedule(k: int, total_k: int, s0: int, s1: int) -> int:
    """N(k) of improved CT (Song & Dhariwal 2023): min(s0 2^floor(k/K'), s1) + 1."""
    k_prime = math.floor(total_k / (math.log2(math.floor(s1 / s0)) + 1))
    doublings = math.floor(k / max(k_prime, 1))
    return min(s0 * 2**doublings, s1) + 1
