"""`bench ui`: the MLflow UI as one process group that bench starts, watches and takes down.

`mlflow ui` starts uvicorn (with its workers) and job consumers as children of its own. They run
in a session of their own, so a Ctrl-C at the terminal reaches bench only; bench then stops
the whole group: SIGTERM, a few seconds' grace, SIGKILL for whatever is left. The URL is shown
once the server answers; a server that ends before that is reported with its last error line.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

from bench.app.tracking import mask_credentials
from bench.core.errors import BenchError, UsageError

START_SECONDS = 60.0  # the server must answer within this long (its store migrations included)
GRACE_SECONDS = 5.0  # after SIGTERM to the group, this long before SIGKILL
POLL_SECONDS = 0.1
_ERROR_LINE = re.compile(r"error|exception|fatal|denied|refused|cannot|failed", re.IGNORECASE)


def netloc(host: str, port: int) -> str:
    """host:port, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Fail in one line unless a server could listen on host:port now (bound and released
    with SO_REUSEADDR, as the server binds: a port with only closing connections is free)."""
    where = netloc(host, port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host!r}: unknown host ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BenchError(f"{where} is already in use (another MLflow UI?); choose "
                                 f"another port with --port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"--host {host}: not an address of this machine "
                                 f"({exc.strerror})") from None
            raise BenchError(f"cannot listen on {where}: {exc.strerror}; choose another "
                             f"--host or --port") from None


def serve(cmd: list[str], host: str, port: int, report: Callable[[str], None],
          start_seconds: float = START_SECONDS, runs_pages: dict[str, str] | None = None,
          ) -> signal.Signals | None:
    """Run the server command in its own session until a signal arrives (SIGINT, SIGTERM, or
    SIGHUP unless ignored) or the server ends. Returns the signal, or None when the server
    ended cleanly by itself; raises BenchError when it failed or never answered. Whatever
    happens, no process of its group outlives this call."""
    stops = _Stops()
    with stops.installed():
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        assert proc.stdout is not None
        output = _Output(proc.stdout)
        try:
            return _watch(proc, output, stops, host, port, report, start_seconds,
                          runs_pages or {})
        finally:
            output.relay = False  # the line bench prints after this is the last one
            stop_group(proc)
            output.close()


def _watch(proc: subprocess.Popen[bytes], output: _Output, stops: _Stops, host: str,
           port: int, report: Callable[[str], None], start_seconds: float,
           runs_pages: dict[str, str]) -> signal.Signals | None:
    url = f"http://{netloc(host, port)}"
    deadline = time.monotonic() + start_seconds
    while not _answers(_client_host(host), port):
        if stops.signal is not None:
            return stops.signal
        if proc.poll() is not None:
            raise BenchError(f"the MLflow UI ended before answering ({_how(proc.returncode)}): "
                             f"{output.last_error()}")
        if time.monotonic() > deadline:
            raise BenchError(f"the MLflow UI did not answer on {url} within "
                             f"{start_seconds:.0f} s; stopped it")
        time.sleep(POLL_SECONDS)
    output.relay = True
    for name, experiment_id in sorted(runs_pages.items()):
        report(f"runs of {name}: {url}/#/experiments/{experiment_id}/runs")
    report(f"MLflow UI on {url}  (Ctrl-C to stop)")
    while stops.signal is None and proc.poll() is None:
        time.sleep(POLL_SECONDS)
    if stops.signal is not None:
        return stops.signal
    if proc.returncode != 0:
        raise BenchError(f"the MLflow UI stopped ({_how(proc.returncode)}): "
                         f"{output.last_error()}")
    report("the MLflow UI stopped")
    return None


def stop_group(proc: subprocess.Popen[bytes], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM to the process group that proc leads, SIGKILL to what is left after grace
    seconds; returns once no process of the group is left (zombies aside) and proc is reaped."""
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_alive(pgid, proc):
        if time.monotonic() > deadline:
            _signal_group(pgid, signal.SIGKILL)
            break
        time.sleep(POLL_SECONDS)
    proc.wait()
    deadline = time.monotonic() + grace  # SIGKILL takes effect at once; the kernel's cleanup
    while group_alive(pgid, proc) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)


def group_alive(pgid: int, leader: subprocess.Popen[bytes] | None = None) -> bool:
    """Whether a process of the group is alive (not a zombie); reaps the leader first."""
    if leader is not None:
        leader.poll()
    if not Path("/proc/self/stat").exists():  # no /proc: zombies count as alive
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return bool(group_members(pgid))


def group_members(pgid: int) -> list[int]:
    """The pids of the live (not zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _client_host(host: str) -> str:
    """Where to reach a server bound to host: loopback for the wildcard addresses."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _answers(host: str, port: int) -> bool:
    """Whether an HTTP server answers GET /health on host:port (any status)."""
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return True


def _how(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


class _Stops:
    """Records the first SIGINT, SIGTERM or SIGHUP (SIGHUP only unless ignored, as under
    nohup) while installed."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Stops]:
        wanted = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            wanted.append(signal.SIGHUP)
        previous: dict[signal.Signals, Any] = {s: signal.signal(s, self._handle)
                                               for s in wanted}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class _Output:
    """Reads the server's output: keeps its last lines, and copies them to stderr (passwords
    masked) while `relay` is set."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.relay = False
        self.lines: deque[str] = deque(maxlen=200)
        self._stream = stream
        self._thread = threading.Thread(target=self._read, name="mlflow-ui-output",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for raw in self._stream:
            line = mask_credentials(raw.decode(errors="replace").rstrip())
            if not line.strip():
                continue
            self.lines.append(line)
            if self.relay:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()

    def last_error(self) -> str:
        """The server's last line that reads like an error, else its last line."""
        lines = list(self.lines)
        line = next((x for x in reversed(lines) if _ERROR_LINE.search(x)),
                    lines[-1] if lines else "no output")
        line = line.strip()
        return line if len(line) <= 300 else line[:297] + "..."

    def close(self) -> None:
        """Wait for the end of the output (every writer has ended by now), then close it."""
        self._thread.join(timeout=GRACE_SECONDS)
        if not self._thread.is_alive():
            self._stream.close()
