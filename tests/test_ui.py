"""`bench ui` in real processes: a busy port fails at once in one line; SIGINT and SIGTERM take
the MLflow server down with every worker it started and free the port (exit 130 / 143)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.app.ui import GRACE_SECONDS, START_SECONDS, serve
from bench.core.errors import BenchError
from tests.conftest import bench_env, run_bench
from tests.servers import free_port
from tests.test_cli import assert_one_line_error


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def live_members(pgid: int) -> list[int]:
    """The processes of a process group that are alive (zombies excluded), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _, group = stat[stat.rindex(")") + 2:].split()[:3]
        if state not in ("Z", "X") and int(group) == pgid:
            found.append(int(entry.name))
    return found


def group_leaders(pid: int) -> list[int]:
    """The children of pid that lead a process group of their own (the server bench starts
    with start_new_session; not a short-lived helper in bench's own group)."""
    leaders = []
    for child in children(pid):
        try:
            if os.getpgid(child) == child:
                leaders.append(child)
        except ProcessLookupError:
            continue
    return leaders


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@contextmanager
def serving(args: list[str], cwd: Path, port: int, log: Path,
            ) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A process started with args, once a server answers on port, and the process group of
    that server (its child); on the way out, the process and the group are killed if still
    there (a failed test leaves nothing behind)."""
    with log.open("w") as err:
        proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=err,
                                stderr=err, text=True, env=bench_env(), start_new_session=True)
    groups: set[int] = set()
    try:
        deadline = time.monotonic() + START_SECONDS + 60
        # the server answers, and bench has seen it answer (it then shows the URL)
        while not (answers(port) and f"MLflow UI on http://127.0.0.1:{port}" in log.read_text()):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            groups.update(group_leaders(proc.pid))
            time.sleep(0.2)
        groups.update(group_leaders(proc.pid))
        (pgid,) = groups
        yield proc, pgid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pgid in groups:
            if live_members(pgid):
                os.killpg(pgid, signal.SIGKILL)


def check_stopped(proc: subprocess.Popen[str], pgid: int, signum: signal.Signals, port: int,
                  log: Path) -> float:
    """Send signum; proc must exit with 128 + signum, the last line of its stderr naming the
    signal, and leave no process of the server's group pgid and the port free. The seconds
    it took."""
    assert pgid != os.getpgid(proc.pid)  # the server runs in a group of its own
    assert live_members(pgid), "the server's group is gone before the signal"
    start = time.monotonic()
    proc.send_signal(signum)
    code = proc.wait(timeout=GRACE_SECONDS + 30)
    took = time.monotonic() - start
    err = log.read_text()
    assert code == 128 + signum, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == f"bench: interrupted ({signum.name}); MLflow UI stopped", err
    assert live_members(pgid) == [], "processes of the server's group survived"
    deadline = time.monotonic() + 5
    while not bindable(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not answers(port) and bindable(port), f"port {port} still taken"
    return took


@pytest.mark.parametrize("signum", [
    pytest.param(signal.SIGTERM, id="SIGTERM"),
    pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow),  # the same path, ~50 s
])
def test_a_signal_stops_the_whole_mlflow_ui(signum: signal.Signals, workdir) -> None:
    from mlflow.tracking import MlflowClient

    cwd = workdir("ui")
    # an experiment made by an older bench or by hand: no kind, so MLflow 3 would open it on
    # its GenAI (traces) view
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")
    old = client.create_experiment("gmm8")
    port = free_port()
    args = [sys.executable, "-m", "bench", "ui", "--port", str(port)]
    with serving(args, cwd, port, cwd / "ui.log") as (proc, pgid):
        assert len(live_members(pgid)) >= 3  # mlflow, uvicorn and its workers at least
        check_stopped(proc, pgid, signum, port, cwd / "ui.log")
    log = (cwd / "ui.log").read_text()
    assert f"MLflow UI on http://127.0.0.1:{port}" in log
    assert f"runs of gmm8: http://127.0.0.1:{port}/#/experiments/{old}/runs" in log
    kind = client.get_experiment(old).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # opens on its runs
    assert not (cwd / "mlruns").exists()


def test_a_busy_port_fails_at_once_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        start = time.monotonic()
        result = run_bench(["ui", "--port", str(port)], tmp_path, timeout=120)
    assert_one_line_error(result, 1, f"127.0.0.1:{port} is already in use", "--port")
    assert time.monotonic() - start < 30
    assert not (tmp_path / "runs").exists()  # refused before the store was opened


# a server slow to stop: it and a child of its own ignore SIGTERM, so only SIGKILL ends them
STUBBORN = """
import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
os.execv(sys.executable, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                          sys.argv[1]])
"""
DRIVER = """
import sys
from bench.app.ui import serve
port = int(sys.argv[1])
stopped = serve([sys.executable, "-c", sys.argv[2], str(port)], "127.0.0.1", port, print)
if stopped is not None:
    print(f"bench: interrupted ({stopped.name}); MLflow UI stopped", file=sys.stderr)
    sys.exit(128 + stopped)
"""


@pytest.mark.parametrize("signum", [
    pytest.param(signal.SIGTERM, id="SIGTERM"),
    pytest.param(signal.SIGHUP, id="SIGHUP", marks=pytest.mark.slow),
])
def test_what_ignores_sigterm_is_killed_after_the_grace(signum: signal.Signals,
                                                        tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-c", DRIVER, str(port), STUBBORN]
    with serving(args, tmp_path, port, tmp_path / "log") as (proc, pgid):
        assert len(live_members(pgid)) >= 2  # the server and the child it started
        took = check_stopped(proc, pgid, signum, port, tmp_path / "log")
    assert took >= GRACE_SECONDS - 0.5  # the group had its grace before SIGKILL


def run_serve(script: str, start_seconds: float = START_SECONDS) -> str:
    """serve() on `python -c script`; the one-line error it raises."""
    port = free_port()
    with pytest.raises(BenchError) as caught:
        serve([sys.executable, "-c", script], "127.0.0.1", port, print, start_seconds)
    return str(caught.value)


def test_a_server_ending_before_it_answers_is_one_line_with_its_last_error() -> None:
    message = run_serve("import sys\nprint('starting', flush=True)\n"
                        "print('ERROR: [Errno 98] address already in use', file=sys.stderr)\n"
                        "print('shutting down')\nsys.exit(3)")
    assert message == ("the MLflow UI ended before answering (exit code 3): ERROR: [Errno 98] "
                       "address already in use")


def test_a_server_that_never_answers_is_stopped() -> None:
    start = time.monotonic()
    message = run_serve("import time\ntime.sleep(600)", start_seconds=1)
    assert "did not answer on http://127.0.0.1:" in message and "within 1 s" in message
    assert time.monotonic() - start < GRACE_SECONDS


def test_signal_handlers_are_restored() -> None:
    before: dict[int, Callable[..., object] | int | None] = {
        s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    run_serve("import sys\nsys.exit(1)")
    assert {s: signal.getsignal(s) for s in before} == before
