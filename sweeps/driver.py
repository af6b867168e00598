"""`bench sweep`: an Optuna study whose trials are `bench run`s with `--set` overrides.

The command validates everything once (space, objective, config, dataset, teacher), creates or
loads the study, opens the MLflow parent run, then runs `--workers K` worker loops (K > 1: K
processes of `python -m sweeps.worker`) that share the study through its storage. A worker
asks for a trial only while fewer than N trials are finished (COMPLETE or PRUNED) or running,
so N means N finished trials; trials of dead workers are marked FAIL first (storage.py).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.app.tracking import Tracker, mask_credentials
from bench.core.errors import BenchError, UsageError
from bench.engine.signals import GUARD, Interrupted, signal_name
from sweeps.objective import Objective, check_available, parse_objectives
from sweeps.space import Param, Space, load_space, set_item
from sweeps.storage import (
    HEARTBEAT_SECONDS,
    HOST,
    STALE_FACTOR,
    STALE_SECONDS,
    Heartbeat,
    StaleTrial,
    default_storage,
    fail_stale_trials,
    heartbeat_stamp,
    lock_path,
    machine_lock,
    open_storage,
)

Reporter = Callable[[str], None]
PRUNERS = ("median", "hyperband", "none")
POLL_SECONDS = 2.0  # how often an idle worker looks at the study again
MAX_FAILURES_IN_ROW = 3  # a worker stops after this many consecutive failed trials
DEFINITION_ATTR = "bench.definition"
PARENT_ATTR = "bench.mlflow_parent_run_id"
ADOPT_WAIT_SECONDS = 5.0  # a study still without our definition this long after it is seen: adopted
PARENT_WAIT_SECONDS = 60.0  # how long a joining host waits for the creator's parent run


@dataclass(frozen=True)
class SweepRequest:
    """What the user asked for on the command line."""

    method: str
    dataset: str
    spaces: tuple[str, ...]  # built-in names or paths
    trials: int  # finished (complete or pruned) trials the study should hold
    objectives: tuple[str, ...] = ()  # METRIC@NFE items; () = the dataset's metric at NFE 1
    storage: str | None = None  # Optuna storage URL or journal path; None = runs/optuna.journal
    study: str | None = None  # study name; None = <method>-<dataset>-<space>
    workers: int = 1  # local worker processes
    pruner: str = "median"  # median, hyperband or none
    timeout: float | None = None  # seconds after which no new trial starts
    heartbeat: float = HEARTBEAT_SECONDS  # seconds between a worker's heartbeats
    sets: tuple[str, ...] = ()  # --set overrides applied to every trial
    tracking_uri: str | None = None  # MLflow store; None = the usual resolution


@dataclass
class WorkerPlan:
    """Everything a worker needs; plain values so it travels as JSON to worker processes."""

    storage: str
    study: str
    trials: int
    method: str
    dataset: str
    params: list[dict[str, Any]]  # Param fields
    objectives: list[dict[str, Any]]  # Objective fields
    fixed_sets: list[str]  # sweep-made overrides that also reproduce the run (teacher)
    eval_sets: list[str]  # sweep-made overrides for evaluation only (eval.nfe, eval_every)
    user_sets: list[str]
    pruner: str
    startup_trials: int  # TPE's random start and the median pruner's warm-up, in trials
    tracking_uri: str
    runs_dir: str
    parent_run_id: str
    deadline: float | None  # wall-clock time after which no trial starts
    lock: str  # machine_lock file of this storage and study
    worker: int = 0
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    stale_seconds: float = STALE_SECONDS  # journal: our staleness limit
    poll_seconds: float = POLL_SECONDS

    def param_objs(self) -> list[Param]:
        return [Param(**{**p, "choices": tuple(p.get("choices", ()))}) for p in self.params]

    def objective_objs(self) -> list[Objective]:
        return [Objective(**o) for o in self.objectives]


@dataclass
class TrialRow:
    """One trial as the summary shows it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    params: dict[str, Any]
    values: list[float] | None
    run_id: str | None
    seconds: float | None
    note: str = ""


@dataclass
class SweepSummary:
    """What `bench sweep` prints at the end."""

    study: str
    storage: str  # masked
    objectives: list[Objective]
    target: int
    rows: list[TrialRow]
    best: list[TrialRow]  # the best trial, or the Pareto front of a multi-objective study
    reproduce: dict[int, str]  # trial number -> `bench run` command
    parent_run_id: str
    ran_here: int  # trials this command ran
    seconds: float
    warnings: list[str] = field(default_factory=list)
    timed_out: bool = False  # --timeout ended it before N trials finished

    @property
    def finished(self) -> int:
        return sum(r.state in ("COMPLETE", "PRUNED") for r in self.rows)

    @property
    def complete(self) -> bool:
        return self.finished >= self.target


# --- setting up ------------------------------------------------------------------------------


def _set_keys(sets: Sequence[str]) -> set[str]:
    from bench.core.config import parse_set

    return {".".join(parse_set(s)[0]) for s in sets}


def _resolve(request: SweepRequest, sets: Sequence[str]) -> Any:
    from bench.core.config import default_bench_files, resolve

    flags = {"method": request.method, "dataset": request.dataset}
    return resolve(bench_files=default_bench_files(Path.cwd()), flags=flags, sets=list(sets))


def default_study_name(request: SweepRequest, space: Space) -> str:
    """<method>-<dataset>-<space label>."""
    return f"{request.method}-{request.dataset}-{space.label}"


def _check_space(request: SweepRequest, space: Space, base_sets: list[str]) -> None:
    """Every swept key is a config key of the right type, unfixed by --set, for this method."""
    if space.methods and request.method not in space.methods:
        raise UsageError(f"space {space.label} is for {', '.join(space.methods)}, "
                         f"not {request.method}")
    fixed = _set_keys(request.sets)
    for p in space.params:
        if p.name in fixed:
            raise UsageError(f"{p.name} is swept by space {space.label} and fixed by --set; "
                             f"drop one of them")
        for value in p.extremes():
            try:
                _resolve(request, [*base_sets, set_item(p.name, value)])
            except UsageError as exc:
                raise UsageError(f"space {space.label}: {p.name} = {value!r}: {exc}") from None


def _lower_is_better() -> dict[str, bool]:
    from bench.engine.evaluation import LOWER_IS_BETTER

    return dict(LOWER_IS_BETTER)


def _pruning_sets(request: SweepRequest, cfg: Any, objectives: list[Objective],
                  notes: list[str]) -> tuple[str, list[str]]:
    """The pruner actually used and the overrides it needs (intermediate evaluations)."""
    if request.pruner == "none":
        return "none", []
    if len(objectives) > 1:
        notes.append("pruning is off: Optuna prunes single-objective studies only")
        return "none", []
    if cfg.train.eval_every > 0:
        return request.pruner, []
    every = cfg.train.steps // 4
    if every < 1:
        notes.append("pruning is off: too few training iterations for intermediate evaluations")
        return "none", []
    notes.append(f"pruning ({request.pruner}): intermediate evaluation every {every} "
                 f"iterations (set train.eval_every to change)")
    return request.pruner, [f"train.eval_every={every}"]


def _make_sampler(plan: WorkerPlan, multi: bool) -> Any:
    import optuna

    return optuna.samplers.TPESampler(n_startup_trials=plan.startup_trials, constant_liar=True,
                                      multivariate=not multi)


def _make_pruner(plan: WorkerPlan) -> Any:
    import optuna

    if plan.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=plan.startup_trials)
    if plan.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def _load_study(plan: WorkerPlan, storage: Any) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=plan.study, storage=storage,
                             sampler=_make_sampler(plan, len(plan.objectives) > 1),
                             pruner=_make_pruner(plan))


def _definition(request: SweepRequest, space: Space, objectives: list[Objective],
                fixed_sets: list[str]) -> dict[str, Any]:
    return {
        "method": request.method,
        "dataset": request.dataset,
        "params": {p.name: p.to_dict() for p in space.params},
        "objectives": [o.label for o in objectives],
        "sets": list(request.sets),
        "fixed_sets": list(fixed_sets),
    }


def _open_study(plan: WorkerPlan, storage: Any, definition: dict[str, Any],
                objectives: list[Objective]) -> tuple[Any, bool]:
    """Create the study or load it, and whether this call created it (the storage lets one
    creator win when several hosts start at once); a study made for another sweep is a usage
    error."""
    import optuna
    from optuna.exceptions import DuplicatedStudyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = [o.direction for o in objectives]
    created = True
    try:
        try:
            study = optuna.create_study(study_name=plan.study, storage=storage,
                                        directions=directions,
                                        sampler=_make_sampler(plan, len(objectives) > 1),
                                        pruner=_make_pruner(plan))
        except DuplicatedStudyError:
            created = False
            study = _load_study(plan, storage)
    except (BenchError, UsageError):
        raise
    except Exception as exc:
        raise BenchError(f"cannot create study {plan.study!r} in "
                         f"{mask_credentials(plan.storage)}: {_first_line(exc)}") from None
    have = [d.name.lower() for d in study.directions]
    if have != directions:
        raise UsageError(f"study {plan.study!r} exists with direction(s) {', '.join(have)}, "
                         f"not {', '.join(directions)}; use --study for a new study")
    stored = study.user_attrs.get(DEFINITION_ATTR)
    deadline = time.monotonic() + ADOPT_WAIT_SECONDS
    while not created and stored is None and time.monotonic() < deadline:
        time.sleep(0.25)  # a host that created it a moment ago is writing its definition
        study = _load_study(plan, storage)
        stored = study.user_attrs.get(DEFINITION_ATTR)
    if created or stored is None:  # ours now (one made with Optuna alone is adopted, with no
        study.set_user_attr(DEFINITION_ATTR, definition)  # parent run of another host to wait
        return study, True  # for)
    for key in ("method", "dataset", "params", "objectives", "sets"):
        if stored.get(key) != definition[key]:
            raise UsageError(f"study {plan.study!r} was made with other {key} "
                             f"({json.dumps(stored.get(key))}); use --study for a new study")
    plan.fixed_sets = list(stored.get("fixed_sets", plan.fixed_sets))  # the teacher it started with
    return study, created


def _parent_run(tracker: Tracker, study: Any, created: bool, request: SweepRequest,
                space: Space, objectives: list[Objective], storage_shown: str,
                report: Reporter) -> str:
    """The sweep's MLflow run: the study's, reopened, or a new one. A host that joins a study
    another host has just created waits for that host's parent run instead of making a
    second one."""
    run_id = study.user_attrs.get(PARENT_ATTR)
    if not run_id and not created:
        deadline = time.monotonic() + PARENT_WAIT_SECONDS
        while not run_id and time.monotonic() < deadline:
            time.sleep(0.5)
            run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        try:
            tracker.get_run(run_id)
        except BenchError:
            run_id = None
        else:
            tracker.reopen(run_id)
            report(f"sweep run {run_id} (continuing study {study.study_name!r})")
            return str(run_id)
    tags = {"sweep": "true", "sweep.study": study.study_name, "sweep.storage": storage_shown,
            "sweep.space": space.label, "sweep.objective": ",".join(o.label for o in objectives),
            "method": request.method, "dataset": request.dataset}
    run_id = tracker.start_run(experiment=request.dataset,
                               run_name=f"sweep-{study.study_name}", tags=tags, params={
        "sweep.trials": request.trials, "sweep.space": space.label,
        "sweep.params": ",".join(p.name for p in space.params),
        "sweep.objective": ",".join(o.label for o in objectives),
        "sweep.pruner": request.pruner, "sweep.workers": request.workers,
        "sweep.sets": " ".join(request.sets) or "-", "sweep.storage": storage_shown})
    study.set_user_attr(PARENT_ATTR, run_id)
    report(f"sweep run {run_id} in experiment {request.dataset!r}")
    return str(run_id)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- the worker loop -------------------------------------------------------------------------


def _count(study: Any) -> tuple[int, int]:
    """(finished, running) trials: finished = COMPLETE or PRUNED."""
    from optuna.trial import TrialState

    finished = running = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            finished += 1
        elif t.state == TrialState.RUNNING:
            running += 1
    return finished, running


def _is_surplus(study: Any, number: int, target: int) -> bool:
    """Whether `target` trials with lower numbers are already finished or running."""
    from optuna.trial import TrialState

    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    ahead = sum(t.number < number and t.state in counted
                for t in study.get_trials(deepcopy=False))
    return ahead >= target


def close_stale(study: Any, storage: Any, tracker: Tracker, plan: WorkerPlan,
                report: Reporter) -> list[StaleTrial]:
    """Fail the trials of dead workers and end their MLflow runs as KILLED."""
    failed = fail_stale_trials(study, storage, plan.stale_seconds)
    for s in failed:
        report(f"trial {s.number} marked failed: {s.reason}")
        run_id = s.run_id or _trial_run(tracker, plan, s.number)
        # a worker killed between its run's end and its tell leaves the run FINISHED: it keeps
        # that status, tagged as the failed trial it is
        if run_id:
            try:
                status = tracker.get_run(run_id).status
                if status in ("RUNNING", "FINISHED"):
                    tracker.set_tags(run_id, {"error": s.reason, "sweep.state": "FAIL"})
                if status == "RUNNING":
                    tracker.end_run(run_id, "KILLED")
            except BenchError:
                continue
    return failed


def _trial_run(tracker: Tracker, plan: WorkerPlan, number: int) -> str | None:
    """The run of a trial whose worker died before recording its id: found by its tags."""
    try:
        experiment = tracker.get_run(plan.parent_run_id).experiment
        runs = tracker.search(experiment, f"tags.`sweep.study` = '{plan.study}' and "
                                          f"tags.`sweep.trial` = '{number}'")
    except BenchError:
        return None
    return runs[0].run_id if runs else None


def run_worker(plan: WorkerPlan, report: Reporter) -> int:
    """Run trials until the study holds `plan.trials` finished ones; return how many ran."""
    import bench.app.runner  # noqa: F401  (the training stack, imported before a trial is taken)

    storage = open_storage(plan.storage, plan.heartbeat_seconds)
    study = _load_study(plan, storage)
    tracker = Tracker(plan.tracking_uri, Path(plan.runs_dir))
    ran = 0
    failures = 0
    waiting_said = False
    while True:
        if plan.deadline is not None and time.time() >= plan.deadline:
            report("timeout reached: no new trial")
            break
        with machine_lock(Path(plan.lock)):
            close_stale(study, storage, tracker, plan, report)
            finished, running = _count(study)
            if finished >= plan.trials:
                break
            trial = None
            if finished + running < plan.trials:
                trial = study.ask()
                trial.set_user_attr("host", HOST)
                trial.set_user_attr("pid", os.getpid())
                stamp = heartbeat_stamp(storage, study, trial)
                stamp(time.time())
        if trial is None:
            if not waiting_said:
                report(f"{finished} of {plan.trials} trials finished, {running} running on "
                       f"other workers: waiting for them")
                waiting_said = True
            time.sleep(plan.poll_seconds)
            continue
        waiting_said = False
        if _is_surplus(study, trial.number, plan.trials):
            trial.set_user_attr("surplus", "the study was full when this trial was created")
            study.tell(trial, state=_state("FAIL"))
            continue
        state = run_trial(plan, study, trial, tracker, report, stamp)
        ran += 1
        failures = failures + 1 if state == "FAIL" else 0
        if failures >= MAX_FAILURES_IN_ROW:
            raise BenchError(f"{failures} trials in a row failed (last: trial {trial.number}, "
                             f"{study.trials[trial.number].user_attrs.get('error', '?')}); "
                             f"stopping this worker")
    return ran


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def _suggest(trial: Any, p: Param) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices))
    if p.type == "int":
        return trial.suggest_int(p.name, int(p.low or 0), int(p.high or 0), log=p.log,
                                 step=int(p.step or 1))
    return trial.suggest_float(p.name, float(p.low or 0), float(p.high or 0), log=p.log,
                               step=p.step)


def trial_sets(plan: WorkerPlan, params: dict[str, Any]) -> list[str]:
    """The --set overrides of one trial, lowest precedence first."""
    return [*plan.eval_sets, *plan.fixed_sets, *plan.user_sets,
            *(set_item(k, v) for k, v in params.items())]


def _value(results: Sequence[Any], o: Objective) -> float:
    for r in results:
        if r.nfe == o.nfe and o.metric in r.metrics:
            return float(r.metrics[o.metric])
    raise BenchError(f"objective {o.label} was not evaluated")


def run_trial(plan: WorkerPlan, study: Any, trial: Any, tracker: Tracker,
              report: Reporter, stamp: Callable[[float], None]) -> str:
    """One trial through the `bench run` code path; returns its final state name."""
    from optuna.exceptions import UpdateFinishedTrialError

    from bench.app.runner import RunInterrupted, RunObserver, StopRun, start
    from bench.core.config import default_bench_files, resolve

    objectives = plan.objective_objs()
    params = {p.name: _suggest(trial, p) for p in plan.param_objs()}
    shown = " ".join(set_item(k, v) for k, v in params.items())
    report(f"trial {trial.number} started: {shown}")
    t0 = time.perf_counter()
    primary = objectives[0]
    prune = plan.pruner != "none" and len(objectives) == 1

    def started(run_id: str) -> None:
        trial.set_user_attr("mlflow_run_id", run_id)

    def evaluated(step: int, results: list[Any]) -> None:
        if not prune:
            return
        value = _value(results, primary)
        if not math.isfinite(value):
            return
        trial.report(value, step)
        if trial.should_prune():
            raise StopRun(f"pruned by the sweep ({primary.label} = {value:.4g})",
                          {"sweep.state": "PRUNED"})

    def tell(state: str, values: list[float] | None = None, error: str | None = None) -> str:
        try:
            if error:
                trial.set_user_attr("error", error[:1000])
            if values is not None:
                study.tell(trial, values)
            else:
                study.tell(trial, state=_state(state))
        except (ValueError, RuntimeError, UpdateFinishedTrialError):
            report(f"trial {trial.number}: another worker marked it failed (stale heartbeat); "
                   f"its result is dropped")
            return "FAIL"
        return state

    try:
        cfg = resolve(bench_files=default_bench_files(Path.cwd()),
                      flags={"method": plan.method, "dataset": plan.dataset},
                      sets=trial_sets(plan, params)).config
        observer = RunObserver(started=started, evaluated=evaluated)
        with Heartbeat(stamp, plan.heartbeat_seconds):
            outcome = start(cfg, tracker, lambda message: None, None,
                            run_name=f"{plan.study}-trial-{trial.number}",
                            parent_run_id=plan.parent_run_id, observer=observer,
                            extra_tags={"sweep.study": plan.study,
                                        "sweep.trial": str(trial.number),
                                        "sweep.params": json.dumps(params)})
        values = [_value(outcome.results, o) for o in objectives]
    except StopRun as exc:
        state = tell("PRUNED")
        report(f"trial {trial.number} pruned: {exc.reason} ({time.perf_counter() - t0:.0f} s)")
        return state
    except RunInterrupted:
        tell("FAIL", error="interrupted")
        raise
    except KeyboardInterrupt:
        tell("FAIL", error="interrupted")
        raise
    except Exception as exc:
        message = f"{type(exc).__name__}: {_first_line(exc)}" if not isinstance(
            exc, BenchError) else _first_line(exc)
        run_id = trial.user_attrs.get("mlflow_run_id")
        state = tell("FAIL", error=message)
        if run_id:
            tracker.set_tags(run_id, {"sweep.state": "FAIL"})
        report(f"trial {trial.number} failed: {message}")
        return state
    if not all(math.isfinite(v) for v in values):
        state = tell("FAIL", error="non-finite objective value")
        tracker.set_tags(outcome.run_id, {"sweep.state": "FAIL"})
        report(f"trial {trial.number} failed: non-finite objective value")
        return state
    state = tell("COMPLETE", values)
    if state == "COMPLETE":
        tracker.set_tags(outcome.run_id, {"sweep.state": "COMPLETE"})
        tracker.log_metrics(plan.parent_run_id, {o.key: v for o, v in zip(objectives, values,
                                                                           strict=True)},
                            trial.number)
    shown = ", ".join(f"{o.label} = {v:.4g}" for o, v in zip(objectives, values, strict=True))
    report(f"trial {trial.number} finished: {shown} ({time.perf_counter() - t0:.0f} s)")
    return state


# --- the command -----------------------------------------------------------------------------


def run_sweep(request: SweepRequest, report: Reporter) -> SweepSummary:
    """Validate, open study and parent run, run the workers, tag the best trial, summarise."""
    from bench.app.runner import RunInterrupted, prepare
    from bench.app.tracking import resolve_tracking_uri
    from methods import get_method

    t0 = time.perf_counter()
    if request.trials < 1:
        raise UsageError("--trials must be >= 1")
    if request.workers < 1:
        raise UsageError("--workers must be >= 1")
    if request.pruner not in PRUNERS:
        raise UsageError(f"--pruner must be one of {', '.join(PRUNERS)}, got {request.pruner!r}")
    if request.timeout is not None and request.timeout <= 0:
        raise UsageError("--timeout must be > 0 seconds")
    if not 1 <= request.heartbeat < math.inf:
        raise UsageError(f"--heartbeat must be a number of seconds >= 1, got {request.heartbeat}")
    base = _resolve(request, request.sets)
    cfg = base.config
    method_cls = get_method(cfg.method)
    space = load_space(request.spaces)
    from bench.data.datasets import get_dataset

    primary_metric = get_dataset(cfg.dataset, cfg.data.path or None).primary_metric
    objectives = parse_objectives(request.objectives, _lower_is_better(), f"{primary_metric}@1")
    eval_sets: list[str] = []
    nfes = sorted({o.nfe for o in objectives})
    if "eval.nfe" in _set_keys(request.sets):
        missing = [n for n in nfes if n not in cfg.eval.nfe]
        if missing:
            raise UsageError(f"objective NFE {missing[0]} is not in eval.nfe = {cfg.eval.nfe}")
    else:
        eval_sets.append(f"eval.nfe={nfes}")
    notes: list[str] = []
    pruner, pruning_sets = _pruning_sets(request, cfg, objectives, notes)
    eval_sets += pruning_sets
    _check_space(request, space, [*eval_sets, *request.sets])
    runs_dir = Path(cfg.tracking.runs_dir)
    tracker = Tracker(resolve_tracking_uri(request.tracking_uri, cfg.tracking.uri, runs_dir),
                      runs_dir)
    prepared_cfg = _resolve(request, [*eval_sets, *request.sets]).config
    p = prepare(prepared_cfg, tracker, notes.append)
    check_available(objectives, p.suite.names, p.dataset.name)
    fixed_sets: list[str] = []
    if method_cls.needs_teacher and "teacher" not in _set_keys(request.sets):
        fixed_sets.append(set_item("teacher", p.config.teacher))
    del p
    storage_url = request.storage or default_storage(runs_dir)
    shown = mask_credentials(storage_url)
    storage = open_storage(storage_url, request.heartbeat)
    plan = WorkerPlan(
        storage=storage_url,
        study=request.study or default_study_name(request, space),
        trials=request.trials,
        method=request.method,
        dataset=request.dataset,
        params=[asdict(p) for p in space.params],
        objectives=[asdict(o) for o in objectives],
        fixed_sets=fixed_sets,
        eval_sets=eval_sets,
        user_sets=list(request.sets),
        pruner=pruner,
        startup_trials=min(10, max(3, request.trials // 4)),
        tracking_uri=tracker.uri,
        runs_dir=str(runs_dir.resolve()),
        parent_run_id="",
        deadline=None if request.timeout is None else time.time() + request.timeout,
        lock=str(lock_path(runs_dir.resolve(), storage_url, request.study
                           or default_study_name(request, space))),
        heartbeat_seconds=request.heartbeat,
        stale_seconds=STALE_FACTOR * request.heartbeat,
    )
    study, created = _open_study(plan, storage,
                                 _definition(request, space, objectives, fixed_sets), objectives)
    plan.parent_run_id = _parent_run(tracker, study, created, request, space, objectives,
                                     shown, report)
    for note in notes:
        report(note)
    report(f"study {plan.study!r} in {shown}")
    close_stale(study, storage, tracker, plan, report)
    finished, running = _count(study)
    warnings: list[str] = []
    pids = {os.getpid()}
    if finished >= plan.trials:
        report(f"study already holds {finished} finished trials (--trials {plan.trials})")
    else:
        report(f"{finished} of {plan.trials} trials finished; running the rest on "
               f"{request.workers} worker(s)")
        try:
            if request.workers == 1:
                run_worker(plan, report)
            else:
                warnings = _run_processes(plan, request.workers, study, storage, tracker,
                                          report, pids)
        except (KeyboardInterrupt, RunInterrupted) as exc:
            name = exc.signal if isinstance(exc, RunInterrupted) else signal_name(exc)
            with GUARD.shielded():
                tracker.set_tags(plan.parent_run_id, {"error": f"interrupted ({name})"})
                tracker.end_run(plan.parent_run_id, "KILLED")
            raise RunInterrupted(f"sweep interrupted ({name}); re-run the same command to "
                                 f"continue", signal=name) from None
        except BaseException as exc:
            tracker.set_tags(plan.parent_run_id, {"error": _first_line(exc)})
            tracker.end_run(plan.parent_run_id, "FAILED")
            raise
    close_stale(study, storage, tracker, plan, report)
    ran = sum(t.user_attrs.get("host") == HOST and t.user_attrs.get("pid") in pids
              and t.state.is_finished() and "surplus" not in t.user_attrs
              for t in study.get_trials(deepcopy=False))
    summary = summarise(study, plan, objectives, request, shown, ran, time.perf_counter() - t0)
    summary.warnings = warnings
    summary.timed_out = plan.deadline is not None and time.time() >= plan.deadline
    _tag_best(tracker, plan.parent_run_id, summary)
    if summary.complete:
        tracker.end_run(plan.parent_run_id, "FINISHED")
    else:
        tracker.set_tags(plan.parent_run_id, {
            "error": f"{summary.finished} of {summary.target} trials finished; re-run to "
                     f"continue"})
        tracker.end_run(plan.parent_run_id, "KILLED")
    return summary


def _cpu_count() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM to the sweep is handled as Ctrl-C: its workers are stopped, not orphaned."""
    raise Interrupted("SIGTERM")


def _run_processes(plan: WorkerPlan, workers: int, study: Any, storage: Any,
                   tracker: Tracker, report: Reporter, pids: set[int]) -> list[str]:
    """K worker processes sharing the storage; the trials of one that dies are failed.
    Ctrl-C or SIGTERM stops the workers (their trials are failed, their runs KILLED)."""
    procs: list[subprocess.Popen[bytes]] = []
    warnings = []
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # K workers share the cores instead of each taking all
        env["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // workers))
    for k in range(workers):
        one = WorkerPlan(**{**asdict(plan), "worker": k + 1})
        procs.append(subprocess.Popen([sys.executable, "-m", "sweeps.worker"],
                                      stdin=subprocess.PIPE, env=env))
        assert procs[-1].stdin is not None
        procs[-1].stdin.write(json.dumps(asdict(one)).encode())
        procs[-1].stdin.close()
    pids.update(p.pid for p in procs)
    report(f"workers: pids {', '.join(str(p.pid) for p in procs)}")
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    try:
        pending = dict(enumerate(procs, start=1))
        next_check = time.monotonic() + plan.heartbeat_seconds
        while pending:
            if time.monotonic() >= next_check:  # fail a dead host's trials while ours are busy
                try:
                    close_stale(study, storage, tracker, plan, report)
                except BenchError as exc:  # the workers meet the same storage and say so
                    report(f"checking for stale trials: {_first_line(exc)}")
                next_check = time.monotonic() + plan.heartbeat_seconds
            for k, proc in list(pending.items()):
                code = proc.poll()
                if code is None:
                    continue
                del pending[k]
                if code != 0:
                    how = (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
                    warnings.append(f"worker {k} (pid {proc.pid}) ended: {how}")
                    report(warnings[-1])
                    close_stale(study, storage, tracker, plan, report)
            time.sleep(0.5)
    except KeyboardInterrupt:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        close_stale(study, storage, tracker, plan, report)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return warnings


# --- the summary -----------------------------------------------------------------------------


def summarise(study: Any, plan: WorkerPlan, objectives: list[Objective],
              request: SweepRequest, storage_shown: str, ran: int, seconds: float,
              ) -> SweepSummary:
    """Rows of every trial, the best one (or the Pareto front) and its `bench run` command."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds_t = None
        if t.datetime_start and t.datetime_complete:
            seconds_t = (t.datetime_complete - t.datetime_start).total_seconds()
        note = str(t.user_attrs.get("error", ""))
        if "surplus" in t.user_attrs:
            note = "surplus: not run"
        if t.state.name == "PRUNED" and t.intermediate_values:
            step = max(t.intermediate_values)
            note = f"pruned at iteration {step}"
        rows.append(TrialRow(t.number, t.state.name, dict(t.params),
                             list(t.values) if t.values is not None else None,
                             t.user_attrs.get("mlflow_run_id"), seconds_t, note))
    done = [r for r in rows if r.state == "COMPLETE"]
    best: list[TrialRow] = []
    if done:
        if len(objectives) == 1:
            sign = 1.0 if objectives[0].minimize else -1.0
            best = [min(done, key=lambda r: (sign * (r.values or [math.inf])[0], r.number))]
        else:
            front = {t.number for t in study.best_trials}
            best = [r for r in done if r.number in front]
    reproduce = {r.number: reproduce_command(request, plan, r.params) for r in best}
    return SweepSummary(plan.study, storage_shown, objectives, plan.trials, rows, best,
                        reproduce, plan.parent_run_id, ran, seconds)


def reproduce_command(request: SweepRequest, plan: WorkerPlan, params: dict[str, Any]) -> str:
    """The `bench run` command that trains the trial's configuration again."""
    parts = ["bench", "run", "--method", request.method, "--dataset", request.dataset]
    for item in [*plan.fixed_sets, *plan.user_sets, *(set_item(k, v) for k, v in params.items())]:
        parts += ["--set", item]
    if request.tracking_uri:
        parts += ["--tracking-uri", mask_credentials(request.tracking_uri)]
    return shlex.join(parts)


def _tag_best(tracker: Tracker, parent_run_id: str, summary: SweepSummary) -> None:
    """Tag the best trial's run (or the Pareto front's) and record it on the parent run."""
    multi = len(summary.objectives) > 1
    tag = "sweep.pareto" if multi else "sweep.best"
    best = {r.number for r in summary.best}
    for r in summary.rows:
        if not r.run_id:
            continue
        try:
            if r.number in best:
                tracker.set_tags(r.run_id, {tag: "true"})
            else:
                tracker.delete_tag(r.run_id, tag)
        except BenchError:
            continue
    if not summary.best:
        return
    first = summary.best[0]
    tags: dict[str, Any] = {"sweep.finished_trials": summary.finished}
    if multi:
        tags["sweep.pareto_trials"] = ",".join(str(r.number) for r in summary.best)
    else:
        tags.update({"sweep.best_trial": first.number, "sweep.best_run_id": first.run_id or "",
                     "sweep.best_params": json.dumps(first.params),
                     "sweep.best_command": summary.reproduce[first.number]})
        assert first.values is not None
        tracker.log_metrics(parent_run_id, {f"best_{summary.objectives[0].key}":
                                            first.values[0]}, 0)
    tracker.set_tags(parent_run_id, tags)
