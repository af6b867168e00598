"""Bad input across commands, in real processes: each ends in one line on stderr, exit 2 for
usage errors and 1 for the rest, no traceback. Commands that fail before torch and mlflow are
imported run by default; the others (about 10 s each) with -m slow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.core.config import RunConfig
from bench.core.errors import resource_exhausted
from bench.data.datasets import gmm8
from bench.engine.checkpoint import save_checkpoint
from bench.engine.models import denoiser_from_spec, model_spec
from tests.conftest import run_bench
from tests.test_cli import assert_one_line_error

CT = ["run", "--method", "ct", "--dataset", "gmm8"]
SWEEP = ["sweep", "--method", "ct", "--dataset", "gmm8", "--space", "ct-lr", "--trials", "1"]

# (args, bench.toml text (or bytes) or None, exit code, fragments of the line); {d} is the
# test folder
FAST = {
    "unknown command": (["frobnicate"], None, 2, ["No such command"]),
    "--steps not a number": ([*CT, "--steps", "abc"], None, 2, ["--steps"]),
    "missing --run": (["eval"], None, 2, ["--run"]),
    "sample --nfe 0": (["sample", "--run", "0" * 32, "--nfe", "0", "--n", "1", "--out", "x.npz"],
                       None, 2, ["--nfe"]),
    "ui --port 70000": (["ui", "--port", "70000"], None, 2, ["--port"]),
    "sweep --trials 0": ([*SWEEP[:-1], "0"], None, 2, ["--trials"]),
    "--set without =": ([*CT, "--set", "train.lr"], None, 2, ["key=value"]),
    "--set negative lr": ([*CT, "--set", "train.lr=-1"], None, 2, ["train.lr must be > 0"]),
    "--set float for int": ([*CT, "--set", "train.steps=1.5"], None, 2, ["train.steps", "int"]),
    "--set bad nonfinite": ([*CT, "--set", "train.nonfinite=maybe"], None, 2,
                            ["train.nonfinite must be stop or skip"]),
    "--set nfe 0": ([*CT, "--set", "eval.nfe=[0]"], None, 2, ["eval.nfe"]),
    "--no-eval with --nfe": ([*CT, "--no-eval", "--nfe", "1"], None, 2, ["--no-eval", "--nfe"]),
    "eval --seeds 0": (["eval", "--run", "0" * 32, "--seeds", "0"], None, 2, ["--seeds"]),
    "report --compare one id": (["report", "--compare", "0" * 32], None, 2, ["--compare"]),
    "--set ema_rate 1": ([*CT, "--set", "train.ema_rate=1.0"], None, 2, ["train.ema_rate"]),
    "--set a table": ([*CT, "--set", "train=3"], None, 2, ["'train' is a table"]),
    "--config missing": (["run", "--config", "{d}/nope.toml"], None, 2,
                         ["config file not found"]),
    "--config not TOML": (["run", "--config", "{d}/garbage.toml"], None, 2, ["not valid TOML"]),
    "bench.toml unknown key": (CT, "[eval]\nnfes = [1]\n", 2, ["eval.nfes"]),
    "bench.toml wrong type": (CT, '[train]\nlr = "fast"\n', 2, ["train.lr", "float"]),
    "bench.toml preset not a table": (CT, "[preset]\ncd = 3\n", 2, ["[preset] must hold"]),
    "--resume not a run id": (["run", "--resume", "nothex"], None, 1, ["unknown run id"]),
    "--config UTF-16": (["run", "--config", "{d}/utf16.toml"], None, 2,
                        ["config file {d}/utf16.toml is not UTF-8 text", "byte 0xff on line 1"]),
    "--config latin-1": (["run", "--config", "{d}/latin1.toml"], None, 2,
                         ["config file {d}/latin1.toml is not UTF-8", "byte 0xe9 on line 2"]),
    "bench.toml not UTF-8": (CT, b"\xff\xfe[train]\n", 2,
                             ["bench.toml {d}/bench.toml is not UTF-8 text"]),
    "--config a folder": (["run", "--config", "{d}/empty"], None, 2,
                          ["cannot read config file {d}/empty"]),
    "--config endless": (["run", "--config", "/dev/zero"], None, 2,
                         ["config file /dev/zero is larger than 16 MiB"]),
    "--config 5000-digit integer": (["run", "--config", "{d}/long.toml"], None, 2,
                                    ["{d}/long.toml is not valid TOML", "more than 4300 digits"]),
    "--set 5000-digit integer": ([*CT, "--set", f"train.steps={'9' * 5000}"], None, 2,
                                 ["--set train.steps: an integer of more than 4300 digits"]),
    "--set lr inf": ([*CT, "--set", "train.lr=inf"], None, 2,
                     ["train.lr must be a finite number, got inf"]),
    "--set lr 1e400": ([*CT, "--set", "train.lr=1e400"], None, 2,
                       ["train.lr must be a finite number, got inf"]),
    "--set lr nan": ([*CT, "--set", "train.lr=nan"], None, 2,
                     ["train.lr must be a finite number, got nan"]),
    "--set rho -inf (no bounds)": ([*CT, "--set", "diffusion.rho=-inf"], None, 2,
                                   ["diffusion.rho must be a finite number, got -inf"]),
    "--set method key inf": ([*CT, "--set", "ct.p_mean=inf"], None, 2,
                             ["ct.p_mean must be a finite number, got inf"]),
    "--set sigmas with inf": ([*CT, "--set", "sample.sigmas=[inf, 1.0]"], None, 2,
                              ["sample.sigmas values must be finite numbers, got inf"]),
    "bench.toml lr 1e400": (CT, "[train]\nlr = 1e400\n", 2,
                            ["train.lr must be a finite number, got inf"]),
    "--steps beyond int64": ([*CT, "--steps", "99999999999999999999999"], None, 2,
                             ["train.steps must fit in 64 bits"]),
    "--seed beyond int64": ([*CT, "--seed", "99999999999999999999999"], None, 2,
                            ["seed must fit in 64 bits"]),
    "--set seed beyond int64": ([*CT, "--set", "seed=99999999999999999999999"], None, 2,
                                ["seed must fit in 64 bits", "got 99999999999999999999999"]),
    "--set steps -2**64": ([*CT, "--set", f"train.steps={-2**64}"], None, 2,
                           ["train.steps must be >= 0"]),
    "--set steps 1e30": ([*CT, "--set", "train.steps=1e30"], None, 2,
                         ["config key 'train.steps' expects int, got 1e+30"]),
    "--set nested 3000 deep": ([*CT, "--set", "train.lr=" + "[" * 3000 + "]" * 3000], None, 2,
                               ["--set train.lr: arrays or tables nested too deeply"]),
    "--set tables 3000 deep": ([*CT, "--set", "train=" + "{a=" * 3000 + "1" + "}" * 3000], None,
                               2, ["--set train: arrays or tables nested too deeply"]),
    "--config nested 3000 deep": (["run", "--config", "{d}/deep.toml"], None, 2,
                                  ["{d}/deep.toml is not valid TOML", "nested too deeply"]),
    "--nfe superscript digit": ([*CT, "--nfe", "1,\u00b2"], None, 2,
                                ["--nfe expects positive integers"]),
    "--nfe Arabic-Indic digit": ([*CT, "--nfe", "\u0661"], None, 2,
                                 ["--nfe expects positive integers"]),
    "--nfe 5000 digits": ([*CT, "--nfe", "9" * 5000], None, 2, ["--nfe expects positive integers"]),
    "--set list beyond int64": ([*CT, "--set", f"net.channel_mult=[1, {2**63}]"], None, 2,
                                ["net.channel_mult values must fit in 64 bits"]),
}
SLOW = {
    "report --select": (["report", "--select", "worst"], None, 2, ["--select"]),
    "report --format": (["report", "--format", "pdf"], None, 2, ["pdf"]),
    "report unknown dataset": (["report", "--dataset", "nope"], None, 2,
                               ["unknown dataset 'nope'", "points:PATH"]),
    "suite unknown method": (["suite", "--methods", "edm,nope"], None, 2, ["'nope'"]),
    "suite bad --set": (["suite", "--set", "cd:train.stpes=1"], None, 2, ["train.stpes"]),
    "sweep space file missing": ([*SWEEP[:6], "{d}/nope.toml", *SWEEP[7:]], None, 2,
                                 ["space file not found"]),
    "sweep storage scheme": ([*SWEEP, "--storage", "ftp://host/x"], None, 2, ["'ftp'"]),
    "sweep storage unreachable": ([*SWEEP, "--storage", "postgresql://u:pw@127.0.0.1:9/db"],
                                  None, 1, ["postgresql://u:***@127.0.0.1:9/db"]),
    "unknown run id (eval)": (["eval", "--run", "0" * 32], None, 1, ["unknown run id"]),
    "unknown run id (ode-error)": (["ode-error", "--run", "f" * 32], None, 1,
                                   ["unknown run id"]),
    "tracking URI unreachable": (["eval", "--run", "0" * 32, "--tracking-uri",
                                  "http://u:pw@127.0.0.1:9"], None, 1,
                                 ["cannot reach the tracking store http://u:***@127.0.0.1:9"]),
    "tracking store not creatable": (["report", "--tracking-uri",
                                      "sqlite:////proc/nope/mlflow.db"], None, 1,
                                     ["cannot reach the tracking store"]),
    "empty image folder": (["run", "--method", "edm", "--dataset", "folder:{d}/empty"], None, 1,
                           ["no images"]),
    "missing image folder": (["run", "--method", "edm", "--dataset", "folder:{d}/nope"], None,
                             1, ["no folder"]),
    "points file of wrong shape": ([*CT[:3], "--dataset", "points:{d}/shape.npy"], None, 1,
                                   ["shape (N, 2), got (50, 3)"]),
    "points file with a NaN": ([*CT[:3], "--dataset", "points:{d}/nan.npy"], None, 1,
                               ["row 7 is not finite"]),
    "points file not .npy": ([*CT[:3], "--dataset", "points:{d}/garbage.toml"], None, 1,
                             ["not an .npy file"]),
    "points file holding a pickle": ([*CT[:3], "--dataset", "points:{d}/pickled.npy"], None, 1,
                                     ["allow_pickle=False"]),
    "teacher file missing": (["run", "--method", "cd", "--dataset", "gmm8", "--teacher",
                              "{d}/nope.pt"], None, 1, ["--teacher"]),
    "teacher checkpoint truncated": (["run", "--method", "cd", "--dataset", "gmm8", "--teacher",
                                      "{d}/truncated.pt"], None, 1,
                                     ["unreadable (corrupt, truncated or not a torch file)"]),
    "teacher not a cmbench checkpoint": (["run", "--method", "cd", "--dataset", "gmm8",
                                          "--teacher", "{d}/foreign.pt"], None, 1,
                                         ["not a cmbench checkpoint"]),
    "teacher of another architecture": (["run", "--method", "cd", "--dataset", "gmm8",
                                         "--teacher", "{d}/otherarch.pt"], None, 1,
                                        ["does not match its architecture"]),
    "teacher of another dataset": (["run", "--method", "cd", "--dataset", "gmm25", "--teacher",
                                    "{d}/teacher.pt"], None, 2, ["trained on 'gmm8'"]),
    "--device tpu": ([*CT, "--device", "tpu"], None, 2, ["'tpu' is not a device"]),
    "more samples than a Sobol sequence": ([*CT, "--set", "eval.num_samples=2000000000"], None, 2,
                                           ["quasi-random noise (eval.noise = auto) draws at most "
                                            "1073741824 samples"]),
    "network too wide for any memory": ([*CT, "--set", "net.width=100000000"], None, 1,
                                        ["out of memory", "lower the sizes in the config"]),
}


def make_inputs(d: Path) -> None:
    """The damaged files the cases point at."""
    (d / "empty").mkdir()
    (d / "garbage.toml").write_text("this is [not toml\n")
    (d / "utf16.toml").write_bytes("[train]\nsteps = 1\n".encode("utf-16"))
    (d / "latin1.toml").write_bytes("[train]\n# caf\u00e9\nsteps = 1\n".encode("latin-1"))
    (d / "long.toml").write_text(f"[train]\nsteps = {'9' * 5000}\n")
    (d / "deep.toml").write_text("[train]\nlr = " + "[" * 3000 + "]" * 3000 + "\n")
    rng = np.random.default_rng(0)
    np.save(d / "shape.npy", rng.normal(size=(50, 3)).astype(np.float32))
    nan = rng.normal(size=(50, 2)).astype(np.float32)
    nan[7, 1] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save({"w": torch.ones(2)}, d / "foreign.pt")
    cfg = RunConfig(method="edm", dataset="gmm8")
    spec = model_spec(cfg, gmm8(), "edm")
    state = {"model": spec, "eval_module": "ema",
             "modules": {"ema": denoiser_from_spec(spec).state_dict()}}
    save_checkpoint(state, d / "teacher.pt")
    data = (d / "teacher.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[:len(data) // 3])
    narrow = cfg.model_copy(update={"net": cfg.net.model_copy(update={"width": 64})})
    save_checkpoint({**state, "model": model_spec(narrow, gmm8(), "edm")}, d / "otherarch.pt")


def check(case: tuple[list[str], str | bytes | None, int, list[str]], cwd: Path) -> None:
    args, bench_toml, code, fragments = case
    if any("{d}" in a for a in args):
        make_inputs(cwd)
    if isinstance(bench_toml, bytes):
        (cwd / "bench.toml").write_bytes(bench_toml)
    elif bench_toml is not None:
        (cwd / "bench.toml").write_text(bench_toml)
    result = run_bench([a.replace("{d}", str(cwd)) for a in args], cwd,
                       env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert_one_line_error(result, code, *(f.replace("{d}", str(cwd)) for f in fragments))
    assert "pw@" not in result.stderr


@pytest.mark.parametrize("name", list(FAST))
def test_bad_input_fails_fast_in_one_line(name: str, tmp_path: Path) -> None:
    check(FAST[name], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_bad_input_after_loading_is_one_line(name: str, workdir) -> None:
    check(SLOW[name], workdir("w"))


SAMPLE = ["sample", "--run", "0" * 32, "--nfe", "1", "--n", "4", "--out"]
# output paths nothing could be written to: refused (exit 2) before any work, even before an
# unknown run is looked up; "folder" is a folder and "file" a file of the test folder, and
# /proc a place where no file can be created
OUTPUTS = {
    "sample --out a folder": ([*SAMPLE, "folder"], ["--out folder: is a folder"]),
    "sample --out under a file": ([*SAMPLE, "file/x.npz"],
                                  ["--out file/x.npz: file is a file, not a folder"]),
    "sample --out unwritable": ([*SAMPLE, "/proc/nope/x.npz"],
                                ["--out /proc/nope/x.npz: cannot create files in /proc"]),
    "report --out a file": (["report", "--out", "file"], ["--out file: is a file, not a folder"]),
    "report --out under a file": (["report", "--out", "file/r"],
                                  ["--out file/r: file is a file, not a folder"]),
    "report --out unwritable": (["report", "--out", "/proc/nope"],
                                ["--out /proc/nope: cannot create files in /proc"]),
    "perf --out a folder": (["perf", "--out", "folder"], ["--out folder: is a folder"]),
    "perf --out unwritable": (["perf", "--out", "/proc/p.json"],
                              ["--out /proc/p.json: cannot create files in /proc"]),
    "doctor --json a folder": (["doctor", "--json", "folder"], ["--json folder: is a folder"]),
    "doctor --json under a file": (["doctor", "--json", "file/d.json"],
                                   ["--json file/d.json: file is a file, not a folder"]),
}


DEFAULT_OUTPUTS = {"sample --out a folder", "report --out a file", "perf --out unwritable",
                   "doctor --json under a file"}  # one per command; the others under -m slow


@pytest.mark.parametrize("name", [
    name if name in DEFAULT_OUTPUTS else pytest.param(name, marks=pytest.mark.slow)
    for name in OUTPUTS])
def test_an_unwritable_output_path_fails_before_the_work(name: str, tmp_path: Path) -> None:
    args, fragments = OUTPUTS[name]
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("kept\n")
    result = run_bench(args, tmp_path, timeout=120)
    assert_one_line_error(result, 2, *fragments)
    assert result.stderr.startswith("bench: error: ")
    assert not (tmp_path / "runs").exists()  # no store opened, no run loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
    assert (tmp_path / "file").read_text() == "kept\n" and not any((tmp_path / "folder").iterdir())


def test_a_failed_allocation_is_named_resource_exhausted() -> None:
    with pytest.raises(RuntimeError) as err:
        torch.empty(2**62, dtype=torch.uint8)
    message = resource_exhausted(err.value)
    assert message is not None and message.startswith("out of memory: ")
    assert "[enforce fail" not in message and "\n" not in message
    assert resource_exhausted(RuntimeError("shape mismatch")) is None
    assert resource_exhausted(ValueError("can't allocate memory")) is None
