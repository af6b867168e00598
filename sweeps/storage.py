"""Optuna storages and worker liveness.

The storage is Optuna's own: a journal file (the default, `runs/optuna.journal`) or any URL
Optuna accepts (sqlite, postgresql, mysql, redis journal).

Liveness on a database (RDBStorage): Optuna's heartbeat. A worker records its running trial's
heartbeat every HEARTBEAT_SECONDS (`bench sweep --heartbeat`); a RUNNING trial with no
heartbeat for GRACE_FACTOR heartbeats is failed by `optuna.storages.fail_stale_trials`, whose
callback (RetryHeartbeatStaleTrialCallback) enqueues the same parameters again, so the killed
trial is replaced by a retry of itself.
A database that goes away (a restart, a network cut) is retried for RETRY_SECONDS on every
storage call, through a pool that checks a connection before use, then ends in one line.

Liveness on a journal file or redis journal, which have no heartbeat in Optuna: ours. A worker
writes its host, pid and a heartbeat time into the trial's user attributes; a RUNNING trial
whose worker process is gone (same host) or whose heartbeat is older than STALE_FACTOR
heartbeats (any host) is marked FAIL and the study runs a new trial in its place.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.app.tracking import mask_credentials
from bench.core.errors import BenchError, UsageError, causes

HEARTBEAT_SECONDS = 15.0  # how often a worker stamps its running trial (--heartbeat)
GRACE_FACTOR = 4  # database: Optuna's grace period, in heartbeats
STALE_FACTOR = 12  # journal: a RUNNING trial with no heartbeat for this many is failed
STALE_SECONDS = STALE_FACTOR * HEARTBEAT_SECONDS
RETRY_SECONDS = 120.0  # a database that went away is retried this long, then a clear failure
SCHEMA_ATTEMPTS = 5  # opening a database whose tables another host is creating right now
RETRIED_METHODS = (  # every RDBStorage call a worker makes, retried while the database is away
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_trial_user_attrs",
    "get_trial_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number",
    "get_trial", "get_all_trials", "get_best_trial", "record_heartbeat", "_get_stale_trial_ids",
    # and the ones Optuna's cache in front of the storage calls directly
    "_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials")
HOST = socket.gethostname()
RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")


def default_storage(runs_dir: Path) -> str:
    """The journal file under runs/."""
    return str((runs_dir / "optuna.journal").resolve())


def open_storage(url: str, heartbeat: float = HEARTBEAT_SECONDS) -> Any:
    """An Optuna storage for a journal file path or a storage URL; one-line errors. A database
    gets Optuna's heartbeat every `heartbeat` seconds, with a grace of GRACE_FACTOR of them."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # the heartbeat is recorded by the worker itself (ask/tell), not by Study.optimize
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
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
            kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a restarted server: reconnect
            if scheme == "sqlite":
                Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
                kwargs["connect_args"] = {"timeout": 120}
            for attempt in range(SCHEMA_ATTEMPTS):
                try:
                    with warnings.catch_warnings():  # the heartbeat arguments: "experimental"
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        storage = _reconnecting_rdb_storage()(
                            url, engine_kwargs=kwargs, heartbeat_interval=math.ceil(heartbeat),
                            grace_period=math.ceil(GRACE_FACTOR * heartbeat),
                            heartbeat_stale_trial_callback=StaleTrialCallback())
                    break
                except Exception as exc:
                    # hosts opening a new database at once race to create Optuna's tables:
                    # the loser finds them made and opens them on the next attempt; a server
                    # in the middle of a restart answers on the next attempt too
                    if attempt == SCHEMA_ATTEMPTS - 1 or not (_schema_race(exc)
                                                              or _restarting(exc)):
                        raise
                    time.sleep(1.0 + attempt)
            storage.shown = shown
            return storage
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


class StaleTrialCallback:
    """Optuna's heartbeat-stale callback: retry the trial's parameters once (Optuna's
    RetryHeartbeatStaleTrialCallback) and remember it, so the sweep can end its MLflow run."""

    def __init__(self, max_retry: int = 1) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.failed: list[Any] = []  # FrozenTrials failed since the last `take`

    def __call__(self, study: Any, trial: Any) -> None:
        self.failed.append(trial)
        self.retry(study, trial)

    def take(self) -> list[Any]:
        """The trials failed since the last call."""
        failed, self.failed = self.failed, []
        return failed


def _schema_race(exc: BaseException) -> bool:
    """Whether opening failed because another process created the same tables at that moment
    (a unique violation or "already exists" from the schema creation)."""
    from sqlalchemy import exc as sa

    return any(isinstance(e, sa.IntegrityError) or "duplicate key" in str(e)
               or "already exists" in str(e) for e in causes(exc))


RESTART_MESSAGES = (  # what PostgreSQL and its driver say while the server restarts
    "the database system is starting up", "the database system is shutting down",
    "terminating connection due to administrator command",
    "server closed the connection unexpectedly", "consuming input failed")


def _restarting(exc: BaseException) -> bool:
    """Whether opening failed because the server is restarting (not because it is absent or
    the URL is wrong, which fail at once)."""
    return connection_lost(exc) and any(
        m in str(e).lower() for e in causes(exc) for m in RESTART_MESSAGES)


def connection_lost(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the database connection is gone or
    busy: SQLAlchemy's OperationalError / InterfaceError, an invalidated connection, or a
    session left holding the transaction the lost connection cut."""
    from sqlalchemy import exc as sa

    return any(isinstance(e, sa.OperationalError | sa.InterfaceError | sa.PendingRollbackError)
               or (isinstance(e, sa.DBAPIError) and e.connection_invalidated)
               for e in causes(exc))


def _retrying(method: Callable[..., Any]) -> Callable[..., Any]:
    """method, retried with a growing pause while the database connection is lost, for at
    most RETRY_SECONDS; then a one-line BenchError. The first retry says so on stderr."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        deadline: float | None = None
        pause = 0.5
        while True:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                self.scoped_session.remove()  # this thread's next call gets a fresh session
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_seconds
                    print(f"the Optuna storage {self.shown} is unreachable "
                          f"({mask_credentials(_root_line(exc))}); retrying for up to "
                          f"{self.retry_seconds:.0f} s", file=sys.stderr, flush=True)
                if now >= deadline:
                    raise BenchError(f"lost the Optuna storage {self.shown} for "
                                     f"{self.retry_seconds:.0f} s: "
                                     f"{mask_credentials(_root_line(exc))}") from None
                time.sleep(min(pause, deadline - now))
                pause = min(pause * 2, 10.0)

    return call


@functools.cache
def _reconnecting_rdb_storage() -> type:
    """Optuna's RDBStorage whose calls survive a database restart (see _retrying)."""
    from optuna.storages import RDBStorage

    namespace: dict[str, Any] = {name: _retrying(getattr(RDBStorage, name))
                                 for name in RETRIED_METHODS}
    namespace.update(shown="a database", retry_seconds=RETRY_SECONDS,
                     __doc__="RDBStorage with its calls retried while the database is away.")
    return type("ReconnectingRDBStorage", (RDBStorage,), namespace)


def heartbeat_enabled(storage: Any) -> bool:
    """Whether the storage has Optuna's heartbeat (a database opened by open_storage)."""
    from optuna.storages import RDBStorage

    return isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None


def _root_line(exc: BaseException) -> str:
    """The first line of the innermost error an error was raised from (the driver's own)."""
    error = exc
    while error.__cause__ is not None:
        error = error.__cause__
    return _first_line_of(error)


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


def fail_stale_trials(study: Any, storage: Any, stale_seconds: float = STALE_SECONDS,
                      ) -> list[StaleTrial]:
    """Mark FAIL every RUNNING trial whose worker is gone; return the ones this call failed.
    A database: Optuna's heartbeat check (its callback enqueues a retry); a journal: ours."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import fail_stale_trials as optuna_fail_stale_trials
    from optuna.trial import TrialState

    if heartbeat_enabled(storage):
        callback = storage.get_heartbeat_stale_trial_callback()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fail_stale_trials is "experimental"
            optuna_fail_stale_trials(study)
        grace = storage.grace_period
        return [StaleTrial(t.number, f"no heartbeat for {grace} s (its worker "
                                     f"{t.user_attrs.get('host', '?')}:"
                                     f"{t.user_attrs.get('pid', '?')} is gone)",
                           t.user_attrs.get("mlflow_run_id"))
                for t in callback.take()]
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


def heartbeat_stamp(storage: Any, study: Any, trial: Any) -> Callable[[float], None]:
    """What a worker's Heartbeat calls for its running trial: Optuna's record_heartbeat on a
    database, our `heartbeat` user attribute on a journal."""
    if heartbeat_enabled(storage):
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), trial.number)
        return lambda now: storage.record_heartbeat(trial_id)
    return lambda now: trial.set_user_attr("heartbeat", now)


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
