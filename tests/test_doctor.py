"""`bench doctor`: its checks on this CPU (training on the paper networks, DDP over gloo, the
metric weights) through the real code, its table and JSON, and that it needs neither MLflow nor
Optuna (the GPU machines it is meant for may lack them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.perf.doctor import CIFAR10, DoctorOptions, ddp_check, train_check, weight_checks
from tests.conftest import bench_env

CPU = torch.device("cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_jvp_method_trains_on_its_paper_network(precision: str) -> None:
    """sCT's iteration on NCSN++ (the CIFAR-10 preset's network) through the real loop, in
    bf16 too (its JVP under autocast once failed in the first convolution after a norm)."""
    row = train_check("sct", CIFAR10, precision, DoctorOptions(CPU, iterations=2, batch=2))
    assert row.status == "ok", row.detail
    assert row.values["net"] == "ncsnpp" and row.values["parameters"] > 50_000_000
    assert row.images_per_second and row.images_per_second > 0
    assert row.values["loss_last"] == pytest.approx(row.values["loss_last"])  # finite


def test_fp16_on_the_cpu_is_skipped_with_the_reason() -> None:
    row = train_check("ict", CIFAR10, "fp16", DoctorOptions(CPU))
    assert row.status == "skip" and "needs CUDA" in row.detail


def test_ddp_over_gloo_averages_the_gradients_of_two_processes() -> None:
    row = ddp_check(CPU)
    assert row.status == "ok", row.detail
    assert row.values["world_size"] == 2 and row.values["spread"] == 0.0
    assert row.values["error"] < 1e-6


def test_missing_weights_say_where_to_put_them(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    rows = {r.subject: r for r in weight_checks()}
    vgg = rows["VGG16 (LPIPS)"]
    assert vgg.status == "missing" and str(tmp_path / "hub") in vgg.detail
    fidelity = rows["Inception-v3 (torch-fidelity)"]
    assert fidelity.status == "missing" and "download https://" in fidelity.detail
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"weights")
    assert {r.subject: r for r in weight_checks()}["VGG16 (LPIPS)"].status == "ok"


def test_the_command_writes_its_table_and_json_without_mlflow_or_optuna(tmp_path: Path) -> None:
    code = ("import sys\n"
            "from bench.cli.main import main\n"
            "code = 0\ntry:\n"
            "    main(sys.argv[1:])\n"
            "except SystemExit as exc:\n"
            "    code = exc.code\n"
            "print('loaded:', sorted(m for m in ('mlflow', 'optuna') if m in sys.modules))\n"
            "sys.exit(code)\n")
    out = subprocess.run([sys.executable, "-c", code, "doctor", "--only", "train,ddp,weights",
                          "--method", "ict", "--iterations", "1", "--json", "doctor.json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=bench_env({"COLUMNS": "200"}))
    assert out.returncode == 0, out.stderr
    assert "loaded: []" in out.stdout
    assert "bench doctor on cpu" in out.stdout and "CPU subset" in out.stdout
    document = json.loads((tmp_path / "doctor.json").read_text())
    rows = {(r["group"], r["subject"], r["precision"]): r for r in document["rows"]}
    assert rows[("train", "ict / cifar10 net", "fp32")]["status"] == "ok"
    assert rows[("train", "ict / cifar10 net", "bf16")]["status"] == "ok"
    assert rows[("train", "ict / cifar10 net", "fp16")]["status"] == "skip"
    assert rows[("ddp", "gloo", "")]["status"] == "ok"
    assert {r["group"] for r in document["rows"]} == {"device", "train", "ddp", "weights"}
    bad = subprocess.run([sys.executable, "-m", "bench", "doctor", "--only", "gpu"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=bench_env())
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "groups are train, sample, ddp, weights" in bad.stderr


@pytest.mark.slow  # torch.compile's first call takes ~25 s on 2 cores
def test_the_whole_cpu_check_with_the_compiled_sampler(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "doctor", "--method", "cd",
                          "--iterations", "1", "--json", "doctor.json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=bench_env())
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "doctor.json").read_text())["rows"]
    samples = [r for r in rows if r["group"] == "sample"]
    assert [r["status"] for r in samples] == ["ok", "ok"]
    assert all(r["values"]["max_abs_diff"] <= 1e-3 for r in samples)
