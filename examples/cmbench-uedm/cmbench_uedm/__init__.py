"""EDM trained with a learned uncertainty weighting (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", section 5), as a cmbench method plug-in:
loss = lambda(sigma) / exp(u(sigma)) * |D(x0 + sigma n; sigma) - x0|^2 + u(sigma), where u is a
small network of the noise level trained with the student. Sampled with EDM's Heun solver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from bench.core.config import Section
from bench.diffusion.denoiser import Denoiser, append_dims, c_noise_of
from bench.diffusion.rng import StackedGenerator
from bench.diffusion.samplers import Model
from methods import Method, MethodContext, PerfPasses
from methods.base import ode_check_nfe, ode_sample, ode_sigmas


class UEDMConfig(Section):
    """The [uedm] section of a run's config (validated: a bad value is a one-line error)."""

    p_mean: float = -1.2  # mean of ln(sigma) of the training noise levels
    p_std: float = Field(default=1.2, gt=0)  # its std
    weighting_width: int = Field(default=32, ge=1)  # hidden units of u(sigma)


class UncertaintyEDM(Method):
    name = "uedm"  # the entry point's name
    summary = "EDM with a learned uncertainty weighting (Karras et al. 2024)"
    Config = UEDMConfig
    label = "EDM-uw"
    group = "Diffusion baselines"
    default_sampler = "heun"
    search_spaces = (Path(__file__).parent / "uedm-lr.toml",)  # `bench sweep --space uedm-lr`
    presets = Path(__file__).parent / "presets.toml"  # below bench.toml: a user's file wins

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.options = self.section(self.config)
        self._student = Denoiser(ctx.new_net(), sigma_data=ctx.sigma_data, precond="edm",
                                 sigma_min=self.config.diffusion.sigma_min).to(ctx.device)
        width = self.options.weighting_width
        self.weighting = nn.Sequential(nn.Linear(1, width), nn.SiLU(),
                                       nn.Linear(width, 1)).to(ctx.device)
        self.sampler = self.config.sampler or self.default_sampler

    @property
    def student(self) -> nn.Module:
        return self._student

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"weighting": self.weighting}  # saved in checkpoints, restored on resume

    def parameters(self) -> list[dict[str, Any]]:  # the optimizer also trains u(sigma)
        return [*super().parameters(), {"params": list(self.weighting.parameters())}]

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None, step: int,
             generator: torch.Generator) -> torch.Tensor:
        b = x0.shape[0]  # the shard draws this process's rows of the global batch's noise
        ln_sigma = self.options.p_mean + self.options.p_std * self.shard.draw(
            lambda n: torch.randn(n, generator=generator, device=x0.device), b)
        sigma = ln_sigma.exp()
        noise = self.shard.draw(lambda n: torch.randn((n, *x0.shape[1:]), generator=generator,
                                                      device=x0.device), b)
        denoised = self.train_forward(x0 + append_dims(sigma, x0.ndim) * noise, sigma, labels)
        sd = self.ctx.sigma_data
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        u = self.weighting(c_noise_of(sigma)[:, None])[:, 0]
        return weight / u.exp() * (denoised - x0).square().flatten(1).mean(1) + u

    def perf_passes(self, x0: torch.Tensor, z: torch.Tensor, generator: torch.Generator,
                    ) -> PerfPasses:
        sigma = (torch.randn(x0.shape[0], generator=generator, device=x0.device)
                 * self.options.p_std + self.options.p_mean).exp()
        return PerfPasses(self.perf_student(), x0 + append_dims(sigma, x0.ndim) * z, sigma, [],
                          "student fwd+bwd")

    def check_nfe(self, nfe: int) -> None:
        ode_check_nfe(self.sampler, nfe)  # Heun: odd NFEs only

    def sample_sigmas(self, nfe: int) -> list[float]:
        return ode_sigmas(nfe, self.sampler, self.config)

    def sample(self, model: Model, noise: torch.Tensor, nfe: int, rng: StackedGenerator,
               ) -> torch.Tensor:
        return ode_sample(model, noise, nfe, self.sampler, self.config)
