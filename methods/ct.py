"""Consistency training (Song et al. 2023, Algorithm 3) and improved consistency training
(Song & Dhariwal 2023): no teacher; x_hat = x0 + sigma_n z with the same z."""

from __future__ import annotations

import torch

from bench.diffusion.schedules import ct_mu_schedule, ct_n_schedule, ict_n_schedule
from methods.base import MethodContext
from methods.consistency import ConsistencyMethod, Distance, make_distance


class CT(ConsistencyMethod):
    """Consistency training with the N(k) and mu(k) curricula."""

    name = "ct"
    summary = "consistency training (Song et al. 2023): no teacher, N(k) and mu(k) schedules"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx, target_mu=None)
        cfg = self.config.ct
        self._distance = make_distance(cfg.distance, ctx.dataset.shape, cfg.huber_c, ctx.device)

    @property
    def distance(self) -> Distance:
        """The configured d."""
        return self._distance

    @property
    def weighting(self) -> str:
        """The configured lambda(t_n)."""
        return self.config.ct.weighting

    @property
    def index_sampling(self) -> tuple[str, float, float]:
        """The configured distribution of n."""
        c = self.config.ct
        return (c.indices, c.p_mean, c.p_std)

    def n_scales(self, step: int) -> int:
        """N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1."""
        c = self.config.ct
        return ct_n_schedule(step, self.total_steps(), c.s0, c.s1)

    def target_mu(self, step: int) -> float:
        """mu(k) = exp(s0 ln(mu0) / N(k)) (N(k) - 1 with ct.mu_official)."""
        c = self.config.ct
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

    def __init__(self, ctx: MethodContext) -> None:
        super(CT, self).__init__(ctx, target_mu=0.0)
        cfg = self.config.ict
        self._distance = make_distance("pseudo_huber", ctx.dataset.shape, cfg.huber_c,
                                       ctx.device)

    def n_scales(self, step: int) -> int:
        """N(k) = min(s0 2^floor(k/K'), s1) + 1."""
        c = self.config.ict
        return ict_n_schedule(step, self.total_steps(), c.s0, c.s1)

    def target_mu(self, step: int) -> float:
        """No EMA: the target is the stop-gradient student."""
        return 0.0

    @property
    def index_sampling(self) -> tuple[str, float, float]:
        """The discretised lognormal over the grid's intervals."""
        return ("lognormal", self.config.ict.p_mean, self.config.ict.p_std)

    @property
    def weighting(self) -> str:
        """lambda = 1 / (sigma_{n+1} - sigma_n), always."""
        return "inverse_gap"
