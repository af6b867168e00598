"""`bench suite`: the whole comparison on one dataset, through the same code path as `bench run`.

The EDM teacher trains first (its Heun evaluation is the EDM row); the distillation methods use
the exact denoiser (`analytic`) where the dataset has one and the suite's EDM run otherwise; a
method that starts from the teacher's weights (ECT) always takes the suite's EDM run; the others
train from data. A method that already has a finished run with the same resolved config is
skipped and a killed one is resumed, so an interrupted suite picks up where it stopped. The
report of the dataset closes the suite.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.app import runner
from bench.app.tracking import RunRecord, Tracker, mask_credentials, param_text
from bench.core.config import RunConfig, default_bench_files, flatten, resolve, to_dict
from bench.core.errors import BenchError, RunInterrupted, UsageError, unknown_name
from bench.data.datasets import GaussianMixture, describe_dataset
from methods import get_method, method_names, teacher_method
from reports.build import FORMATS, ReportOutput, build_report

ProgressFn = Callable[[int, int, float], None]
ProgressFactory = Callable[[], AbstractContextManager[ProgressFn]]
Reporter = Callable[[str], None]


@dataclass
class SuiteRun:
    """What happened to one method."""

    method: str
    status: str  # "ran", "resumed", "skipped" (finished before), "failed" or "not run"
    run_id: str = ""
    teacher: str = ""  # the teacher spec the run used ("none" for methods without one)
    seconds: float = 0.0  # wall time of this suite's work on the method
    error: str = ""


@dataclass
class SuiteOutcome:
    """The suite's runs and its report."""

    dataset: str
    runs: list[SuiteRun] = field(default_factory=list)
    report: ReportOutput | None = None
    seconds: float = 0.0

    def raise_for_failures(self) -> None:
        """One line naming the failed methods, when there are any."""
        failed = [r for r in self.runs if r.status in ("failed", "not run")]
        if failed:
            detail = "; ".join(f"{r.method}: {r.error}" for r in failed)
            raise BenchError(f"suite on {self.dataset}: {len(failed)} of {len(self.runs)} "
                             f"methods did not finish ({detail}); fix and re-run `bench suite`, "
                             f"finished runs are skipped")


def suite_order() -> list[str]:
    """Every registered method in the suite's order: the teacher first, then registration
    order."""
    teacher = teacher_method()
    return [teacher, *(m for m in method_names() if m != teacher)]


def parse_methods(text: str | None) -> list[str]:
    """'cd,edm' -> ['edm', 'cd'] (the suite's order); None -> every method in the suite;
    unknown names fail."""
    if text is None:
        return [m for m in suite_order() if get_method(m).in_suite]
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UsageError("--methods needs at least one method; `bench methods` lists them")
    for name in names:
        if name not in method_names():
            raise unknown_name("method", name, method_names())
    order = {m: i for i, m in enumerate(suite_order())}
    return sorted(dict.fromkeys(names), key=lambda m: order[m])


def split_sets(sets: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`--set k=v` for every run and `--set method:k=v` for one method (kept even when the
    method is not run this time, so one command line serves any --methods)."""
    common: list[str] = []
    per_method: dict[str, list[str]] = {}
    for item in sets:
        key = item.split("=", 1)[0]
        if ":" in key:
            method, rest = item.split(":", 1)
            method = method.strip()
            if method not in method_names():
                raise UsageError(f"--set {item!r}: {method!r} is not a method; valid: "
                                 f"{', '.join(sorted(method_names()))}")
            per_method.setdefault(method, []).append(rest)
        else:
            common.append(item)
    return common, per_method


def suite_config(dataset: str, method: str, teacher: str, sets: Sequence[str], cwd: Path,
                 ) -> tuple[RunConfig, str | None]:
    """The resolved config of one suite run (as `bench run` would resolve it) and the presets
    applied. The teacher is the value the run records: a spec, or 'none' without one."""
    resolved = resolve(bench_files=default_bench_files(cwd),
                       flags={"method": method, "dataset": dataset, "teacher": teacher},
                       sets=list(sets))
    return resolved.config, resolved.preset


def logged_params(cfg: RunConfig) -> dict[str, str]:
    """The params a run of this config logs."""
    return {k: mask_credentials(param_text(v))[:6000] for k, v in flatten(to_dict(cfg)).items()}


def matching_run(tracker: Tracker, cfg: RunConfig, status: str) -> RunRecord | None:
    """The newest run of this method with this status and exactly this resolved config."""
    expected = logged_params(cfg)
    runs = tracker.search(cfg.dataset, f"tags.method = '{cfg.method}' and "
                                       f"attributes.status = '{status}'")
    return next((r for r in runs if r.params == expected), None)


def newest_teacher(tracker: Tracker, dataset: str) -> str | None:
    """The id of the newest finished edm run on the dataset, if any."""
    runs = tracker.search(dataset, f"tags.method = '{teacher_method()}' and "
                                   "attributes.status = 'FINISHED'", max_results=1)
    return runs[0].run_id if runs else None


def check_suite(dataset: str, methods: Sequence[str], sets: Sequence[str], cwd: Path) -> None:
    """Every user error of a suite (dataset, methods, --set) before any store or training."""
    describe_dataset(dataset)
    common, per_method = split_sets(sets)
    for method in methods:
        suite_config(dataset, method, "none", [*common, *per_method.get(method, [])], cwd)


def seed_group(cfg: RunConfig) -> str:
    """What the runs of one method over several training seeds share: the first 16 hex digits
    of the SHA-256 of their logged config without the seed (the tag `seed_group`)."""
    params = {k: v for k, v in logged_params(cfg).items() if k != "seed"}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def run_suite(
    tracker: Tracker,
    dataset: str,
    methods: Sequence[str],
    sets: Sequence[str],
    cwd: Path,
    report: Reporter,
    progress: ProgressFactory | None = None,
    seeds: int = 1,
) -> SuiteOutcome:
    """Run (or skip, or resume) every method on the dataset, then write its report. With
    `seeds` > 1 every method trains that many times (training seeds seed, seed + 1, ...; each
    seed's distillation runs use that seed's teacher), the runs of a method tagged with one
    `seed_group`, and the report shows each number as the mean ± std over the seeds."""
    t0 = time.perf_counter()
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    check_suite(dataset, methods, sets, cwd)
    data = describe_dataset(dataset)
    has_analytic = isinstance(data, GaussianMixture)
    common, per_method = split_sets(sets)
    outcome = SuiteOutcome(data.name)
    total = len(methods) * seeds
    for k in range(seeds):
        teacher_run: str | None = None
        teacher_failed = False
        for i, method in enumerate(methods, 1):
            needs_teacher = get_method(method).needs_teacher
            if not needs_teacher:
                teacher = "none"
            elif has_analytic and not get_method(method).teacher_weights:
                teacher = "analytic"
            else:
                teacher = teacher_run or ("" if teacher_failed or k else
                                          newest_teacher(tracker, data.name) or "")
                if not teacher:
                    name = teacher_method()
                    why = (f"the {name} teacher did not finish" if teacher_failed or k else
                           f"no finished {name} run on {data.name}; add {name} to --methods")
                    outcome.runs.append(SuiteRun(method, "not run", error=why))
                    continue
            method_sets = [*common, *per_method.get(method, [])]
            cfg, preset = suite_config(data.name, method, teacher, method_sets, cwd)
            tags: dict[str, str] = {}
            if seeds > 1:
                cfg, preset = suite_config(data.name, method, teacher,
                                           [*method_sets, f"seed={cfg.seed + k}"], cwd)
                tags = {"seed_group": seed_group(cfg), "seed_index": str(k)}
            row = _run_one(tracker, cfg, preset, f"{k * len(methods) + i}/{total}", report,
                           progress, runner, tags)
            outcome.runs.append(row)
            if get_method(method).provides_teacher:
                teacher_run = row.run_id if row.status in ("ran", "resumed", "skipped") else None
                teacher_failed = teacher_run is None
    pinned: dict[tuple[str, str], list[str]] = {}
    for r in outcome.runs:
        if r.status in ("ran", "resumed", "skipped"):
            pinned.setdefault((data.name, r.method), []).append(r.run_id)
    if pinned:
        outcome.report = build_report(tracker, [data.name], "latest", list(FORMATS),
                                      tracker.runs_dir / "reports", pinned)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _run_one(tracker: Tracker, cfg: RunConfig, preset: str | None, position: str,
             report: Reporter, progress: ProgressFactory | None, runner: Any,
             tags: dict[str, str] | None = None) -> SuiteRun:
    """Skip, resume or start one run (with `tags` besides the contract's); failures are
    recorded, interrupts stop the suite. A finished run prints its result line."""
    method = cfg.method
    seed = f" (seed {cfg.seed})" if tags else ""
    finished = matching_run(tracker, cfg, "FINISHED")
    if finished is not None:
        report(f"suite {position}: {method}{seed} on {cfg.dataset} already finished "
               f"(run {finished.run_id}); skipped")
        if tags:
            tracker.set_tags(finished.run_id, tags)
        return SuiteRun(method, "skipped", finished.run_id, cfg.teacher)
    killed = matching_run(tracker, cfg, "KILLED")
    if killed is not None and tags:
        tracker.set_tags(killed.run_id, tags)
    report(f"suite {position}: {method}{seed} on {cfg.dataset}, teacher {cfg.teacher}"
           + (f", presets {preset}" if preset else "")
           + (f"; resuming killed run {killed.run_id}" if killed else ""))
    t0 = time.perf_counter()
    try:
        with progress() if progress is not None else nullcontext() as bar:
            if killed is not None:
                outcome = runner.resume(tracker, killed.run_id, report, bar)
            else:
                outcome = runner.start(cfg, tracker, report, bar, extra_tags=tags or None)
    except RunInterrupted as exc:
        raise RunInterrupted(f"{method}: {exc}, or re-run the same `bench suite` command, which "
                             "resumes it", signal=exc.signal) from None
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report(f"suite {position}: {method} failed: {message}")
        return SuiteRun(method, "failed", killed.run_id if killed else "", cfg.teacher,
                        time.perf_counter() - t0, message)
    line = result_line(outcome.results, outcome.primary_metric)
    if line:
        report(f"{method}{seed}: {line}")
    return SuiteRun(method, "resumed" if killed else "ran", outcome.run_id, cfg.teacher,
                    time.perf_counter() - t0)


def result_line(results: Sequence[Any], metric: str) -> str:
    """'w2@1 0.058 @2 0.040' (± the spread over evaluation seed sets where measured)."""
    parts: list[str] = []
    for r in sorted(results, key=lambda r: r.nfe_measured):
        if metric not in r.metrics:
            continue
        std = r.spread().get(f"{metric}_seeds_std")
        value = f"{r.metrics[metric]:.4g}" + (f" ± {std:.2g}" if std is not None else "")
        parts.append(f"{metric if not parts else ''}@{r.nfe_measured} {value}")
    return " ".join(parts)


def summary_table(outcome: SuiteOutcome) -> Any:
    """A rich table of what the suite did."""
    from rich.table import Table

    table = Table(title=f"suite on {outcome.dataset} ({outcome.seconds:.0f} s)")
    for col in ("method", "status", "run", "teacher", "seconds"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for r in outcome.runs:
        status = r.status if not r.error else f"{r.status}: {r.error}"
        table.add_row(r.method, status, r.run_id or "-", r.teacher or "-",
                      f"{r.seconds:.1f}" if r.status in ("ran", "resumed", "failed") else "-")
    return table
