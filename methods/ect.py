"""Easy Consistency Tuning (ECT: Geng et al. 2024, "Consistency Models Made Easy", arXiv
2406.14548; locuslab/ect): a consistency model tuned in continuous time from a trained
diffusion model's weights.

t ~ lognormal(P_mean, P_std); r = max(0, t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))), so that
r approaches t as the stage grows (every ect.stage_iters iterations); x_t = x0 + t n and
x_r = x0 + r n share n; the student's f(x_t, t) and the stop-gradient target f(x_r, r) (x0 where
r = 0) share one dropout mask; the loss is the pseudo-Huber distance sqrt(||.||^2 + c^2) - c
(c = 0: the L2 norm) weighted by 1 / (t - r) (CIFAR-10) or EDM's (t^2 + sigma_d^2) /
(t sigma_d)^2 (ImageNet 64), as the paper's code does.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, cast

import torch
from pydantic import Field
from torch import nn

from bench.core.config import Section
from bench.core.errors import UsageError
from bench.diffusion.denoiser import Denoiser, append_dims
from methods.base import MethodContext, PaperResult, PerfPasses
from methods.consistency import (
    ConsistencyModel,
    replayed,
    require_network_teacher,
    rng_state_of,
    student_from_teacher,
)
from methods.papers import ECT_CIFAR, ECT_IMAGENET

SPACES = Path(__file__).resolve().parent / "spaces"
PRESETS = Path(__file__).resolve().parent / "presets"


class ECTConfig(Section):
    p_mean: float = -1.1  # ln t ~ N(P_mean, P_std^2)
    p_std: float = Field(default=2.0, gt=0)
    q: float = Field(default=2.0, gt=1)  # the gap t - r shrinks by q each stage
    k: float = Field(default=8.0, ge=0)  # r(t)'s adjustment 1 + k sigmoid(-b t)
    b: float = Field(default=1.0, ge=0)
    stage_iters: int = Field(default=1000, ge=1)  # iterations per stage
    huber_c: float = Field(default=0.0, ge=0)  # pseudo-Huber c; 0 = the L2 norm
    # the loss weight: "inverse_gap" 1 / (t - r) (CIFAR-10) or "edm" (t^2 + sigma_d^2) /
    # (t sigma_d)^2 (ImageNet 64, the code's snrpk)
    weighting: Literal["inverse_gap", "edm"] = "inverse_gap"
    init_from: Literal["ema", "online"] = "ema"  # the teacher's average or its online weights


def ect_gap(t: torch.Tensor, stage: int, q: float, k: float, b: float) -> torch.Tensor:
    """t - r = min(t, t q^-(stage+1) (1 + k sigmoid(-b t))), computed as a product (not as
    t - r, whose float32 cancellation gives 0 and an infinite weight in late stages)."""
    return torch.minimum(t * (q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t))), t)


def ect_r(t: torch.Tensor, stage: int, q: float, k: float, b: float) -> torch.Tensor:
    """r = max(0, t (1 - q^-(stage+1) (1 + k sigmoid(-b t))))."""
    return t - ect_gap(t, stage, q, k, b)


class ECT(ConsistencyModel):
    """ECT: continuous-time consistency tuning from a trained EDM run."""

    name = "ect"
    summary = ("easy consistency tuning (Geng et al. 2024): CT in continuous time from a "
               "trained EDM run, dt shrinking by stages")
    Config: ClassVar[type[Section] | None] = ECTConfig
    label = "ECT"
    group = "Direct training"
    needs_teacher = True
    teacher_weights = True
    paper: ClassVar[tuple[PaperResult, ...]] = (
        PaperResult("cifar10", ECT_CIFAR, "1/3.60 2/2.11"),
        PaperResult("imagenet64", ECT_IMAGENET, "1/3.35 2/1.96"))
    search_spaces = (SPACES / "ect-schedule.toml",)
    presets = PRESETS / "ect.toml"

    def __init__(self, ctx: MethodContext) -> None:
        self.options = ctx.config.section(self.name, ECTConfig)
        self.teacher = require_network_teacher(ctx.teacher, self.name)
        if not isinstance(self.teacher, Denoiser):
            raise UsageError("ect tunes a trained network: --teacher RUN_ID|PATH|auto (an "
                             "analytic teacher has no weights to start from)")
        super().__init__(ctx, target_mu=0.0)

    def initial_student(self) -> Denoiser:
        """The teacher's network under the consistency parameterisation, with ect.init_from's
        weights and the run's net.dropout."""
        return student_from_teacher(self.ctx, self.name, cast(Denoiser, self.ctx.teacher),
                                    self.options.init_from)

    def initial_average(self) -> dict[str, torch.Tensor] | None:
        """With ect.init_from = online, the evaluation EMA starts from the teacher's average."""
        if self.options.init_from == "online":
            return cast(Denoiser, self.ctx.teacher).state_dict()
        return None

    def target_mu(self, step: int) -> float:
        """No target network: the stop-gradient student."""
        return 0.0

    def stage(self, step: int) -> int:
        """The stage at iteration step."""
        return step // self.options.stage_iters

    def schedule_values(self, step: int) -> dict[str, float]:
        """The stage and the ratio r / t far from the data (1 - q^-(stage+1))."""
        stage = self.stage(step)
        return {"stage": float(stage), "ratio": 1 - self.options.q ** -(stage + 1)}

    def draw(self, x0: torch.Tensor, generator: torch.Generator,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) and the shared noise n, this shard's rows of the global draws."""
        c = self.options
        t = (c.p_mean + c.p_std * self.shard.draw(
            lambda b: torch.randn(b, generator=generator, device=x0.device), x0.shape[0])).exp()
        n = self.shard.draw(lambda b: torch.randn((b, *x0.shape[1:]), generator=generator,
                                                  device=x0.device, dtype=x0.dtype), x0.shape[0])
        return t, n

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None, step: int,
             generator: torch.Generator) -> torch.Tensor:
        """w(t, r) (sqrt(||f(x_t, t) - sg f(x_r, r)||^2 + c^2) - c) per sample."""
        c = self.options
        t, n = self.draw(x0, generator)
        gap = ect_gap(t, self.stage(step), c.q, c.k, c.b)
        r = t - gap
        x_t = x0 + append_dims(t, x0.ndim) * n
        x_r = x0 + append_dims(r, x0.ndim) * n
        state = rng_state_of(x0.device) if self.dropout_active else None
        # the target pass runs for every sample (no host sync to ask whether any r > 0); x0
        # replaces it where r = 0
        with torch.no_grad(), replayed(state, x0.device):
            at_r = self._student(x_r, r.clamp_min(self.sigma_min), labels)
            target = torch.where(append_dims(r > 0, x0.ndim), torch.nan_to_num(at_r), x0)
        with replayed(state, x0.device):
            online = self.train_forward(x_t, t, labels)
        squared = (online - target).square().flatten(1).sum(1)
        # c = 0 is the L2 norm, whose gradient at an exact match would be 0 / 0: the clamp
        # gives such a sample no gradient instead
        distance = (squared + c.huber_c ** 2).clamp_min(1e-30).sqrt() - c.huber_c
        if c.weighting == "inverse_gap":
            weight = 1.0 / gap
        else:
            sd = self.ctx.sigma_data
            weight = (t.square() + sd * sd) / (t * sd).square()
        return weight * distance

    def perf_passes(self, x0: torch.Tensor, z: torch.Tensor, generator: torch.Generator,
                    ) -> PerfPasses:
        """The student's forward and backward at t, and the no-grad target forward at r."""
        c = self.options
        t = (torch.randn(x0.shape[0], generator=generator, device=x0.device) * c.p_std
             + c.p_mean).exp()
        r = ect_r(t, 0, c.q, c.k, c.b).clamp_min(self.sigma_min)
        student = self.perf_student()
        x_t = x0 + append_dims(t, x0.ndim) * z
        x_r = x0 + append_dims(r, x0.ndim) * z
        calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = [(student, x_r, r)]
        return PerfPasses(student, x_t, t, calls, "student fwd+bwd + no-grad student fwd")

