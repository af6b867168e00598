"""Faults with real processes: kill -9, SIGINT and SIGTERM mid-training then --resume, a
non-finite loss from a real input file, damaged checkpoints, two runs on one sqlite store and
credentials in URLs. Every store is a real MLflow sqlite file in tmp_path."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from bench.engine.training import BatchStream
from tests.conftest import bench_env, run_bench, run_id_of
from tests.test_cli import assert_one_line_error

# ct on gmm8 with dropout (so the dropout RNG matters), a target network and an EMA; a
# checkpoint every 40 iterations, a loss logged every 10
CT_ARGS = ["run", "--method", "ct", "--dataset", "gmm8", "--steps", "400", "--nfe", "1",
           "--set", "train.batch_size=64", "--set", "train.checkpoint_every=40",
           "--set", "train.log_every=10", "--set", "net.dropout=0.1",
           "--set", "eval.num_samples=200"]
STEPS = 400


def client_for(cwd: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")


def spawn(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=cwd, env=bench_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def checkpoint_of(cwd: Path) -> Path | None:
    found = sorted((cwd / "runs" / "mlartifacts").glob("*/artifacts/checkpoints/last.pt"))
    return found[0] if found else None


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def wait_for_checkpoint(cwd: Path, proc: subprocess.Popen[str], after: int = 0,
                        timeout: float = 240) -> int:
    """Poll until the run's checkpoint holds an iteration > after; return that iteration."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        path = checkpoint_of(cwd)
        if path is not None:
            step = int(load(path)["loop"]["step"])
            if step > after:
                return step
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a checkpoint with its dotted path."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from tensors(value, f"{prefix}.{key}")
    elif isinstance(state, list | tuple):
        for i, value in enumerate(state):
            yield from tensors(value, f"{prefix}[{i}]")
    else:
        yield prefix, state


def assert_same_checkpoint(a: Path, b: Path) -> None:
    left, right = dict(tensors(load(a))), dict(tensors(load(b)))
    assert left.keys() == right.keys()
    for key, value in left.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, right[key]), key
        else:
            assert value == right[key], key


def assert_ends_in_error(result: subprocess.CompletedProcess[str], code: int,
                         *fragments: str) -> None:
    """A run that fails after it started: its last stderr line is the error, no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bench: error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """step -> value; a step logged twice (after a kill -9) must carry the same value."""
    out: dict[int, float] = {}
    for m in client.get_metric_history(run_id, key):
        assert out.setdefault(m.step, m.value) == m.value, (key, m.step)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, empty_store: Path,
              ) -> tuple[Path, str]:
    """The uninterrupted run every interrupted one is compared with: (folder, run id)."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "runs").mkdir()
    shutil.copy(empty_store, folder / "runs" / "mlflow.db")
    done = run_bench(CT_ARGS, folder)
    assert done.returncode == 0, done.stderr
    return folder, run_id_of(done.stdout)


def assert_same_as_reference(reference: tuple[Path, str], cwd: Path, run_id: str) -> None:
    """Bit-identical final checkpoint (student, EMA, target, optimizer, RNG) and metrics."""
    folder, ref_id = reference
    assert_same_checkpoint(checkpoint_of(folder), checkpoint_of(cwd))
    client, ref = client_for(cwd), client_for(folder)
    for key in ("train/loss", "train/lr", "w2", "fd"):
        assert history(client, run_id, key) == history(ref, ref_id, key), key
    assert max(history(client, run_id, "train/loss")) == STEPS


def test_kill9_then_resume_is_bit_exact(workdir, reference) -> None:
    b = workdir("b")
    proc = spawn(CT_ARGS, b)
    wait_for_checkpoint(b, proc)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    killed_at = int(load(checkpoint_of(b))["loop"]["step"])  # the last complete checkpoint
    run_id = re.search(r"run ([0-9a-f]{32}) in experiment", err).group(1)
    client = client_for(b)
    assert killed_at < STEPS and client.get_run(run_id).info.status == "RUNNING"

    done = run_bench(["run", "--resume", run_id], b)
    assert done.returncode == 0, done.stderr
    assert run_id_of(done.stdout) == run_id
    assert "is marked RUNNING" in done.stderr
    assert f"resuming run {run_id} at iteration {killed_at}" in done.stderr
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_same_as_reference(reference, b, run_id)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_gives_a_killed_run_that_resumes_exactly(workdir, reference,
                                                        signum: signal.Signals) -> None:
    # a signal after the first checkpoint: KILLED, a final checkpoint, one line with the way on
    b = workdir("b")
    proc = spawn(CT_ARGS, b)
    wait_for_checkpoint(b, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], err
    assert "Traceback" not in err
    run_id = re.search(r"run ([0-9a-f]{32}) in experiment", err).group(1)
    assert f"resume with `bench run --resume {run_id}`" in err.splitlines()[-1]
    client = client_for(b)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    first = load(checkpoint_of(b))  # weights_only=True
    stopped_at = int(first["loop"]["step"])
    assert 40 <= stopped_at < STEPS
    assert run.data.tags["error"] == f"interrupted ({signum.name}) at iteration {stopped_at}"
    assert set(first["modules"]) == {"student", "ema", "target"}

    # resume, then kill -9 once it has written a newer checkpoint: the run stays RUNNING
    proc = spawn(["run", "--resume", run_id], b)
    wait_for_checkpoint(b, proc, after=stopped_at)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    killed_at = int(load(checkpoint_of(b))["loop"]["step"])
    assert f"resuming run {run_id} at iteration {stopped_at}" in err
    assert killed_at < STEPS and client.get_run(run_id).info.status == "RUNNING"

    # resume to the end: same run id, FINISHED, bit-identical to the uninterrupted run
    done = run_bench(["run", "--resume", run_id], b)
    assert done.returncode == 0, done.stderr
    assert run_id_of(done.stdout) == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_same_as_reference(reference, b, run_id)

    # a truncated checkpoint: one line at bench eval, exit 1
    path = checkpoint_of(b)
    path.write_bytes(path.read_bytes()[:1000])
    assert_one_line_error(run_bench(["eval", "--run", run_id], b), 1,
                          "unreadable (corrupt, truncated or not a torch file)", str(path))


def outlier_file(folder: Path, row: int) -> Path:
    """500 points at unit scale; one finite but absurd row (1e30) overflows the loss."""
    points = np.random.default_rng(0).normal(size=(500, 2)).astype(np.float32) * 0.5
    points[row] = 1e30
    path = folder / "points.npy"
    np.save(path, points)
    return path


@pytest.mark.slow
def test_nonfinite_loss_stops_with_the_iteration_or_is_skipped(workdir) -> None:
    cwd = workdir("nan")
    row = 123
    data = outlier_file(cwd, row)
    stream = BatchStream(lambda i: i, 500, None, 64, 0, torch.device("cpu"))
    k = next(step for step in range(100) if row in stream.indices(step).tolist())
    assert k > 4
    args = ["run", "--method", "ct", "--dataset", f"points:{data}", "--steps", "40", "--nfe", "1",
            "--set", "train.batch_size=64", "--set", "train.checkpoint_every=4",
            "--set", "eval.num_samples=200"]
    result = run_bench(args, cwd)
    last_good = k // 4 * 4
    assert_ends_in_error(result, 1, f"non-finite loss (nan) at iteration {k}",
                          "last good checkpoint:", f"iteration {last_good}; resume with",
                          'train.nonfinite = "skip"')
    client = client_for(cwd)
    (failed,) = client.search_runs([client.get_experiment_by_name(f"points:{data}")
                                    .experiment_id])
    assert failed.info.status == "FAILED"
    assert f"NonFiniteLoss: non-finite loss (nan) at iteration {k}" in failed.data.tags["error"]
    assert failed.data.tags["failed_at_iteration"] == str(k)
    saved = load(checkpoint_of(cwd))
    assert saved["loop"]["step"] == last_good
    assert all(torch.isfinite(v).all() for v in saved["modules"]["student"].values())

    # skip: the iterations that draw the row are skipped, counted, and the run finishes
    result = run_bench([*args, "--set", "train.nonfinite=skip", "--set", "train.log_every=40",
                        "--set", "net.width=64"], cwd)
    assert result.returncode == 0, result.stderr
    skipped_id = run_id_of(result.stdout)
    assert client.get_run(skipped_id).info.status == "FINISHED"
    expected = sum(row in stream.indices(step).tolist() for step in range(40))
    assert history(client, skipped_id, "train/skipped_iterations") == {40: float(expected)}

    # the failed run's checkpoint replaced by one of another architecture, then a truncated
    # one: --resume fails in one line each
    failed_ckpt = Path(failed.info.artifact_uri.removeprefix("file://")) / "checkpoints/last.pt"
    other = Path(client.get_run(skipped_id).info.artifact_uri.removeprefix("file://"))
    shutil.copy(other / "checkpoints" / "last.pt", failed_ckpt)
    assert_one_line_error(run_bench(["run", "--resume", failed.info.run_id], cwd), 1,
                          "checkpoint does not match this run's architecture")
    failed_ckpt.write_bytes(failed_ckpt.read_bytes()[:2000])
    assert_one_line_error(run_bench(["run", "--resume", failed.info.run_id], cwd), 1,
                          "unreadable (corrupt, truncated or not a torch file)")


@pytest.mark.slow
def test_two_concurrent_runs_on_one_fresh_sqlite_store_keep_every_metric(tmp_path: Path) -> None:
    # a fresh folder: both processes also race to create and migrate the store
    args = ["run", "--method", "ct", "--dataset", "gmm8", "--steps", "300", "--nfe", "1,2",
            "--set", "train.batch_size=32", "--set", "train.log_every=1",
            "--set", "train.checkpoint_every=20", "--set", "eval.num_samples=200"]
    procs = [spawn([*args, "--seed", str(seed)], tmp_path) for seed in (1, 2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    client = client_for(tmp_path)
    ids = [run_id_of(out) for out, _ in outputs]
    assert len(set(ids)) == 2
    for run_id in ids:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for name in ("loss", "lr", "iters_per_second", "n_scales", "target_mu"):
            key = f"train/{name}"
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(1, 301)), key
        for key in ("w2", "fd", "nfe_measured", "seconds_per_sample"):
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2]
        assert run.data.params["train.steps"] == "300"


@pytest.mark.slow
def test_credentials_never_reach_mlflow_or_the_terminal(workdir) -> None:
    secret = "s3cretpw"
    cwd = workdir("mask")
    # the sweep storage: unreachable, one line with the URL masked
    result = run_bench(["sweep", "--method", "ct", "--dataset", "gmm8", "--space", "ct-lr",
                        "--trials", "1", "--storage",
                        f"postgresql://alice:{secret}@127.0.0.1:9/optuna"], cwd)
    assert_one_line_error(result, 1, "postgresql://alice:***@127.0.0.1:9/optuna")
    assert secret not in result.stdout + result.stderr
    # an MLflow server URL with a password: unreachable, one line, masked
    result = run_bench(["eval", "--run", "0" * 32, "--tracking-uri",
                        f"http://bob:{secret}@127.0.0.1:9"], cwd,
                       env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert_one_line_error(result, 1, "bob:***@127.0.0.1:9")
    assert secret not in result.stdout + result.stderr
    # a password in the config (bench.toml's tracking.uri, a --set value): masked in params,
    # tags and the config.toml artifact of a run that succeeds on the local store
    (cwd / "bench.toml").write_text(
        f'[tracking]\nuri = "postgresql://carol:{secret}@db.example/mlflow"\n')
    result = run_bench(["run", "--method", "ddim", "--dataset", "gmm8", "--teacher", "analytic",
                        "--nfe", "1", "--set", "eval.num_samples=100", "--tracking-uri",
                        f"sqlite:///{cwd / 'runs' / 'mlflow.db'}",
                        "--set", f"data.path=redis://:{secret}@cache:6379/0"], cwd)
    # data.path on an embedded dataset is refused, in one masked line
    assert_one_line_error(result, 2, "redis://:***@cache")
    assert secret not in result.stdout + result.stderr
    result = run_bench(["run", "--method", "ddim", "--dataset", "gmm8", "--teacher", "analytic",
                        "--nfe", "1", "--set", "eval.num_samples=100", "--tracking-uri",
                        f"sqlite:///{cwd / 'runs' / 'mlflow.db'}"], cwd)
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    run = client_for(cwd).get_run(run_id_of(result.stdout))
    assert run.data.params["tracking.uri"] == "postgresql://carol:***@db.example/mlflow"
    everything = [*run.data.params.values(), *run.data.tags.values()]
    assert not any(secret in v for v in everything)
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    files = [f for f in artifacts.rglob("*") if f.is_file()]
    assert any(f.name == "config.toml" for f in files)
    assert not any(secret.encode() in f.read_bytes() for f in files)


def test_ui_binds_to_loopback_unless_host_is_given(tmp_path: Path) -> None:
    import typer

    from bench.cli.main import app, ui_command

    command = typer.main.get_command(app).commands["ui"]
    host = next(p for p in command.params if p.name == "host")
    assert host.default == "127.0.0.1"
    cmd = ui_command("sqlite:///x.db", tmp_path, host.default, 5000)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    cmd = ui_command("sqlite:///x.db", tmp_path, "0.0.0.0", 5000)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
