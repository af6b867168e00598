"""The Method protocol: every algorithm meets the training loop and the evaluator through this
interface, so neither branches on a method's name. A method also declares what the rest of the
house needs to know about it (its config section, report label and group, default sampler,
capabilities, published numbers, search spaces, the passes `bench perf` times), so nothing
outside `methods/` names a method."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bench.core.config import RunConfig, Section, register_presets, register_section
from bench.core.errors import BenchError, UsageError, unknown_name
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
    # the teacher checkpoint's online weights (`teacher` holds its average, the eval module),
    # for methods that start from them; None when the checkpoint keeps only one set
    teacher_online: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class PaperResult:
    """Published numbers of a method on one dataset, as printed: "1/3.55 2/2.93" (NFE/value)."""

    dataset: str  # bench's dataset name
    source: str  # paper and table
    values: str  # "NFE/value" pairs separated by spaces
    metric: str = "fid"

    def pairs(self) -> list[tuple[int, str]]:
        """[(nfe, value as printed), ...]."""
        return [(int(nfe), value) for nfe, value in
                (pair.split("/") for pair in self.values.split())]


@dataclass
class PerfPasses:
    """The raw passes of one training iteration, for `bench perf`'s bare loop: the student's
    forward and backward at (x, sigma), and the no-grad forwards (module, x, sigma) a method
    cannot skip (teacher steps, target)."""

    student: nn.Module  # a copy of the student that the passes train
    x: torch.Tensor
    sigma: torch.Tensor
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]]
    description: str  # e.g. "student fwd+bwd + target fwd"
    # further no-grad work of the iteration that is not one forward (a JVP of the network)
    no_grad_fns: list[Callable[[], object]] = field(default_factory=list)


class Method(ABC):
    """One algorithm behind the common interface."""

    name: ClassVar[str]  # registry name, e.g. "cd"
    summary: ClassVar[str]  # one line for `bench methods`
    Config: ClassVar[type[Section] | None] = None  # the method's config section [name]
    label: ClassVar[str] = ""  # report label ("" = the name)
    group: ClassVar[str] = "Other"  # report group; groups appear in registration order
    default_sampler: ClassVar[str] = ""  # ODE baselines name their sampler: "EDM (Heun)"
    needs_teacher: ClassVar[bool] = False  # distillation methods and samplers of a teacher
    # starts from the teacher's weights: an analytic teacher will not do (the suite gives it
    # the teacher run even where the dataset has an exact denoiser)
    teacher_weights: ClassVar[bool] = False
    provides_teacher: ClassVar[bool] = False  # its finished runs serve `--teacher auto`
    trains: ClassVar[bool] = True  # False for training-free baselines (ddim)
    precond: ClassVar[str] = "edm"  # the student's parameterisation (bench.diffusion.denoiser)
    can_edit: ClassVar[bool] = False  # zero-shot editing (`bench edit`): a consistency function
    in_suite: ClassVar[bool] = True  # part of `bench suite`'s default methods
    paper: ClassVar[tuple[PaperResult, ...]] = ()  # published numbers the report shows beside
    search_spaces: ClassVar[tuple[Path, ...]] = ()  # built-in sweep spaces (TOML files)
    # its own presets: [preset.<name>.<dataset>] tables in bench.toml's format, below bench.toml
    presets: ClassVar[Path | None] = None
    official_import: ClassVar[bool] = False  # `bench import` of the paper's released weights
    perf_settings: ClassVar[tuple[str, ...]] = ()  # --set overrides of `bench perf`'s runs
    perf_train_target: ClassVar[float] = 1.05  # `bench perf`: training overhead target
    perf_reference: ClassVar[bool] = False  # the method `bench perf` samples and evaluates

    @classmethod
    def display_label(cls) -> str:
        """The report label."""
        return cls.label or cls.name

    @classmethod
    def section(cls, config: RunConfig) -> Section:
        """This method's config section of a run's config."""
        if cls.Config is None:
            raise RuntimeError(f"method {cls.name!r} has no config section")
        return config.section(cls.name, cls.Config)

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.shard = ctx.shard  # random draws for a batch: this rank's rows of the global draw
        # parallel_module() inside DistributedDataParallel, when several processes train
        self.parallel: nn.Module | None = None

    def parallel_module(self) -> nn.Module | None:
        """The module DistributedDataParallel wraps when several processes train: the student,
        whose forward is train_forward. A method whose loss calls the student's raw network
        (MeanFlow, sCT, sCD) returns that network and calls `self.parallel` in its place."""
        return self.student

    @property
    def train_forward(self) -> nn.Module:
        """The module the gradient-carrying forward pass goes through: the student, or its
        DistributedDataParallel wrapper (which averages the gradients over the processes)."""
        module = self.parallel if self.parallel is not None else self.student
        if module is None:
            raise RuntimeError(f"{self.name} does not train")
        if self.parallel is not None and getattr(module, "module", None) is not self.student:
            raise RuntimeError(f"{self.name}'s DistributedDataParallel wraps "
                               f"{type(self.parallel_module()).__name__}, not the student: "
                               f"call self.parallel")
        return module

    # --- training -----------------------------------------------------------------------------

    @property
    @abstractmethod
    def student(self) -> nn.Module | None:
        """The network the optimizer updates (None for training-free methods)."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """Further networks saved in checkpoints (e.g. the target network)."""
        return {}

    def initial_average(self) -> dict[str, torch.Tensor] | None:
        """Weights the run's evaluation EMA starts from; None: a copy of the student."""
        return None

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

    def lr_factor(self, step: int) -> float:
        """A factor on train.lr's schedule at iteration step (a stage-wise decay, say)."""
        return 1.0

    def resets_optimizer(self, step: int) -> bool:
        """Whether the optimizer's state (moments, step counts) starts afresh at iteration
        step, before that iteration's update."""
        return False

    def total_steps(self) -> int:
        """Optimizer iterations of the whole run."""
        return self.config.train.steps if self.trains else 0

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the networks, for exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""

    def parameters(self) -> list[dict[str, Any]]:
        """What the optimizer updates, as torch.optim parameter groups: the student's
        trainable parameters by default. A method may add groups of its own (a learned loss
        weighting, say), saved through extra_modules(); a group's "lr_scale" multiplies the
        scheduled learning rate. With several processes the loop averages the gradients of
        these over the ranks as DDP does the student's."""
        student = self.student
        if student is None:
            return []
        return [{"params": [p for p in student.parameters() if p.requires_grad]}]

    def parameter_averages(self) -> list[str]:
        """The averages of the student's parameters the method updates each iteration
        (besides the run's evaluation EMA): what `bench perf`'s floor must also update."""
        return []

    def perf_passes(self, x0: torch.Tensor, z: torch.Tensor, generator: torch.Generator,
                    ) -> PerfPasses:
        """The raw network passes of one training iteration on x0 with noise z, further draws
        from generator (`bench perf`'s bare loop); None where the method does not train."""
        raise NotImplementedError(f"{self.name} declares no passes for bench perf")

    def perf_student(self) -> nn.Module:
        """A training copy of the student for perf_passes."""
        if self.student is None:
            raise RuntimeError(f"{self.name} does not train")
        return copy.deepcopy(self.student).train()

    @classmethod
    def imported_modules(cls, config: RunConfig) -> tuple[str, ...]:
        """`bench import`: the checkpoint modules besides the student and the EMA that hold
        the released weights (e.g. a target network)."""
        return ()

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

ENTRY_POINT_GROUP = "cmbench.methods"  # where other packages register their methods
_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Register a Method class under its name, with its config section."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a Method subclass")
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    if cls.Config is not None:
        register_section(cls.name, cls.Config)
    if cls.presets is not None:
        register_presets(cls.name, cls.presets)
    _REGISTRY[cls.name] = cls
    return cls


def load_plugins() -> None:
    """Register the methods other installed packages declare in the `cmbench.methods`
    entry-point group (each entry point names a Method subclass)."""
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in is the user's to fix: say which
            raise BenchError(f"method plug-in {ep.name!r} ({ep.value}) failed to load: "
                             f"{type(exc).__name__}: {exc}") from exc
        if getattr(cls, "name", None) in _REGISTRY and _REGISTRY[cls.name] is cls:
            continue
        if getattr(cls, "name", None) != ep.name:
            raise BenchError(f"method plug-in {ep.name!r} ({ep.value}) must name a Method "
                             f"subclass whose name is {ep.name!r}")
        register(cls)


def get_method(name: str) -> type[Method]:
    """The Method class registered under name; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise unknown_name("method", name, list(_REGISTRY))
    return _REGISTRY[name]


def method_names() -> list[str]:
    """Registered method names in registration order."""
    return list(_REGISTRY)


def teacher_method() -> str:
    """The method whose finished runs are the teachers (`--teacher auto`, the suite's first)."""
    for cls in _REGISTRY.values():
        if cls.provides_teacher:
            return cls.name
    raise BenchError("no registered method provides teachers")


def all_methods() -> list[type[Method]]:
    """Registered methods in registration order."""
    return list(_REGISTRY.values())


def online_teacher_weights(ctx: MethodContext, name: str) -> dict[str, torch.Tensor]:
    """The teacher checkpoint's online weights, for <name>.init_from = "online"."""
    if ctx.teacher_online is None:
        raise BenchError(f"{name}.init_from = online: teacher {ctx.teacher_source} keeps no "
                         f"online weights apart from its average; use {name}.init_from = ema")
    return ctx.teacher_online
