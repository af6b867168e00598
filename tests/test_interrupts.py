"""Ctrl-C and SIGTERM at every moment of a command, with real processes and real signals:
exit code 130 (SIGINT) or 143 (SIGTERM), one last line, no traceback, and a run that existed
marked KILLED with the way to resume it; two processes driving one run; a real full disk."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import bench_env, run_bench, run_id_of
from tests.test_cli import assert_one_line_error

STEPS = 120
RUN_ARGS = ["run", "--method", "ct", "--dataset", "gmm8", "--steps", str(STEPS),
            "--nfe", "1,2,4,8", "--set", "train.batch_size=64",
            "--set", "train.checkpoint_every=40", "--set", "train.log_every=10",
            "--set", "eval.num_samples=1000"]
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Running:
    """A bench process whose stderr is read line by line as it comes."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.cwd = cwd
        self.proc = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=cwd,
                                     env=bench_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.out = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 240) -> bool:
        """Poll until predicate() holds (True) or the process ended first (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        raise AssertionError(f"timed out; stderr so far:\n{self.stderr}")

    def line_with(self, fragment: str) -> Callable[[], bool]:
        return lambda: any(fragment in line for line in self.lines)

    def finish(self, timeout: float = 180) -> int:
        assert self.proc.stdout is not None
        self.out = self.proc.stdout.read()
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


def client_for(cwd: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")


def all_runs(cwd: Path) -> list:  # noqa: ANN401 - MLflow Run entities
    client = client_for(cwd)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def checkpoint_step(cwd: Path) -> int:
    """The iteration of the run's last checkpoint, -1 while there is none."""
    found = sorted((cwd / "runs" / "mlartifacts").glob("*/artifacts/checkpoints/last.pt"))
    if not found:
        return -1
    try:
        return int(torch.load(found[0], weights_only=True)["loop"]["step"])
    except Exception:  # being replaced right now
        return -1


def assert_interrupted(run: Running, signum: signal.Signals) -> None:
    """Exit 130/143, the last stderr line names the signal, no traceback anywhere."""
    code = run.finish()
    assert code == EXIT[signum], run.stderr
    assert "Traceback" not in run.stderr + run.out, run.stderr
    last = run.lines[-1]
    assert last.startswith("bench: ") and f"interrupted ({signum.name})" in last, run.stderr


def assert_killed_with_hint(run: Running, signum: signal.Signals) -> str:
    """The one run of the folder is KILLED with the signal in its error tag, and the last
    line says how to resume it."""
    runs = all_runs(run.cwd)
    assert len(runs) == 1, [r.info.status for r in runs]
    record = runs[0]
    assert record.info.status == "KILLED", run.stderr
    assert f"interrupted ({signum.name})" in record.data.tags["error"]
    assert f"bench run --resume {record.info.run_id}" in run.lines[-1], run.stderr
    assert "holder" not in record.data.tags  # the lock went with the process
    return record.info.run_id


# the moments: while imports and data load (no run yet), the instant the run exists, mid
# training, and in the final evaluation (the last checkpoint is written, the process lives)
def _loading(run: Running) -> bool:
    time.sleep(1.0)
    return run.proc.poll() is None


def _created(run: Running) -> bool:
    return run.wait_for(run.line_with(" in experiment "))


def _training(run: Running) -> bool:
    return run.wait_for(lambda: 0 < checkpoint_step(run.cwd) < STEPS)


def _evaluating(run: Running) -> bool:
    return run.wait_for(lambda: checkpoint_step(run.cwd) == STEPS)


MOMENTS = {"loading": _loading, "created": _created, "training": _training,
           "evaluating": _evaluating}


@pytest.mark.parametrize(("moment", "signum"), [
    ("loading", signal.SIGINT), ("created", signal.SIGTERM), ("training", signal.SIGINT),
    pytest.param("evaluating", signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_at_any_moment_of_a_run_ends_it_killed_with_the_exit_code(
        workdir, moment: str, signum: signal.Signals) -> None:
    cwd = workdir(moment)
    run = Running(RUN_ARGS, cwd)
    assert MOMENTS[moment](run), f"the run ended before the moment {moment}:\n{run.stderr}"
    run.proc.send_signal(signum)
    assert_interrupted(run, signum)
    if moment == "loading":
        assert all_runs(cwd) == [] or all(r.info.status == "KILLED" for r in all_runs(cwd))
        return
    run_id = assert_killed_with_hint(run, signum)
    if moment in ("training", "evaluating"):
        assert "checkpoint kept" in run.lines[-1]
    # flags that disagree with the run are refused; agreeing ones are accepted
    assert_one_line_error(run_bench(["run", "--resume", run_id, "--steps", "999"], cwd), 2,
                          f"train.steps = 999 conflicts with run {run_id}, which has {STEPS}")
    # the run resumes to the end under its own id; nothing was logged twice
    done = run_bench(["run", "--resume", run_id, "--steps", str(STEPS), "--method", "ct"], cwd)
    assert done.returncode == 0, done.stderr
    assert run_id_of(done.stdout) == run_id
    client = client_for(cwd)
    record = client.get_run(run_id)
    assert record.info.status == "FINISHED"
    assert "error" not in record.data.tags  # the last ending's reason went with it
    for key in ("train/loss", "w2", "seconds_per_sample"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    assert sorted(m.step for m in client.get_metric_history(run_id, "w2")) == [1, 2, 4, 8]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 1.5, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 8.0])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_after_any_delay_leaves_no_running_run(workdir, delay: float,
                                                        signum: signal.Signals) -> None:
    # a sweep of delays over start-up, creation and the first iterations: whichever window
    # the signal falls in, the exit code, the last line and the store agree
    cwd = workdir("delay")
    run = Running(RUN_ARGS, cwd)
    time.sleep(delay)
    if run.proc.poll() is not None:
        pytest.fail(f"ended before {delay} s:\n{run.stderr}")
    run.proc.send_signal(signum)
    assert_interrupted(run, signum)
    runs = all_runs(cwd)
    assert all(r.info.status == "KILLED" for r in runs), [r.info.status for r in runs]
    if runs:
        assert f"bench run --resume {runs[0].info.run_id}" in run.lines[-1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> tuple[Path, str]:
    """A DDIM run on gmm8 with the exact (analytic) denoiser: no training, seconds."""
    folder = tmp_path_factory.mktemp("ddim")
    (folder / "runs").mkdir()
    shutil.copy(empty_store, folder / "runs" / "mlflow.db")
    done = run_bench(["run", "--method", "ddim", "--dataset", "gmm8", "--teacher", "analytic",
                      "--nfe", "1", "--set", "eval.num_samples=200"], folder)
    assert done.returncode == 0, done.stderr
    return folder, run_id_of(done.stdout)


@pytest.mark.parametrize("signum", [
    pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow),  # as SIGTERM below
    pytest.param(signal.SIGTERM, id="SIGTERM"),
])
def test_sample_interrupted_exits_with_the_signal_and_writes_no_file(
        finished_run, signum: signal.Signals) -> None:
    cwd, run_id = finished_run
    out = cwd / f"x-{signum.name}.npz"
    run = Running(["sample", "--run", run_id, "--nfe", "200", "--n", "3000000",
                   "--batch-size", "100000", "--out", str(out)], cwd)
    time.sleep(6.0)  # into the sampling (loading the run takes ~3 s)
    assert run.proc.poll() is None, run.stderr
    run.proc.send_signal(signum)
    assert_interrupted(run, signum)
    assert not out.exists()
    assert not [p for p in cwd.iterdir() if p.name.startswith(f".{out.name}")]  # no temp file


# 0.2 s: while typer and pydantic are imported; 0.6 s: while numpy and scipy are
@pytest.mark.parametrize("delay", [0.2, 0.6, pytest.param(1.5, marks=pytest.mark.slow)])
def test_report_interrupted_exits_130(finished_run, delay: float) -> None:
    cwd, _ = finished_run
    run = Running(["report", "--out", str(cwd / f"report-{delay}")], cwd)
    time.sleep(delay)
    if run.proc.poll() is not None:
        pytest.fail(f"report ended within {delay} s:\n{run.stderr}")
    run.proc.send_signal(signal.SIGINT)
    assert_interrupted(run, signal.SIGINT)


def test_a_run_is_driven_by_one_process_at_a_time(workdir) -> None:
    cwd = workdir("twice")
    long_run = [*RUN_ARGS[:6], "3000", *RUN_ARGS[7:]]  # --steps 3000: a resume of a minute
    first = Running(long_run, cwd)
    assert first.wait_for(lambda: checkpoint_step(cwd) > 0)
    first.proc.send_signal(signal.SIGKILL)  # dies holding the run: RUNNING, a stale holder tag
    first.finish()
    (record,) = all_runs(cwd)
    run_id = record.info.run_id
    assert record.info.status == "RUNNING" and "holder" in record.data.tags

    resumed = Running(["run", "--resume", run_id], cwd)
    assert resumed.wait_for(resumed.line_with("resuming run")), resumed.stderr
    assert any("is gone; taking it over" in line for line in resumed.lines)
    # a second resume and an evaluation while it trains: refused, naming the holder
    pid = str(resumed.proc.pid)
    for args in (["run", "--resume", run_id], ["eval", "--run", run_id, "--nfe", "1"]):
        again = run_bench(args, cwd)
        assert resumed.proc.poll() is None, "the resumed run ended before the check"
        assert_one_line_error(again, 1, f"run {run_id} is in use by pid {pid} on host",
                              "`bench run --resume")
    resumed.proc.send_signal(signal.SIGTERM)
    assert_interrupted(resumed, signal.SIGTERM)
    client = client_for(cwd)
    record = client.get_run(run_id)
    assert record.info.status == "KILLED" and "holder" not in record.data.tags
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert len(steps) == len(set(steps)), sorted(steps)  # the repeated iterations: logged once
    assert list((cwd / "runs" / "locks").glob("*.lock")) == []
    # free again: an evaluation now goes through
    assert run_bench(["eval", "--run", run_id, "--nfe", "1"], cwd).returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 6 MiB tmpfs mounted on a folder: room for one checkpoint of the run below (3.7 MB),
    not for a second beside it while it is replaced."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(mount)], check=True, capture_output=True)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes(
        workdir, small_disk: Path) -> None:
    cwd = workdir("full")
    artifacts = cwd / "runs" / "mlartifacts"
    artifacts.symlink_to(small_disk, target_is_directory=True)
    result = run_bench(RUN_ARGS, cwd)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    match = re.search(r"run ([0-9a-f]{32}) marked FAILED", last)
    assert last.startswith("bench: error: no space left on device") and match, last
    run_id = match.group(1)
    assert "the last checkpoint" in last and "is intact" in last, last
    assert f"resume with `bench run --resume {run_id}`" in last
    kept = int(re.search(r"iteration (\d+)\) is intact", last).group(1))
    assert kept > 0
    assert checkpoint_step(cwd) == kept  # loads with weights_only=True, whole
    assert client_for(cwd).get_run(run_id).info.status == "FAILED"
    # room again: the run resumes from that checkpoint to the end
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    done = run_bench(["run", "--resume", run_id], cwd)
    assert done.returncode == 0, done.stderr
    assert f"resuming run {run_id} at iteration {kept}" in done.stderr
    assert client_for(cwd).get_run(run_id).info.status == "FINISHED"


def test_memory_that_runs_out_is_one_line_naming_it(workdir) -> None:
    # an address-space limit of 6 GiB and a batch whose first layer needs 4 GiB tensors: the
    # allocation fails for real (without the kernel's OOM killer, which nothing survives)
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    cwd = workdir("oom")
    result = subprocess.run([sys.executable, "-m", "bench", "run", "--method", "ct",
                             "--dataset", "gmm8", "--steps", "5", "--nfe", "1",
                             "--set", f"train.batch_size={2 ** 24}"], cwd=cwd, env=bench_env(),
                            capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bench: error: out of memory"), last
    assert "marked FAILED" in last and "smaller train.batch_size" in last, last
    (record,) = all_runs(cwd)
    assert record.info.status == "FAILED"


IMPORT_INTERRUPTED = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from bench.engine.signals import GUARD, Interrupted, critical
GUARD.install()
started = time.monotonic()
try:
    import slow_module  # sends itself the signal in the middle of its body
    imported = time.monotonic()
    if sys.argv[2] == "block":  # a critical block ending first raises it (and stops the timer)
        with critical():
            pass
    while time.monotonic() - imported < 5:
        time.sleep(0.01)
    print("not interrupted")
except Interrupted as exc:
    whole = getattr(sys.modules.get("slow_module"), "COMPLETE", False)
    timer = signal.getitimer(signal.ITIMER_REAL)[0]  # left armed, it would fire at exit,
    print(exc.signal_name, "complete" if whole else "half",  # after Python restored SIGALRM's
          round(time.monotonic() - started, 2), timer)  # default action: killed by SIGALRM
"""


@pytest.mark.parametrize("raised_by", ["timer", "block"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_an_import_waits_for_the_module_to_finish(
        tmp_path: Path, signum: signal.Signals, raised_by: str) -> None:
    """An interrupt raised in the middle of a module's first import leaves it half-initialised
    in sys.modules (numpy's lazy attributes then recurse without end): the guard holds the
    signal until the import is over, then raises it."""
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\n"
        f"os.kill(os.getpid(), {int(signum)})\n"
        "time.sleep(0.5)\n"
        "COMPLETE = True\n")
    done = subprocess.run([sys.executable, "-c", IMPORT_INTERRUPTED, str(tmp_path), raised_by],
                          capture_output=True, text=True, timeout=60, env=bench_env())
    assert done.returncode == 0, done.stderr
    name, state, seconds, timer = done.stdout.split()
    assert (name, state, float(timer)) == (signum.name, "complete", 0.0)
    assert 0.5 <= float(seconds) < 2.0  # raised within the retry period after the import
