"""Progressive distillation (Salimans & Ho 2022) in sigma space: each stage trains a student to
take in one Euler (DDIM) step what its teacher takes in two, then the student becomes the next
teacher; the sampling steps halve from pd.initial_steps down to 1.

Design (the official code is google-research/diffusion_distillation, `dpm.py` and
`config/*_distill.py`):
- Grid. The N-step grid is the Karras grid of N + 1 levels (u = i/N from sigma_max to sigma_min,
  `karras_sigmas`) with its last level sigma_min replaced by 0: the official code also samples at
  u = i/N and replaces its last level by the x prediction. Levels at u = i/N are every other
  level at u = j/(2N), so a student step t -> t3 is exactly two teacher steps t -> t2 -> t3.
- Loss weight. max(1/t^2, 1), the paper's truncated SNR (`snr_trunc`: max(x_mse, eps_mse)) with
  SNR = 1/sigma^2 in sigma space. It is not rescaled by sigma_data: Adam ignores a constant factor,
  so sigma_data would only move the knee from t = 1 to t = sigma_data, and keeping the paper's knee
  keeps image runs ([-1, 1] data) on the paper's loss.
- Teacher update. The official code anneals the learning rate to 0 in each stage and keeps no
  EMA (`ema_decay = 0`). The loop here has a constant learning rate and one EMA whose rate spans
  stages, so at the end of a short stage it would still mostly hold networks trained for another
  step count. PD therefore averages the student's iterates within each stage with a warm-up EMA,
  rate min(train.ema_rate, (1 + k)/(10 + k)) at iteration k of the stage (tf.train.
  ExponentialMovingAverage with num_updates): roughly the last tenth of the stage, whatever its
  length; train.ema_rate = 0 keeps the raw student as the official code does. At the end of a
  stage that average is the stage's snapshot, the next teacher and the next student's start
  (Salimans & Ho 2022, Algorithm 2: theta <- eta); the loop's EMA is set to it as well, so the
  checkpoint's eval module is always the latest snapshot.
- Snapshots. One per stage, kept as CPU state dicts in `state_dict()` (plain tensors); the
  teacher of stage s >= 1 is the snapshot of stage s - 1, so a resumed run rebuilds it from them.
"""

from __future__ import annotations

import bisect
import copy
import itertools
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from bench.core.config import Section
from bench.core.errors import UsageError
from bench.diffusion.denoiser import Denoiser, append_dims
from bench.diffusion.rng import StackedGenerator
from bench.diffusion.samplers import Model, euler_step, sample_euler
from bench.diffusion.schedules import karras_sigmas
from bench.nets.averaging import ParamAverage
from bench.nets.build import set_dropout
from methods.base import Method, MethodContext, PaperResult, PerfPasses, online_teacher_weights
from methods.papers import CM_TABLE1, CM_TABLE2

SPACES = Path(__file__).resolve().parent / "spaces"


class PDConfig(Section):
    initial_steps: int = 16  # teacher Euler steps at the first stage (a power of two >= 2)
    iters_per_stage: int = Field(default=400, ge=1)  # iterations per halving stage (paper: 50k)
    last_stage_factor: float = Field(default=2.0, gt=0)  # the last stages train this x longer
    long_stages: int = Field(default=1, ge=0)  # how many of the last stages train longer
    # learning rate within a stage: "none" (train.lr_schedule over the whole run) or "linear"
    # (from train.lr down to 0 over each stage, and the optimizer's state reset at each stage's
    # start, as the JAX code behind the CM paper's PD rows and Salimans & Ho's own code)
    stage_lr: Literal["none", "linear"] = "none"
    # which teacher weights the first student starts from: "ema" (the teacher's average) or
    # "online" (its raw weights, as the CIFAR-10 JAX code's `finetune`)
    init_from: Literal["ema", "online"] = "ema"

    @model_validator(mode="after")
    def _power_of_two(self) -> PDConfig:
        if not (self.initial_steps >= 2 and self.initial_steps.bit_count() == 1):
            raise ValueError("pd.initial_steps must be a power of two >= 2")
        return self

StateDict = dict[str, torch.Tensor]


def nested_sigmas(n_steps: int, sigma_min: float, sigma_max: float, rho: float,
                  ) -> torch.Tensor:
    """Descending PD grid of n_steps + 1 levels: Karras levels at u = i/n_steps, then 0.

    The grid of n steps is every other level of the grid of 2n steps (Salimans & Ho 2022, Alg. 2).
    """
    levels = karras_sigmas(n_steps + 1, sigma_min, sigma_max, rho).flip(0)
    return torch.cat([levels[:-1], levels.new_zeros(1)])


def pd_x0_target(
    teacher: Model,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t2: torch.Tensor,
    t3: torch.Tensor,
) -> torch.Tensor:
    """x0 that makes one Euler step t -> t3 land on two teacher Euler steps (Salimans & Ho 2022).

    x0_target = x_t - t (x_t3 - x_t) / (t3 - t); for t3 = 0 this is x_t3 itself.
    """
    x_t2 = euler_step(teacher, x_t, t, t2)
    x_t3 = euler_step(teacher, x_t2, t2, t3)
    t_, t3_ = append_dims(t, x_t.ndim), append_dims(t3, x_t.ndim)
    return x_t - t_ * (x_t3 - x_t) / (t3_ - t_)


def truncated_snr_weight(sigma: torch.Tensor) -> torch.Tensor:
    """max(SNR, 1) with SNR = 1/sigma^2 (Salimans & Ho 2022, Section 4, `snr_trunc`)."""
    return sigma.pow(-2).clamp(min=1.0)


def _frozen(module: nn.Module) -> nn.Module:
    """module in eval mode with gradients off."""
    return module.eval().requires_grad_(False)


class PD(Method):
    """Progressive distillation of a teacher into a 1-step sampler, halving steps per stage.

    The student starts as a copy of the teacher when the teacher is a network (a `Denoiser`),
    with the run's net.dropout; an analytic teacher (gmm8, gmm25) has no network to copy, so the
    student is then a fresh EDM-preconditioned `Denoiser` around `ctx.new_net()`.
    """

    name = "pd"
    summary = "progressive distillation (Salimans & Ho 2022): halve Euler steps per stage"
    Config = PDConfig
    label = "PD"
    group = "Distillation"
    needs_teacher = True
    paper = (PaperResult("cifar10", CM_TABLE1, "1/8.34 2/5.58"),
             PaperResult("imagenet64", CM_TABLE2, "1/15.39 2/8.95"),
             PaperResult("lsun-bedroom", CM_TABLE2, "1/16.92 2/8.47"),
             PaperResult("lsun-cat", CM_TABLE2, "1/29.6 2/15.5"))
    search_spaces = (SPACES / "pd-lr.toml", SPACES / "pd-steps.toml")
    perf_settings = ("pd.iters_per_stage=1000000",)
    precond = "edm"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if ctx.teacher is None:
            raise ValueError("pd needs a teacher")
        d, p = self.config.diffusion, self.config.section(self.name, PDConfig)
        self.teacher = _frozen(ctx.teacher)  # the original teacher: stage 0 and NFE initial_steps
        self.initial_steps = p.initial_steps
        self.num_stages = p.initial_steps.bit_length() - 1  # log2(initial_steps)
        self.stage_lr = p.stage_lr
        long_iters = max(1, round(p.last_stage_factor * p.iters_per_stage))
        long_stages = min(p.long_stages, self.num_stages)
        lengths = ([p.iters_per_stage] * (self.num_stages - long_stages)
                   + [long_iters] * long_stages)
        self._stage_starts = [0, *itertools.accumulate(lengths)]  # stage s: [starts[s], [s+1])
        if isinstance(ctx.teacher, Denoiser):
            self._check_architecture(ctx.teacher, ctx)
            student = copy.deepcopy(ctx.teacher)
            if p.init_from == "online":
                student.load_state_dict(online_teacher_weights(ctx, self.name))
            set_dropout(student, self.config.net.dropout)  # official PD students: 0
        else:
            student = Denoiser(ctx.new_net(), sigma_data=ctx.sigma_data, precond="edm",
                               sigma_min=d.sigma_min)
        self._student = student.to(ctx.device).requires_grad_(True).train()
        self._stage_average = _frozen(copy.deepcopy(self._student))
        self._averager = ParamAverage(self._stage_average, self._student)
        self._stage_teacher = _frozen(copy.deepcopy(self._student))  # holds snapshots as teacher
        self._stage_teacher_steps = 0  # which snapshot _stage_teacher holds (0 = none)
        self._snapshots: dict[int, StateDict] = {}  # student steps -> stage-end weights (CPU)
        self._snapshot_models: dict[int, nn.Module] = {}  # built lazily for evaluation
        self._loss_grids: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    @staticmethod
    def _check_architecture(teacher: Denoiser, ctx: MethodContext) -> None:
        """The copied teacher must match the run's [net] settings, which checkpoints record."""
        mine = {k: tuple(v.shape) for k, v in ctx.new_net().state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in teacher.net.state_dict().items()}
        if mine != theirs or abs(teacher.sigma_data - ctx.sigma_data) > 1e-9:
            raise UsageError(f"pd copies the teacher {ctx.teacher_source}: its network or "
                             f"sigma_data differs from this run's [net]/[diffusion] settings; "
                             f"pass the teacher run's settings")

    # --- stages (pure functions of the step) --------------------------------------------------

    def stage_of(self, step: int) -> int:
        """Stage index of iteration step: stage s has a 2N-step teacher and an N-step student."""
        return min(bisect.bisect_right(self._stage_starts, step) - 1, self.num_stages - 1)

    def stage_start(self, stage: int) -> int:
        """First iteration of stage `stage`."""
        return self._stage_starts[stage]

    def stage_end(self, stage: int) -> int:
        """First iteration after stage `stage`."""
        return self._stage_starts[stage + 1]

    def student_steps(self, stage: int) -> int:
        """Student sampling steps N of a stage: initial_steps / 2^(stage + 1)."""
        return self.initial_steps >> (stage + 1)

    def total_steps(self) -> int:
        """iters_per_stage per stage, the last pd.long_stages stages last_stage_factor times
        longer."""
        return self._stage_starts[-1]

    def lr_factor(self, step: int) -> float:
        """pd.stage_lr = "linear": 1 - k / L at iteration k of a stage of L iterations."""
        if self.stage_lr == "none":
            return 1.0
        stage = self.stage_of(step)
        start, end = self.stage_start(stage), self.stage_end(stage)
        return 1.0 - (step - start) / (end - start)

    def resets_optimizer(self, step: int) -> bool:
        """pd.stage_lr = "linear": each stage after the first starts a fresh optimizer."""
        return self.stage_lr == "linear" and step > 0 and step in self._stage_starts

    def reached_nfes(self) -> list[int]:
        """NFEs a finished run can sample with: the students' 1, 2, ... and the teacher's."""
        return [self.student_steps(s) for s in reversed(range(self.num_stages))] + [
            self.initial_steps]

    def schedule_values(self, step: int) -> dict[str, float]:
        """Stage and step counts of iteration step."""
        stage = self.stage_of(step)
        n = self.student_steps(stage)
        return {"pd_stage": float(stage), "pd_student_steps": float(n),
                "pd_teacher_steps": float(2 * n)}

    def grid(self, n_steps: int) -> torch.Tensor:
        """The nested n-step grid with this run's diffusion settings (float64, descending)."""
        d = self.config.diffusion
        return nested_sigmas(n_steps, d.sigma_min, d.sigma_max, d.rho)

    def parameter_averages(self) -> list[str]:
        """The within-stage average of the student's iterates."""
        return ["stage average"]

    def perf_passes(self, x0: torch.Tensor, z: torch.Tensor, generator: torch.Generator,
                    ) -> PerfPasses:
        """The student's forward and backward, and the teacher's two DDIM steps."""
        b, device = x0.shape[0], x0.device
        grid = self.grid(2 * self.student_steps(0)).to(device, x0.dtype)
        i = torch.randint(self.student_steps(0), (b,), generator=generator, device=device)
        t, t2 = grid[2 * i], grid[2 * i + 1]
        x_t = x0 + append_dims(t, x0.ndim) * z
        x_t2 = x0 + append_dims(t2, x0.ndim) * z
        return PerfPasses(self.perf_student(), x_t, t,
                          [(self.teacher, x_t, t), (self.teacher, x_t2, t2)],
                          "student fwd+bwd + 2 teacher fwds (two DDIM steps)")

    def _loss_grid(self, n_steps: int, like: torch.Tensor) -> torch.Tensor:
        """grid(n_steps) on like's device and dtype, made once per stage, not per iteration."""
        key = (n_steps, like.device, like.dtype)
        if key not in self._loss_grids:
            self._loss_grids[key] = self.grid(n_steps).to(device=like.device, dtype=like.dtype)
        return self._loss_grids[key]

    def _teacher_of(self, stage: int) -> nn.Module:
        """The original teacher for stage 0; the previous stage's snapshot afterwards."""
        if stage == 0:
            return self.teacher
        steps = self.student_steps(stage - 1)
        if steps not in self._snapshots:  # the stage's last step was skipped (non-finite)
            self._end_stage(stage - 1, None)
        if self._stage_teacher_steps != steps:
            self._stage_teacher.load_state_dict(self._snapshots[steps])
            self._stage_teacher_steps = steps
        return self._stage_teacher

    # --- training -----------------------------------------------------------------------------

    @property
    def student(self) -> nn.Module:
        """The denoiser being distilled."""
        return self._student

    def extra_modules(self) -> dict[str, nn.Module]:
        """The within-stage average of the student."""
        return {"stage_average": self._stage_average}

    def loss(
        self,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        step: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Truncated-SNR weighted L2 to the two-teacher-step x0 target at a random student step."""
        stage = self.stage_of(step)
        n = self.student_steps(stage)
        grid = self._loss_grid(2 * n, x0)
        b = x0.shape[0]
        i = self.shard.draw(lambda m: torch.randint(n, (m,), generator=generator,
                                                    device=x0.device), b)
        t, t2, t3 = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        noise = self.shard.draw(lambda m: torch.randn((m, *x0.shape[1:]), generator=generator,
                                                      device=x0.device, dtype=x0.dtype), b)
        x_t = x0 + append_dims(t, x0.ndim) * noise
        teacher = self._teacher_of(stage)
        with torch.no_grad():
            target = pd_x0_target(lambda x, s: teacher(x, s, labels), x_t, t, t2, t3)
        denoised = self.train_forward(x_t, t, labels)
        per_dim = (denoised - target) ** 2
        return truncated_snr_weight(t) * per_dim.flatten(1).mean(1)

    def after_step(self, step: int, ema: nn.Module | None) -> None:
        """Update the stage average; at a stage's end snapshot it and start the next stage."""
        stage = self.stage_of(step)
        k = step - self.stage_start(stage)
        rate = min(self.config.train.ema_rate, (1 + k) / (10 + k))
        self._averager.update(rate)
        if step + 1 == self.stage_end(stage):
            self._end_stage(stage, ema)

    def _end_stage(self, stage: int, ema: nn.Module | None) -> None:
        """Snapshot the stage average; it starts the next stage as student and teacher."""
        snapshot = {name: value.detach().cpu().clone()
                    for name, value in self._stage_average.state_dict().items()}
        self._snapshots[self.student_steps(stage)] = snapshot
        self._snapshot_models.pop(self.student_steps(stage), None)
        if stage + 1 < self.num_stages:
            self._student.load_state_dict(snapshot)
        if ema is not None:
            ema.load_state_dict(snapshot)

    def state_dict(self) -> dict[str, Any]:
        """The per-stage snapshots (the teacher of each later stage is one of them)."""
        return {"snapshots": {n: dict(s) for n, s in self._snapshots.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the snapshots; the stage teacher is rebuilt from them when next needed."""
        self._snapshots = {int(n): {k: v.cpu() for k, v in s.items()}
                           for n, s in state.get("snapshots", {}).items()}
        self._snapshot_models.clear()
        self._stage_teacher_steps = 0

    # --- evaluation ---------------------------------------------------------------------------

    def evaluation_model(self, ema: nn.Module | None, nfe: int) -> nn.Module:
        """The N-step snapshot for NFE N, the teacher for initial_steps, else the stage average.

        A run that has not reached nfe yet (an intermediate evaluation) is sampled from the
        current stage's average, trained for more steps than nfe.
        """
        if nfe == self.initial_steps:
            return self.teacher
        if nfe not in self._snapshots:
            return self._stage_average
        if nfe not in self._snapshot_models:
            model = _frozen(copy.deepcopy(self._stage_average))
            model.load_state_dict(self._snapshots[nfe])
            self._snapshot_models[nfe] = model
        return self._snapshot_models[nfe]

    def check_nfe(self, nfe: int) -> None:
        """Only the step counts the stages reach (powers of two up to initial_steps)."""
        reached = self.reached_nfes()
        if nfe not in reached:
            raise UsageError(f"pd with pd.initial_steps={self.initial_steps} samples with NFE "
                             f"{', '.join(map(str, reached))} (the last is the teacher), "
                             f"not {nfe}")

    def sample_sigmas(self, nfe: int) -> list[float]:
        """The nested grid of nfe Euler steps."""
        return [float(s) for s in self.grid(nfe)]

    def sample(self, model: Model, noise: torch.Tensor, nfe: int, rng: StackedGenerator,
               ) -> torch.Tensor:
        """nfe deterministic Euler steps on the nested grid from sigma_max (rng unused)."""
        grid = self.grid(nfe)
        return sample_euler(model, noise * float(grid[0]), grid)
