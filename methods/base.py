"""The Method protocol: every algorithm (EDM, DDIM, PD, CD, CT, ...) meets the training loop
and the evaluator through this interface, so neither branches on a method's name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from bench.core.config import RunConfig
from bench.core.errors import UsageError, unknown_name
from bench.data.datasets import Dataset
from bench.data.shard import Shard
from bench.diffusion.rng import StackedGenerator
from bench.diffusion.samplers import Model, sample_euler, sample_heun
from bench.diffusion.schedules import sampling_sigmas


@dataclass
class MethodContext:
    """Everything a method is built from."""

    config: RunConfig  # the resolved run configuration
    dataset: Dataset  # training data and its declared constants
    device: torch.device  # where the networks live
    sigma_data: float  # data std used by the preconditioning
    teacher: nn.Module | None  # frozen D(x; sigma) for methods that need one
    teacher_source: str  # run id, checkpoint path, "analytic" or "none"
    new_net: Callable[[], nn.Module]  # builds a fresh raw network F for this dataset
    shard: Shard = field(default_factory=Shard)  # this process's rows of each global batch


class Method(ABC):
    """One algorithm behind the common interface."""

    name: ClassVar[str]  # registry name, e.g. "cd"
    summary: ClassVar[str]  # one line for `bench methods`
    needs_teacher: ClassVar[bool] = False  # distillation methods and samplers of a teacher
    trains: ClassVar[bool] = True  # False for training-free baselines (ddim)
    precond: ClassVar[str] = "edm"  # preconditioning of the student ("edm" or "cm")

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.shard = ctx.shard  # random draws for a batch: this rank's rows of the global draw
        self.parallel: nn.Module | None = None  # the student inside DDP, when several processes

    @property
    def train_forward(self) -> nn.Module:
        """The module the gradient-carrying forward pass goes through: the student, or its
        DistributedDataParallel wrapper (which averages the gradients over the processes)."""
        module = self.parallel if self.parallel is not None else self.student
        if module is None:
            raise RuntimeError(f"{self.name} does not train")
        return module

    # --- training -----------------------------------------------------------------------------

    @property
    @abstractmethod
    def student(self) -> nn.Module | None:
        """The network the optimizer updates (None for training-free methods)."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """Further networks saved in checkpoints (e.g. the target network)."""
        return {}

    def loss(
        self,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        step: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Per-sample training loss, shape (B,)."""
        raise NotImplementedError(f"{self.name} does not train")

    def after_step(self, step: int, ema: nn.Module | None) -> None:
        """Called after each optimizer step and EMA update (target updates, stage changes)."""

    def schedule_values(self, step: int) -> dict[str, float]:
        """Schedule values (N, mu, ...) to log against the iteration."""
        return {}

    def total_steps(self) -> int:
        """Optimizer iterations of the whole run."""
        return self.config.train.steps if self.trains else 0

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the networks, for exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""

    # --- evaluation ---------------------------------------------------------------------------

    def evaluation_model(self, ema: nn.Module | None, nfe: int) -> nn.Module:
        """The model sampled from at evaluation with nfe calls: the EMA student by default."""
        model = ema if ema is not None else self.student
        if model is None:
            raise RuntimeError(f"{self.name} has no model to evaluate")
        return model

    @abstractmethod
    def check_nfe(self, nfe: int) -> None:
        """Raise UsageError if this method cannot sample with nfe network calls."""

    def noise_draws(self, nfe: int) -> int:
        """Noise draws per sample that sample() makes with nfe calls, the initial noise
        included (drawn ahead in one pass for small batches)."""
        return 1

    @abstractmethod
    def sample_sigmas(self, nfe: int) -> list[float]:
        """The noise levels used to sample with nfe calls (logged with the results)."""

    @abstractmethod
    def sample(
        self,
        model: Model,
        noise: torch.Tensor,
        nfe: int,
        rng: StackedGenerator,
    ) -> torch.Tensor:
        """Samples in data space from unit-normal noise (one row per sample)."""


def ode_check_nfe(sampler: str, nfe: int) -> None:
    """Euler takes any NFE >= 1; Heun with n steps costs 2n - 1, so its NFE must be odd."""
    if nfe < 1:
        raise UsageError(f"NFE must be >= 1, got {nfe}")
    if sampler == "heun" and nfe % 2 == 0:
        raise UsageError(f"Heun sampling costs 2n-1 network calls: NFE {nfe} is not reachable "
                         f"(use {nfe - 1} or {nfe + 1}, or --set sampler=euler)")


def ode_steps(sampler: str, nfe: int) -> int:
    """Number of ODE steps that spend exactly nfe network calls."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def ode_sample(
    model: Model,
    noise: torch.Tensor,
    nfe: int,
    sampler: str,
    config: RunConfig,
) -> torch.Tensor:
    """Solve the PF ODE from sigma_max to 0 on the Karras grid with Euler (DDIM) or Heun."""
    d = config.diffusion
    sigmas = sampling_sigmas(ode_steps(sampler, nfe), d.sigma_min, d.sigma_max, d.rho)
    x = noise * d.sigma_max
    solve = sample_heun if sampler == "heun" else sample_euler
    return solve(model, x, sigmas)


def ode_sigmas(nfe: int, sampler: str, config: RunConfig) -> list[float]:
    """The sampling schedule ode_sample uses, as floats."""
    d = config.diffusion
    return [float(s) for s in sampling_sigmas(ode_steps(sampler, nfe), d.sigma_min,
                                              d.sigma_max, d.rho)]


# --- registry --------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Register a Method class under its name."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The Method class registered under name; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise unknown_name("method", name, list(_REGISTRY))
    return _REGISTRY[name]


def method_names() -> list[str]:
    """Registered method names in registration order."""
    return list(_REGISTRY)
