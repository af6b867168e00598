"""`bench perf --scaling`: whether cost grows no faster than the work.

- eval: one evaluation of a digits CD model at NFE 1 (the digits UNet, the Frechet classifier
  distance) at 1k, 10k and 50k samples, each in a fresh child process after a warm-up evaluation
  of the same size: seconds of `evaluate`, the process's peak resident memory during it (VmHWM,
  reset before it) and that peak above the resident memory before it (samples stream into the
  metrics, so both must stay flat).
- train: a `bench run` of CT on gmm8 for 10k iterations (logging to its MLflow store, with
  checkpoints), its resident memory sampled from outside every 0.25 s: the peak over each tenth
  of the run, so that growth shows.
- store: the tracking store with 10, 100 and 1,000 runs in it, each a copy through MLflow's API
  of a real short `bench run` (its params, tags, every metric point and its artifacts): the
  size of mlflow.db and of the artifact folder, and the wall time of `bench report` on it.
- sweep: `bench sweep` of 100 cheap CT trials with 2 workers against 100 times the wall time of
  one trial (a 1-trial sweep), and the disk the sweep leaves.

Each figure comes from real commands on this machine; a busy machine slows them all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Report = Callable[[str], None]

EVAL_COUNTS = (1000, 10000, 50000)
STORE_COUNTS = (10, 100, 1000)
TRAIN_STEPS = 10000
SWEEP_TRIALS = 100
CHEAP = ["--set", "train.steps=20", "--set", "train.batch_size=64", "--set",
         "eval.num_samples=200", "--set", "train.log_every=10", "--set",
         "train.checkpoint_every=0"]


def _bench(args: list[str], cwd: Path, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench {' '.join(args[:3])} failed: {last}")
    return out


def folder_bytes(path: Path) -> int:
    """Bytes of every file under path (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# --- evaluation ---------------------------------------------------------------------------------


def eval_child(count: int) -> dict[str, float]:
    """In a child process: one evaluation of `count` digits samples at NFE 1 (random-weights
    CD student; the cost does not depend on the weights); seconds and peak memory above the
    memory before it."""
    import torch

    import methods  # noqa: F401  (the registry)
    from bench.core.config import resolve
    from bench.core.memory import reset_peak_rss, status_kib
    from bench.data.datasets import get_dataset
    from bench.engine.evaluation import evaluate, prepare_metrics
    from bench.perf.doctor import _build

    torch.manual_seed(0)
    device = torch.device("cpu")
    cfg = resolve(bench_files=[], flags={"method": "cd", "dataset": "digits"},
                  sets=["device=cpu", "eval.nfe=[1]", f"eval.num_samples={count}",
                        "eval.batch_size=500"]).config
    dataset = get_dataset("digits")
    method = _build("cd", cfg, dataset, device)
    with tempfile.TemporaryDirectory() as cache:
        suite = prepare_metrics(dataset, cfg, Path(cache))
        evaluate(method, None, dataset, cfg, [1], suite, device)  # warm-up at the same size
        import gc

        gc.collect()
        reset_peak_rss()
        before = status_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        results = evaluate(method, None, dataset, cfg, [1], suite, device)
        seconds = time.perf_counter() - t0
        peak = status_kib("VmHWM") * 1024
    return {"samples": count, "seconds": seconds, "peak_above_bytes": peak - before,
            "peak_bytes": peak, "metric": float(results[0].metrics[dataset.primary_metric])}


def eval_scaling(report: Report) -> list[Row]:
    """eval_child at each of EVAL_COUNTS, each in a fresh process."""
    rows = []
    for count in EVAL_COUNTS:
        report(f"evaluation at {count} samples")
        out = subprocess.run([sys.executable, "-m", "bench.perf.scaling", "eval-child",
                              str(count)], capture_output=True, text=True, timeout=3600,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"evaluation at {count} samples failed: "
                               f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
        rows.append({"figure": "eval", **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


# --- training -----------------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def train_memory(report: Report, folder: Path) -> Row:
    """Resident memory of a 10k-iteration `bench run`, sampled from outside: the peak of each
    tenth of the run's wall time."""
    report(f"a {TRAIN_STEPS}-iteration run, its memory sampled every 0.25 s")
    args = [sys.executable, "-m", "bench", "run", "--method", "ct", "--dataset", "gmm8",
            "--steps", str(TRAIN_STEPS), "--nfe", "1", "--set", "train.checkpoint_every=1000",
            "--set", "eval.num_samples=1000"]
    proc = subprocess.Popen(args, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    while proc.poll() is None:
        rss = _rss_bytes(proc.pid)
        if rss is not None:
            samples.append((time.perf_counter() - t0, rss))
        time.sleep(0.25)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the training run failed: {(err.strip().splitlines() or ['?'])[-1]}")
    wall = time.perf_counter() - t0
    tenths = [max((r for t, r in samples if k * wall / 10 <= t < (k + 1) * wall / 10),
                  default=0) for k in range(10)]
    return {"figure": "train", "iterations": TRAIN_STEPS, "seconds": wall,
            "peak_bytes_per_tenth": tenths, "samples": len(samples)}


# --- the tracking store -------------------------------------------------------------------------


def _copy_run(client: Any, source: Any, experiment_id: str, artifacts: Path, k: int) -> None:
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(experiment_id, run_name=f"{source.info.run_name}-copy{k}",
                            tags={key: value for key, value in source.data.tags.items()
                                  if not key.startswith("mlflow.")})
    params = [Param(key, value) for key, value in source.data.params.items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    points = [Metric(key, m.value, m.timestamp, m.step)
              for key in source.data.metrics
              for m in client.get_metric_history(source.info.run_id, key)]
    for start in range(0, len(points), 1000):
        client.log_batch(run.info.run_id, metrics=points[start:start + 1000])
    client.log_batch(run.info.run_id, tags=[RunTag("copy_of", source.info.run_id)])
    client.log_artifacts(run.info.run_id, str(artifacts))
    client.set_terminated(run.info.run_id, "FINISHED")


def store_scaling(report: Report, folder: Path) -> list[Row]:
    """The store's size and `bench report`'s time with STORE_COUNTS runs in it."""
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    report("a real short run to copy")
    _bench(["run", "--method", "ct", "--dataset", "gmm8", "--steps", "200", "--nfe", "1,2",
            "--set", "train.log_every=10", "--set", "train.checkpoint_every=100"], folder)
    runs = folder / "runs"
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gmm8")
    if experiment is None:
        raise RuntimeError("the short run left no gmm8 experiment")
    source = client.search_runs([experiment.experiment_id])[0]
    artifacts = Path(client.download_artifacts(source.info.run_id, "", str(folder / "source")))
    rows = []
    have = 1
    for count in STORE_COUNTS:
        report(f"the store with {count} runs")
        for k in range(have, count):
            _copy_run(client, source, experiment.experiment_id, artifacts, k)
        have = count
        t0 = time.perf_counter()
        _bench(["report", "--dataset", "gmm8", "--out", str(folder / f"report-{count}")],
               folder)
        seconds = time.perf_counter() - t0
        rows.append({"figure": "store", "runs": count, "report_seconds": seconds,
                     "db_bytes": (runs / "mlflow.db").stat().st_size,
                     "artifact_bytes": folder_bytes(runs / "mlartifacts")
                     if (runs / "mlartifacts").is_dir() else folder_bytes(runs)})
    return rows


# --- a sweep ------------------------------------------------------------------------------------


def sweep_scaling(report: Report, folder: Path) -> Row:
    """A 100-trial sweep with 2 workers vs 100 times a 1-trial sweep, and its disk."""
    base = ["sweep", "--method", "ct", "--dataset", "gmm8", "--space", "ct-schedule",
            "--pruner", "none", *CHEAP]
    one = folder / "one"
    one.mkdir()
    report("one trial")
    t0 = time.perf_counter()
    _bench([*base, "--trials", "1", "--study", "one"], one)
    single = time.perf_counter() - t0
    many = folder / "many"
    many.mkdir()
    report(f"{SWEEP_TRIALS} trials, 2 workers")
    t0 = time.perf_counter()
    _bench([*base, "--trials", str(SWEEP_TRIALS), "--workers", "2", "--study", "many"], many,
           timeout=7200)
    wall = time.perf_counter() - t0
    return {"figure": "sweep", "trials": SWEEP_TRIALS, "workers": 2, "seconds": wall,
            "one_trial_seconds": single, "ratio_to_serial": wall / (SWEEP_TRIALS * single),
            "disk_bytes": folder_bytes(many / "runs"),
            "disk_bytes_per_trial": folder_bytes(many / "runs") / SWEEP_TRIALS}


# --- all of it ----------------------------------------------------------------------------------


def run_scaling(report: Report, parts: tuple[str, ...] = ("eval", "train", "store", "sweep"),
                ) -> list[Row]:
    """Every measurement, in temporary folders."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        root = Path(tmp)
        if "eval" in parts:
            rows.extend(eval_scaling(report))
        if "train" in parts:
            (root / "train").mkdir()
            rows.append(train_memory(report, root / "train"))
        if "store" in parts:
            (root / "store").mkdir()
            rows.extend(store_scaling(report, root / "store"))
        if "sweep" in parts:
            (root / "sweep").mkdir()
            rows.append(sweep_scaling(report, root / "sweep"))
        shutil.rmtree(root, ignore_errors=True)
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_scaling(rows: list[Row], console: Any) -> None:
    """The measurements as rich tables."""
    from rich import box
    from rich.table import Table

    evals = [r for r in rows if r["figure"] == "eval"]
    if evals:
        table = Table(title="evaluation (digits, NFE 1)", box=box.SIMPLE)
        for col in ("samples", "seconds", "peak RSS", "vs the smallest", "peak above start"):
            table.add_column(col, justify="right")
        for r in evals:
            table.add_row(f"{r['samples']:,}", f"{r['seconds']:.1f}", _mib(r["peak_bytes"]),
                          f"{r['peak_bytes'] / max(evals[0]['peak_bytes'], 1):.3f}",
                          _mib(r["peak_above_bytes"]))
        console.print(table)
    for r in (r for r in rows if r["figure"] == "train"):
        tenths = ", ".join(f"{b / 2**20:.0f}" for b in r["peak_bytes_per_tenth"])
        console.print(f"training, {r['iterations']:,} iterations in {r['seconds']:.0f} s: peak "
                      f"resident MiB per tenth of the run: {tenths}")
    stores = [r for r in rows if r["figure"] == "store"]
    if stores:
        table = Table(title="tracking store", box=box.SIMPLE)
        for col in ("runs", "mlflow.db", "artifacts", "bench report"):
            table.add_column(col, justify="right")
        for r in stores:
            table.add_row(f"{r['runs']:,}", _mib(r["db_bytes"]), _mib(r["artifact_bytes"]),
                          f"{r['report_seconds']:.1f} s")
        console.print(table)
    for r in (r for r in rows if r["figure"] == "sweep"):
        console.print(f"sweep: {r['trials']} trials, {r['workers']} workers in "
                      f"{r['seconds']:.0f} s; one trial {r['one_trial_seconds']:.1f} s, x "
                      f"{r['trials']} = {r['one_trial_seconds'] * r['trials']:.0f} s (ratio "
                      f"{r['ratio_to_serial']:.2f}); disk {_mib(r['disk_bytes'])} "
                      f"({_mib(r['disk_bytes_per_trial'])} per trial)")


if __name__ == "__main__" and sys.argv[1:2] == ["eval-child"]:
    from bench.core.memory import configure_malloc

    configure_malloc()  # as the bench command does
    print(json.dumps(eval_child(int(sys.argv[2]))))
