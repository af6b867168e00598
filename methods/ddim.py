"""DDIM baseline: a teacher sampled with Euler steps of the PF ODE (deterministic DDIM in
sigma space, Song et al. 2021 / Karras et al. 2022); `sampler = "heun"` uses Heun instead."""

from __future__ import annotations

import torch
from torch import nn

from bench.diffusion.rng import StackedGenerator
from bench.diffusion.samplers import Model
from methods.base import Method, MethodContext, PaperResult, ode_check_nfe, ode_sample, ode_sigmas
from methods.papers import CM_TABLE1


class DDIM(Method):
    """Training-free: evaluates the teacher with an ODE solver at each NFE."""

    name = "ddim"
    summary = "DDIM (Euler PF-ODE) sampling of a teacher; no training"
    label = "DDIM"
    group = "Diffusion baselines"
    default_sampler = "euler"
    needs_teacher = True
    trains = False
    paper = (PaperResult("cifar10", CM_TABLE1, "50/4.67 20/6.84 10/8.23"),)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if ctx.teacher is None:
            raise ValueError("ddim needs a teacher")
        self.teacher = ctx.teacher
        self.sampler = self.config.sampler or self.default_sampler

    @property
    def student(self) -> None:
        """DDIM has nothing to train."""
        return None

    def evaluation_model(self, ema: nn.Module | None, nfe: int) -> nn.Module:
        """The teacher itself."""
        return self.teacher

    def check_nfe(self, nfe: int) -> None:
        """Euler: any NFE; Heun: odd NFE."""
        ode_check_nfe(self.sampler, nfe)

    def sample_sigmas(self, nfe: int) -> list[float]:
        """The Karras schedule of the ODE solve."""
        return ode_sigmas(nfe, self.sampler, self.config)

    def sample(self, model: Model, noise: torch.Tensor, nfe: int, rng: StackedGenerator,
               ) -> torch.Tensor:
        """Deterministic PF-ODE solve from sigma_max."""
        return ode_sample(model, noise, nfe, self.sampler, self.config)
