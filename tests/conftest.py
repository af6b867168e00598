"""Shared fixtures: real subprocesses for the CLI, a real MLflow sqlite store in tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each of K workers (and the bench processes it starts) gets
    CPUs / K threads unless OMP_NUM_THREADS is set: K workers of CPUs threads each would
    oversubscribe the cores many times over."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def bench_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a bench subprocess: no MLFLOW_TRACKING_URI of the caller, and the
    bench of this checkout on PYTHONPATH (not an installed one)."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [full_env.get("PYTHONPATH")])])
    return full_env


def run_bench(args: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    """Run `python -m bench ARGS` in cwd and capture its output."""
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=bench_env(env), check=False)


@pytest.fixture
def bench(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """A `bench` runner whose working directory (and so runs/) is a fresh tmp folder."""

    def call(*args: str, timeout: float = 600, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
        return run_bench(list(args), tmp_path, timeout, env)

    return call


def run_id_of(output: str) -> str:
    """The run id printed at the end of a command."""
    for line in reversed(output.splitlines()):
        if line.startswith("run id: "):
            return line.split()[2]
    raise AssertionError(f"no run id in output:\n{output}")


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store created once (its schema migrations take seconds); copy it."""
    from bench.app.tracking import Tracker

    runs = tmp_path_factory.mktemp("template") / "runs"
    Tracker(f"sqlite:///{runs / 'mlflow.db'}", runs)
    return runs / "mlflow.db"


@pytest.fixture
def workdir(tmp_path: Path, empty_store: Path) -> Callable[[str], Path]:
    """workdir(name): a fresh working folder whose runs/ holds a copy of the empty store."""

    def make(name: str) -> Path:
        folder = tmp_path / name
        (folder / "runs").mkdir(parents=True)
        shutil.copy(empty_store, folder / "runs" / "mlflow.db")
        return folder

    return make
