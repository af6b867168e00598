"""What consistency distillation and consistency training share (Song et al. 2023): the
consistency parameterisation, the distance d, the target network, the shared dropout RNG and
multistep sampling. CD and CT differ only in how x_hat (the point one step closer to the data)
is made, in the noise-index distribution and in their schedules."""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import nn

from bench.core.config import RunConfig
from bench.core.errors import BenchError, UsageError
from bench.diffusion.denoiser import Denoiser, append_dims
from bench.diffusion.rng import StackedGenerator
from bench.diffusion.samplers import Model, sample_consistency
from bench.diffusion.schedules import karras_sigmas
from bench.nets.averaging import ParamAverage
from bench.nets.build import has_dropout, set_dropout
from methods.base import Method, MethodContext, PerfPasses, online_teacher_weights
from methods.lpips_distance import lpips_distance

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# consistency-loss distances; lpips_avgpool: LPIPS with average pooling (openai/consistency_models)
DistanceName = Literal["l2", "l1", "pseudo_huber", "lpips", "lpips_avgpool"]
Weighting = Literal["uniform", "inverse_gap"]  # consistency-loss weightings lambda(t_n)
IndexSampling = Literal["uniform", "lognormal"]  # how the consistency index n is drawn


def pseudo_huber(c: float) -> Distance:
    """d(x, y) = sqrt(|x - y|^2 + c^2) - c over the whole sample (Song & Dhariwal 2023)."""

    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((x - y).square().flatten(1).sum(1) + c * c).sqrt() - c

    return distance


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample (the official code's "l2")."""
    return (x - y).square().flatten(1).mean(1)


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample."""
    return (x - y).abs().flatten(1).mean(1)


def huber_c_for(dim: int, configured: float) -> float:
    """c = 0.00054 sqrt(dim) unless configured (> 0)."""
    return configured if configured > 0 else 0.00054 * math.sqrt(dim)


def make_distance(name: str, shape: tuple[int, ...], huber_c: float, device: torch.device,
                  ) -> Distance:
    """The distance d by name; LPIPS fails at start, with one line, when it cannot run here."""
    dim = math.prod(shape)
    if name == "l2":
        return l2
    if name == "l1":
        return l1
    if name == "pseudo_huber":
        return pseudo_huber(huber_c_for(dim, huber_c))
    if name == "lpips":
        return lpips_distance(shape, device, "max")
    if name == "lpips_avgpool":
        return lpips_distance(shape, device, "avg")
    raise UsageError(f"unknown distance {name!r}")


def consistency_weight(kind: str, sigma_next: torch.Tensor, sigma: torch.Tensor,
                       ) -> torch.Tensor | None:
    """lambda(t_n): None for "uniform" (Song et al. 2023); 1 / (t_{n+1} - t_n) for
    "inverse_gap" (Song & Dhariwal 2023), which keeps the small-noise levels, where every
    consistency error starts, from being drowned by the large ones."""
    if kind == "uniform":
        return None
    if kind == "inverse_gap":
        return 1.0 / (sigma_next - sigma)
    raise ValueError(f"unknown consistency weighting {kind!r}")


class ConsistencyModel(Method):
    """What every consistency model shares, discrete-grid or continuous-time: the student f
    under the consistency parameterisation, an optional target network theta^- kept as an
    average of the student, multistep sampling (Algorithm 1) and so zero-shot editing."""

    precond = "cm"
    can_edit = True

    def __init__(self, ctx: MethodContext, *, target_mu: float | None) -> None:
        super().__init__(ctx)
        d = self.config.diffusion
        self.sigma_min, self.sigma_max, self.rho = d.sigma_min, d.sigma_max, d.rho
        self._student = self.initial_student().to(ctx.device)
        # online and target passes share one dropout mask whenever any dropout is active
        self.dropout_active = has_dropout(self._student)
        # target_mu None: a scheduled mu; 0: no separate target (stop-gradient student)
        self.separate_target = target_mu is None or target_mu > 0
        self.target: nn.Module | None = None
        self._target_average: ParamAverage | None = None
        if self.separate_target:
            self.target = copy.deepcopy(self._student).requires_grad_(False)
            self._target_average = ParamAverage(self.target, self._student)
        # per NFE, made once: the levels as float32 (the precision sampling has always used),
        # held as Python floats so that no call reads them back from a tensor
        self._sample_sigmas: dict[int, list[float]] = {}

    def initial_student(self) -> Denoiser:
        """A fresh network under the method's parameterisation (CT); CD overrides this to start
        from the teacher."""
        return Denoiser(self.ctx.new_net(), sigma_data=self.ctx.sigma_data, precond=self.precond,
                        sigma_min=self.config.diffusion.sigma_min)

    @property
    def student(self) -> nn.Module:
        """The consistency function f_theta being trained."""
        return self._student

    def extra_modules(self) -> dict[str, nn.Module]:
        """The target network theta^-, when it is separate from the student."""
        return {"target": self.target} if self.target is not None else {}

    @abstractmethod
    def target_mu(self, step: int) -> float:
        """Target EMA rate at iteration step."""

    def after_step(self, step: int, ema: nn.Module | None) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta."""
        if self._target_average is not None:
            self._target_average.update(self.target_mu(step))

    def parameter_averages(self) -> list[str]:
        """The target network, when it is separate from the student."""
        return ["target"] if self.target is not None else []

    @classmethod
    def imported_modules(cls, config: RunConfig) -> tuple[str, ...]:
        """The target network, when the configuration keeps one."""
        return ("target",) if cls.keeps_target(config) else ()

    @classmethod
    def keeps_target(cls, config: RunConfig) -> bool:
        """Whether a run of this configuration has a separate target network."""
        return True

    # --- sampling -----------------------------------------------------------------------------

    def check_nfe(self, nfe: int) -> None:
        """Any NFE >= 1: one consistency-function call per level."""
        if nfe < 1:
            raise UsageError(f"NFE must be >= 1, got {nfe}")

    def noise_draws(self, nfe: int) -> int:
        """The initial noise and one re-noising per call after the first (Algorithm 1)."""
        return nfe

    def sample_sigmas(self, nfe: int) -> list[float]:
        """sample.sigmas when it has nfe levels, else sigma_max and nfe - 1 levels spaced
        evenly in sigma^(1/rho) between sigma_max and sigma_min (both ends excluded)."""
        explicit = self.config.sample.sigmas
        if len(explicit) == nfe:
            return [float(s) for s in explicit]
        levels = karras_sigmas(nfe + 1, self.sigma_min, self.sigma_max, self.rho).flip(0)
        return [float(s) for s in levels[:nfe]]

    def sample(self, model: Model, noise: torch.Tensor, nfe: int, rng: StackedGenerator,
               ) -> torch.Tensor:
        """Multistep consistency sampling (Song et al. 2023, Algorithm 1)."""
        if nfe not in self._sample_sigmas:
            self._sample_sigmas[nfe] = torch.tensor(self.sample_sigmas(nfe)).tolist()
        sigmas = self._sample_sigmas[nfe]
        return sample_consistency(model, noise * sigmas[0], sigmas, rng, self.sigma_min,
                                  self.ctx.dataset.clamp)


class GridConsistencyMethod(ConsistencyModel):
    """Consistency training and distillation on a discrete Karras grid (CD, CT, iCT): the
    noise-index distribution, the weighting lambda(t_n), the distance d and the loss."""

    def __init__(self, ctx: MethodContext, *, target_mu: float | None) -> None:
        super().__init__(ctx, target_mu=target_mu)
        self._grids: dict[int, torch.Tensor] = {}
        self._index_probs: dict[int, torch.Tensor] = {}

    @abstractmethod
    def n_scales(self, step: int) -> int:
        """N at iteration step."""

    def grid(self, n: int) -> torch.Tensor:
        """Ascending Karras grid of n levels on the device (cached)."""
        if n not in self._grids:
            self._grids[n] = karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho).to(
                self.ctx.device, torch.float32)
        return self._grids[n]

    @property
    def index_sampling(self) -> tuple[str, float, float]:
        """How n is drawn: ("uniform", 0, 0) or ("lognormal", P_mean, P_std)."""
        return ("uniform", 0.0, 0.0)

    def index_probs(self, n_scales: int) -> torch.Tensor:
        """p(n) for n in 0..N-2: uniform, or proportional to
        erf((ln t_{n+1} - P_mean) / (sqrt2 P_std)) - erf((ln t_n - P_mean) / (sqrt2 P_std))."""
        if n_scales not in self._index_probs:
            kind, p_mean, p_std = self.index_sampling
            if kind == "uniform":
                probs = torch.ones(n_scales - 1, dtype=torch.float64)
            else:
                log_sigma = self.grid(n_scales).double().log()
                cdf = torch.erf((log_sigma - p_mean) / (math.sqrt(2) * p_std))
                probs = (cdf[1:] - cdf[:-1]).clamp_min(0)
            self._index_probs[n_scales] = (probs / probs.sum()).float().to(self.ctx.device)
        return self._index_probs[n_scales]

    def draw_indices(self, n_scales: int, batch: int, generator: torch.Generator,
                     ) -> torch.Tensor:
        """n ~ U{0, ..., N-2} (Song et al. 2023), or the discretised lognormal of iCT."""
        if self.index_sampling[0] == "uniform":
            return self.shard.draw(lambda b: torch.randint(
                0, n_scales - 1, (b,), generator=generator, device=self.ctx.device), batch)
        probs = self.index_probs(n_scales)
        return self.shard.draw(lambda b: torch.multinomial(probs, b, replacement=True,
                                                           generator=generator), batch)

    def weight(self, sigma_next: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        """lambda(t_n) of the configured weighting; None = uniform."""
        return consistency_weight(self.weighting, sigma_next, sigma)

    @property
    def weighting(self) -> str:
        """The lambda(t_n) in use: "uniform" or "inverse_gap"."""
        return "uniform"

    @abstractmethod
    def x_hat(self, x0: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
              sigma_next: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
              ) -> torch.Tensor:
        """The point at level sigma that x (at sigma_next) should agree with."""

    @property
    @abstractmethod
    def distance(self) -> Distance:
        """d(f(x, sigma_next), f^-(x_hat, sigma))."""

    # --- training -----------------------------------------------------------------------------

    def loss(
        self,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        step: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """lambda d(f_theta(x, sigma_{n+1}), stopgrad f_target(x_hat, sigma_n)) per sample."""
        grid = self.grid(self.n_scales(step))
        n = self.draw_indices(grid.numel(), x0.shape[0], generator)
        sigma_next, sigma = grid[n + 1], grid[n]
        z = self.shard.draw(lambda b: torch.randn((b, *x0.shape[1:]), generator=generator,
                                                  device=x0.device, dtype=x0.dtype), x0.shape[0])
        x = x0 + sigma_next.reshape(-1, *([1] * (x0.ndim - 1))) * z
        dropout = self.dropout_active
        rng_state = rng_state_of(x0.device) if dropout else None
        # the no-grad passes first, so that their activations never sit on top of the
        # student's autograd graph; the student then replays the target's dropout RNG state
        with torch.no_grad():
            x_hat = self.x_hat(x0, x, z, sigma_next, sigma, labels)
            target = self.target if self.target is not None else self._student
            with replayed(rng_state, x0.device) if dropout else nullcontext():
                wanted = target(x_hat, sigma, labels)
        online = self.train_forward(x, sigma_next, labels)
        per_sample = self.distance(online, wanted)
        weight = self.weight(sigma_next, sigma)
        return per_sample if weight is None else weight * per_sample

    def schedule_values(self, step: int) -> dict[str, float]:
        """N(k) and mu(k), logged against the iteration."""
        return {"n_scales": float(self.n_scales(step)), "target_mu": self.target_mu(step)}

    def perf_passes(self, x0: torch.Tensor, z: torch.Tensor, generator: torch.Generator,
                    ) -> PerfPasses:
        """The student's forward and backward at sigma_{n+1}, and the no-grad passes that
        make the target: x_hat_passes (the teacher's step, if any), then theta^-."""
        grid = self.grid(self.n_scales(0))
        n = torch.randint(0, grid.numel() - 1, (x0.shape[0],), generator=generator,
                          device=x0.device)
        s_next, s = grid[n + 1], grid[n]
        x = x0 + append_dims(s_next, x0.ndim) * z
        x_hat = x0 + append_dims(s, x0.ndim) * z
        student = self.perf_student()
        calls, what = self.perf_x_hat_passes(x, x_hat, s_next, s)
        if self.target is None:  # the stop-gradient student makes the target
            calls.append((student, x_hat, s))
            what.append("no-grad student fwd")
        else:
            calls.append((copy.deepcopy(self.target).requires_grad_(False), x_hat, s))
            what.append("target fwd")
        return PerfPasses(student, x, s_next, calls, " + ".join(["student fwd+bwd", *what]))

    def perf_x_hat_passes(self, x: torch.Tensor, x_hat: torch.Tensor, sigma_next: torch.Tensor,
                          sigma: torch.Tensor,
                          ) -> tuple[list[tuple[nn.Module, torch.Tensor, torch.Tensor]],
                                     list[str]]:
        """The network passes that make x_hat (none: x_hat is x0 + sigma_n z)."""
        return [], []


def rng_state_of(device: torch.device) -> dict[str, Any]:
    """The RNG states dropout draws from on this device."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class replayed:
    """Run a block with the RNG set to `state`, then put back the state from before the block
    (so the next random draws, the student's dropout, see `state` again)."""

    def __init__(self, state: dict[str, Any] | None, device: torch.device) -> None:
        self.state = state
        self.device = device
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        if self.state is None:
            return
        self.saved = rng_state_of(self.device)
        torch.set_rng_state(self.state["cpu"])
        if "cuda" in self.state:
            torch.cuda.set_rng_state(self.state["cuda"], self.device)

    def __exit__(self, *exc: object) -> None:
        if self.state is None:
            return
        torch.set_rng_state(self.saved["cpu"])
        if "cuda" in self.saved:
            torch.cuda.set_rng_state(self.saved["cuda"], self.device)


def student_from_teacher(ctx: MethodContext, name: str, teacher: Denoiser, init_from: str,
                         ) -> Denoiser:
    """The teacher's network under the consistency parameterisation, with <name>.init_from's
    weights (the teacher's average, "ema", or its online weights) and the run's net.dropout."""
    student = Denoiser(copy.deepcopy(teacher.net), sigma_data=ctx.sigma_data, precond="cm",
                       sigma_min=ctx.config.diffusion.sigma_min)
    if init_from == "online":
        student.load_state_dict(online_teacher_weights(ctx, name))
    set_dropout(student, ctx.config.net.dropout)
    return student.requires_grad_(True).train()


def require_network_teacher(teacher: nn.Module | None, name: str) -> nn.Module:
    """The teacher module; a method that needs one fails clearly without it."""
    if teacher is None:
        raise BenchError(f"{name} needs a teacher (--teacher RUN_ID|PATH|analytic|auto)")
    return teacher
