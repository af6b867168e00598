"""Preconditioning: every network meets the samplers as D(x; sigma) -> x0.

A parameterisation (c_skip, c_out, c_in and the noise input c_noise as functions of sigma) is
registered by name; a method picks one for its student, and the name is saved with the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bench.core.errors import unknown_name
from bench.diffusion.schedules import SIGMA_MIN

Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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


def c_noise_of(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Noise conditioning input of the network, log(sigma) / 4."""
    return sigma.log() / 4


def trigflow_scalings(sigma: torch.Tensor, sigma_data: float, sigma_min: float = SIGMA_MIN,
                      ) -> Scalings:
    """TrigFlow (Lu & Song 2024) in EDM's variables: with t = arctan(sigma / sigma_d) and
    x_t = cos(t) x, f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t) is
    cos^2(t) x - sigma_d sin(t) F(cos(t) x / sigma_d, t): EDM's c_skip and c_in, c_out negated.
    f(x, 0) = x holds exactly (c_out(0) = 0)."""
    c_skip, c_out, c_in = edm_scalings(sigma, sigma_data)
    return c_skip, -c_out, c_in


def trigflow_time(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """TrigFlow's time t = arctan(sigma / sigma_d) in [0, pi/2), the network's time input."""
    return torch.atan(sigma / sigma_data)


def flow_map_scalings(times: torch.Tensor, sigma_data: float, sigma_min: float = SIGMA_MIN,
                      ) -> Scalings:
    """The flow map of an average velocity u (MeanFlow, Geng et al. 2025) on z_t = (1 - t) x +
    t e: z_r = z_t - (t - r) u(z_t, r, t), for times (B, 2) = columns (t, r)."""
    t, r = times.unbind(1)
    return torch.ones_like(t), -(t - r), torch.ones_like(t)


def flow_map_inputs(times: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """The network's two time inputs (t, t - r), as MeanFlow conditions on them."""
    t, r = times.unbind(1)
    return torch.stack([t, t - r], dim=1)


@dataclass(frozen=True)
class Parameterization:
    """How D(x; sigma) wraps the raw network F: the scalings and F's noise input.
    `times` is the number of time arguments: 1 (a noise level sigma, shape (B,)), or 2
    (a flow map from time t to time r, shape (B, 2))."""

    scalings: Callable[[torch.Tensor, float, float], Scalings]  # (sigma, sigma_data, sigma_min)
    c_noise: Callable[[torch.Tensor, float], torch.Tensor] = c_noise_of  # (sigma, sigma_data)
    description: str = ""
    times: int = 1


PARAMETERIZATIONS: dict[str, Parameterization] = {}


def register_parameterization(name: str, parameterization: Parameterization) -> None:
    """Make a parameterisation available to methods under name."""
    if name in PARAMETERIZATIONS:
        raise ValueError(f"parameterisation {name!r} registered twice")
    PARAMETERIZATIONS[name] = parameterization


def get_parameterization(name: str) -> Parameterization:
    """The parameterisation registered under name; an unknown name lists the valid ones."""
    if name not in PARAMETERIZATIONS:
        raise unknown_name("parameterisation", name, list(PARAMETERIZATIONS))
    return PARAMETERIZATIONS[name]


register_parameterization("edm", Parameterization(
    lambda sigma, sigma_data, sigma_min: edm_scalings(sigma, sigma_data),
    description="EDM (Karras et al. 2022): diffusion denoisers"))
register_parameterization("cm", Parameterization(
    cm_scalings, description="consistency models (Song et al. 2023): f(x, sigma_min) = x"))
register_parameterization("trigflow", Parameterization(
    trigflow_scalings, trigflow_time,
    description="TrigFlow (Lu & Song 2024): sCM's consistency function, f(x, 0) = x"))
register_parameterization("flowmap", Parameterization(
    flow_map_scalings, flow_map_inputs, times=2,
    description="MeanFlow (Geng et al. 2025): z_r = z_t - (t - r) u(z_t, r, t)"))


class Denoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) around a raw network F."""

    def __init__(
        self,
        net: nn.Module,
        *,
        sigma_data: float,  # data standard deviation used by the scalings
        precond: str,  # a registered parameterisation: "edm", "cm", ...
        sigma_min: float = SIGMA_MIN,  # boundary of the consistency parameterisation
    ) -> None:
        super().__init__()
        self.parameterization = get_parameterization(precond)
        self.net = net
        self.sigma_data = float(sigma_data)
        self.precond = precond
        self.sigma_min = float(sigma_min)

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        """c_skip, c_out, c_in for this preconditioning."""
        return self.parameterization.scalings(sigma, self.sigma_data, self.sigma_min)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Denoised estimate of x0 from x at noise level sigma (shape (B,) or scalar); for a
        two-time parameterisation, the state at time r from x at time t, sigma (B, 2) or (2,)
        holding (t, r)."""
        times = self.parameterization.times
        sigma = sigma.to(torch.float32)
        sigma = (sigma.reshape(-1).expand(x.shape[0]) if times == 1
                 else sigma.reshape(-1, times).expand(x.shape[0], times))
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        f = self.net(c_in * x, self.parameterization.c_noise(sigma, self.sigma_data),
                     class_labels)
        return c_skip * x + c_out * f.to(x.dtype)


class AnalyticDenoiser(nn.Module):
    """The exact E[x0 | x; sigma] of a dataset that knows it (Gaussian mixtures)."""

    def __init__(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.denoise = denoise
        self.precond = "edm"

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exact posterior mean, computed in float64 and returned in x's dtype."""
        sigma = sigma.to(torch.float64).reshape(-1).expand(x.shape[0])
        return self.denoise(x.to(torch.float64), sigma).to(x.dtype)
