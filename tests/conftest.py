"""Shared fixtures: real subprocesses for the CLI, a real MLflow sqlite store in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_bench(args: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    """Run `python -m bench ARGS` in cwd and capture its output."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env, check=False)


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
