"""`bench perf --scaling`'s measurements through their real commands, at small sizes (the
figures themselves come from a full run on a quiet machine; no timing is asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.core.memory import fixed_malloc_thresholds, one_malloc_arena
from bench.perf import scaling
from tests.conftest import bench_env


def test_one_malloc_arena_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux's")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert one_malloc_arena() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert one_malloc_arena() is True


def test_fixed_malloc_thresholds_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux's")
    for name, value in (("MALLOC_TRIM_THRESHOLD_", "131072"),
                        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")):
        monkeypatch.setenv(name, value)
        assert fixed_malloc_thresholds() is False
        monkeypatch.delenv(name)
    assert fixed_malloc_thresholds() is True


SAMPLING_FAULTS = """
import resource, sys, torch
from bench.core.memory import fixed_malloc_thresholds
from bench.perf.run import _case, _sampling_method
if sys.argv[1] == "fixed":
    assert fixed_malloc_thresholds()
case = _case("unet16-c32")
method, cfg = _sampling_method(case, torch.device("cpu"))
model = method.evaluation_model(None, 1).eval()
x = torch.randn(32, *case.dataset.shape) * 80.0
sigma = torch.full((32,), 80.0)
def once():
    with torch.inference_mode():
        model(x, sigma)
once(); once()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def test_fixed_thresholds_keep_sampling_pages_mapped_between_calls() -> None:
    """Calls of a 16x16 UNet at batch 32 without autograd, as sampling makes them, three after
    two of warm-up: under glibc's sliding thresholds each call faults its activations in again,
    under fixed ones they stay mapped."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux's")
    env = {k: v for k, v in bench_env().items() if not k.startswith("MALLOC_")}
    faults = {}
    for mode in ("sliding", "fixed"):
        out = subprocess.run([sys.executable, "-c", SAMPLING_FAULTS, mode], capture_output=True,
                             text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        faults[mode] = int(out.stdout.strip().splitlines()[-1])
    assert faults["sliding"] > 1000  # megabytes of activations per call
    assert faults["fixed"] < faults["sliding"] / 10, faults


def test_folder_bytes_counts_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 1000)
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c").write_bytes(b"y" * 24)
    assert scaling.folder_bytes(tmp_path) == 1024


def test_an_evaluation_child_reports_its_time_and_memory() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.perf.scaling", "eval-child", "600"],
                         capture_output=True, text=True, timeout=300, env=bench_env())
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["samples"] == 600 and row["seconds"] > 0
    assert 0 < row["peak_above_bytes"] < row["peak_bytes"]
    assert row["metric"] > 0  # the Frechet classifier distance of an untrained model


def test_the_store_grows_by_copies_of_a_real_run(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(scaling, "STORE_COUNTS", (2, 3))
    rows = scaling.store_scaling(lambda line: None, tmp_path)
    assert [r["runs"] for r in rows] == [2, 3]
    assert rows[1]["db_bytes"] >= rows[0]["db_bytes"] > 0
    assert rows[1]["artifact_bytes"] > rows[0]["artifact_bytes"] > 0
    assert all(r["report_seconds"] > 0 for r in rows)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gmm8").experiment_id])
    assert len(runs) == 3
    source = next(r for r in runs if "copy_of" not in r.data.tags)
    for copy in (r for r in runs if "copy_of" in r.data.tags):
        assert copy.data.params == source.data.params
        assert copy.data.metrics == source.data.metrics and copy.info.status == "FINISHED"
        assert (len(client.get_metric_history(copy.info.run_id, "train/loss"))
                == len(client.get_metric_history(source.info.run_id, "train/loss")))
    assert (tmp_path / "report-3" / "report.html").is_file() or list(
        (tmp_path / "report-3").iterdir())


@pytest.mark.slow
def test_the_whole_scaling_command_at_small_sizes(tmp_path: Path) -> None:
    code = ("import sys\n"
            "import bench.perf.scaling as s\n"
            "s.EVAL_COUNTS = (500, 1000); s.STORE_COUNTS = (2, 3); s.SWEEP_TRIALS = 3\n"
            "s.TRAIN_STEPS = 200\n"
            "from bench.cli.main import main\n"
            "main(['perf', '--scaling', 'all', '--out', 'scaling.json'])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=1200, env=bench_env())
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert [r["figure"] for r in rows] == ["eval", "eval", "train", "store", "store", "sweep"]
    assert rows[-1]["trials"] == 3 and rows[-1]["disk_bytes"] > 0
