"""Consistency distillation (Song et al. 2023, Algorithm 2): one teacher ODE step from
sigma_{n+1} to sigma_n gives x_hat; the student f_theta(x, sigma_{n+1}) is pulled towards the
target f_theta-(x_hat, sigma_n)."""

from __future__ import annotations

import copy

import torch

from bench.diffusion.denoiser import Denoiser
from bench.diffusion.samplers import euler_step, heun_step
from methods.base import MethodContext
from methods.consistency import ConsistencyMethod, Distance, make_distance, require_network_teacher


class CD(ConsistencyMethod):
    """Consistency distillation from a frozen teacher D(x; sigma)."""

    name = "cd"
    summary = "consistency distillation (Song et al. 2023): one teacher ODE step per sample"
    needs_teacher = True

    def __init__(self, ctx: MethodContext) -> None:
        self.teacher = require_network_teacher(ctx.teacher, "cd")
        super().__init__(ctx, target_mu=ctx.config.cd.target_mu)
        cfg = self.config.cd
        self._distance = make_distance(cfg.distance, ctx.dataset.shape, cfg.huber_c, ctx.device)
        self.step_fn = heun_step if cfg.solver == "heun" else euler_step

    def initial_student(self) -> Denoiser:
        """The teacher's network under consistency preconditioning (a fresh one if analytic)."""
        teacher = self.ctx.teacher
        if isinstance(teacher, Denoiser):
            net = copy.deepcopy(teacher.net).requires_grad_(True).train()
            return Denoiser(net, sigma_data=self.ctx.sigma_data, precond="cm",
                            sigma_min=self.config.diffusion.sigma_min)
        return super().initial_student()

    @property
    def distance(self) -> Distance:
        """The configured d."""
        return self._distance

    @property
    def weighting(self) -> str:
        """The configured lambda(t_n)."""
        return self.config.cd.weighting

    @property
    def index_sampling(self) -> tuple[str, float, float]:
        """The configured distribution of n."""
        c = self.config.cd
        return (c.indices, c.p_mean, c.p_std)

    def n_scales(self, step: int) -> int:
        """Fixed N."""
        return self.config.cd.n_scales

    def target_mu(self, step: int) -> float:
        """Fixed mu."""
        return self.config.cd.target_mu

    def x_hat(self, x0: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
              sigma_next: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
              ) -> torch.Tensor:
        """One Heun or Euler step of the teacher's PF ODE from sigma_{n+1} to sigma_n."""

        def teacher(xt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return self.teacher(xt, s, labels)

        return self.step_fn(teacher, x, sigma_next, sigma)
