"""Continuous-time consistency models on TrigFlow (sCM: Lu & Song 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models", arXiv 2410.11081): sCT (training)
and sCD (distillation).

TrigFlow: x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2 I), t in [0, pi/2], and the
consistency function f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t). In EDM's
variables (sigma = sigma_d tan t, x = x_t / cos t) that is a Denoiser under the "trigflow"
parameterisation, so sampling, evaluation and editing are those of every consistency model.

The objective is the limit of consistency training as the step goes to 0. With
g = cos(t) df/dt = -cos^2(t) (sigma_d F^- - dx_t/dt) - cos(t) sin(t) (x_t + sigma_d dF^-/dt),
where dF^-/dt is the total derivative of the stop-gradient network along the ODE (one JVP),
the loss is ||F - F^- - g||^2, with the paper's stabilisers: the tangent warm-up (the second
term of g ramps in over <method>.tangent_warmup iterations), the tangent normalisation
g / (||g|| + c) and the learned adaptive weighting e^{-w(t)} / D ||.||^2 + w(t), w a small
network of t trained with the student. sCT takes dx_t/dt = cos(t) z - sin(t) x0; sCD the
teacher's PF-ODE velocity, from any D(x; sigma) teacher converted to TrigFlow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from pydantic import Field
from torch import nn

from bench.core.config import Section
from bench.diffusion.denoiser import append_dims
from bench.diffusion.jvp import JVPMode, jvp
from bench.nets.basic import Linear, seeded
from bench.nets.songunet import FourierFeatures
from methods.base import MethodContext, PaperResult, PerfPasses
from methods.consistency import ConsistencyModel, replayed, require_network_teacher, rng_state_of
from methods.papers import SCM_CIFAR, SCM_IMAGENET

SPACES = Path(__file__).resolve().parent / "spaces"
PRESETS = Path(__file__).resolve().parent / "presets"


class SCMConfig(Section):
    p_mean: float = -1.0  # tau ~ N(P_mean, P_std^2), tan(t) = e^tau / sigma_d
    p_std: float = Field(default=1.6, gt=0)
    tangent_warmup: int = Field(default=10000, ge=0)  # iterations over which g's 2nd term ramps in
    tangent_c: float = Field(default=0.1, ge=0)  # tangent normalisation g / (||g|| + c)
    tangent_normalization: bool = True  # off: the raw tangent g
    adaptive_weighting: bool = True  # the learned w(t): e^{-w} / D ||.||^2 + w
    prior_weighting: bool = True  # the prior weight 1 / (sigma_d tan t)
    weighting_lr_scale: float = Field(default=1.0, gt=0)  # w(t)'s learning rate, relative
    mid_t: float = Field(default=1.1, gt=0, lt=math.pi / 2)  # 2-step sampling's intermediate t
    jvp: JVPMode = "forward"  # "forward" (torch.func) or "finite_difference"
    jvp_eps: float = Field(default=1e-3, gt=0)  # the finite difference's step


class AdaptiveWeight(nn.Module):
    """w(t): Fourier features of ln(sigma) / 4 (sigma = sigma_d tan t), one linear layer to a
    scalar, zero at initialisation (EDM2's learned uncertainty, as sCM uses it)."""

    def __init__(self, channels: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.features = FourierFeatures(channels, scale=1.0)
        self.features.reset_parameters(seeded(seed))
        self.linear = Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor, sigma_data: float) -> torch.Tensor:
        """w(t) per sample, shape (B,)."""
        c_noise = (sigma_data * t.tan()).log() / 4
        return self.linear(self.features(c_noise)).squeeze(1)


def trigflow_time_draw(tau: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """t = arctan(e^tau / sigma_d)."""
    return torch.atan(tau.exp() / sigma_data)


def trigflow_velocity(teacher: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                      sigma_data: float, labels: torch.Tensor | None) -> torch.Tensor:
    """The PF-ODE velocity dx_t/dt of a D(x; sigma) teacher in TrigFlow's variables:
    sigma = sigma_d tan t, x = x_t / cos t and dx_t/dt = (cos(t) x_t - D(x; sigma)) / sin(t)
    (EDM's dx/dsigma = (x - D) / sigma, changed to TrigFlow's time and scale)."""
    cos, sin = append_dims(t.cos(), x_t.ndim), append_dims(t.sin(), x_t.ndim)
    denoised = teacher(x_t / cos, sigma_data * t.tan(), labels)
    return (cos * x_t - denoised) / sin


class SCT(ConsistencyModel):
    """sCT: continuous-time consistency training on TrigFlow."""

    name = "sct"
    summary = ("continuous-time consistency training on TrigFlow (Lu & Song 2024): JVP "
               "objective, tangent normalisation and warm-up, learned weighting")
    Config: ClassVar[type[Section] | None] = SCMConfig
    label = "sCT"
    group = "Direct training"
    precond = "trigflow"
    paper: ClassVar[tuple[PaperResult, ...]] = (
        PaperResult("cifar10", SCM_CIFAR, "1/2.85 2/2.06"),
        PaperResult("imagenet64", SCM_IMAGENET, "1/2.04 2/1.48"))
    search_spaces = (SPACES / "sct-time.toml", SPACES / "sct-stabilisers.toml")
    presets = PRESETS / "sct.toml"

    def __init__(self, ctx: MethodContext) -> None:
        self.options = ctx.config.section(self.name, SCMConfig)
        super().__init__(ctx, target_mu=0.0)
        self.sigma_data = ctx.sigma_data
        self.weighting = AdaptiveWeight(seed=ctx.config.seed).to(ctx.device) \
            if self.options.adaptive_weighting else None

    # --- what the loop sees ---------------------------------------------------------------------

    def extra_modules(self) -> dict[str, nn.Module]:
        """The learned weighting w(t)."""
        return {"weighting": self.weighting} if self.weighting is not None else {}

    def parameters(self) -> list[dict[str, Any]]:
        """The student's parameters and w(t)'s, which the optimizer trains together."""
        groups = super().parameters()
        if self.weighting is not None:
            groups.append({"params": list(self.weighting.parameters()),
                           "lr_scale": self.options.weighting_lr_scale})
        return groups

    def target_mu(self, step: int) -> float:
        """No target network: the stop-gradient student."""
        return 0.0

    def tangent_warmup(self, step: int) -> float:
        """The factor on g's second term: min(1, step / <method>.tangent_warmup)."""
        warmup = self.options.tangent_warmup
        return 1.0 if warmup == 0 else min(1.0, step / warmup)

    def schedule_values(self, step: int) -> dict[str, float]:
        """The tangent warm-up factor."""
        return {"tangent_warmup": self.tangent_warmup(step)}

    # --- the objective --------------------------------------------------------------------------

    def velocity(self, x0: torch.Tensor, z: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 labels: torch.Tensor | None) -> torch.Tensor:
        """dx_t/dt: the conditional velocity cos(t) z - sin(t) x0 (sCT)."""
        cos, sin = append_dims(t.cos(), x0.ndim), append_dims(t.sin(), x0.ndim)
        return cos * z - sin * x0

    def draw_times(self, batch: int, generator: torch.Generator, device: torch.device,
                   ) -> torch.Tensor:
        """t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2), this shard's rows."""
        c = self.options
        tau = c.p_mean + c.p_std * self.shard.draw(
            lambda b: torch.randn(b, generator=generator, device=device), batch)
        return trigflow_time_draw(tau, self.sigma_data)

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None, step: int,
             generator: torch.Generator) -> torch.Tensor:
        """e^{-w(t)} / D ||F - F^- - g||^2 + w(t) per sample (times 1 / (sigma_d tan t))."""
        c, sd = self.options, self.sigma_data
        t = self.draw_times(x0.shape[0], generator, x0.device)
        z = sd * self.shard.draw(lambda b: torch.randn((b, *x0.shape[1:]), generator=generator,
                                                        device=x0.device, dtype=x0.dtype),
                                 x0.shape[0])
        cos, sin = append_dims(t.cos(), x0.ndim), append_dims(t.sin(), x0.ndim)
        x_t = cos * x0 + sin * z
        net = self._student.net
        state = rng_state_of(x0.device) if self.dropout_active else None
        with torch.no_grad():
            dxdt = self.velocity(x0, z, x_t, t, labels)
            cs = (t.cos() * t.sin())

            def f(x_in: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
                return net(x_in, time, labels)

            with replayed(state, x0.device):
                f_minus, df = jvp(f, (x_t / sd, t), (append_dims(cs, x0.ndim) * dxdt / sd, cs),
                                  c.jvp, c.jvp_eps)
            g = -cos.square() * (sd * f_minus - dxdt) \
                - self.tangent_warmup(step) * (append_dims(cs, x0.ndim) * x_t + sd * df)
            if c.tangent_normalization:
                norm = g.flatten(1).norm(dim=1)
                g = g / append_dims(norm + c.tangent_c, g.ndim)
        with replayed(state, x0.device):
            online = self.train_forward_net(x_t / sd, t, labels)
        per_sample = (online - f_minus - g).square().flatten(1).mean(1)
        if c.prior_weighting:
            per_sample = per_sample / (sd * t.tan())
        if self.weighting is not None:
            w = self.weighting(t, sd)
            per_sample = (-w).exp() * per_sample + w
        return per_sample

    def train_forward_net(self, x_in: torch.Tensor, t: torch.Tensor,
                          labels: torch.Tensor | None) -> torch.Tensor:
        """F(x_t / sigma_d, t) with gradient, through DDP when several processes train (it wraps
        the raw network, see parallel_module)."""
        net = self.parallel if self.parallel is not None else self._student.net
        return net(x_in, t, labels)

    def parallel_module(self) -> nn.Module:
        """The raw network F: the loss takes F itself, not f = cos(t) x_t - sin(t) sigma_d F."""
        return self._student.net

    # --- sampling -------------------------------------------------------------------------------

    def sample_sigmas(self, nfe: int) -> list[float]:
        """1 step from sigma_max; 2 steps through t = <method>.mid_t (sigma = sigma_d tan t), the
        paper's choice; sample.sigmas when it has nfe levels; else the Karras levels."""
        explicit = self.config.sample.sigmas
        if len(explicit) == nfe:
            return [float(s) for s in explicit]
        if nfe == 2:
            return [float(self.sigma_max), self.sigma_data * math.tan(self.options.mid_t)]
        return super().sample_sigmas(nfe)

    # --- bench perf -----------------------------------------------------------------------------

    def perf_passes(self, x0: torch.Tensor, z: torch.Tensor, generator: torch.Generator,
                    ) -> PerfPasses:
        """The student's forward and backward, and the no-grad JVP of the network (plus the
        teacher's forward for sCD)."""
        student = self.perf_student()
        t = trigflow_time_draw(torch.randn(x0.shape[0], generator=generator,
                                           device=x0.device) * 1.6 - 1.0, self.sigma_data)
        sigma = self.sigma_data * t.tan()
        x = x0 + append_dims(sigma, x0.ndim) * z
        x_t = append_dims(t.cos(), x0.ndim) * x
        net = cast(nn.Module, student.net)
        tangent = torch.randn_like(x_t)
        mode = self.options.jvp

        def jvp_pass() -> object:
            return jvp(lambda a, b: net(a, b, None), (x_t, t), (tangent, t.cos() * t.sin()),
                       mode, self.options.jvp_eps)

        calls, what = self.perf_teacher_calls(x, sigma)
        return PerfPasses(student, x, sigma, calls,
                          " + ".join(["student fwd+bwd", *what, f"{mode} JVP"]), [jvp_pass])

    def perf_teacher_calls(self, x: torch.Tensor, sigma: torch.Tensor,
                           ) -> tuple[list[tuple[nn.Module, torch.Tensor, torch.Tensor]],
                                      list[str]]:
        """The teacher's no-grad forwards (none for sCT)."""
        return [], []


class SCD(SCT):
    """sCD: continuous-time consistency distillation; dx_t/dt from the teacher."""

    name = "scd"
    summary = ("continuous-time consistency distillation on TrigFlow (Lu & Song 2024): the "
               "teacher's velocity converted from D(x; sigma)")
    label = "sCD"
    group = "Distillation"
    needs_teacher = True
    paper = (PaperResult("cifar10", SCM_CIFAR, "1/3.66 2/2.52"),
             PaperResult("imagenet64", SCM_IMAGENET, "1/2.44 2/1.66"))
    search_spaces = (SPACES / "scd-time.toml", SPACES / "scd-stabilisers.toml")
    presets = PRESETS / "scd.toml"

    def __init__(self, ctx: MethodContext) -> None:
        self.teacher = require_network_teacher(ctx.teacher, "scd")
        super().__init__(ctx)

    def velocity(self, x0: torch.Tensor, z: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 labels: torch.Tensor | None) -> torch.Tensor:
        """The teacher's PF-ODE velocity at (x_t, t)."""
        return trigflow_velocity(self.teacher, x_t, t, self.sigma_data, labels)

    def perf_teacher_calls(self, x: torch.Tensor, sigma: torch.Tensor,
                           ) -> tuple[list[tuple[nn.Module, torch.Tensor, torch.Tensor]],
                                      list[str]]:
        """One teacher forward."""
        return [(self.teacher, x, sigma)], ["teacher fwd"]
