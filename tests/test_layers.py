"""The layer contract (pyproject.toml, [tool.importlinter]): every import points down, and the
check really fails when a forbidden import is added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("bench", "methods", "sweeps", "reports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the packages under root with the repository's contracts."""
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(exe), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, check=False)


def test_layer_contract_kept() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_forbidden_import_breaks_the_contract(tmp_path: Path) -> None:
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "bench" / "core" / "config.py"
    config.write_text(config.read_text() + "\nfrom bench.engine import training  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "bench.core is not allowed to import bench.engine" in result.stdout
    assert "bench.core.config -> bench.engine.training" in result.stdout
