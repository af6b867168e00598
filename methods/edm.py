"""EDM teacher (Karras et al. 2022): denoising score matching with EDM preconditioning,
evaluated with its Heun sampler (the EDM baseline row, NFE = 2n - 1)."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from bench.core.config import Section
from bench.data.shard import Shard
from bench.diffusion.denoiser import Denoiser, append_dims
from bench.diffusion.rng import StackedGenerator
from bench.diffusion.samplers import Model
from methods.base import (
    Method,
    MethodContext,
    PaperResult,
    PerfPasses,
    ode_check_nfe,
    ode_sample,
    ode_sigmas,
)
from methods.papers import CM_TABLE1, CM_TABLE2

SPACES = Path(__file__).resolve().parent / "spaces"


class EDMConfig(Section):
    p_mean: float = -1.2  # mean of ln(sigma) during teacher training
    p_std: float = Field(default=1.2, gt=0)  # std of ln(sigma) during teacher training


class EDMLoss:
    """Implements the EDM training loss (Karras et al. 2022, Table 1)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_data = sigma_data

    def __call__(
        self,
        net: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator,
        shard: Shard = Shard(),
    ) -> torch.Tensor:
        """Per-sample weighted L2 between D(x0 + sigma n; sigma) and x0; the draws are the
        shard's rows of the global batch's."""
        b = x0.shape[0]
        ln_sigma = self.p_mean + self.p_std * shard.draw(
            lambda n: torch.randn(n, generator=generator, device=x0.device), b)
        sigma = ln_sigma.exp()
        noise = shard.draw(lambda n: torch.randn((n, *x0.shape[1:]), generator=generator,
                                                 device=x0.device, dtype=x0.dtype), b)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        denoised = net(x0 + append_dims(sigma, x0.ndim) * noise, sigma, labels)
        per_dim = (denoised - x0) ** 2
        return weight * per_dim.flatten(1).mean(1)


class EDM(Method):
    """Trains the EDM teacher; evaluates it with Heun (default) or Euler."""

    name = "edm"
    summary = "EDM teacher (Karras et al. 2022): trained by denoising, sampled with Heun"
    Config = EDMConfig
    label = "EDM"
    group = "Diffusion baselines"
    default_sampler = "heun"
    provides_teacher = True
    official_import = True
    paper = (PaperResult("cifar10", CM_TABLE1, "35/2.04"),
             PaperResult("imagenet64", CM_TABLE2, "79/2.44"))
    search_spaces = (SPACES / "edm-lr.toml",)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self._student = Denoiser(ctx.new_net(), sigma_data=ctx.sigma_data, precond="edm",
                                 sigma_min=self.config.diffusion.sigma_min).to(ctx.device)
        options = self.config.section(self.name, EDMConfig)
        self.loss_fn = EDMLoss(options.p_mean, options.p_std, ctx.sigma_data)
        self.sampler = self.config.sampler or self.default_sampler

    @property
    def student(self) -> nn.Module:
        """The denoiser being trained."""
        return self._student

    def loss(
        self,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        step: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """EDM loss at a lognormal noise level."""
        return self.loss_fn(self.train_forward, x0, labels, generator, self.shard)

    def perf_passes(self, x0: torch.Tensor, z: torch.Tensor, generator: torch.Generator,
                    ) -> PerfPasses:
        """The student's forward and backward at a lognormal noise level."""
        student = self.perf_student()
        sigma = (torch.randn(x0.shape[0], generator=generator, device=x0.device) * 1.2
                 - 1.2).exp()
        return PerfPasses(student, x0 + append_dims(sigma, x0.ndim) * z, sigma, [],
                          "student fwd+bwd")

    def check_nfe(self, nfe: int) -> None:
        """Heun: odd NFE; Euler: any."""
        ode_check_nfe(self.sampler, nfe)

    def sample_sigmas(self, nfe: int) -> list[float]:
        """The Karras schedule of the ODE solve."""
        return ode_sigmas(nfe, self.sampler, self.config)

    def sample(self, model: Model, noise: torch.Tensor, nfe: int, rng: StackedGenerator,
               ) -> torch.Tensor:
        """Deterministic PF-ODE solve from sigma_max."""
        return ode_sample(model, noise, nfe, self.sampler, self.config)
