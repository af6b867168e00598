"""Preconditioning: every network meets the samplers as D(x; sigma) -> x0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from bench.diffusion.schedules import SIGMA_MIN

Precond = Literal["edm", "cm"]


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions to x until it has ndim dimensions."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def edm_scalings(
    sigma: torch.Tensor, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """c_skip, c_out, c_in of EDM (Karras et al. 2022, Table 1)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def cm_scalings(
    sigma: torch.Tensor, sigma_data: float, sigma_min: float = SIGMA_MIN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """c_skip, c_out, c_in with the consistency boundary condition f(x, sigma_min) = x.

    Song et al. 2023, Appendix C: c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly.
    """
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = shifted * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def c_noise_of(sigma: torch.Tensor) -> torch.Tensor:
    """Noise conditioning input of the network, log(sigma) / 4."""
    return sigma.log() / 4


class Denoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) around a raw network F."""

    def __init__(
        self,
        net: nn.Module,
        *,
        sigma_data: float,  # data standard deviation used by the scalings
        precond: Precond,  # "edm" for diffusion, "cm" for the consistency boundary condition
        sigma_min: float = SIGMA_MIN,  # boundary of the consistency parameterisation
    ) -> None:
        super().__init__()
        if precond not in ("edm", "cm"):
            raise ValueError(f"unknown preconditioning {precond!r}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.precond: Precond = precond
        self.sigma_min = float(sigma_min)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_skip, c_out, c_in for this preconditioning."""
        if self.precond == "edm":
            return edm_scalings(sigma, self.sigma_data)
        return cm_scalings(sigma, self.sigma_data, self.sigma_min)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Denoised estimate of x0 from x at noise level sigma (shape (B,) or scalar)."""
        sigma = sigma.to(torch.float32).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        f = self.net(c_in * x, c_noise_of(sigma), class_labels)
        return c_skip * x + c_out * f.to(x.dtype)


class AnalyticDenoiser(nn.Module):
    """The exact E[x0 | x; sigma] of a dataset that knows it (Gaussian mixtures)."""

    def __init__(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.denoise = denoise
        self.precond: Precond = "edm"

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exact posterior mean, computed in float64 and returned in x's dtype."""
        sigma = sigma.to(torch.float64).reshape(-1).expand(x.shape[0])
        return self.denoise(x.to(torch.float64), sigma).to(x.dtype)
