"""The CLI end to end, in real subprocesses, against a real MLflow sqlite store in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_id_of

FAST_EVAL = ["--set", "eval.num_samples=400", "--set", "eval.batch_size=150"]


def client_for(cwd: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")


def assert_one_line_error(result, code: int, *fragments: str) -> None:  # noqa: ANN001
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_commands(bench) -> None:
    result = bench("--help")
    assert result.returncode == 0
    for command in ("run", "eval", "sample", "datasets", "methods", "ui", "perf"):
        assert command in result.stdout


def test_edm_then_ddim_auto_then_sample_and_eval(bench, tmp_path: Path) -> None:
    result = bench("run", "--method", "edm", "--dataset", "gmm8", "--steps", "60", "--nfe",
                   "1,3", *FAST_EVAL)
    assert result.returncode == 0, result.stderr
    assert "presets: *.gmm8, edm.*" in result.stderr
    edm_id = run_id_of(result.stdout)
    client = client_for(tmp_path)
    run = client.get_run(edm_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "edm" and run.data.tags["dataset"] == "gmm8"
    assert run.data.params["train.steps"] == "60"
    for key in ("w2", "fd", "nll", "seconds_per_sample", "nfe_measured"):
        assert sorted(m.step for m in client.get_metric_history(edm_id, key)) == [1, 3], key
    assert [m.step for m in client.get_metric_history(edm_id, "train/loss")][-1] == 60
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    for name in ("config.toml", "results.csv", "w2_vs_nfe.png", "checkpoints/last.pt",
                 "samples/nfe001.png", "samples/nfe003.png"):
        assert (artifacts / name).is_file(), name
    assert not (tmp_path / "mlruns").exists()

    # ddim with --teacher auto picks the finished edm run
    result = bench("run", "--method", "ddim", "--dataset", "gmm8", "--nfe", "2", *FAST_EVAL)
    assert result.returncode == 0, result.stderr
    ddim_run = client.get_run(run_id_of(result.stdout))
    assert ddim_run.data.tags["teacher"] == edm_id
    assert ddim_run.data.params["teacher"] == edm_id

    # the saved config reproduces the run
    result = bench("run", "--config", str(artifacts / "config.toml"), "--steps", "0")
    assert result.returncode == 0, result.stderr
    assert client.get_run(run_id_of(result.stdout)).data.params["train.lr"] == \
        run.data.params["train.lr"]

    # bench sample: same seed -> identical file, whatever the batch size
    a, c = (tmp_path / f"{name}.npz" for name in "ac")
    for out, batch in ((a, "64"), (c, "7")):
        result = bench("sample", "--run", edm_id, "--nfe", "3", "--n", "100", "--out", str(out),
                       "--batch-size", batch)
        assert result.returncode == 0, result.stderr
    xa = np.load(a)["x"]
    assert xa.shape == (100, 2) and xa.dtype == np.float32
    assert a.read_bytes() == c.read_bytes()

    # bench eval adds an NFE to the same run
    result = bench("eval", "--run", edm_id, "--nfe", "5")
    assert result.returncode == 0, result.stderr
    assert 5 in [m.step for m in client.get_metric_history(edm_id, "w2")]


def test_ddim_with_analytic_teacher_and_heun(bench, tmp_path: Path) -> None:
    result = bench("run", "--method", "ddim", "--dataset", "gmm8", "--teacher", "analytic",
                   "--nfe", "1,4,16", *FAST_EVAL)
    assert result.returncode == 0, result.stderr
    client = client_for(tmp_path)
    rid = run_id_of(result.stdout)
    w2 = {m.step: m.value for m in client.get_metric_history(rid, "w2")}
    assert w2[16] < w2[4] < w2[1]
    result = bench("run", "--method", "ddim", "--dataset", "gmm8", "--teacher", "analytic",
                   "--nfe", "3", "--set", "sampler=heun", *FAST_EVAL)
    assert result.returncode == 0, result.stderr
    rid = run_id_of(result.stdout)
    assert [m.step for m in client.get_metric_history(rid, "nfe_measured")] == [3]


def test_edm_on_digits_logs_the_classifier_metric(bench, tmp_path: Path) -> None:
    result = bench("run", "--method", "edm", "--dataset", "digits", "--steps", "3", "--nfe", "1",
                   "--set", "eval.num_samples=100")
    assert result.returncode == 0, result.stderr
    client = client_for(tmp_path)
    run = client.get_run(run_id_of(result.stdout))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fcd")] == [1]
    assert float(run.data.tags["fcd_classifier_test_accuracy"]) > 0.95


@pytest.mark.slow
def test_edm_on_digits_200_steps(bench, tmp_path: Path) -> None:
    result = bench("run", "--method", "edm", "--dataset", "digits", "--steps", "200")
    assert result.returncode == 0, result.stderr
    rid = run_id_of(result.stdout)
    assert len(client_for(tmp_path).get_metric_history(rid, "fcd")) == 6


@pytest.mark.parametrize(("args", "code", "fragments"), [
    (["run", "--method", "nope", "--dataset", "gmm8"], 2, ["unknown method 'nope'", "edm", "ddim"]),
    (["run", "--method", "edm", "--dataset", "nope"], 2, ["unknown dataset 'nope'", "gmm8"]),
    (["run", "--method", "edm", "--dataset", "gmm8", "--nfe", "0"], 2, ["--nfe"]),
    (["run", "--method", "edm", "--dataset", "gmm8", "--nfe", "x"], 2, ["--nfe"]),
    (["run", "--method", "edm", "--dataset", "gmm8", "--nfe", "2"], 2, ["Heun", "2n-1"]),
    (["run", "--method", "edm", "--dataset", "gmm8", "--set", "train.stpes=1"], 2,
     ["train.stpes"]),
    (["run", "--method", "edm", "--dataset", "gmm8", "--steps", "-1"], 2, ["--steps"]),
    (["run", "--method", "edm", "--dataset", "cifar10"], 1, ["cifar10", "data.path"]),
    (["run", "--method", "edm", "--dataset", "cifar10", "--set", "data.path=/no/such"], 1,
     ["cifar10", "/no/such"]),
    (["eval", "--run", "0123456789abcdef0123456789abcdef"], 1, ["unknown run id"]),
    (["sample", "--run", "nothex", "--nfe", "1", "--n", "2", "--out", "x.npz"], 1,
     ["unknown run id"]),
    (["run", "--method", "ddim", "--dataset", "moons", "--teacher", "analytic"], 2,
     ["analytic", "moons"]),
    (["run", "--method", "ddim", "--dataset", "moons"], 1, ["bench run --method edm"]),
    (["run", "--method", "edm", "--dataset", "gmm8", "--device", "cuda:7"], 2, ["cuda"]),
    (["run", "--bogus-flag"], 2, ["--bogus-flag"]),
])
def test_bad_input_is_one_line(bench, args: list[str], code: int, fragments: list[str]) -> None:
    assert_one_line_error(bench(*args), code, *fragments)


def test_malformed_bench_toml_is_one_line(bench, tmp_path: Path) -> None:
    (tmp_path / "bench.toml").write_text("[train\nsteps = 1\n")
    assert_one_line_error(bench("run", "--method", "edm", "--dataset", "gmm8"), 2, "bench.toml")
    (tmp_path / "bench.toml").write_text("[train]\nsteps = 'many'\n")
    assert_one_line_error(bench("run", "--method", "edm", "--dataset", "gmm8"), 2, "train.steps")


def test_debug_shows_the_traceback(bench) -> None:
    result = bench("--debug", "run", "--method", "nope", "--dataset", "gmm8")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_datasets_and_methods_tables(bench) -> None:
    result = bench("datasets")
    assert result.returncode == 0, result.stderr
    for name in ("gmm8", "gmm25", "moons", "swissroll", "checkerboard", "digits", "cifar10",
                 "imagenet64"):
        assert name in result.stdout
    result = bench("methods")
    assert result.returncode == 0 and "edm" in result.stdout and "ddim" in result.stdout


@pytest.mark.slow
def test_sampling_through_torch_compile_gives_the_same_samples(bench, tmp_path: Path) -> None:
    """bench sample --compile runs the network through torch.compile (inductor on the CPU;
    CUDA graphs on a GPU): the same samples, to float32 rounding."""
    result = bench("run", "--method", "cd", "--dataset", "gmm8", "--teacher", "analytic",
                   "--steps", "20", "--nfe", "1", *FAST_EVAL)
    assert result.returncode == 0, result.stderr
    run_id = run_id_of(result.stdout)
    plain, compiled = tmp_path / "plain.npz", tmp_path / "compiled.npz"
    for out, extra in ((plain, []), (compiled, ["--compile"])):
        result = bench("sample", "--run", run_id, "--nfe", "2", "--n", "100", "--batch-size",
                       "50", "--out", str(out), *extra)
        assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(compiled)["x"], np.load(plain)["x"], rtol=1e-4,
                               atol=1e-5)
