"""One process drives a run at a time.

Training, `--resume`, `bench eval` and `bench ode-error` write into a run; two of them at once
would train twice, overwrite one checkpoint from two processes and log every metric twice. A
process that drives a run holds its lock:

- an exclusive `flock` on runs/locks/<run id>.lock (the kernel releases it when the process
  dies, however it dies), which settles a race between two processes of one machine sharing a
  runs folder, and
- the run's `holder` tag (host, pid, the process's start time, the command and a heartbeat
  refreshed every HEARTBEAT_SECONDS), which reaches processes in other folders and on other
  hosts that share the tracking store.

A second process is refused in one line naming the process and the host that hold the run. A
holder tag whose process is gone (same host: no such pid, or a pid reused by another process)
or whose heartbeat is older than STALE_SECONDS (another host) is stale, and is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bench.core.errors import BenchError

HOLDER_TAG = "holder"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 150.0  # five missed heartbeats


@dataclass(frozen=True)
class Holder:
    """The process that drives a run."""

    host: str
    pid: int
    started: str  # the process's start time (/proc/<pid>/stat), "" where unknown
    command: str
    since: float  # epoch seconds
    beat: float  # epoch seconds of the last heartbeat

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host} (`{self.command}`, since {since})"

    def to_text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def parse(text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return Holder(str(data["host"]), int(data["pid"]), str(data["started"]),
                          str(data["command"]), float(data["since"]), float(data["beat"]))
        except (ValueError, KeyError, TypeError):
            return None


def process_start(pid: int) -> str:
    """The start time of a process (clock ticks since boot, from /proc), "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2:].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else ""


def alive(holder: Holder, now: float | None = None) -> bool:
    """Whether the holder still drives its run: on this host, its process exists (and is the
    same process); on another, its heartbeat is recent."""
    if holder.host != socket.gethostname():
        return (now or time.time()) - holder.beat < STALE_SECONDS
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return not holder.started or process_start(holder.pid) in ("", holder.started)


def this_command() -> str:
    """The command this process runs, shortened for a message (`bench run --resume ...`)."""
    args = [a for a in sys.argv[1:] if not a.startswith("--tracking-uri")]
    return " ".join(["bench", *args])[:120]


class RunLock:
    """`with RunLock(tracker, run_id):` hold the run, or fail in one line naming its holder."""

    def __init__(self, tracker: Any, run_id: str, report: Any = None) -> None:
        self.tracker, self.run_id, self.report = tracker, run_id, report
        self.path = Path(tracker.runs_dir) / "locks" / f"{run_id}.lock"
        self._file: IO[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder: Holder | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the run, or raise the one-line refusal naming its holder."""
        self._lock_file()
        try:
            self._claim_tag()
        except BaseException:
            self._unlock_file()
            raise
        self._thread = threading.Thread(target=self._beat, name=f"holder-{self.run_id[:8]}",
                                        daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Give the run back: the heartbeat stops, the tag and the lock file go."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):  # a stale tag is recognised by the next holder
            self.tracker.delete_tag(self.run_id, HOLDER_TAG)
        self._unlock_file()

    # --- the lock file (this machine, this runs folder) -----------------------------------------

    def _lock_file(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the tag alone
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path, "a+")  # noqa: SIM115 - held until __exit__
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = Holder.parse(fh.read())
                fh.close()
                raise self._refusal(holder) from None
            try:  # the file may have been removed by its last holder meanwhile: lock a new one
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._file = fh
                return
            fh.close()

    def _unlock_file(self) -> None:
        if self._file is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            self.path.unlink()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    # --- the holder tag (every host of the tracking store) --------------------------------------

    def _claim_tag(self) -> None:
        current = Holder.parse(self.tracker.get_run(self.run_id).tags.get(HOLDER_TAG, ""))
        if current is not None and current.pid == os.getpid() and \
                current.host == socket.gethostname():
            current = None  # this very process (a run it created a moment ago)
        if current is not None:
            if alive(current):
                raise self._refusal(current)
            if self.report is not None:
                self.report(f"run {self.run_id}: its last holder, {current.describe()}, is gone;"
                            f" taking it over")
        now = time.time()
        self.holder = Holder(socket.gethostname(), os.getpid(), process_start(os.getpid()),
                             this_command(), now, now)
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(self.holder.to_text())
            self._file.flush()
        self.tracker.set_tags(self.run_id, {HOLDER_TAG: self.holder.to_text()})

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            assert self.holder is not None
            beat = Holder(**{**asdict(self.holder), "beat": time.time()})
            with contextlib.suppress(Exception):  # a store that is away: beat again later
                self.tracker.client.set_tag(self.run_id, HOLDER_TAG, beat.to_text())

    def _refusal(self, holder: Holder | None) -> BenchError:
        who = holder.describe() if holder is not None else "another process on this machine"
        return BenchError(f"run {self.run_id} is in use by {who}; wait for it to end or stop "
                          f"it first")
