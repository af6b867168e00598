"""Consistency distillation (Song et al. 2023, Algorithm 2): one teacher ODE step from
sigma_{n+1} to sigma_n gives x_hat; the student f_theta(x, sigma_{n+1}) is pulled towards the
target f_theta-(x_hat, sigma_n)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from bench.core.config import RunConfig, Section
from bench.diffusion.denoiser import Denoiser
from bench.diffusion.samplers import euler_step, heun_step
from methods.base import MethodContext, PaperResult
from methods.consistency import (
    Distance,
    DistanceName,
    GridConsistencyMethod,
    IndexSampling,
    Weighting,
    make_distance,
    require_network_teacher,
    student_from_teacher,
)
from methods.papers import CM_TABLE1, CM_TABLE2

SPACES = Path(__file__).resolve().parent / "spaces"


class CDConfig(Section):
    n_scales: int = Field(default=18, ge=2)  # N: levels of the Karras discretisation
    # teacher ODE solver for one step: "heun" (2 calls) or "euler" (1)
    solver: Literal["heun", "euler"] = "heun"
    distance: DistanceName = "l2"  # "l2", "l1", "pseudo_huber", "lpips" or "lpips_avgpool"
    weighting: Weighting = "uniform"  # lambda(t_n): "uniform" (the paper) or "inverse_gap" (iCT)
    indices: IndexSampling = "uniform"  # n: "uniform" (the paper) or "lognormal" (iCT)
    p_mean: float = -1.1  # lognormal index distribution: mean of ln(sigma)
    p_std: float = Field(default=2.0, gt=0)  # lognormal index distribution: std of ln(sigma)
    # target EMA rate mu (0 = the target is the student, stop-grad)
    target_mu: float = Field(default=0.0, ge=0, lt=1)
    huber_c: float = Field(default=0.0, ge=0)  # pseudo-Huber c; 0 = 0.00054 sqrt(dim)
    # which teacher weights the student (and the target) start from: "ema", the teacher's
    # average (openai/consistency_models loads edm_*_ema.pt), or "online", its raw weights
    # (the CIFAR-10 JAX code, `finetune`), the evaluation EMA then starting from the average
    init_from: Literal["ema", "online"] = "ema"


class CD(GridConsistencyMethod):
    """Consistency distillation from a frozen teacher D(x; sigma)."""

    name = "cd"
    summary = "consistency distillation (Song et al. 2023): one teacher ODE step per sample"
    Config = CDConfig
    label = "CD"
    group = "Distillation"
    needs_teacher = True
    official_import = True
    perf_reference = True
    perf_train_target = 1.03
    perf_settings = ("cd.solver=heun", "cd.distance=l2", "cd.n_scales=18")
    paper = (PaperResult("cifar10", CM_TABLE1, "1/3.55 2/2.93"),
             PaperResult("imagenet64", CM_TABLE2, "1/6.20 2/4.70"),
             PaperResult("lsun-bedroom", CM_TABLE2, "1/7.80 2/5.22"),
             PaperResult("lsun-cat", CM_TABLE2, "1/11.0 2/8.84"))
    search_spaces = (SPACES / "cd-ema.toml", SPACES / "cd-lr.toml", SPACES / "cd-n.toml")

    @classmethod
    def keeps_target(cls, config: RunConfig) -> bool:
        """A separate target network only when mu > 0."""
        return config.section(cls.name, CDConfig).target_mu > 0

    def __init__(self, ctx: MethodContext) -> None:
        self.teacher = require_network_teacher(ctx.teacher, self.name)
        self.options = ctx.config.section(self.name, CDConfig)
        super().__init__(ctx, target_mu=self.options.target_mu)
        cfg = self.options
        self._distance = make_distance(cfg.distance, ctx.dataset.shape, cfg.huber_c, ctx.device)
        self.step_fn = heun_step if cfg.solver == "heun" else euler_step

    def initial_student(self) -> Denoiser:
        """The teacher's network under consistency preconditioning, with cd.init_from's
        weights and the run's net.dropout (the paper and both official codes train CD with
        dropout 0, whatever the teacher's); a fresh network if the teacher is analytic."""
        teacher = self.ctx.teacher
        if not isinstance(teacher, Denoiser):
            return super().initial_student()
        return student_from_teacher(self.ctx, self.name, teacher, self.options.init_from)

    def initial_average(self) -> dict[str, torch.Tensor] | None:
        """With cd.init_from = online, the evaluation EMA starts from the teacher's average
        (the CIFAR-10 JAX code's params_ema), not from the student's raw weights."""
        teacher = self.ctx.teacher
        if self.options.init_from == "online" and isinstance(teacher, Denoiser):
            return teacher.state_dict()
        return None

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
        """Fixed N."""
        return self.options.n_scales

    def target_mu(self, step: int) -> float:
        """Fixed mu."""
        return self.options.target_mu

    def x_hat(self, x0: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
              sigma_next: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
              ) -> torch.Tensor:
        """One Heun or Euler step of the teacher's PF ODE from sigma_{n+1} to sigma_n."""

        def teacher(xt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return self.teacher(xt, s, labels)

        return self.step_fn(teacher, x, sigma_next, sigma)

    def perf_x_hat_passes(self, x: torch.Tensor, x_hat: torch.Tensor, sigma_next: torch.Tensor,
                          sigma: torch.Tensor,
                          ) -> tuple[list[tuple[nn.Module, torch.Tensor, torch.Tensor]],
                                     list[str]]:
        """The teacher's Heun step: two forwards."""
        return ([(self.teacher, x, sigma_next), (self.teacher, x_hat, sigma)],
                ["2 teacher fwds (Heun)"])
