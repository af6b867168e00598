"""Consistency error: how far a sampler's output lies from the exact PF-ODE solution of the
same noise, measurable where the data's exact denoiser is known (gmm8, gmm25)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.core.errors import UsageError
from bench.data.datasets import GaussianMixture
from bench.diffusion.denoiser import AnalyticDenoiser
from bench.diffusion.rng import StackedGenerator
from bench.diffusion.samplers import sample_euler, sample_heun
from bench.diffusion.schedules import sampling_sigmas
from methods.base import Method

REFERENCE_HEUN_STEPS = 512  # the "exact" solution: Heun with 512 steps on the exact denoiser


@dataclass
class OdeErrors:
    """Mean L2 distance to the exact PF-ODE solution, for the run and for DDIM."""

    run: dict[int, float]  # NFE -> error of the run's sampler
    ddim: dict[int, float]  # NFE -> error of Euler (DDIM) on the exact denoiser


def ode_errors(method: Method, ema: nn.Module | None, dataset: GaussianMixture,
               nfes: list[int], ddim_nfes: list[int], count: int = 2000, seed: int = 0,
               ) -> OdeErrors:
    """Errors of the run's sampler at nfes and of exact-denoiser DDIM at ddim_nfes."""
    if not isinstance(dataset, GaussianMixture):
        raise UsageError("the ODE error needs a dataset with an exact denoiser (gmm8, gmm25)")
    cfg = method.config.diffusion
    exact_model = AnalyticDenoiser(dataset.denoise)
    rng = StackedGenerator(seed, range(count))
    noise = rng.randn(dataset.shape, dtype=torch.float64)
    x_t = noise * cfg.sigma_max
    with torch.inference_mode():
        exact = sample_heun(exact_model, x_t, sampling_sigmas(REFERENCE_HEUN_STEPS,
                                                              cfg.sigma_min, cfg.sigma_max,
                                                              cfg.rho))
        run: dict[int, float] = {}
        for nfe in nfes:
            model = method.evaluation_model(ema, nfe).eval()

            def denoise(x: torch.Tensor, s: torch.Tensor, m: nn.Module = model) -> torch.Tensor:
                return m(x.float(), s.float()).double()

            out = method.sample(denoise, noise.clone(), nfe,
                                StackedGenerator(seed + 1, range(count)))
            run[nfe] = float((out.double() - exact).norm(dim=1).mean())
        ddim = {}
        for nfe in ddim_nfes:
            out = sample_euler(exact_model, x_t, sampling_sigmas(nfe, cfg.sigma_min,
                                                                  cfg.sigma_max, cfg.rho))
            ddim[nfe] = float((out - exact).norm(dim=1).mean())
    return OdeErrors(run, ddim)
