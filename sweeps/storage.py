"""Optuna storages and worker liveness.

The storage is Optuna's own: a journal file (the default, `runs/optuna.journal`) or any URL
Optuna accepts (sqlite, postgresql, mysql, redis journal). Liveness works the same on all of
them: a worker writes its host, pid and a heartbeat time into the trial's user attributes; a
RUNNING trial whose worker process is gone (same host) or whose heartbeat is older than
STALE_SECONDS (any host) is marked FAIL, so it is never lost and never counted twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.app.tracking import mask_credentials
from bench.core.errors import BenchError, UsageError

HEARTBEAT_SECONDS = 15.0  # how often a worker stamps its running trial
STALE_SECONDS = 180.0  # a RUNNING trial with no heartbeat for this long is failed
HOST = socket.gethostname()
RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")


def default_storage(runs_dir: Path) -> str:
    """The journal file under runs/."""
    return str((runs_dir / "optuna.journal").resolve())


def open_storage(url: str) -> Any:
    """An Optuna storage for a journal file path or a storage URL; one-line errors."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    shown = mask_credentials(url)
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    try:
        if not scheme:
            path = Path(url).expanduser()
            if path.is_dir():
                raise UsageError(f"--storage {shown} is a folder; give a journal file path")
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if scheme == "redis":
            from optuna.storages.journal import JournalRedisBackend

            return JournalStorage(JournalRedisBackend(url))
        if scheme in RDB_SCHEMES:
            kwargs: dict[str, Any] = {}
            if scheme == "sqlite":
                Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
                kwargs = {"connect_args": {"timeout": 120}}
            return RDBStorage(url, engine_kwargs=kwargs or None)
    except (UsageError, BenchError):
        raise
    except ImportError as exc:
        if exc.name is None:  # a driver that reports no module name (SQLAlchemy dialects)
            raise BenchError(f"storage {shown} needs a database driver that is not installed: "
                             f"{mask_credentials(_first_line_of(exc))}") from None
        raise BenchError(f"storage {shown} needs the {exc.name!r} package: "
                         f"pip install {exc.name}") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(f"cannot open the Optuna storage {shown}: "
                         f"{mask_credentials(first)}") from None
    raise UsageError(f"--storage {shown}: unsupported scheme {scheme!r} (a journal file path, "
                     f"sqlite:///, postgresql://, mysql:// or redis://)")


def _first_line_of(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (zombies count as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def stale_reason(attrs: dict[str, Any], started: float | None, now: float,
                 stale_seconds: float = STALE_SECONDS) -> str | None:
    """Why a RUNNING trial's worker is considered gone, or None while it looks alive."""
    host, pid = attrs.get("host"), attrs.get("pid")
    worker = f"{host}:{pid}" if host else "an unknown worker"
    if host == HOST and isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid):
        return f"its worker {worker} is gone"
    last = attrs.get("heartbeat", started)
    if isinstance(last, int | float) and now - last > stale_seconds:
        return f"no heartbeat from {worker} for {now - last:.0f} s"
    return None


@dataclass
class StaleTrial:
    """A RUNNING trial that was marked FAIL because its worker is gone."""

    number: int
    reason: str
    run_id: str | None


def fail_stale_trials(study: Any, stale_seconds: float = STALE_SECONDS) -> list[StaleTrial]:
    """Mark FAIL every RUNNING trial whose worker is gone; return the ones this call failed."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start.timestamp() if t.datetime_start else None
        reason = stale_reason(dict(t.user_attrs), started, now, stale_seconds)
        if reason is None:
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, UpdateFinishedTrialError):
            continue  # another process finished or failed it first
        failed.append(StaleTrial(t.number, reason, t.user_attrs.get("mlflow_run_id")))
    return failed


class Heartbeat:
    """Stamps a trial's `heartbeat` user attribute every interval from a daemon thread."""

    def __init__(self, stamp: Callable[[float], None],
                 interval: float = HEARTBEAT_SECONDS) -> None:
        self.stamp = stamp
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="sweep-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.stamp(time.time())
            except Exception:  # a missed beat is retried; the storage may be briefly busy
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)


def lock_path(runs_dir: Path, storage: str, study: str) -> Path:
    """The file that serialises taking a trial among the workers of this machine."""
    digest = hashlib.sha1(f"{storage}\0{study}".encode()).hexdigest()[:16]
    return runs_dir / "locks" / f"sweep-{digest}.lock"


@contextlib.contextmanager
def machine_lock(path: Path) -> Iterator[None]:
    """An exclusive lock among this machine's processes (a no-op where fcntl is missing).

    Workers hold it while they count the study's trials and take the next one, so the
    workers of one machine never start more trials than the study needs; workers on other
    machines are caught by the surplus check after `ask`.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
