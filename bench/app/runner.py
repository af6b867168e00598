"""One `bench run`: resolve, train, evaluate, track. Also reloads a tracked run for
`bench eval`, `bench sample` and `--resume`."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.app.artifacts import (
    save_grid,
    save_metric_vs_nfe,
    save_results_csv,
    save_scatter,
    tidy_rows,
)
from bench.app.diagnostics import ode_errors
from bench.app.protocol import TAG_PREFIX as PROTOCOL_TAG
from bench.app.protocol import evaluation_protocol
from bench.app.runlock import RunLock
from bench.app.teachers import CHECKPOINT_ARTIFACT, resolve_teacher, run_checkpoint
from bench.app.tracking import (
    BY_ITERATION_PREFIX,
    Tracker,
    by_iteration,
    git_commit,
    package_versions,
    param_text,
    training_metrics,
)
from bench.core.atomic import atomic_write
from bench.core.config import (
    RunConfig,
    dumps,
    flatten,
    from_dict,
    merge_free,
    nest,
    parse_set,
    public_dict,
    read_toml,
    to_dict,
)
from bench.core.errors import BenchError, RunInterrupted, UsageError, resource_exhausted
from bench.data.datasets import Dataset, GaussianMixture, PointsDataset, get_dataset
from bench.engine.checkpoint import load_checkpoint, retain, save_checkpoint
from bench.engine.distributed import (
    Shard,
    all_mean,
    broadcast,
    local_device,
    main_first,
    process_group,
    wrap,
)
from bench.engine.evaluation import (
    LOWER_IS_BETTER,
    SEEDS_STD,
    EvalResult,
    evaluate,
    evaluation_seeds,
    generate,
    points_reference,
    prepare_metrics,
    sampling_model,
)
from bench.engine.fid import check_metric_weights
from bench.engine.models import model_spec, net_summary, new_raw_net, sigma_data_of
from bench.engine.signals import GUARD, signal_name
from bench.engine.training import (
    BatchStream,
    LoopHooks,
    LoopState,
    load_loop_state,
    loop_state_dict,
    new_loop_state,
    train_loop,
)
from bench.metrics.base import GAP, MetricSuite
from methods import Method, MethodContext, get_method

Reporter = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; an unavailable device is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)"
                         ) from None


@dataclass
class Prepared:
    """A run's parts, built and validated before any training starts."""

    config: RunConfig
    dataset: Dataset
    device: torch.device
    method: Method
    suite: MetricSuite
    teacher_kind: str
    spec: dict[str, Any]
    shard: Shard = field(default_factory=Shard)  # this process's part of a multi-process run


def prepare(cfg: RunConfig, tracker: Tracker, report: Reporter, shard: Shard = Shard(),
            metrics: bool = True) -> Prepared:
    """Build dataset, teacher, method and metrics; every user error surfaces here. No metrics
    (no weights needed, no reference statistics) with evaluation off (eval.nfe = []) or
    `metrics` False (sampling)."""
    if not cfg.method:
        raise UsageError("no method: pass --method (see `bench methods`)")
    if not cfg.dataset:
        raise UsageError("no dataset: pass --dataset (see `bench datasets`)")
    method_cls = get_method(cfg.method)
    dataset = get_dataset(cfg.dataset, cfg.data.path or None)
    reason = dataset.unavailable_reason()
    if reason:
        raise BenchError(reason)
    if cfg.data.hflip and dataset.kind != "image":
        raise UsageError(f"data.hflip flips images; {dataset.name} holds {dataset.kind}")
    device = local_device(resolve_device(cfg.device))
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise UsageError(f"train.precision = fp16 needs CUDA (its gradient scaler), not "
                         f"{device.type}; use bf16 on the CPU")
    shard.local_size(cfg.train.batch_size)  # an uneven split fails here
    teacher_model: nn.Module | None = None
    teacher_online: dict[str, torch.Tensor] | None = None
    teacher_source, teacher_kind = "none", "none"
    if method_cls.needs_teacher:
        teacher = resolve_teacher(cfg.teacher, dataset, tracker, device)
        teacher_model, teacher_source, teacher_kind = teacher.model, teacher.source, teacher.kind
        teacher_online = teacher.online
    cfg = cfg.model_copy(update={"teacher": teacher_source})
    spec = model_spec(cfg, dataset, method_cls.precond)
    ctx = MethodContext(
        config=cfg,
        dataset=dataset,
        device=device,
        sigma_data=sigma_data_of(cfg, dataset),
        teacher=teacher_model,
        teacher_source=teacher_source,
        new_net=lambda: new_raw_net(spec, cfg.seed),
        shard=shard,
        teacher_online=teacher_online,
    )
    scored = metrics and bool(cfg.eval.nfe)
    if scored and dataset.kind == "image" and dataset.primary_metric == "fid":
        check_metric_weights(cfg)  # missing Inception or DINOv2 weights fail here, first
    method = method_cls(ctx)
    for nfe in cfg.eval.nfe:
        method.check_nfe(nfe)
    if teacher_model is not None:
        report(f"teacher: {teacher_source}")
    if scored:
        suite = prepare_metrics(dataset, cfg, tracker.runs_dir / "cache")
    else:
        suite = MetricSuite([], list, {"evaluation": EVALUATION_OFF} if metrics else {})
    return Prepared(cfg, dataset, device, method, suite, teacher_kind, spec, shard)


def accelerate(p: Prepared) -> None:
    """The student in channels-last order and compiled (train.channels_last, train.compile),
    and inside DistributedDataParallel under several processes. After new_loop_state: the
    EMA is a copy of the plain student."""
    student = p.method.student
    if student is None or not p.method.trains:
        return
    train = p.config.train
    if train.channels_last and p.dataset.kind == "image":
        student.to(memory_format=torch.channels_last)
    if train.compile:
        student.compile()
    if p.shard.distributed:
        p.method.parallel = wrap(p.method.parallel_module() or student, p.device)


def batch_stream(p: Prepared) -> BatchStream:
    """The run's training batches (this process's rows of them)."""
    labels = p.dataset.train_labels() if p.spec["num_classes"] else None
    return BatchStream(p.dataset.train_batch, len(p.dataset), labels,
                       p.config.train.batch_size, p.config.seed, p.device, p.shard,
                       p.config.train.channels_last, p.config.data.hflip)


# --- checkpoints -----------------------------------------------------------------------------


def checkpoint_path(tracker: Tracker, run_id: str) -> Path:
    """Where the run's checkpoint is written: in its artifact folder when that is local."""
    local = tracker.get_run(run_id).local_artifact_dir
    if local is not None:
        return local / CHECKPOINT_ARTIFACT
    return tracker.runs_dir / "checkpoints" / run_id / "last.pt"


class BestCheckpoint:
    """train.keep_best: best.pt holds the weights of the evaluation with the best primary
    metric at the first evaluated NFE so far; the run's tags best_step, best_metric and
    best_value say which (and carry the best value over a resume)."""

    def __init__(self, p: Prepared, tracker: Tracker, run_id: str, path: Path,
                 remote: bool) -> None:
        self.p, self.tracker, self.run_id, self.path, self.remote = p, tracker, run_id, path, remote
        self.enabled = p.config.train.keep_best and p.method.trains
        self.metric = p.dataset.primary_metric
        self.lower = LOWER_IS_BETTER.get(self.metric, True)
        self.value: float | None = None
        if self.enabled:
            saved = tracker.get_run(run_id).tags.get("best_value")
            self.value = float(saved) if saved is not None and path.is_file() else None

    def consider(self, state: LoopState, results: list[EvalResult]) -> None:
        """Save best.pt when the first NFE's primary metric beats the best so far."""
        if not self.enabled or not results:
            return
        first = results[0]
        value = first.metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        if self.value is not None and not (value < self.value if self.lower
                                           else value > self.value):
            return
        save_checkpoint(checkpoint_state(self.p, state), self.path)
        self.value = value
        self.tracker.set_tags(self.run_id, {"best_step": str(state.step),
                                            "best_metric": (f"{BY_ITERATION_PREFIX}"
                                                            f"{self.metric}_nfe{first.nfe}"),
                                            "best_value": repr(value)})
        if self.remote:
            self.tracker.log_artifact(self.run_id, self.path, "checkpoints")


def checkpoint_state(p: Prepared, state: LoopState) -> dict[str, Any]:
    """Everything needed to resume or to sample: networks, loop, method state, RNG."""
    method = p.method
    modules: dict[str, Any] = {}
    if method.student is not None:
        modules["student"] = method.student.state_dict()
    if state.ema is not None:
        modules["ema"] = state.ema.state_dict()
    for name, module in method.extra_modules().items():
        modules[name] = module.state_dict()
    return {
        "model": p.spec,
        "modules": modules,
        "eval_module": "ema" if state.ema is not None else "student",
        "loop": loop_state_dict(state),
        "method_state": method.state_dict(),
        "config": public_dict(p.config),  # no password at rest
        "torch_rng": torch.get_rng_state(),
    }


def restore(p: Prepared, state: LoopState, saved: dict[str, Any]) -> None:
    """Load a checkpoint into the method and the loop state."""
    modules = saved.get("modules", {})
    try:
        if p.method.student is not None:
            p.method.student.load_state_dict(modules["student"])
        for name, module in p.method.extra_modules().items():
            module.load_state_dict(modules[name])
        load_loop_state(state, saved["loop"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise BenchError(f"checkpoint does not match this run's architecture: {first}"
                         ) from None
    p.method.load_state_dict(saved.get("method_state", {}))
    if "torch_rng" in saved:
        torch.set_rng_state(saved["torch_rng"].cpu())


# --- observers and early stops ---------------------------------------------------------------


class StopRun(Exception):
    """Raised by an observer to end a run early on purpose (a pruned sweep trial, say)."""

    def __init__(self, reason: str, tags: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tags = tags or {}


@dataclass
class RunObserver:
    """Callbacks for a caller that drives runs (a sweep); all optional."""

    started: Callable[[str], None] | None = None  # the new run's id, before training
    evaluated: Callable[[int, list[EvalResult]], None] | None = None  # iteration, results


# --- the run ---------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    """What `bench run` prints at the end."""

    run_id: str
    method: str
    dataset: str
    results: list[EvalResult]
    primary_metric: str
    seconds: float


def run_tags(p: Prepared) -> dict[str, str]:
    """The tracking contract's tags."""
    cfg = p.config
    return {
        "method": cfg.method,
        "dataset": p.dataset.name,
        "teacher": cfg.teacher,
        "teacher_kind": p.teacher_kind,
        "metric_tool": "bench",  # image datasets: the metric suite's notes override these
        "metric_mode": "exact" if p.dataset.kind == "points" else "classifier-features",
        "metrics": ",".join(p.suite.names),
        "device": str(p.device),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "world_size": str(p.shard.world_size),
        **seed_tags(cfg),
        **p.suite.notes,
    }


EVALUATION_OFF = "off"  # the tag `evaluation` of a run trained with eval.nfe = []


def seed_tags(cfg: RunConfig) -> dict[str, str]:
    """Which seeds the evaluation used and which statistic the metrics' own names hold."""
    seeds = evaluation_seeds(cfg)
    return {"eval_seeds": ",".join(str(s) for s in seeds),
            "eval_statistic": ("mean" if len(seeds) > 1 else "single")}


class RunCheckpoints:
    """A run's checkpoint files: last.pt (and the kept iter-<step>.pt), best.pt, and the
    iteration the last one holds."""

    def __init__(self, p: Prepared, tracker: Tracker, run_id: str, state: LoopState) -> None:
        self.p, self.tracker, self.run_id = p, tracker, run_id
        self.path = checkpoint_path(tracker, run_id)
        self.remote = tracker.get_run(run_id).local_artifact_dir is None
        self.saved_at: int | None = state.step if self.path.is_file() else None
        self.best = BestCheckpoint(p, tracker, run_id, self.path.with_name("best.pt"),
                                   self.remote)

    def write(self, s: LoopState) -> None:
        """Save the loop's state as the last checkpoint (the curves up to it stored first)."""
        self.tracker.flush(self.run_id)
        save_checkpoint(checkpoint_state(self.p, s), self.path)
        self.saved_at = s.step
        retain(self.path, s.step, self.p.config.train.keep_checkpoints)
        if self.remote:
            self.tracker.log_artifact(self.run_id, self.path, "checkpoints")


def execute(
    p: Prepared,
    tracker: Tracker,
    run_id: str,
    setup: Callable[[], LoopState],
    progress: Callable[[int, int, float], None] | None,
    report: Reporter,
    observer: RunObserver | None = None,
    locked: bool = False,
    held: bool = False,
) -> RunOutcome:
    """Set up (`setup` returns the loop state to train from), train, evaluate and log; mark
    the run FINISHED, FAILED or KILLED, whenever it ends: a signal or an error anywhere from
    the moment the run exists is recorded in it. The run's lock is held throughout (taken
    here unless the caller holds it: `locked`); `held`: the caller holds signals back
    (GUARD.hold()) since it created the run, and they are taken from here on.

    An observer's `evaluated` callback sees every intermediate evaluation and may raise
    StopRun: the run then ends KILLED with a `stopped` tag (no checkpoint error, no traceback).
    """
    t0 = time.perf_counter()
    cfg = p.config
    state: LoopState | None = None
    files: RunCheckpoints | None = None
    lock: RunLock | None = None

    stages: dict[str, float] = {}

    def log(metrics: dict[str, float], step: int) -> None:  # queued: off the training path
        tracker.log_metrics(run_id, training_metrics(metrics), step, wait=False)
        for key, value in metrics.items():  # a staged method (PD) says when a stage begins
            if key.endswith("_stage") and stages.get(key) != value:
                if stages:
                    prefix = key.removesuffix("stage")
                    detail = ", ".join(f"{k.removeprefix(prefix).replace('_', ' ')} {v:g}"
                                       for k, v in metrics.items()
                                       if k.startswith(prefix) and k != key)
                    report(f"{cfg.method}: stage {value:g} by iteration {step}"
                           + (f" ({detail})" if detail else ""))
                stages[key] = value

    def intermediate_eval(s: LoopState) -> None:
        with torch.random.fork_rng(devices=[]):  # training's global RNG stream stays untouched
            results = evaluate(p.method, s.ema, p.dataset, cfg, cfg.eval.nfe, p.suite,
                               p.device, shard=p.shard, report=report)
        for r in results:
            tracker.log_metrics(run_id, by_iteration(r.metrics, r.nfe), s.step)
        assert files is not None
        files.best.consider(s, results)
        if observer is not None and observer.evaluated is not None:
            observer.evaluated(s.step, results)

    try:
        with GUARD.installed():
            if held:
                GUARD.release()
            GUARD.raise_pending()
            if not locked:
                lock = RunLock(tracker, run_id, report).acquire()
            state = setup()
            files = RunCheckpoints(p, tracker, run_id, state)
            hooks = LoopHooks(log=log, checkpoint=files.write, evaluate=intermediate_eval,
                              progress=progress, critical=GUARD.deferred,
                              reduce=all_mean if p.shard.distributed else None)
            train_loop(p.method, cfg.train, batch_stream(p), state, hooks)
            if p.method.trains:
                with GUARD.deferred():
                    files.write(state)
            protocol = evaluation_protocol(p.dataset, cfg, p.suite)
            announce_evaluation(cfg, report)
            final_step = state.step

            def evaluated(r: EvalResult) -> None:
                log_result(tracker, run_id, r, protocol, final_step, p.suite.floors)
                report(result_text(r, p.dataset.primary_metric))

            results = evaluate(p.method, state.ema, p.dataset, cfg, cfg.eval.nfe, p.suite,
                               p.device, on_result=evaluated, shard=p.shard, report=report)
            files.best.consider(state, results)
            log_eval_artifacts(tracker, run_id, p, results)
    except StopRun as exc:
        step = state.step if state is not None else 0
        tracker.set_tags(run_id, {"stopped": f"{exc.reason} at iteration {step}", **exc.tags})
        tracker.end_run(run_id, "KILLED")
        raise
    except KeyboardInterrupt as exc:
        name = signal_name(exc)
        step = state.step if state is not None else 0
        with GUARD.installed(), GUARD.shielded():  # a second Ctrl-C cannot cut this short
            kept = ""
            if files is not None and state is not None and p.method.trains and step > 0:
                try:
                    files.write(state)
                    kept = "checkpoint kept; "
                except Exception as error:  # a full disk, say: the previous one is whole
                    kept = (f"the checkpoint of iteration {files.saved_at} is kept (writing "
                            f"this one failed: {resource_exhausted(error) or error}); ")
            _record_end(tracker, run_id, "KILLED",
                        {"error": f"interrupted ({name}) at iteration {step}"})
        raise RunInterrupted(f"interrupted ({name}) at iteration {step}; run {run_id} marked "
                             f"KILLED; {kept}resume with `bench run --resume {run_id}`",
                             signal=name) from None
    except BaseException as exc:
        step = state.step if state is not None else 0
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        with GUARD.shielded():
            _record_end(tracker, run_id, "FAILED",
                        {"error": f"{type(exc).__name__}: {message}",
                         "failed_at_iteration": getattr(exc, "iteration", step)})
        resource = resource_exhausted(exc)
        if resource is not None:  # the disk or the memory ran out: say so, and how to go on
            kept = (f"the last checkpoint ({files.path}, iteration {files.saved_at}) is intact"
                    if files is not None and files.saved_at is not None else
                    "no checkpoint was written")
            way = (f"free some space and resume with `bench run --resume {run_id}`"
                   if "space" in resource or "quota" in resource else
                   f"resume with `bench run --resume {run_id}` where more memory is free, or "
                   f"start again with a smaller train.batch_size")
            raise BenchError(f"{resource}; run {run_id} marked FAILED, {kept}; {way}"
                             ) from exc
        if isinstance(exc, BenchError) and files is not None and files.saved_at is not None:
            raise BenchError(f"{message} (last good checkpoint: {files.path}, iteration "
                             f"{files.saved_at}; resume with `bench run --resume {run_id}`)"
                             ) from exc
        raise
    else:
        tracker.end_run(run_id, "FINISHED")
    finally:
        if lock is not None:  # after the run's end is recorded
            lock.release()
    return RunOutcome(run_id, cfg.method, p.dataset.name, results, p.dataset.primary_metric,
                      time.perf_counter() - t0)


def _record_end(tracker: Tracker, run_id: str, status: str, tags: dict[str, Any]) -> None:
    """Tag a run with why it ended and close it; when the store cannot take that (its disk is
    full, say), one line says so and the run's own error goes on (the run stays RUNNING, which
    `--resume` accepts)."""
    try:
        tracker.set_tags(run_id, tags)
        tracker.end_run(run_id, status)
    except Exception as error:
        reason = resource_exhausted(error) or str(error).strip().splitlines()[0][:200]
        print(f"bench: could not mark run {run_id} {status} in the tracking store: {reason}",
              file=sys.stderr, flush=True)


def execute_worker(p: Prepared, run_id: str, state: LoopState) -> RunOutcome:
    """A rank other than 0: train its shard and generate its share of the evaluation samples
    in step with the others; no tracking, no checkpoints, no scores (rank 0 does those)."""
    t0 = time.perf_counter()
    cfg = p.config

    def generate_share(s: LoopState) -> None:
        with torch.random.fork_rng(devices=[]):
            evaluate(p.method, s.ema, p.dataset, cfg, cfg.eval.nfe, p.suite, p.device,
                     shard=p.shard)

    hooks = LoopHooks(evaluate=generate_share, critical=GUARD.deferred, reduce=all_mean)
    try:
        with GUARD.installed():
            train_loop(p.method, cfg.train, batch_stream(p), state, hooks)
            generate_share(state)
    except KeyboardInterrupt as exc:
        name = signal_name(exc)
        raise RunInterrupted(f"rank {p.shard.rank} interrupted ({name}) at iteration "
                             f"{state.step}", signal=name) from None
    return RunOutcome(run_id, p.config.method, p.dataset.name, [], p.dataset.primary_metric,
                      time.perf_counter() - t0)


def announce_evaluation(cfg: RunConfig, report: Reporter) -> None:
    """One line as an evaluation starts: its NFEs, samples and seed sets."""
    if cfg.eval.nfe:
        sets = f" x {cfg.eval.seeds} seed sets" if cfg.eval.seeds > 1 else ""
        report(f"evaluating at NFE {', '.join(map(str, cfg.eval.nfe))}: "
               f"{cfg.eval.num_samples} samples{sets} each")


def result_text(r: EvalResult, primary: str) -> str:
    """'NFE 2: w2 0.0401 (± 0.0012 over 3 seed sets), 1.2e-05 s/sample'."""
    text = f"NFE {r.nfe_measured}"
    if primary in r.metrics:
        text += f": {primary} {r.metrics[primary]:.4g}"
        std = r.spread().get(f"{primary}{SEEDS_STD}")
        if std is not None:
            text += f" (± {std:.2g} over {len(r.per_seed)} seed sets)"
    return text + f", {r.seconds_per_sample:.2g} s/sample"


def log_result(tracker: Tracker, run_id: str, r: EvalResult,
               protocol: dict[str, Any] | None = None, iteration: int | None = None,
               floors: Mapping[str, float] | None = None) -> None:
    """Evaluation metrics against the measured NFE as the step (each metric's mean over the
    seed sets, and with several sets their spread), the sampler's levels and the protocol.
    With `iteration`, also `by_iteration/<metric>_nfe<N>` at that iteration, as intermediate
    evaluations log them: the runs table then has a column per NFE (its last value: this one)
    instead of a single `w2` that is whichever NFE came last. A metric with a lower bound in
    `floors` (the suite's) is also logged as `<metric>_gap` (value - bound, never negative),
    which a log-scale chart axis can draw where the metric itself can be negative (nll)."""
    metrics = {**r.metrics, **r.spread()}
    for name, floor in (floors or {}).items():
        if name in r.metrics:
            metrics[f"{name}{GAP}"] = max(r.metrics[name] - floor, 0.0)
    metrics["seconds_per_sample"] = r.seconds_per_sample
    metrics["nfe_measured"] = r.nfe_measured
    tracker.log_metrics(run_id, metrics, r.nfe_measured)
    if iteration is not None:
        tracker.log_metrics(run_id, by_iteration(r.metrics, r.nfe), iteration)
    tags = {f"sigmas_nfe{r.nfe_measured}": json.dumps([round(s, 6) for s in r.sigmas])}
    if protocol is not None:
        tags[f"{PROTOCOL_TAG}{r.nfe_measured}"] = json.dumps(protocol, sort_keys=True)
    tracker.set_tags(run_id, tags)


def log_eval_artifacts(tracker: Tracker, run_id: str, p: Prepared,
                       results: list[EvalResult]) -> None:
    """Sample pictures per NFE, results.csv and the primary metric against NFE."""
    cfg = p.config
    primary = p.dataset.primary_metric
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "samples").mkdir()
        reference = (points_reference(p.dataset, cfg, len(results[0].preview))
                     if isinstance(p.dataset, PointsDataset) and results else None)
        for r in results:
            name = out / "samples" / f"nfe{r.nfe_measured:03d}.png"
            title = f"{cfg.method} on {p.dataset.name}, NFE {r.nfe_measured}"
            if primary in r.metrics:
                title += f": {primary} {r.metrics[primary]:.4g}"
            if p.dataset.kind == "points":
                save_scatter(r.preview, reference, title, name)
            else:
                save_grid(r.preview, name, p.dataset.clamp or (-1.0, 1.0))
        save_results_csv(tidy_rows(cfg.method, p.dataset.name, results), out / "results.csv")
        if any(primary in r.metrics for r in results):
            save_metric_vs_nfe(results, primary, cfg.method, out / f"{primary}_vs_nfe.png")
        (out / "sampling_sigmas.json").write_text(json.dumps(
            {str(r.nfe_measured): r.sigmas for r in results}, indent=1))
        for item in sorted(out.iterdir()):
            tracker.log_artifact(run_id, item, "samples" if item.is_dir() else None)


def start(
    cfg: RunConfig,
    tracker: Tracker,
    report: Reporter,
    progress: Callable[[int, int, float], None] | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    announce: str | None = None,
    observer: RunObserver | None = None,
    extra_tags: dict[str, str] | None = None,
    shard: Shard = Shard(),
) -> RunOutcome:
    """A new tracked run from a resolved config; `announce` is reported once it validated.

    `parent_run_id` nests the run under another (a sweep's); `extra_tags` are added to the
    contract's tags; `observer` is told the run id and every intermediate evaluation. Under
    several processes (`shard`), every rank calls this; rank 0 alone tracks and evaluates,
    and the others return an outcome with no results.
    """
    if not shard.distributed:
        return _start(cfg, tracker, report, progress, run_name, parent_run_id, announce,
                      observer, extra_tags, shard)
    with process_group(shard, local_device(resolve_device(cfg.device))):
        return _start(cfg, tracker, report if shard.is_main else _silent, progress, run_name,
                      parent_run_id, announce, observer, extra_tags, shard)


def _silent(message: str) -> None:
    """The reporter of ranks other than 0."""


def _start(
    cfg: RunConfig,
    tracker: Tracker,
    report: Reporter,
    progress: Callable[[int, int, float], None] | None,
    run_name: str | None,
    parent_run_id: str | None,
    announce: str | None,
    observer: RunObserver | None,
    extra_tags: dict[str, str] | None,
    shard: Shard,
) -> RunOutcome:
    """start() inside the process group (if any)."""
    torch.manual_seed(cfg.seed)
    p: Prepared = main_first(shard, lambda: prepare(cfg, tracker, report, shard))
    if not shard.is_main:
        run_id = broadcast(None, shard)
        state = new_loop_state(p.method, p.config.train, p.config.seed, p.device)
        accelerate(p)
        return execute_worker(p, run_id, state)
    if announce:
        report(announce)
    if p.method.student is not None:
        report(net_summary(p.spec, p.method.student))
    GUARD.hold()  # from here a signal waits until execute() can end the run KILLED
    try:
        run_id = tracker.start_run(experiment=p.dataset.name,
                                   run_name=run_name or f"{cfg.method}-{p.dataset.name}",
                                   tags={**run_tags(p), **(extra_tags or {})},
                                   parent_run_id=parent_run_id,
                                   params=flatten(public_dict(p.config)),
                                   files={"config.toml": dumps(p.config)})
    except BaseException:
        GUARD.release()
        raise

    def setup() -> LoopState:
        broadcast(run_id, shard)
        report(f"run {run_id} in experiment {p.dataset.name!r}")
        if observer is not None and observer.started is not None:
            observer.started(run_id)
        state = new_loop_state(p.method, p.config.train, p.config.seed, p.device)
        accelerate(p)
        return state

    return execute(p, tracker, run_id, setup, progress, report, observer, held=True)


def run_config(tracker: Tracker, run_id: str) -> RunConfig:
    """The resolved config a tracked run was started with."""
    record = tracker.get_run(run_id)
    local = record.local_artifact_dir
    path = local / "config.toml" if local is not None else None
    if path is None or not path.is_file():
        path = tracker.download_artifact(run_id, "config.toml", tracker.runs_dir / "downloads"
                                         / run_id)
    return from_dict(read_toml(path, "run config"))


def load_run(tracker: Tracker, run_id: str, report: Reporter, nfe: list[int] | None = None,
             device: str | None = None, seeds: int | None = None, metrics: bool = True,
             ) -> tuple[Prepared, LoopState]:
    """Rebuild a tracked run's method with its last checkpoint loaded (evaluated at `nfe`
    with `seeds` seed sets where given, instead of the run's own)."""
    cfg = run_config(tracker, run_id)
    changes: dict[str, Any] = {}
    if device:
        changes["device"] = device
    cfg = cfg.model_copy(update=changes)
    evaluation: dict[str, Any] = {}
    if nfe:
        evaluation["nfe"] = nfe
    if seeds is not None:
        evaluation["seeds"] = seeds
    if evaluation:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=evaluation)})
    p = prepare(cfg, tracker, report, metrics=metrics)
    state = new_loop_state(p.method, cfg.train, cfg.seed, p.device)
    if p.method.trains:
        saved = load_checkpoint(run_checkpoint(tracker, run_id), map_location=p.device)
        restore(p, state, saved)
    return p, state


def check_resume_flags(cfg: RunConfig, run_id: str, flags: Mapping[str, Any],
                       sets: list[str]) -> None:
    """A resumed run keeps its config: flags and --set values given with --resume must agree
    with it (a usage error names the first that does not); where the run is tracked
    (tracking.*) is not part of it."""
    data = to_dict(cfg)
    for key, value in flags.items():
        if value is not None:
            merge_free(data, nest(key.split("."), value))
    for item in sets:
        path, value = parse_set(item)
        merge_free(data, nest(path, value))
    wanted = flatten(to_dict(from_dict(data)))
    have = flatten(to_dict(cfg))
    for key, value in wanted.items():
        if not key.startswith("tracking.") and have.get(key) != value:
            raise UsageError(f"{key} = {param_text(value)} conflicts with run {run_id}, "
                             f"which has {param_text(have.get(key))}: a resumed run keeps its "
                             f"config (start a new run to change it)")


def resume(tracker: Tracker, run_id: str, report: Reporter,
           progress: Callable[[int, int, float], None] | None = None,
           shard: Shard = Shard(), flags: Mapping[str, Any] | None = None,
           sets: list[str] | None = None) -> RunOutcome:
    """Continue a killed or failed run from its last checkpoint, under the same run id
    (`flags` and `sets`, given with --resume, must agree with its config).

    Under several processes every rank reads the run's config; rank 0 finds the checkpoint and
    reopens the run, the others load the checkpoint it names."""
    report = report if shard.is_main else _silent
    record = tracker.get_run(run_id)
    if record.status == "FINISHED":
        raise UsageError(f"run {run_id} already finished; nothing to resume")
    with RunLock(tracker, run_id, report) if shard.is_main else contextlib.nullcontext():
        if record.status == "RUNNING":
            report(f"run {run_id} is marked RUNNING but no process holds it (it died?); "
                   f"resuming it")
        cfg = run_config(tracker, run_id)
        check_resume_flags(cfg, run_id, flags or {}, sets or [])
        if not shard.distributed:
            return _resume(tracker, run_id, cfg, report, progress, shard)
        with process_group(shard, local_device(resolve_device(cfg.device))):
            return _resume(tracker, run_id, cfg, report, progress, shard)


def _resume(tracker: Tracker, run_id: str, cfg: RunConfig, report: Reporter,
            progress: Callable[[int, int, float], None] | None, shard: Shard) -> RunOutcome:
    """resume() inside the process group (if any)."""
    torch.manual_seed(cfg.seed)  # as `start` does: a run with no checkpoint restarts exactly
    p: Prepared = main_first(shard, lambda: prepare(cfg, tracker, report, shard))
    state = new_loop_state(p.method, cfg.train, cfg.seed, p.device)
    ckpt = Path(broadcast(str(checkpoint_path(tracker, run_id)) if shard.is_main else None,
                          shard))
    if p.method.trains and ckpt.exists() and not ckpt.is_file():
        raise BenchError(f"run {run_id}'s checkpoint {ckpt} is not a file; move it aside (the "
                         f"run would otherwise restart from iteration 0)")
    if p.method.trains and ckpt.is_file():
        restore(p, state, load_checkpoint(ckpt, map_location=p.device))
        report(f"resuming run {run_id} at iteration {state.step}")
    else:
        report(f"run {run_id} has no checkpoint; restarting it from iteration 0")
    accelerate(p)
    if not shard.is_main:
        return execute_worker(p, run_id, state)

    def setup() -> LoopState:
        tracker.reopen(run_id)
        return state

    return execute(p, tracker, run_id, setup, progress, report, locked=True)


def evaluate_run(tracker: Tracker, run_id: str, nfe: list[int] | None, report: Reporter,
                 seeds: int | None = None) -> RunOutcome:
    """Re-evaluate a tracked run (at other NFEs, or under more seed sets) and log into the
    same run; each NFE records the protocol it was evaluated under."""
    t0 = time.perf_counter()
    with RunLock(tracker, run_id, report):
        if not nfe and not run_config(tracker, run_id).eval.nfe:
            raise UsageError(f"run {run_id} was trained with evaluation off (eval.nfe = []): "
                             f"give the NFEs, e.g. `bench eval --run {run_id} --nfe 1,2`")
        p, state = load_run(tracker, run_id, report, nfe, seeds=seeds)
        protocol = evaluation_protocol(p.dataset, p.config, p.suite)
        tags = {**seed_tags(p.config), **p.suite.notes}
        if tracker.get_run(run_id).tags.get("evaluation") == EVALUATION_OFF:
            tags["evaluation"] = "bench eval"  # off during training, evaluated since
        tracker.set_tags(run_id, tags)
        announce_evaluation(p.config, report)

        def evaluated(r: EvalResult) -> None:
            log_result(tracker, run_id, r, protocol, state.step, p.suite.floors)
            report(result_text(r, p.dataset.primary_metric))

        results = evaluate(p.method, state.ema, p.dataset, p.config, p.config.eval.nfe,
                           p.suite, p.device, on_result=evaluated, report=report)
        log_eval_artifacts(tracker, run_id, p, results)
    return RunOutcome(run_id, p.config.method, p.dataset.name, results,
                      p.dataset.primary_metric, time.perf_counter() - t0)


def sample_run(tracker: Tracker, run_id: str, nfe: int, count: int, seed: int,
               batch_size: int, out: Path, report: Reporter, compile_net: bool = False,
               ) -> Path:
    """Generate `count` samples at `nfe` with per-sample seeds into an .npz file (array x);
    compile_net (or the run's sample.compile) samples through torch.compile."""
    import numpy as np

    p, state = load_run(tracker, run_id, report, [nfe], metrics=False)
    cfg = p.config
    if compile_net:
        cfg = cfg.model_copy(
            update={"sample": cfg.sample.model_copy(update={"compile": True})})
    model = sampling_model(p.method.evaluation_model(state.ema, nfe), cfg, p.device)
    chunks: list[torch.Tensor] = []
    conditional = bool(p.spec["num_classes"])
    measured, seconds = generate(p.method, model, p.dataset, nfe, count, batch_size, seed,
                                 p.device, conditional, lambda x: chunks.append(x.cpu()))
    x = torch.cat(chunks).to(torch.float32).numpy()
    # whole or not at all: an interrupted or failed write leaves no partial file behind
    atomic_write(out, lambda fh: np.savez(fh, x=x, nfe=np.int64(measured), seed=np.int64(seed)))
    report(f"{count} samples at NFE {measured} in {seconds:.2f} s")
    return out


def ode_error_run(tracker: Tracker, run_id: str, nfe: list[int] | None,
                  ddim_nfe: list[int], report: Reporter) -> Any:
    """Consistency error of a tracked run (gmm8/gmm25) next to exact-denoiser DDIM; the run's
    figures are logged as `ode_error` with step = NFE."""
    with RunLock(tracker, run_id, report):
        p, state = load_run(tracker, run_id, report, nfe)
        if not isinstance(p.dataset, GaussianMixture):
            raise UsageError(f"bench ode-error needs gmm8 or gmm25, not {p.dataset.name}")
        errors = ode_errors(p.method, state.ema, p.dataset, p.config.eval.nfe, ddim_nfe)
        for k, v in errors.run.items():
            tracker.log_metrics(run_id, {"ode_error": v}, k)
    return errors
