"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447):
a network of the average velocity u(z, r, t) = 1/(t - r) int_r^t v(z_s, s) ds on the linear path
z_t = (1 - t) x + t e, t = 1 pure noise.

The MeanFlow identity u = v - (t - r) du/dt, with du/dt = v d_z u + d_t u the total derivative
along the path, gives the regression target u_tgt = v - (t - r) (v d_z u + d_t u), one JVP of
the network with tangent (v, 0, 1) in (z, r, t), under stop-gradient. (r, t) come from the
logit-normal, t the larger of two draws, and r = t (plain flow matching) except for a fraction
meanflow.ratio_neq of the samples; the loss is sg(w) ||u - u_tgt||^2 with the adaptive weight
w = 1 / (||u - u_tgt||^2 + c)^p. The network sees (t, t - r) through two time embeddings
(the "flowmap" parameterisation's two time inputs). Sampling maps z_1 = e to
z_0 = z_1 - u(z_1, 0, 1) in one step, or through intermediate times,
z_r = z_t - (t - r) u(z_t, r, t).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, cast

import torch
from pydantic import Field
from torch import nn

from bench.core.config import Section
from bench.core.errors import UsageError
from bench.diffusion.denoiser import Denoiser, append_dims
from bench.diffusion.jvp import JVPMode, jvp
from bench.diffusion.rng import StackedGenerator
from bench.diffusion.samplers import Model
from bench.nets.build import has_dropout
from methods.base import Method, MethodContext, PaperResult, PerfPasses
from methods.consistency import replayed, rng_state_of
from methods.papers import MEANFLOW_CIFAR

SPACES = Path(__file__).resolve().parent / "spaces"
PRESETS = Path(__file__).resolve().parent / "presets"


class MeanFlowConfig(Section):
    p_mean: float = -0.4  # logit-normal time draws: sigmoid(N(P_mean, P_std^2))
    p_std: float = Field(default=1.0, gt=0)
    ratio_neq: float = Field(default=0.25, ge=0, le=1)  # the fraction of samples with r != t
    norm_p: float = Field(default=1.0, ge=0)  # adaptive weight 1 / (||delta||^2 + c)^p
    norm_c: float = Field(default=1e-3, gt=0)
    jvp: JVPMode = "forward"  # "forward" (torch.func) or "finite_difference"
    jvp_eps: float = Field(default=1e-3, gt=0)  # the finite difference's step


class MeanFlow(Method):
    """MeanFlow: one-step generation from a learned average velocity."""

    name = "meanflow"
    summary = ("mean flows (Geng et al. 2025): the average velocity u(z, r, t) from the "
               "MeanFlow identity through one JVP; 1-step sampling")
    Config: ClassVar[type[Section] | None] = MeanFlowConfig
    label = "MeanFlow"
    group = "Direct training"
    precond = "flowmap"
    paper: ClassVar[tuple[PaperResult, ...]] = (
        PaperResult("cifar10", MEANFLOW_CIFAR, "1/2.92"),)
    search_spaces = (SPACES / "meanflow-time.toml",)
    presets = PRESETS / "meanflow.toml"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.options = ctx.config.section(self.name, MeanFlowConfig)
        self._student = Denoiser(ctx.new_net(), sigma_data=ctx.sigma_data, precond="flowmap",
                                 sigma_min=self.config.diffusion.sigma_min).to(ctx.device)
        # the JVP and the student's pass share one dropout mask whenever any dropout is active
        self.dropout_active = has_dropout(self._student)
        self._sample_times: dict[int, list[float]] = {}

    @property
    def student(self) -> nn.Module:
        """The flow map z_r = z_t - (t - r) u(z_t, r, t) around the network u."""
        return self._student

    # --- training -------------------------------------------------------------------------------

    def draw_times(self, batch: int, generator: torch.Generator, device: torch.device,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r): two logit-normal draws, t the larger; r = t except for a fraction
        meanflow.ratio_neq of the samples."""
        c = self.options
        pair = torch.sigmoid(c.p_mean + c.p_std * self.shard.draw(
            lambda b: torch.randn((b, 2), generator=generator, device=device), batch))
        t, r = pair.max(dim=1).values, pair.min(dim=1).values
        keep = self.shard.draw(lambda b: torch.rand(b, generator=generator, device=device),
                               batch) < c.ratio_neq
        return t, torch.where(keep, r, t)

    def target(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor,
               labels: torch.Tensor | None) -> torch.Tensor:
        """u_tgt = v - (t - r) du/dt, du/dt the JVP of u along (v, 0, 1) in (z, r, t)."""
        net = self._student.net
        c = self.options

        def u(z_in: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
            return net(z_in, times, labels)

        inputs = torch.stack([t, t - r], dim=1)  # the network's (t, t - r)
        _, dudt = jvp(u, (z, inputs), (v, torch.ones_like(inputs)), c.jvp, c.jvp_eps)
        return v - append_dims((t - r).clamp(0, 1), z.ndim) * dudt

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None, step: int,
             generator: torch.Generator) -> torch.Tensor:
        """sg(w) ||u(z_t, r, t) - sg(u_tgt)||^2 per sample."""
        c = self.options
        t, r = self.draw_times(x0.shape[0], generator, x0.device)
        e = self.shard.draw(lambda b: torch.randn((b, *x0.shape[1:]), generator=generator,
                                                  device=x0.device, dtype=x0.dtype), x0.shape[0])
        tt = append_dims(t, x0.ndim)
        z = (1 - tt) * x0 + tt * e
        v = e - x0
        state = rng_state_of(x0.device) if self.dropout_active else None
        with torch.no_grad(), replayed(state, x0.device):
            wanted = self.target(z, t, r, v, labels)
        with replayed(state, x0.device):  # the JVP's dropout mask
            u = self.average_velocity(z, t, r, labels)
        squared = (u - wanted).square().flatten(1).sum(1)
        weight = 1.0 / (squared.detach() + c.norm_c) ** c.norm_p
        return weight * squared

    def average_velocity(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                         labels: torch.Tensor | None) -> torch.Tensor:
        """u(z, r, t) with gradient: the raw network at (t, t - r), through DDP when several
        processes train (it wraps the raw network, see parallel_module)."""
        net = self.parallel if self.parallel is not None else self._student.net
        return net(z, torch.stack([t, t - r], dim=1), labels)

    def parallel_module(self) -> nn.Module:
        """The raw network: the loss reads u itself, which the flow map z - (t - r) u hides
        where r = t."""
        return self._student.net

    # --- sampling -------------------------------------------------------------------------------

    def check_nfe(self, nfe: int) -> None:
        """Any NFE >= 1: one network call per step."""
        if nfe < 1:
            raise UsageError(f"NFE must be >= 1, got {nfe}")

    def sample_times(self, nfe: int) -> list[float]:
        """The times 1 = t_0 > t_1 > ... > t_nfe = 0: sample.sigmas as the inner times when
        it has nfe - 1 values in (0, 1), else evenly spaced."""
        if nfe not in self._sample_times:
            inner = [float(s) for s in self.config.sample.sigmas]
            if len(inner) != nfe - 1 or not all(0 < s < 1 for s in inner):
                inner = [1 - k / nfe for k in range(1, nfe)]
            self._sample_times[nfe] = [1.0, *sorted(inner, reverse=True), 0.0]
        return self._sample_times[nfe]

    def sample_sigmas(self, nfe: int) -> list[float]:
        """The time each network call starts from."""
        return self.sample_times(nfe)[:-1]

    def sample(self, model: Model, noise: torch.Tensor, nfe: int, rng: StackedGenerator,
               ) -> torch.Tensor:
        """z_r = z_t - (t - r) u(z_t, r, t) from z_1 = the noise, down to t = 0."""
        times = self.sample_times(nfe)
        z = noise
        for t, r in zip(times[:-1], times[1:], strict=True):
            z = model(z, z.new_tensor([t, r]).expand(z.shape[0], 2))
        clamp = self.ctx.dataset.clamp
        return z if clamp is None else z.clamp(*clamp)

    # --- bench perf -----------------------------------------------------------------------------

    def perf_passes(self, x0: torch.Tensor, z: torch.Tensor, generator: torch.Generator,
                    ) -> PerfPasses:
        """The student's forward and backward, and the no-grad JVP of the network."""
        student = self.perf_student()
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device)
        r = t * torch.rand(x0.shape[0], generator=generator, device=x0.device)
        tt = append_dims(t, x0.ndim)
        zt = (1 - tt) * x0 + tt * z
        inputs = torch.stack([t, t - r], dim=1)
        net = cast(nn.Module, student.net)
        mode, eps = self.options.jvp, self.options.jvp_eps

        def jvp_pass() -> object:
            return jvp(lambda a, b: net(a, b, None), (zt, inputs),
                       (z - x0, torch.ones_like(inputs)), mode, eps)

        return PerfPasses(student, zt, torch.stack([t, r], dim=1), [],
                          f"student fwd+bwd + {mode} JVP", [jvp_pass])
