"""Read finished runs from the tracking store into polars frames and pick one run per
(dataset, method).

Only the tracking contract is used (../shared/DESIGN.md, section 5): one experiment per dataset,
tags `method`, `dataset`, `teacher`, params = the resolved config, evaluation metrics logged
with step = measured NFE. A metric logged twice at one NFE (`bench eval` again) counts with its
newest value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from bench.app.protocol import comparable, logged_protocol, seed_count
from bench.app.tracking import RunRecord, Tracker, mask_credentials
from bench.core.errors import BenchError, UsageError
from bench.data.datasets import FOLDER_PREFIX, POINTS_PREFIX, dataset_names, describe_dataset
from bench.engine.evaluation import LOWER_IS_BETTER
from bench.metrics.base import BOOT_HIGH, BOOT_LOW
from methods import method_names

Select = Literal["best", "latest"]
SELECTS: tuple[Select, ...] = ("best", "latest")
EVAL_METRICS = tuple(LOWER_IS_BETTER)  # evaluation metrics a report can show
EXTRA_METRICS = ("seconds_per_sample",)  # read for the CSV, never bold
# one row per (run, nfe, metric): seed is the run's training seed; the value is the mean over
# the evaluation's seed sets (the value itself with one set), std their sample standard
# deviation (null with one set), seeds their count, low/high a 95% bootstrap interval over the
# generated points (2-D data with eval.bootstrap and one seed set; else null), protocol what
# the number is comparable under (bench.app.protocol.comparable)
RESULT_SCHEMA = {"dataset": pl.String, "method": pl.String, "run_id": pl.String,
                 "seed": pl.Int64, "nfe": pl.Int64, "metric": pl.String, "value": pl.Float64,
                 "std": pl.Float64, "seeds": pl.Int64, "low": pl.Float64, "high": pl.Float64,
                 "protocol": pl.String}


@dataclass(frozen=True)
class RunInfo:
    """A selected run: what a table row needs besides the numbers."""

    run_id: str
    dataset: str
    method: str
    teacher: str  # tag `teacher`: run id, checkpoint path, "analytic" or "none"
    sampler: str  # param `sampler` ("" = the method's default)
    start_time: int
    artifact_dir: Path | None  # local artifact folder, None for a remote artifact store


@dataclass
class Selection:
    """The chosen runs of each dataset and their evaluation numbers."""

    select: Select
    runs: dict[tuple[str, str], RunInfo]  # (dataset, method) -> run
    results: pl.DataFrame  # RESULT_SCHEMA, one row per (dataset, method, nfe, metric)
    primary: dict[str, str]  # dataset -> primary metric


def check_select(text: str) -> Select:
    """'best' or 'latest'; anything else is a usage error."""
    for select in SELECTS:
        if text == select:
            return select
    raise UsageError(f"--select must be one of {', '.join(SELECTS)}, got {text!r}")


def primary_metric(dataset: str) -> str:
    """The dataset's primary metric (w2, fcd or fid), from its registered class."""
    return describe_dataset(dataset).primary_metric


def check_dataset_name(name: str) -> None:
    """An unknown dataset name is a one-line usage error listing the valid ones."""
    if name == FOLDER_PREFIX:
        raise UsageError("folder: needs a path, e.g. --dataset folder:/data/my_images")
    if name == POINTS_PREFIX:
        raise UsageError("points: needs a file, e.g. --dataset points:/data/points.npy")
    describe_dataset(name)


def _is_bench_run(record: RunRecord, dataset: str, methods: set[str]) -> bool:
    """A run of a method on the dataset; not a sweep's own run (it logs each trial's objective
    values against the trial number, not results against the NFE), nor a run trained with
    evaluation off that no `bench eval` has evaluated since (tag `evaluation` = off)."""
    return (record.tags.get("dataset") == dataset and record.tags.get("method") in methods
            and record.tags.get("sweep") != "true" and record.tags.get("evaluation") != "off")


def candidate_runs(tracker: Tracker, datasets: Iterable[str] | None) -> dict[str, list[RunRecord]]:
    """dataset -> its finished bench runs (newest first); all datasets with runs when None."""
    methods = set(method_names())
    if datasets is None:
        names = [n for n in tracker.experiment_names()
                 if n in dataset_names() or n.startswith((FOLDER_PREFIX, POINTS_PREFIX))]
    else:
        names = list(dict.fromkeys(datasets))
    out: dict[str, list[RunRecord]] = {}
    for name in names:
        runs = [r for r in tracker.finished_runs(name) if _is_bench_run(r, name, methods)]
        if runs or datasets is not None:
            out[name] = runs
    return out


def _newest_points(tracker: Tracker, record: RunRecord, key: str) -> dict[int, float]:
    """step -> the newest value of a metric (a re-evaluated NFE counts with its newest)."""
    newest: dict[int, tuple[int, float]] = {}
    if key not in record.metric_keys:
        return {}
    for point in tracker.metric_points(record.run_id, key):
        kept = newest.get(point.step)
        if kept is None or point.timestamp >= kept[0]:
            newest[point.step] = (point.timestamp, point.value)
    return {step: value for step, (_, value) in newest.items()}


def eval_results(tracker: Tracker, record: RunRecord, metrics: Iterable[str]) -> pl.DataFrame:
    """The run's evaluation numbers: one row per (nfe, metric), newest value per NFE, with the
    spread over seed sets and the protocol the NFE was evaluated under."""
    rows: list[dict[str, object]] = []
    dataset = record.tags["dataset"]
    points = describe_dataset(dataset).kind == "points"
    protocols: dict[int, dict[str, object]] = {}
    seed_text = record.params.get("seed", "")
    seed = int(seed_text) if seed_text.isdigit() else None
    for key in metrics:
        values = _newest_points(tracker, record, key)
        if not values:
            continue
        stds = _newest_points(tracker, record, f"{key}_seeds_std")
        lows = _newest_points(tracker, record, f"{key}{BOOT_LOW}")
        highs = _newest_points(tracker, record, f"{key}{BOOT_HIGH}")
        for step, value in values.items():
            if step not in protocols:
                protocols[step] = logged_protocol(record.tags, record.params, step, points,
                                                  dataset == "digits")
            protocol = protocols[step]
            seeds = seed_count(protocol)
            rows.append({"dataset": dataset, "method": record.tags["method"],
                         "run_id": record.run_id, "seed": seed, "nfe": step, "metric": key,
                         "value": value,
                         "std": stds.get(step) if seeds > 1 else None, "seeds": seeds,
                         "low": lows.get(step) if seeds == 1 else None,
                         "high": highs.get(step) if seeds == 1 else None,
                         "protocol": comparable(protocol)})
    return pl.DataFrame(rows, schema=RESULT_SCHEMA)


def _run_info(record: RunRecord) -> RunInfo:
    return RunInfo(
        run_id=record.run_id,
        dataset=record.tags["dataset"],
        method=record.tags["method"],
        teacher=record.tags.get("teacher", "none"),
        sampler=record.params.get("sampler", ""),
        start_time=record.start_time,
        artifact_dir=record.local_artifact_dir,
    )


def _is_nested(record: RunRecord) -> bool:
    """A sweep's trial (a run with a parent run)."""
    return "mlflow.parentRunId" in record.tags


def _newest(records: list[RunRecord]) -> RunRecord:
    return max(records, key=lambda r: (r.start_time, r.run_id))


def _best(tracker: Tracker, records: list[RunRecord], primary: str) -> RunRecord:
    """The run with the best primary metric at the smallest NFE every candidate evaluated
    (without a shared NFE: at each run's own best NFE); ties go to the newest run."""
    if len(records) == 1:
        return records[0]
    frames = [eval_results(tracker, r, [primary]) for r in records]
    values = pl.concat(frames) if frames else pl.DataFrame(schema=RESULT_SCHEMA)
    if values.is_empty():
        return _newest(records)
    lower = LOWER_IS_BETTER.get(primary, True)
    with_primary = values["run_id"].unique().to_list()
    shared = (values.group_by("nfe").agg(pl.col("run_id").n_unique().alias("runs"))
              .filter(pl.col("runs") == len(with_primary))["nfe"].sort())
    if len(shared):
        scores = values.filter(pl.col("nfe") == shared[0]).select("run_id", "value")
    else:
        agg = pl.col("value").min() if lower else pl.col("value").max()
        scores = values.group_by("run_id").agg(agg.alias("value"))
    by_id = {r.run_id: r for r in records}
    ranked = sorted(scores.iter_rows(), key=lambda row: (
        row[1] if lower else -row[1], -by_id[row[0]].start_time, row[0]))
    return by_id[ranked[0][0]]


def _seed_members(records: list[RunRecord], chosen: RunRecord) -> list[RunRecord]:
    """The chosen run and, when it is one of several training seeds (tag `seed_group`), the
    newest finished run of each other seed of its group."""
    group = chosen.tags.get("seed_group")
    if not group:
        return [chosen]
    by_seed: dict[str, RunRecord] = {chosen.params.get("seed", ""): chosen}
    for record in sorted(records, key=lambda r: (r.start_time, r.run_id), reverse=True):
        if record.tags.get("seed_group") == group and not _is_nested(record):
            by_seed.setdefault(record.params.get("seed", ""), record)
    return [chosen, *(r for r in by_seed.values() if r is not chosen)]


def select_runs(
    tracker: Tracker,
    datasets: Iterable[str] | None = None,
    select: Select = "latest",
    pinned: Mapping[tuple[str, str], str | Sequence[str]] | None = None,
) -> Selection:
    """One finished run per (dataset, method): the pinned run id, else `latest` (the newest
    run that is not a sweep trial, if there is one) or `best` (every run, trials included).
    Several training seeds of one method count together: pinned as several ids, or with
    `latest` every finished run sharing the chosen run's `seed_group` tag (the newest of each
    seed); the results then hold the rows of each of them."""
    select = check_select(select)
    requested = None if datasets is None else list(datasets)
    for name in requested or []:
        check_dataset_name(name)
    candidates = candidate_runs(tracker, requested)
    store = mask_credentials(tracker.uri)
    if not any(candidates.values()):
        where = f" for {', '.join(requested)}" if requested else ""
        raise BenchError(f"no finished runs{where} in the store {store}; start with "
                         f"`bench suite --dataset gmm8`")
    empty = [name for name, runs in candidates.items() if not runs]
    if empty:
        raise BenchError(f"no finished runs for {', '.join(empty)} in the store {store}")
    runs: dict[tuple[str, str], RunInfo] = {}
    frames: list[pl.DataFrame] = []
    primary: dict[str, str] = {}
    for dataset in sorted(candidates):
        primary[dataset] = primary_metric(dataset)
        by_method: dict[str, list[RunRecord]] = {}
        for record in candidates[dataset]:
            by_method.setdefault(record.tags["method"], []).append(record)
        for method in sorted(by_method):
            records = by_method[method]
            pin = (pinned or {}).get((dataset, method))
            ids = [pin] if isinstance(pin, str) else list(pin or [])
            members = [r for i in ids for r in records if r.run_id == i]
            chosen = members[0] if members else None
            if chosen is None and select == "latest":
                chosen = _newest([r for r in records if not _is_nested(r)] or records)
                members = _seed_members(records, chosen)
            elif chosen is None:
                chosen = _best(tracker, records, primary[dataset])
                members = [chosen]
            runs[(dataset, method)] = _run_info(chosen)
            frames += [eval_results(tracker, r, (*EVAL_METRICS, *EXTRA_METRICS))
                       for r in members]
    results = pl.concat(frames).sort("dataset", "method", "nfe", "metric")
    return Selection(select, runs, results, primary)
