"""`bench perf`: bench's overhead over bare PyTorch loops on the same net, batch and dtype.

Every figure is a ratio bench / bare (lower is better; 1 = no overhead):

- train_overhead (edm, cd, ct, ict, pd): seconds per iteration of the real training loop (data,
  noise and index draws, LR schedule, optimizer, eval EMA, target update or stage average,
  schedules, logging to a real MLflow store) / seconds of the raw network passes that iteration
  needs, on fixed inputs and with no optimizer (each row's `denominator` says which passes). A
  pass is one call of the preconditioned network (D or f), as the official code counts them.
- sample_overhead (cd at NFE 1, 2, 4): what `bench sample` runs (per-sample counter-based noise,
  call counting, multistep consistency sampling, clipping, the copy to the host) / a bare loop
  of the same network calls that draws its noise with torch.randn and re-noises and clips as
  Algorithm 1 does. bench's per-sample noise streams are counted as overhead.
- eval_overhead (cd): one evaluation at the case's NFE list (generation, metric accumulators,
  previews, the metrics) / generation + feature extraction alone: the bare sampling loop, then
  the feature extractor on the quantised images (images: a small fixed random-weights extractor
  stands in for Inception, so that the evaluation's own cost is not hidden behind a large net)
  or, for 2-D data, the same metric functions on the same samples.
- peak_memory_ratio (cd): peak memory of CD iterations / that of bare student forward+backward
  plus the bytes of the tensors CD keeps besides (teacher, target, EMA, optimizer state),
  measured in a fresh child process per case, each side after a warm-up on throwaway networks
  of its own: the peak over the iterations (VmHWM on the CPU, reset once the side's networks
  are built and the memory freed while building them is handed back; on CUDA
  torch.cuda.max_memory_allocated, reset at the same point) above the memory before the side's
  networks were built, so their weights count and their construction does not; on the CPU with
  glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the resident set.

The sides run in turn, once per round in a seeded random order, and the ratio of medians is
reported, so a busy machine slows both alike and no side always follows the same one, with its
95 % interval over the run's rounds (ratio_interval: a paired bootstrap). A judged pairing
whose interval holds its threshold runs on, up to EXTEND_FACTOR times its rounds, until the
interval clears the threshold on either side; a row whose interval still holds it has a
verdict within this run's noise (threshold_in_ci). A round times a block of iterations lasting
about BLOCK_SECONDS; the logging of the training loop happens at train.log_every, so its time on
the training path is replaced by its share per iteration (the mean time of a log call /
train.log_every), to which the store's write of the logged values is added at its rate (off the
training thread, on the same cores).

The 2-D MLP's training and sampling figures are judged against their floor instead of a fixed
target (passing when bench / floor <= FLOOR_TARGET): on so small a network the per-sample noise
and the loss's own ops are most of an iteration, and they belong to the method. There the
training floor is the method's own iteration without the loop (loss_floor_step: its loss with its
draws and tensor ops on a fixed batch, backward, optimizer step, EMA lerp, after_step) and the
sampling floor the bare loop with bench's per-sample noise. Every other row is judged against
its target.

A training or sampling figure judged by its target that misses it also gets its floor (always,
with floor True): the bare side plus only what no implementation on the same kernels can skip,
made with the ops the real loop uses (training: the optimizer's step, torch's fused Adam, and each
parameter average's lerp over all its parameters; sampling: bench's per-sample noise), timed
against the bare side afresh. A floor above the target means the target is out of reach on these
kernels; figure minus floor is what bench adds.
"""

from __future__ import annotations

import concurrent.futures
import copy
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.app.tracking import (
    BUFFER_SECONDS,
    BUFFER_VALUES,
    Tracker,
    default_tracking_uri,
    git_commit,
    training_metrics,
)
from bench.core.config import RunConfig, resolve
from bench.core.memory import release_free_memory, reset_peak_rss, status_kib
from bench.data.datasets import Dataset, get_dataset
from bench.diffusion.denoiser import Denoiser
from bench.diffusion.rng import StackedGenerator
from bench.engine.models import model_spec, new_raw_net
from bench.engine.signals import SignalGuard
from bench.engine.training import (
    BatchStream,
    LoopHooks,
    make_optimizer,
    new_loop_state,
    train_loop,
)
from bench.metrics.extractors import ExtractedBatch, ImageFeatureExtractor, images_to_uint8
from bench.nets.averaging import ParamAverage
from methods import MethodContext, all_methods, get_method, teacher_method

SAMPLE_NFES = (1, 2, 4)
SAMPLE_TARGET = 1.02
EVAL_TARGET = 1.05
MEMORY_TARGET = 1.10
FLOOR_TARGET = 1.03  # bench / floor, for the rows a case judges by their floor
# rounds of a row judged by its floor, per round asked for: its verdict rests on a gap of a few
# percent, and with rounds of 2-5 % spread on a shared machine 20 rounds put bench / floor
# within about +-1.5 % of itself; 60 within about +-0.8 %
FLOOR_ROUNDS_FACTOR = 3
EXTEND_FACTOR = 3  # a judged pairing whose interval holds its threshold runs on up to this
# many times its rounds (_alternated)
CI_LEVEL = 0.95  # of each ratio's interval (ratio_interval)
BOOTSTRAP_RESAMPLES = 2000
ROUNDS = 20  # timed rounds per side and figure (the medians are over at least this many)
MIN_SECONDS = 1.0  # per figure, both sides together: small cases get more rounds
BLOCK_SECONDS = 0.05  # a round repeats the work until it lasts about this long
MEMORY_ITERATIONS = 3  # iterations whose peak memory is taken

Row = dict[str, Any]
Report = Callable[[str], None]


class SyntheticImages(Dataset):
    """Fixed random images of a given shape: timing only, never scored."""

    kind = "image"
    sigma_data = 0.5
    num_classes = 0
    clamp = (-1.0, 1.0)
    primary_metric = "fid"
    description = "random images for timing"

    def __init__(self, shape: tuple[int, ...], size: int = 256) -> None:
        self.name = "synthetic-" + "x".join(map(str, shape))
        self.shape = shape
        g = torch.Generator().manual_seed(0)
        self._data = torch.rand((size, *shape), generator=g) * 2 - 1

    def train(self) -> torch.Tensor:
        """The random images."""
        return self._data

    def reference(self, n: int, seed: int) -> torch.Tensor:
        """The first n random images."""
        return self._data[:n]


class RandomConvFeatures(ImageFeatureExtractor):
    """Two fixed random 3x3 convolutions, mean- and max-pooled: 16 features per uint8 image."""

    tool = "bench-perf"
    mode = "random-conv"
    identity = "random-conv-16"
    feature_dim = 16
    with_logits = False

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(8, 3, 3, 3, generator=g) * 0.4
        self.w2 = torch.randn(8, 8, 3, 3, generator=g) * 0.3

    def extract(self, images: torch.Tensor) -> ExtractedBatch:
        """Features of a uint8 batch."""
        with torch.no_grad():
            h = torch.tanh(F.conv2d(images.to(torch.float32) / 127.5 - 1.0, self.w1, stride=2))
            h = torch.tanh(F.conv2d(h, self.w2, stride=2))
            return ExtractedBatch(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1), None)

    def to(self, device: torch.device) -> None:
        """Move the weights."""
        self.w1, self.w2 = self.w1.to(device), self.w2.to(device)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.w1.device


@dataclass
class PerfCase:
    """One configuration to time."""

    name: str
    dataset: Dataset
    sets: list[str]  # config overrides: the net and the training batch
    sample_count: int  # samples of one `bench sample` call (one batch)
    eval_sets: list[str]  # the evaluation's NFE list, sample count and batch
    by_floor: bool = False  # training and sampling judged against their floor (FLOOR_TARGET)


def cases() -> list[PerfCase]:
    """The 2-D MLP of gmm8 at batch 512 (training and sampling judged against their floors) and
    a 16x16 UNet with 32 channels at batch 32 (against their targets).

    The evaluations are small (500 points, 32 images): the ratio only gets stricter as the
    metrics' share of the time, which is the same on both sides, shrinks.
    """
    unet = ["net.model_channels=32", "net.channel_mult=[1,2,2]", "net.num_res_blocks=2",
            "net.attn_resolutions=[8]", "train.batch_size=32"]
    return [
        PerfCase("gmm8-mlp", get_dataset("gmm8"), ["train.batch_size=512"], 500,
                 ["eval.nfe=[1,2,4]", "eval.num_samples=500", "eval.batch_size=500"],
                 by_floor=True),
        PerfCase("unet16-c32", SyntheticImages((3, 16, 16)), unet, 32,
                 ["eval.nfe=[1,2]", "eval.num_samples=32", "eval.batch_size=32"]),
    ]


def _case(name: str) -> PerfCase:
    return {c.name: c for c in cases()}[name]


def train_methods() -> list[str]:
    """The methods whose training iteration `bench perf` times: those that train."""
    return [cls.name for cls in all_methods() if cls.trains]


def reference_method() -> str:
    """The method whose sampling, evaluation and memory `bench perf` measures."""
    for cls in all_methods():
        if cls.perf_reference:
            return cls.name
    raise RuntimeError("no registered method is bench perf's reference")


def _config(case: PerfCase, method: str, device: torch.device) -> RunConfig:
    """Every method's perf settings (for CD: N = 18, l2, Heun teacher); no checkpoints, no
    stage change."""
    sets = [*case.sets, *case.eval_sets, "train.checkpoint_every=0", "train.steps=1000000",
            *(s for cls in all_methods() for s in cls.perf_settings), f"device={device.type}"]
    return resolve(bench_files=[], flags={"method": method, "dataset": "gmm8"},
                   sets=sets).config


def _method(case: PerfCase, name: str, cfg: RunConfig, device: torch.device) -> Any:
    """A method on the case's net; distillation gets a frozen random-weights EDM teacher."""
    cls = get_method(name)
    teacher = None
    if cls.needs_teacher:
        precond = get_method(teacher_method()).precond
        teacher = Denoiser(new_raw_net(model_spec(cfg, case.dataset, precond), 1),
                           sigma_data=case.dataset.sigma_data, precond=precond)
        teacher.to(device).eval().requires_grad_(False)
    spec = model_spec(cfg, case.dataset, cls.precond)
    ctx = MethodContext(config=cfg, dataset=case.dataset, device=device,
                        sigma_data=case.dataset.sigma_data, teacher=teacher,
                        teacher_source="random", new_net=lambda: new_raw_net(spec, 0))
    return cls(ctx)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _paired_medians(bench_fn: Callable[[], float], bare_fn: Callable[[], float], rounds: int,
                    min_seconds: float, threshold: float | None = None,
                    ) -> tuple[float, float, int, list[float]]:
    """Alternate both sides at least `rounds` times and for at least min_seconds (more while
    the interval of bench / bare holds `threshold`: see _alternated); medians of seconds per
    unit, the number of rounds and the interval of bench / bare (ratio_interval)."""
    settled = None if threshold is None else _settled(0, 1, threshold)
    bench_t, bare_t = _alternated([bench_fn, bare_fn], rounds, min_seconds, settled)
    return (statistics.median(bench_t), statistics.median(bare_t), len(bench_t),
            ratio_interval(bench_t, bare_t))


def _holds(interval: Sequence[float], threshold: float) -> bool:
    """Whether `threshold` lies inside the closed interval (low, high)."""
    low, high = interval
    return low <= threshold <= high


def _settled(numerator: int, denominator: int, threshold: float,
             ) -> Callable[[list[list[float]]], bool]:
    """Whether the times so far put the interval of side `numerator` / side `denominator`
    wholly on one side of `threshold`."""
    def settled(times: list[list[float]]) -> bool:
        return not _holds(ratio_interval(times[numerator], times[denominator]), threshold)

    return settled


def _alternated(fns: Sequence[Callable[[], float]], rounds: int, min_seconds: float,
                settled: Callable[[list[list[float]]], bool] | None = None,
                ) -> list[list[float]]:
    """Call every side once per round, at least `rounds` rounds and for at least min_seconds;
    each side's seconds per unit, round by round. Each round takes the sides in a fresh random
    order (seeded: the same orders every run), so that no side always runs after the same
    one: a side pays for what its predecessor left behind (caches, the thread pool, the
    allocator), and in a fixed order of three that cost fell on one side, moving bench / floor
    by up to 0.03.

    With `settled` (a verdict's test: its ratio's interval clear of its threshold), rounds go
    on in steps of half of `rounds` while it fails, up to EXTEND_FACTOR times `rounds`: the
    time goes to the verdicts this run's noise leaves open. The rule stops as readily on an
    interval wholly above the threshold as on one below it, so it favours neither verdict."""
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    shuffle = random.Random(0).shuffle
    start = time.perf_counter()
    wanted, most = rounds, rounds * EXTEND_FACTOR
    while True:
        while len(times[0]) < wanted or time.perf_counter() - start < min_seconds:
            shuffle(order)
            for k in order:
                times[k].append(fns[k]())
        if settled is None or len(times[0]) >= most or settled(times):
            return times
        wanted = min(most, len(times[0]) + max(1, rounds // 2))


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float],
                   level: float = CI_LEVEL) -> list[float]:
    """The `level` confidence interval of median(numerator) / median(denominator), two sides
    timed round by round: scipy's percentile bootstrap over the rounds, each resample keeping
    a round's two times together (paired), BOOTSTRAP_RESAMPLES resamples, seeded. It says how
    far the ratio moves with the noise within this run, not with a machine that is busier on
    another day."""
    import numpy as np
    from scipy.stats import bootstrap

    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if len(num) != len(den) or len(num) < 2:
        raise ValueError(f"need two or more paired rounds, got {len(num)} and {len(den)}")

    def ratio_of_medians(a: Any, b: Any, axis: int = -1) -> Any:
        return np.median(a, axis=axis) / np.median(b, axis=axis)

    ci = bootstrap((num, den), ratio_of_medians, paired=True, vectorized=True,
                   n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=level,
                   method="percentile", random_state=np.random.default_rng(0)
                   ).confidence_interval
    return [float(ci.low), float(ci.high)]


def _block(seconds_per_unit: float, block_seconds: float) -> int:
    """Units per round so that a round lasts about block_seconds."""
    return max(1, round(block_seconds / max(seconds_per_unit, 1e-9)))


# --- training ----------------------------------------------------------------------------------


def _bare_passes(student: nn.Module, x: torch.Tensor, sigma: torch.Tensor,
                 no_grad_calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]],
                 no_grad_fns: Sequence[Callable[[], object]] = (),
                 ) -> Callable[[], None]:
    """Student forward, the no-grad passes (and JVPs), student backward: fixed inputs,
    nothing else."""
    grad = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(3),
                       device=x.device)

    def step() -> None:
        student.zero_grad(set_to_none=True)
        out = student(x, sigma)
        with torch.no_grad():
            for module, xi, si in no_grad_calls:
                module(xi, si)
            for fn in no_grad_fns:
                fn()
        out.backward(grad)

    return step


def bare_training_passes(method: Any, name: str, x0: torch.Tensor,
                         ) -> tuple[Callable[[], None], str]:
    """The raw passes of one iteration of `name` on copies of its networks, and what they are."""
    step, denominator, _ = _training_passes(method, x0)
    return step, denominator


def parameter_averages(method: Any, name: str, cfg: RunConfig) -> list[str]:
    """The averages of the student's parameters the training loop of `name` updates each
    iteration: the eval EMA and the method's own (a consistency target, PD's stage average)."""
    return (["eval EMA"] if cfg.train.ema_rate > 0 else []) + method.parameter_averages()


def floor_training_step(method: Any, name: str, x0: torch.Tensor, cfg: RunConfig,
                        ) -> tuple[Callable[[], None], str, list[nn.Module]]:
    """The floor of an iteration of `name`: its raw passes (as bare_training_passes) plus what
    no training loop can skip, made with the ops bench's loop uses: the optimizer's step
    (make_optimizer's, fused Adam where torch has it) and one update per parameter average
    (ParamAverage). Nothing else: no data, draws, schedules, checks or logging. What it costs
    above the raw passes is the least any loop on these ops pays. Returns the step, what it
    does and the modules it changes (the student copy, then one module per average)."""
    passes, denominator, student = _training_passes(method, x0)
    optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad], cfg.train)
    names = parameter_averages(method, name, cfg)
    copies = [copy.deepcopy(student).requires_grad_(False) for _ in names]
    averages = [ParamAverage(module, student) for module in copies]
    rate = cfg.train.ema_rate or 0.999

    def step() -> None:
        passes()
        optimizer.step()
        for average in averages:
            average.update(rate)

    kernel = "fused" if optimizer.param_groups[0].get("fused") else "foreach"
    what = " + ".join([denominator, f"{kernel} {type(optimizer).__name__} step",
                       *(f"{n} lerp" for n in names)])
    return step, what, [student, *copies]


LOSS_FLOOR = ("the method's loss on a fixed batch (its draws and tensor ops), backward, "
              "optimizer step, eval EMA lerp and after_step")


def loss_floor_step(method: Any, cfg: RunConfig, x0: torch.Tensor, step: int,
                    ) -> Callable[[], None]:
    """The floor of a case judged by its floor (the 2-D MLP): an iteration of the method
    itself without the loop, on a fixed batch and iteration: the loss with its own draws and
    tensor ops, its backward, the optimizer's step (a fresh make_optimizer over the method's
    parameters), the eval EMA's lerp and the method's after_step. What the loop adds above it
    (the batch, the LR schedule, the non-finite check, the loss window, the log) is bench's."""
    optimizer = make_optimizer(method.parameters(), cfg.train)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ema = copy.deepcopy(method.student).requires_grad_(False)
    average = ParamAverage(ema, method.student)
    generator = torch.Generator(x0.device).manual_seed(5)
    rate = cfg.train.ema_rate or 0.999

    def one() -> None:
        for p in params:
            p.grad = None
        method.loss(x0, None, step, generator).float().mean().backward()
        optimizer.step()
        average.update(rate)
        method.after_step(step, ema)

    return one


def _training_passes(method: Any, x0: torch.Tensor,
                     ) -> tuple[Callable[[], None], str, nn.Module]:
    """bare_training_passes, with the student copy the passes train."""
    g = torch.Generator(x0.device).manual_seed(1)
    z = torch.randn(x0.shape, generator=g, device=x0.device)
    passes = method.perf_passes(x0, z, g)
    return (_bare_passes(passes.student, passes.x, passes.sigma, passes.calls,
                         passes.no_grad_fns),
            passes.description, passes.student)


def _timed(fn: Callable[[], object], device: torch.device) -> Callable[[int], float]:
    """Seconds of n calls of fn."""

    def block(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        return time.perf_counter() - t0

    return block


def _wants_floor(row: Row, floor: bool | None, by_floor: bool = False) -> bool:
    """Time a row's floor always (floor True, or a row judged by it), never (False) or when it
    misses its target."""
    return by_floor or floor is True or (floor is None and row["ratio"] > row["target"])


def judged_interval(row: Row) -> tuple[list[float], float] | None:
    """The interval of the ratio a row is judged by and its threshold (None for a row without
    one: peak memory)."""
    if row.get("judge") == "floor":
        return (row["vs_floor_ci"], FLOOR_TARGET) if "vs_floor_ci" in row else None
    return (row["ratio_ci"], row["target"]) if "ratio_ci" in row else None


def threshold_in_interval(row: Row) -> bool | None:
    """Whether the threshold lies inside the interval of the ratio the row is judged by: the
    verdict is then within this run's noise (another run may read the other way)."""
    found = judged_interval(row)
    if found is None:
        return None
    return _holds(*found)


def judged(row: Row) -> bool:
    """Whether a row passes: bench / floor <= FLOOR_TARGET for a row judged by its floor, its
    ratio <= its target otherwise."""
    if row.get("judge") == "floor":
        return bool(row["vs_floor"] <= FLOOR_TARGET)
    return bool(row["ratio"] <= row["target"])


def _with_floor(row: Row, floor: bool | None,
                make_floor: Callable[[], tuple[Callable[[int], float], str]],
                bare_fn: Callable[[int], float], block: int, rounds: int,
                min_seconds: float, by_floor: bool = False,
                bench_fn: Callable[[], float] | None = None) -> Row:
    """The row with its floor when _wants_floor: make_floor builds the floor's timed block and
    says what it runs; the floor and the bare side alternate afresh, floor_ratio is the ratio
    of their medians. A row judged by its floor alternates bench (bench_fn: seconds per unit),
    floor and bare sides in one loop, FLOOR_ROUNDS_FACTOR times `rounds` rounds, and vs_floor =
    bench / floor is the ratio of those medians."""
    row = {**row, "judge": "floor" if by_floor else "target"}
    if not _wants_floor(row, floor, by_floor):
        return {**row, "pass": judged(row)}
    floor_fn, what = make_floor()
    floor_fn(block)  # warm-up
    sides = [lambda: floor_fn(block) / block, lambda: bare_fn(block) / block]
    if by_floor and bench_fn is not None:
        sides.append(bench_fn)
    three = len(sides) == 3
    times = _alternated(sides, rounds * FLOOR_ROUNDS_FACTOR if three else rounds, min_seconds,
                        _settled(2, 0, FLOOR_TARGET) if three else None)
    floor_s, bare_s = statistics.median(times[0]), statistics.median(times[1])
    row = {**row, "floor_ratio": floor_s / bare_s,
           "floor_ratio_ci": ratio_interval(times[0], times[1]), "floor_seconds": floor_s,
           "floor": what, "floor_rounds": len(times[0])}
    if three:
        row.update(vs_floor=statistics.median(times[2]) / floor_s,
                   vs_floor_ci=ratio_interval(times[2], times[0]), floor_target=FLOOR_TARGET)
    return {**row, "pass": judged(row)}


def _store_seconds_per_value(tracker: Tracker, run_id: str, metrics: dict[str, float],
                             iterations_per_second: float, log_every: int) -> float:
    """Seconds the store spends per logged value, in writes of the size a run at this rate
    makes: the metrics of BUFFER_SECONDS of iterations (at most BUFFER_VALUES values), written
    off the training thread but on the same cores, so perf counts them at their rate."""
    logs = max(1, min(BUFFER_VALUES // max(len(metrics), 1),
                      round(BUFFER_SECONDS * iterations_per_second / log_every)))
    tracker.flush(run_id)
    for k in range(logs):
        tracker.log_metrics(run_id, metrics, -1000 - k, wait=False)
    t0 = time.perf_counter()
    tracker.flush(run_id)
    return (time.perf_counter() - t0) / (logs * len(metrics))


def train_overhead(case: PerfCase, name: str, rounds: int, tracker: Tracker,
                   device: torch.device, min_seconds: float = MIN_SECONDS,
                   block_seconds: float = BLOCK_SECONDS, floor: bool | None = None) -> Row:
    """The real training loop vs the raw passes of its iteration, same net and batch; with the
    floor (floor_training_step) when `floor` asks for it (see _with_floor)."""
    cfg = _config(case, name, device)
    method = _method(case, name, cfg, device)
    state = new_loop_state(method, cfg.train, 0, device)
    stream = BatchStream(case.dataset.train_batch, len(case.dataset), None,
                         cfg.train.batch_size, 0, device)
    run_id = tracker.start_run(experiment="perf", run_name=f"perf-{name}-{case.name}", tags={})
    log_seconds: list[float] = []

    def log(metrics: dict[str, float], step: int) -> None:  # as bench run logs
        t0 = time.perf_counter()
        tracker.log_metrics(run_id, training_metrics(metrics), step, wait=False)
        log_seconds.append(time.perf_counter() - t0)

    x0, _ = stream.batch(0)
    bare_step, denominator = bare_training_passes(method, name, x0)
    hooks = LoopHooks(log=log, critical=SignalGuard().deferred)  # as bench run's loop

    def bench_block(n: int) -> float:
        logged = sum(log_seconds)
        _sync(device)
        t0 = time.perf_counter()
        train_loop(method, cfg.train, stream, state, hooks, until=state.step + n)
        _sync(device)
        return time.perf_counter() - t0 - (sum(log_seconds) - logged)

    bare_block = _timed(bare_step, device)
    sample_metrics = {"loss": 0.0, "lr": 0.0, "iters_per_second": 0.0, "images_per_second": 0.0,
                      **method.schedule_values(0)}
    for step in range(4):  # the first call starts MLflow's logging thread
        log(sample_metrics, -1 - step)
    bench_block(1)  # warm-up: the first optimizer step allocates its state
    bare_block(1)
    iteration_seconds = bare_block(1)
    block = _block(iteration_seconds, block_seconds)
    del log_seconds[:1]
    store = _store_seconds_per_value(tracker, run_id, training_metrics(sample_metrics),
                                     1.0 / iteration_seconds,
                                     cfg.train.log_every)
    log_share = (statistics.mean(log_seconds) + len(sample_metrics) * store) / cfg.train.log_every
    target = get_method(name).perf_train_target
    bench_s, bare_s, done, ci = _paired_medians(
        lambda: bench_block(block) / block + log_share, lambda: bare_block(block) / block,
        rounds, min_seconds, None if case.by_floor else target)
    tracker.end_run(run_id)
    row = {"figure": "train_overhead", "case": case.name, "method": name, "nfe": None,
           "ratio": bench_s / bare_s, "ratio_ci": ci, "target": target,
           "bench_seconds": bench_s, "bare_seconds": bare_s, "denominator": denominator,
           "rounds": done, "iterations": done * block, "log_seconds_per_iteration": log_share,
           "store_seconds_per_value": store}

    def make_floor() -> tuple[Callable[[int], float], str]:
        if case.by_floor:
            return _timed(loss_floor_step(method, cfg, x0, state.step), device), LOSS_FLOOR
        floor_step, what, _ = floor_training_step(method, name, x0, cfg)
        return _timed(floor_step, device), what

    return _with_floor(row, floor, make_floor, bare_block, block, rounds, min_seconds,
                       case.by_floor, lambda: bench_block(block) / block + log_share)


# --- sampling and evaluation ---------------------------------------------------------------------


def bare_sampler(model: nn.Module, sigmas: list[float], sigma_min: float, count: int,
                 shape: tuple[int, ...], clamp: tuple[float, float] | None,
                 device: torch.device, per_sample_noise: bool = False,
                 ) -> Callable[[torch.Generator], torch.Tensor]:
    """Algorithm 1 of Song et al. (2023) as a bare loop: torch.randn noise, len(sigmas) calls.
    With per_sample_noise the noise is bench's per-sample streams (the sampling floor)."""
    levels = [torch.full((count,), s, device=device) for s in sigmas]
    scales = [(t**2 - sigma_min**2) ** 0.5 for t in sigmas[1:]]
    size = (count, *shape)

    def run(g: torch.Generator) -> torch.Tensor:
        if per_sample_noise:
            streams = StackedGenerator(0, range(count), device)
            streams.reserve(shape, len(sigmas))

            def noise() -> torch.Tensor:
                return streams.randn(shape)
        else:
            def noise() -> torch.Tensor:
                return torch.randn(size, generator=g, device=device)

        with torch.inference_mode():
            x0 = model(noise() * sigmas[0], levels[0])
            x0 = x0 if clamp is None else x0.clamp(*clamp)
            for level, scale in zip(levels[1:], scales, strict=True):
                x = x0 + scale * noise()
                x0 = model(x, level)
                x0 = x0 if clamp is None else x0.clamp(*clamp)
        return x0

    return run


def _sampling_method(case: PerfCase, device: torch.device) -> tuple[Any, RunConfig]:
    cfg = _config(case, reference_method(), device)
    return _method(case, reference_method(), cfg, device), cfg


def sample_overhead(case: PerfCase, nfe: int, rounds: int, device: torch.device,
                    min_seconds: float = MIN_SECONDS, block_seconds: float = BLOCK_SECONDS,
                    floor: bool | None = None) -> Row:
    """`bench sample` (generate into host memory) vs the bare loop of the same network calls;
    with the floor (the bare loop drawing bench's per-sample noise) when `floor` asks for it."""
    from bench.engine.evaluation import generate

    method, cfg = _sampling_method(case, device)
    model = method.evaluation_model(None, nfe)
    n = case.sample_count

    def timed_sampler(per_sample_noise: bool) -> Callable[[int], float]:
        run = bare_sampler(copy.deepcopy(model).eval(), method.sample_sigmas(nfe),
                           cfg.diffusion.sigma_min, n, case.dataset.shape, case.dataset.clamp,
                           device, per_sample_noise)
        return _timed(lambda: run(torch.Generator(device).manual_seed(2)).cpu(), device)

    def bench_once() -> None:
        chunks: list[torch.Tensor] = []
        generate(method, model, case.dataset, nfe, n, n, 0, device, False,
                 lambda x: chunks.append(x.cpu()))

    bench_block = _timed(bench_once, device)
    bare_block = timed_sampler(False)
    bench_block(1)
    block = _block(bare_block(1), block_seconds)
    bench_s, bare_s, done, ci = _paired_medians(lambda: bench_block(block) / block,
                                                lambda: bare_block(block) / block, rounds,
                                                min_seconds,
                                                None if case.by_floor else SAMPLE_TARGET)
    row = {"figure": "sample_overhead", "case": case.name, "method": reference_method(), "nfe": nfe,
           "ratio": bench_s / bare_s, "ratio_ci": ci, "target": SAMPLE_TARGET,
           "bench_seconds": bench_s, "bare_seconds": bare_s, "samples": n, "rounds": done,
           "calls": done * block,
           "denominator": f"{nfe} network calls + torch.randn noise, re-noising and clipping"}
    what = "the bare loop with bench's per-sample noise streams"
    return _with_floor(row, floor, lambda: (timed_sampler(True), what), bare_block, block,
                       rounds, min_seconds, case.by_floor, lambda: bench_block(block) / block)


def eval_overhead(case: PerfCase, rounds: int, device: torch.device, cache_dir: Path,
                  min_seconds: float = MIN_SECONDS) -> Row:
    """One evaluation at the case's NFE list vs generation + feature extraction alone."""
    from bench.engine.evaluation import evaluate, prepare_metrics
    from bench.metrics.image import EXTRACT_BATCH

    method, cfg = _sampling_method(case, device)
    dataset = case.dataset
    nfes = list(cfg.eval.nfe)
    extractor: ImageFeatureExtractor | None = None
    if dataset.kind == "image":
        from bench.engine.fid import prepare_image_metrics

        extractor = RandomConvFeatures()
        suite = prepare_image_metrics(dataset, cfg, cache_dir, extractor)
        extraction = "features of the quantised images (16-d random-weights convolutions)"
    else:
        suite = prepare_metrics(dataset, cfg, cache_dir)
        extraction = f"{', '.join(suite.names)} on the same samples"
    model = copy.deepcopy(method.evaluation_model(None, nfes[0])).eval()
    total, batch = cfg.eval.num_samples, cfg.eval.batch_size
    samplers = {(nfe, count): bare_sampler(model, method.sample_sigmas(nfe),
                                           cfg.diffusion.sigma_min, count, dataset.shape,
                                           dataset.clamp, device)
                for nfe in nfes for count in {min(batch, total - s)
                                              for s in range(0, total, batch)}}

    def bench_once() -> float:
        _sync(device)
        t0 = time.perf_counter()
        evaluate(method, None, dataset, cfg, nfes, suite, device)
        return time.perf_counter() - t0

    def bare_once() -> float:
        _sync(device)
        t0 = time.perf_counter()
        g = torch.Generator(device).manual_seed(2)
        for nfe in nfes:
            points: list[torch.Tensor] = []
            for start in range(0, total, batch):
                x = samplers[(nfe, min(batch, total - start))](g)
                if extractor is None:
                    points.append(x)
                    continue
                for chunk in images_to_uint8(x).split(EXTRACT_BATCH):
                    extractor.extract(chunk)
            if extractor is None:
                metrics = suite.new()[0]
                metrics.update(torch.cat(points))
                metrics.compute()
        _sync(device)
        return time.perf_counter() - t0

    bench_once()
    bare_once()
    bench_s, bare_s, done, ci = _paired_medians(bench_once, bare_once, rounds, min_seconds,
                                                EVAL_TARGET)
    return {"figure": "eval_overhead", "case": case.name, "method": reference_method(), "nfe": None,
            "ratio": bench_s / bare_s, "ratio_ci": ci, "target": EVAL_TARGET,
            "bench_seconds": bench_s, "bare_seconds": bare_s, "nfes": nfes, "samples": total,
            "rounds": done, "evaluations": done,
            "denominator": f"bare sampling at NFE {nfes} + {extraction}"}


# --- peak memory ---------------------------------------------------------------------------------


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return _tensor_bytes([*module.parameters(), *module.buffers()])


class _MemoryWork:
    """One side of the memory figure: CD iterations of the real loop, or bare student fwd+bwd."""

    def __init__(self, case: PerfCase, side: str, device: torch.device) -> None:
        cfg = _config(case, reference_method(), device)
        self.side = side
        stream = BatchStream(case.dataset.train_batch, len(case.dataset), None,
                             cfg.train.batch_size, 0, device)
        x0, _ = stream.batch(0)
        self.run: Callable[[int], object]  # n iterations (what the loop returns is unused)
        if side == "bench":
            self.method = _method(case, reference_method(), cfg, device)
            self.state = new_loop_state(self.method, cfg.train, 0, device)
            self.run = lambda n: train_loop(self.method, cfg.train, stream, self.state,
                                            LoopHooks(), until=self.state.step + n)
            return
        spec = model_spec(cfg, case.dataset, "cm")
        student = Denoiser(new_raw_net(spec, 0), sigma_data=case.dataset.sigma_data,
                           precond="cm").to(device).train()
        sigma = torch.full((x0.shape[0],), 1.0, device=device)
        step = _bare_passes(student, x0, sigma, [])

        def run(n: int) -> None:
            for _ in range(n):
                step()

        self.run = run

    def extra_bytes(self) -> int:
        """What CD keeps besides the student: teacher, target, EMA, optimizer state."""
        if self.side != "bench":
            return 0
        optimizer = self.state.optimizer
        state_tensors = [v for s in optimizer.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor)] if optimizer is not None else []
        return (_module_bytes(self.method.teacher) + _module_bytes(self.method.target)
                + _module_bytes(self.state.ema) + _tensor_bytes(state_tensors))


def memory_child(case_name: str, device_name: str) -> dict[str, dict[str, int]]:
    """Peak memory of both sides of a case, one after the other, in a fresh process."""
    device = torch.device(device_name)
    case = _case(case_name)
    return {side: _side_memory(case, side, device) for side in ("bench", "bare")}


def _reset_peak(device: torch.device) -> int:
    """Hand freed memory back, restart the peak and return the memory in use now."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    release_free_memory(every=0.0)  # freed memory leaves the resident set
    reset_peak_rss()
    return status_kib("VmRSS") * 1024


def _side_memory(case: PerfCase, side: str, device: torch.device) -> dict[str, int]:
    """Peak memory of one side above the memory before its networks (module docstring)."""
    torch.manual_seed(0)
    warm = _MemoryWork(case, side, device)  # the same code on throwaway networks: warm caches
    warm.run(2)
    del warm
    base = _reset_peak(device)
    work = _MemoryWork(case, side, device)
    _reset_peak(device)  # what building the networks freed is not the iterations' memory
    work.run(MEMORY_ITERATIONS)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = status_kib("VmHWM") * 1024
    result = {"peak_bytes": peak - base, "extra_bytes": work.extra_bytes()}
    del work
    gc.collect()
    return result


def _memory_supported(device: torch.device) -> bool:
    return device.type == "cuda" or (sys.platform == "linux"
                                     and os.access("/proc/self/clear_refs", os.W_OK))


def peak_memory(case_names: list[str], device: torch.device) -> list[Row]:
    """CD's peak memory per case, in a child process per case (all run at once)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # glibc keeps freed heap memory resident, so the peak would mix in whatever was freed
    # before; with a fixed 64 KiB mmap threshold every tensor block is unmapped when freed
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"

    def child(case_name: str) -> dict[str, dict[str, int]]:
        out = subprocess.run([sys.executable, "-m", "bench.perf.run", case_name, device.type],
                             env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory child {case_name} failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with concurrent.futures.ThreadPoolExecutor(len(case_names)) as pool:
        results = dict(zip(case_names, pool.map(child, case_names), strict=True))
    rows = []
    for name in case_names:
        bench, bare = results[name]["bench"], results[name]["bare"]
        bare_bytes = bare["peak_bytes"] + bench["extra_bytes"]
        rows.append({"figure": "peak_memory_ratio", "case": name, "method": reference_method(),
                     "nfe": None,
                     "ratio": bench["peak_bytes"] / bare_bytes, "target": MEMORY_TARGET,
                     "bench_bytes": bench["peak_bytes"], "bare_bytes": bare_bytes,
                     "extra_bytes": bench["extra_bytes"],
                     "measure": ("CUDA max allocated" if device.type == "cuda"
                                 else "peak RSS (VmHWM) of the iterations above the warm "
                                      "process"),
                     "denominator": "bare student fwd+bwd + teacher, target, EMA and "
                                    "optimizer-state bytes"})
    return rows


# --- the whole run -------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": "float32"}


def run_perf(rounds: int, report: Report, device: torch.device | None = None,
             case_names: list[str] | None = None, min_seconds: float = MIN_SECONDS,
             block_seconds: float = BLOCK_SECONDS, floor: bool | None = None) -> list[Row]:
    """Every figure on every case (or the named ones), as rows (min_seconds and block_seconds
    at 0 make the quickest run: single-unit rounds, `rounds` of them). Training and sampling
    rows get their floor when they miss their target, or always with floor True."""
    device = device or torch.device("cpu")
    chosen = [c for c in cases() if case_names is None or c.name in case_names]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(default_tracking_uri(Path(tmp)), Path(tmp))
        for case in chosen:
            for name in train_methods():
                report(f"timing {name} training: {case.name}")
                rows.append(train_overhead(case, name, rounds, tracker, device, min_seconds,
                                           block_seconds, floor))
            for nfe in SAMPLE_NFES:
                report(f"timing sampling: {case.name}, NFE {nfe}")
                rows.append(sample_overhead(case, nfe, rounds, device, min_seconds,
                                            block_seconds, floor))
            report(f"timing an evaluation: {case.name}")
            rows.append(eval_overhead(case, rounds, device, Path(tmp) / "cache", min_seconds))
    if _memory_supported(device):
        report("peak memory of CD iterations (child processes)")
        rows.extend(peak_memory([c.name for c in chosen], device))
    else:
        report("peak memory skipped: needs Linux /proc/self/clear_refs on the CPU")
    rows = [{"judge": "target", **row} for row in rows]
    return [{**row, "pass": judged(row), "threshold_in_ci": threshold_in_interval(row)}
            for row in rows]


SHORT_FIGURES = {"train_overhead": "train", "sample_overhead": "sample",
                 "eval_overhead": "eval", "peak_memory_ratio": "memory"}


def print_rows(rows: list[Row], console: Any) -> None:
    """A rich table of the figures, pass/fail against each target, and the floor where one was
    measured (red when the floor alone misses the target)."""
    from rich import box
    from rich.table import Table

    table = Table(title="bench perf: ratio = bench / bare PyTorch (medians)", box=box.SIMPLE,
                  padding=(0, 1, 0, 0), pad_edge=False)
    for col in ("figure", "case", "method", "bench", "bare", "ratio", "target", "floor",
                "vs floor", f"{CI_LEVEL:.0%} interval", ""):
        table.add_column(col, justify="left" if col in ("figure", "case", "method") else "right",
                         no_wrap=True)
    for r in rows:
        ok = judged(r)
        style = "green" if ok else "red"
        by_floor = r.get("judge") == "floor"
        if "bench_bytes" in r:
            bench, bare = (f"{r['bench_bytes'] / 2**20:.1f} MiB",
                           f"{r['bare_bytes'] / 2**20:.1f} MiB")
        else:
            bench, bare = (f"{r['bench_seconds'] * 1e3:.2f} ms",
                           f"{r['bare_seconds'] * 1e3:.2f} ms")
        method = r["method"] if r["nfe"] is None else f"{r['method']} nfe {r['nfe']}"
        floor = vs_floor = ""
        if "floor_ratio" in r:
            floor_style = ("default" if by_floor else
                           "green" if r["floor_ratio"] <= r["target"] else "red")
            floor = f"[{floor_style}]{r['floor_ratio']:.3f}[/{floor_style}]"
        if by_floor:
            vs_floor = f"[{style}]{r['vs_floor']:.3f}[/{style}] <= {FLOOR_TARGET:.2f}"
        found = judged_interval(r)
        interval = f"{found[0][0]:.3f}-{found[0][1]:.3f}" if found else ""
        unsure = threshold_in_interval(r)
        verdict = f"{'pass' if ok else 'FAIL'}{'*' if unsure else ''}"
        table.add_row(SHORT_FIGURES[r["figure"]], r["case"], method, bench, bare,
                      f"{r['ratio']:.3f}" if by_floor else f"[{style}]{r['ratio']:.3f}[/{style}]",
                      "floor" if by_floor else f"{r['target']:.2f}", floor, vs_floor, interval,
                      f"[{style}]{verdict}[/{style}]")
    console.print(table)
    console.print(f"interval: the {CI_LEVEL:.0%} bootstrap interval of the judged ratio (vs "
                  "floor where a row is judged by its floor), over this run's rounds; * marks a "
                  "verdict whose interval holds its threshold: within this run's noise, so "
                  "another run may read the other way.")
    if any("floor_ratio" in r for r in rows):
        console.print("floor: the bare side plus only what no implementation on the same "
                      "kernels can skip (training: the optimizer's step and each parameter "
                      "average's lerp over all its parameters; sampling: bench's per-sample "
                      "noise), timed against the bare side afresh. Rows with target 'floor' are "
                      f"judged by bench / floor (vs floor) <= {FLOOR_TARGET}, the others by "
                      "their ratio against the target (a red floor misses it by itself).")


def write_json(rows: list[Row], path: Path, device: torch.device | None = None,
               seconds: float | None = None) -> None:
    """The rows plus the machine, the commit and the wall-clock seconds of the run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": machine(device or torch.device("cpu")), "commit": git_commit(),
                "seconds": seconds, "rows": rows}
    path.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":  # a memory child: python -m bench.perf.run CASE DEVICE
    print(json.dumps(memory_child(sys.argv[1], sys.argv[2])))
