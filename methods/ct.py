"""Consistency training (Song et al. 2023, Algorithm 3) and improved consistency training
(Song & Dhariwal 2023): no teacher; x_hat = x0 + sigma_n z with the same z."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field, model_validator

from bench.core.config import RunConfig, Section
from bench.diffusion.schedules import ct_mu_schedule, ct_n_schedule, ict_n_schedule
from methods.base import MethodContext, PaperResult
from methods.consistency import (
    Distance,
    DistanceName,
    GridConsistencyMethod,
    IndexSampling,
    Weighting,
    make_distance,
)
from methods.papers import CM_TABLE1, CM_TABLE2, ICT_CIFAR, ICT_IMAGENET

SPACES = Path(__file__).resolve().parent / "spaces"


class CTConfig(Section):
    s0: int = 2  # initial discretisation steps of the N(k) curriculum
    s1: int = 150  # final discretisation steps
    mu0: float = Field(default=0.9, gt=0, lt=1)  # target EMA rate at the start
    distance: DistanceName = "l2"  # "l2", "l1", "pseudo_huber", "lpips" or "lpips_avgpool"
    weighting: Weighting = "uniform"  # lambda(t_n): "uniform" (the paper) or "inverse_gap" (iCT)
    indices: IndexSampling = "uniform"  # n: "uniform" (the paper) or "lognormal" (iCT)
    p_mean: float = -1.1  # lognormal index distribution: mean of ln(sigma)
    p_std: float = Field(default=2.0, gt=0)  # lognormal index distribution: std of ln(sigma)
    mu_official: bool = False  # mu(k) with N(k) - 1 in the denominator, as the official code
    huber_c: float = Field(default=0.0, ge=0)  # pseudo-Huber c; 0 = 0.00054 sqrt(dim)

    @model_validator(mode="after")
    def _curriculum(self) -> CTConfig:
        if not 2 <= self.s0 <= self.s1:
            raise ValueError("ct.s0 and ct.s1 must satisfy 2 <= s0 <= s1")
        return self


class ICTConfig(Section):
    s0: int = 10  # initial discretisation steps of the doubling curriculum
    s1: int = 1280  # final discretisation steps
    p_mean: float = -1.1  # lognormal noise-index distribution: mean of ln(sigma)
    p_std: float = Field(default=2.0, gt=0)  # lognormal noise-index distribution: std
    huber_c: float = Field(default=0.0, ge=0)  # pseudo-Huber c; 0 = 0.00054 sqrt(dim)

    @model_validator(mode="after")
    def _curriculum(self) -> ICTConfig:
        if not 1 <= self.s0 <= self.s1:
            raise ValueError("ict.s0 and ict.s1 must satisfy 1 <= s0 <= s1")
        return self


class CT(GridConsistencyMethod):
    """Consistency training with the N(k) and mu(k) curricula."""

    name = "ct"
    summary = "consistency training (Song et al. 2023): no teacher, N(k) and mu(k) schedules"
    Config: ClassVar[type[Section] | None] = CTConfig
    label = "CT"
    group = "Direct training"
    official_import = True
    paper: ClassVar[tuple[PaperResult, ...]] = (
        PaperResult("cifar10", CM_TABLE1, "1/8.70 2/5.83"),
        PaperResult("imagenet64", CM_TABLE2, "1/13.0 2/11.1"),
        PaperResult("lsun-bedroom", CM_TABLE2, "1/16.0 2/7.85"),
        PaperResult("lsun-cat", CM_TABLE2, "1/20.7 2/11.7"))
    search_spaces = (SPACES / "ct-lr.toml", SPACES / "ct-schedule.toml")

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx, target_mu=None)
        self.options = ctx.config.section(self.name, CTConfig)
        cfg = self.options
        self._distance = make_distance(cfg.distance, ctx.dataset.shape, cfg.huber_c, ctx.device)

    @property
    def distance(self) -> Distance:
        """The configured d."""
        return self._distance

    @property
    def weighting(self) -> str:
        """The configured lambda(t_n)."""
        return self.options.weighting

    @property
    def index_sampling(self) -> tuple[str, float, float]:
        """The configured distribution of n."""
        c = self.options
        return (c.indices, c.p_mean, c.p_std)

    def n_scales(self, step: int) -> int:
        """N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1."""
        c = self.options
        return ct_n_schedule(step, self.total_steps(), c.s0, c.s1)

    def target_mu(self, step: int) -> float:
        """mu(k) = exp(s0 ln(mu0) / N(k)) (N(k) - 1 with ct.mu_official)."""
        c = self.options
        return ct_mu_schedule(self.n_scales(step), c.s0, c.mu0, c.mu_official)

    def x_hat(self, x0: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
              sigma_next: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
              ) -> torch.Tensor:
        """x0 + sigma_n z: the unbiased one-sample estimate of the ODE step."""
        return x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * z


class ICT(CT):
    """Improved consistency training: pseudo-Huber, lognormal indices, 1/(dsigma) weight,
    doubling curriculum and no target EMA."""

    name = "ict"
    summary = "improved consistency training (Song & Dhariwal 2023): pseudo-Huber, mu = 0"
    Config = ICTConfig
    label = "iCT"
    official_import = False
    paper = (PaperResult("cifar10", ICT_CIFAR, "1/2.83 2/2.46"),
             PaperResult("imagenet64", ICT_IMAGENET, "1/4.02 2/3.20"))
    search_spaces = (SPACES / "ict-curriculum.toml", SPACES / "ict-lr.toml")

    def __init__(self, ctx: MethodContext) -> None:
        super(CT, self).__init__(ctx, target_mu=0.0)
        self.ict_options = ctx.config.section(self.name, ICTConfig)
        cfg = self.ict_options
        self._distance = make_distance("pseudo_huber", ctx.dataset.shape, cfg.huber_c,
                                       ctx.device)

    @classmethod
    def keeps_target(cls, config: RunConfig) -> bool:
        """No target network: the target is the stop-gradient student."""
        return False

    def n_scales(self, step: int) -> int:
        """N(k) = min(s0 2^floor(k/K'), s1) + 1."""
        c = self.ict_options
        return ict_n_schedule(step, self.total_steps(), c.s0, c.s1)

    def target_mu(self, step: int) -> float:
        """No EMA: the target is the stop-gradient student."""
        return 0.0

    @property
    def index_sampling(self) -> tuple[str, float, float]:
        """The discretised lognormal over the grid's intervals."""
        return ("lognormal", self.ict_options.p_mean, self.ict_options.p_std)

    @property
    def weighting(self) -> str:
        """lambda = 1 / (sigma_{n+1} - sigma_n), always."""
        return "inverse_gap"
