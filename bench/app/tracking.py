"""MLflow tracking: the only module that imports mlflow.

Contract (reports and sweeps read it): one experiment per dataset; one run per `bench run`;
tags method, dataset, teacher, metric_tool, device, git_commit, versions; params = the resolved
config flattened; training curves against the iteration; evaluation metrics against NFE.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.app.outbox import Outbox, Record
from bench.core.errors import BenchError, causes
from bench.core.secrets import mask_credentials, mask_url  # noqa: F401 - re-exported
from bench.engine.signals import GUARD, critical, signal_name

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
ENDING_TAGS = ("error", "failed_at_iteration", "stopped")  # why a run last ended early
BUFFER_VALUES = 1000  # asynchronous metrics gathered into one write: at most this many values
BUFFER_SECONDS = 30.0  # ... or what arrived within this long
OUTBOX_RETRY_SECONDS = 15.0  # while a server is away, try delivering the outbox this often
# a tracking server's requests fail over to the outbox after ~7 s of retries, not MLflow's ~2 min
REMOTE_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Failed to establish a new "
                "connection", "Read timed out", "Connection aborted", "RemoteDisconnected")
def _lock_name(db: Path) -> str:
    """The name of a sqlite store's creation lock: a digest of the database's path, so that
    nothing of its URL (a query string, say) ends up in a file name."""
    import hashlib

    return f".{hashlib.sha256(str(db.resolve()).encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def _store_creation_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on .<digest>.lock beside the database while opening a local
    sqlite store.

    MLflow creates and migrates the schema of a new sqlite file on first use; two processes
    doing that at once (two `bench run`s on a fresh runs/ folder) break the migration. Other
    stores, and systems without fcntl, are opened without the lock.
    """
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if not path or path.startswith(":memory:"):
        yield
        return
    try:
        import fcntl
    except ImportError:
        yield
        return
    db = Path(path)
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / _lock_name(db), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# Metric-name prefixes: the MLflow UI draws one chart section per prefix, so the training
# curves (step = iteration) and the evaluations during training (step = iteration) never share
# a section with the evaluation metrics against the NFE (step = NFE), which keep plain names
TRAIN_PREFIX = "train/"  # train/loss, train/lr, train/iters_per_second, ...
BY_ITERATION_PREFIX = "by_iteration/"  # by_iteration/w2_nfe1: a metric at one NFE vs iteration


def training_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The training loop's values under their logged names (train/<name>)."""
    return {TRAIN_PREFIX + k: v for k, v in metrics.items()}


def by_iteration(metrics: Mapping[str, float], nfe: int) -> dict[str, float]:
    """An evaluation's metrics at one NFE under their names against the iteration
    (by_iteration/<metric>_nfe<N>)."""
    return {f"{BY_ITERATION_PREFIX}{k}_nfe{nfe}": v for k, v in metrics.items()}


# MLflow 3 opens an experiment without this tag in its GenAI view (traces, no runs): bench's
# experiments are model training, whose runs, charts and parameters the UI then shows first
KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def default_tracking_uri(runs_dir: Path) -> str:
    """sqlite:///<runs_dir>/mlflow.db (absolute, so the working directory does not matter)."""
    return f"sqlite:///{runs_dir.resolve() / 'mlflow.db'}"


def resolve_tracking_uri(flag: str | None, config_uri: str, runs_dir: Path) -> str:
    """--tracking-uri > MLFLOW_TRACKING_URI > bench.toml tracking.uri > runs/mlflow.db."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or config_uri or default_tracking_uri(
        runs_dir)


@dataclass(frozen=True)
class RunRecord:
    """What the rest of the suite needs to know of a tracked run."""

    run_id: str
    experiment: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    artifact_uri: str
    start_time: int
    metric_keys: tuple[str, ...] = ()  # names of the metrics the run logged, sorted

    @property
    def local_artifact_dir(self) -> Path | None:
        """The artifact folder when the artifact store is local, else None."""
        uri = self.artifact_uri
        if uri.startswith("file://"):
            return Path(uri[len("file://"):])
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", uri):  # no scheme (mlflow-artifacts:/...)
            return Path(uri)
        return None


@dataclass(frozen=True)
class MetricPoint:
    """One logged metric value."""

    step: int  # the iteration for training curves, the measured NFE for evaluation metrics
    value: float
    timestamp: int  # milliseconds since the epoch


class _Uncut:
    """An MlflowClient whose calls on a database store are never cut by SIGINT or SIGTERM:
    each runs as a critical() block, so a signal that arrives inside one (in the middle of a
    SQLAlchemy transaction, which would leave the sqlite file locked for the code that then
    marks the run KILLED) is raised as soon as the call returns. Artifact transfers, which
    can take long and hold no transaction, stay interruptible."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or "artifact" in name:
            return attr

        @functools.wraps(attr)
        def whole(*args: Any, **kwargs: Any) -> Any:
            with critical():
                return attr(*args, **kwargs)

        return whole


class Tracker:
    """A thin typed wrapper over MlflowClient bound to one store."""

    def __init__(self, uri: str, runs_dir: Path, outbox_wait: float = 120.0) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # keep schema-migration chatter off the terminal
            logger = logging.getLogger(name)  # (raised only: the CLI may have set it higher)
            logger.setLevel(max(logger.level, logging.WARNING))
        # MLflow prints a server's run links itself, with the URL as given (a password too)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # nor its artifact-download progress bars (tqdm), which a resume or `bench eval` showed
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

        self.uri = uri
        self.runs_dir = runs_dir
        # a tracking server: writes it cannot take wait in runs/outbox (bench.app.outbox)
        self.remote = uri.startswith(("http://", "https://"))
        self.outbox = Outbox(runs_dir / "outbox") if self.remote else None
        self.outbox_wait = outbox_wait  # at a run's end, seconds to wait for an absent server
        self._away_since: float | None = None  # wall time the server stopped answering
        self._last_try = 0.0  # monotonic time of the last delivery attempt
        if self.remote:
            for key, value in REMOTE_HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        # (run id -> MLflow RunOperations in flight, with the metrics each carries)
        self._pending: dict[str, list[tuple[Any, list[Any]]]] = {}
        self._buffer: dict[str, list[Any]] = {}  # run id -> metrics not yet queued
        self._buffer_since: dict[str, float] = {}  # run id -> when its buffer was started
        self._logged: dict[str, set[tuple[str, int]]] = {}  # reopened run -> points it holds
        try:
            with _store_creation_lock(uri):
                client = MlflowClient(tracking_uri=uri)
                # a database store: no transaction is ever cut by a signal (see _Uncut)
                self.client = client if self.remote else _Uncut(client)
                self.client.search_experiments(max_results=1)
        except Exception as exc:
            raise BenchError(f"cannot reach the tracking store {mask_credentials(uri)}: "
                             f"{_first_line(exc)}") from None

    # --- experiments and runs -----------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """Id of the experiment `name`, created with artifacts under runs/mlartifacts for a
        local store, or where a tracking server puts them (its artifact proxy,
        mlflow-artifacts:/, when it serves artifacts), and marked as model training
        (EXPERIMENT_KIND) so that the MLflow UI opens it on its runs."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if KIND_TAG not in exp.tags:
                self.client.set_experiment_tag(exp.experiment_id, KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        location = None if self.remote else (self.runs_dir / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created concurrently by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(
        self,
        *,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
    ) -> str:
        """Create a run with its tags, params and small text artifacts (`files`: name ->
        text, a config.toml say) and return its id. No signal cuts this short: one that
        arrives is raised once the run is whole, which then ends KILLED; an error ends it
        FAILED."""
        all_tags = {k: mask_credentials(str(v)) for k, v in tags.items()}
        all_tags["mlflow.runName"] = run_name
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        experiment_id = self.experiment_id(experiment)
        run_id: str | None = None
        try:
            with critical():
                run_id = self.client.create_run(experiment_id, tags=all_tags,
                                                run_name=run_name).info.run_id
                if params:
                    self.log_params(run_id, params)
                if files:
                    with tempfile.TemporaryDirectory() as tmp:
                        for name, text in files.items():
                            path = Path(tmp) / name
                            path.write_text(mask_credentials(text))
                            self.log_artifact(run_id, path)
        except BaseException as exc:
            if run_id is not None:
                interrupted = isinstance(exc, KeyboardInterrupt)
                reason = (f"interrupted ({signal_name(exc)}) as the run was created"
                          if interrupted else f"{type(exc).__name__}: {_first_line(exc)}")
                with GUARD.shielded():
                    self.set_tags(run_id, {"error": reason})
                    self.end_run(run_id, "KILLED" if interrupted else "FAILED")
            raise
        return run_id

    def reopen(self, run_id: str) -> None:
        """Mark a finished, failed or killed run as running again (resume): its tags of the
        last ending (error, stopped) go, and from now on a metric point at a (name, step) the
        run already holds is not logged again (a resume repeats the iterations after its
        checkpoint and an interrupted evaluation, with the same values)."""
        with critical():
            self.client.update_run(run_id, status="RUNNING")
        for key in ENDING_TAGS:
            self.delete_tag(run_id, key)
        self._logged[run_id] = {(key, m.step) for key in self.client.get_run(run_id).data.metrics
                                for m in self.client.get_metric_history(run_id, key)}

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run as FINISHED, FAILED or KILLED, once its queued metrics are stored.

        A tracking server that is away gets `outbox_wait` seconds to come back; then the writes
        stay in the outbox (`bench sync` delivers them) and a FINISHED run is a BenchError
        that says so (a failed or killed run only says so on stderr: its own error goes on).
        """
        self.flush(run_id)
        end_time = int(time.time() * 1000)
        self._write(run_id, {"op": "end", "status": status, "end_time": end_time},
                    lambda: self.client.set_terminated(run_id, status=status,
                                                       end_time=end_time))
        if self.outbox is None or not self.outbox.pending(run_id):
            return
        deadline = time.monotonic() + self.outbox_wait
        while time.monotonic() < deadline:
            if self._deliver(run_id, force=True):
                return
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        message = (f"the tracking server {mask_credentials(self.uri)} is unreachable: "
                   f"{self.outbox.count(run_id)} writes of run {run_id} are kept in "
                   f"{self.outbox.path(run_id)}; `bench sync` delivers them")
        if status == "FINISHED":
            raise BenchError(message)
        print(message, file=sys.stderr, flush=True)

    def get_run(self, run_id: str) -> RunRecord:
        """The run with this id; an unknown id is a one-line error."""
        from mlflow.exceptions import MlflowException

        if not RUN_ID_PATTERN.match(run_id):
            raise BenchError(f"unknown run id {run_id!r} (run ids are 32 hex characters)")
        self.flush(run_id)
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if unreachable(exc):
                raise BenchError(f"cannot reach the tracking store {mask_credentials(self.uri)}"
                                 f": {_first_line(exc)}") from None
            raise BenchError(f"unknown run id {run_id!r} in {mask_credentials(self.uri)}"
                             ) from None
        exp = self.client.get_experiment(run.info.experiment_id)
        return RunRecord(
            run_id=run.info.run_id,
            experiment=exp.name,
            status=run.info.status,
            tags=dict(run.data.tags),
            params=dict(run.data.params),
            artifact_uri=run.info.artifact_uri,
            start_time=run.info.start_time,
            metric_keys=tuple(sorted(run.data.metrics)),
        )

    def search(self, experiment: str, filter_string: str = "", max_results: int = 1000,
               ) -> list[RunRecord]:
        """Runs of one experiment, newest first."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        runs = self.client.search_runs([exp.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time DESC"],
                                       max_results=max_results)
        return [
            RunRecord(r.info.run_id, experiment, r.info.status, dict(r.data.tags),
                      dict(r.data.params), r.info.artifact_uri, r.info.start_time,
                      tuple(sorted(r.data.metrics)))
            for r in runs
        ]

    def experiment_names(self) -> list[str]:
        """Names of the store's active experiments, sorted."""
        return sorted(self.experiments())

    def experiments(self) -> dict[str, str]:
        """Name -> id of the store's active experiments."""
        from mlflow.entities import ViewType

        return {e.name: e.experiment_id for e in self.client.search_experiments(
            view_type=ViewType.ACTIVE_ONLY, max_results=50000)}

    def finished_runs(self, experiment: str) -> list[RunRecord]:
        """The FINISHED runs of one experiment (nested runs included), newest first."""
        return self.search(experiment, "attributes.status = 'FINISHED'", max_results=50000)

    def metric_points(self, run_id: str, key: str) -> list[MetricPoint]:
        """Every logged value of one metric with its step and timestamp."""
        self.flush(run_id)
        return [MetricPoint(m.step, m.value, m.timestamp)
                for m in self.client.get_metric_history(run_id, key)]

    # --- logging ------------------------------------------------------------------------------

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params in batches (values masked and cut to MLflow's limit)."""
        from mlflow.entities import Param

        items = [Param(k, mask_credentials(_param_value(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i:i + 100]

            def send(chunk: list[Param] = chunk) -> None:
                self.client.log_batch(run_id, params=chunk, synchronous=True)

            self._write(run_id, {"op": "params", "params": {p.key: p.value for p in chunk}},
                        send)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set several tags."""
        from mlflow.entities import RunTag

        items = [RunTag(k, mask_credentials(str(v))[:5000]) for k, v in tags.items()]
        if items:
            self._write(run_id, {"op": "tags", "tags": {t.key: t.value for t in items}},
                        lambda: self.client.log_batch(run_id, tags=items, synchronous=True))

    def delete_tag(self, run_id: str, key: str) -> None:
        """Remove a tag (no error when it is absent)."""
        from mlflow.exceptions import MlflowException

        def delete() -> None:
            with contextlib.suppress(MlflowException):
                self.client.delete_tag(run_id, key)

        self._write(run_id, {"op": "delete_tag", "key": key}, delete)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int,
                    wait: bool = True) -> None:
        """Log several metrics at one step.

        wait=False queues them on MLflow's asynchronous logging thread, so a training loop
        does not wait for the store, gathered into one write per BUFFER_VALUES values or
        BUFFER_SECONDS: MLflow's sqlite store spends ~40 ms on a write of 60 values and ~150
        ms on one of 600, CPU taken from a training loop on the same cores, so few large
        writes cost it least; flush(), end_run and the readers of the run write and wait for
        what is buffered and queued.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        logged = self._logged.get(run_id)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if logged is None or (k, int(step)) not in logged]
        if not items:
            return
        if wait:
            self._write(run_id, _metrics_record(items),
                        lambda: self.client.log_batch(run_id, metrics=items, synchronous=True))
            return
        buffered = self._buffer.setdefault(run_id, [])
        if not buffered:
            self._buffer_since[run_id] = time.monotonic()
        buffered.extend(items)
        if (len(buffered) >= BUFFER_VALUES
                or time.monotonic() - self._buffer_since[run_id] >= BUFFER_SECONDS):
            self._send(run_id)

    def _send(self, run_id: str) -> None:
        """Queue the run's buffered metrics as one asynchronous write (to the outbox while
        the server is away)."""
        buffered = self._buffer.pop(run_id, None)
        if not buffered:
            return
        if self.outbox is not None and self.outbox.pending(run_id) and not self._deliver(run_id):
            self.outbox.append(run_id, [_metrics_record(buffered)])
            return
        queued = self._pending.setdefault(run_id, [])
        if len(queued) >= 64:  # long done by now: collect them (and any error)
            for pending, items in queued[:32]:
                self._settle(run_id, pending, items)
            del queued[:32]
        queued.append((self.client.log_batch(run_id, metrics=buffered, synchronous=False),
                       buffered))

    def _settle(self, run_id: str, pending: Any, items: list[Any]) -> None:
        """Wait for one asynchronous write; one the server did not take goes to the outbox."""
        try:
            pending.wait()
        except Exception as exc:
            if self.outbox is None or not unreachable(exc):
                raise
            self._went_away(exc)
            self.outbox.append(run_id, [_metrics_record(items)])

    def flush(self, run_id: str) -> None:
        """Wait until the run's buffered and queued metrics are in the store, or in the
        outbox when the tracking server is away (another error surfaces here)."""
        self._send(run_id)
        for pending, items in self._pending.pop(run_id, []):
            self._settle(run_id, pending, items)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or folder) into the run's artifacts (through the server's
        artifact proxy for a tracking server; from the outbox, its content then, when the
        server was away)."""
        self._write(run_id, {"op": "artifact", "path": str(path.resolve()),
                             "artifact_path": artifact_path},
                    lambda: self._upload(run_id, path, artifact_path))

    def _upload(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    # --- the outbox (a tracking server that is away) -------------------------------------------

    def _write(self, run_id: str, record: Record, call: Callable[[], Any]) -> None:
        """One write to a run: made now, or kept in the outbox (behind what is already
        there) while the tracking server does not answer. A signal waits until it is made."""
        with critical():
            self._write_now(run_id, record, call)

    def _write_now(self, run_id: str, record: Record, call: Callable[[], Any]) -> None:
        if self.outbox is None:
            call()
            return
        if self.outbox.pending(run_id) and not self._deliver(run_id):
            self.outbox.append(run_id, [record])
            return
        try:
            call()
        except Exception as exc:
            if not unreachable(exc):
                raise
            self._went_away(exc)
            self.outbox.append(run_id, [record])

    def _went_away(self, exc: BaseException) -> None:
        if self._away_since is None:
            self._away_since = time.time()
            print(f"the tracking server {mask_credentials(self.uri)} does not answer "
                  f"({_first_line(exc)[:200]}); training goes on and its writes wait in "
                  f"{self.outbox.folder if self.outbox else '?'}", file=sys.stderr, flush=True)

    def _deliver(self, run_id: str, force: bool = False) -> bool:
        """Send the run's outbox in order; True when it is empty afterwards. Tried at most
        every OUTBOX_RETRY_SECONDS unless forced."""
        assert self.outbox is not None
        if not force and time.monotonic() - self._last_try < OUTBOX_RETRY_SECONDS:
            return False
        self._last_try = time.monotonic()
        if not force and not self._answers():
            return False
        records = self.outbox.records(run_id)
        for i, record in enumerate(records):
            try:
                self._apply(run_id, record)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                self.outbox.replace(run_id, records[i:])
                return False
        self.outbox.replace(run_id, [])
        if self._away_since is not None and records:
            print(f"the tracking server {mask_credentials(self.uri)} answers again: "
                  f"delivered what waited for run {run_id}", file=sys.stderr, flush=True)
        self._away_since = None
        return True

    def _answers(self) -> bool:
        """Whether the tracking server's /health answers within 2 s: a cheap look before a
        delivery (MLflow's retries of a real write would stall training ~7 s)."""
        import requests

        try:
            return requests.get(f"{self.uri.rstrip('/')}/health", timeout=2).ok
        except requests.RequestException:
            return False

    def _apply(self, run_id: str, record: Record) -> None:
        """Make one outbox write against the server."""
        from mlflow.entities import Metric, Param, RunTag

        op = record["op"]
        if op == "metrics":
            metrics = [Metric(k, float(v), int(ts), int(step))
                       for k, v, ts, step in record["metrics"]]
            for i in range(0, len(metrics), BUFFER_VALUES):
                self.client.log_batch(run_id, metrics=metrics[i:i + BUFFER_VALUES],
                                      synchronous=True)
        elif op == "params":
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in
                                                  record["params"].items()], synchronous=True)
        elif op == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in
                                                record["tags"].items()], synchronous=True)
        elif op == "delete_tag":
            from mlflow.exceptions import MlflowException

            with contextlib.suppress(MlflowException):
                self.client.delete_tag(run_id, record["key"])
        elif op == "artifact":
            path = Path(record["path"])
            if path.exists():  # a checkpoint since replaced by a newer one: that one is sent
                self._upload(run_id, path, record["artifact_path"])
        elif op == "end":
            self.client.set_terminated(run_id, status=record["status"],
                                       end_time=int(record["end_time"]))
        else:
            raise BenchError(f"unknown outbox record {op!r} for run {run_id}")

    def deliver_outbox(self, report: Callable[[str], None]) -> int:
        """`bench sync`: deliver every run's outbox to this store; the runs left waiting."""
        if self.outbox is None:
            raise BenchError(f"{mask_credentials(self.uri)} is not a tracking server: nothing "
                             f"waits for it (an outbox is kept for http(s):// stores)")
        left = 0
        for run_id in self.outbox.runs():
            count = self.outbox.count(run_id)
            try:
                self.client.get_run(run_id)
            except Exception as exc:
                if unreachable(exc):
                    raise BenchError(f"cannot reach the tracking store "
                                     f"{mask_credentials(self.uri)}: {_first_line(exc)}"
                                     ) from None
                report(f"run {run_id}: not in {mask_credentials(self.uri)} (give the "
                       f"--tracking-uri it was logged to); {count} writes kept")
                left += 1
                continue
            if self._deliver(run_id, force=True):
                report(f"run {run_id}: delivered {count} writes")
            else:
                report(f"run {run_id}: the server stopped answering; "
                       f"{self.outbox.count(run_id)} writes kept")
                left += 1
        return left

    def download_artifact(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        """Fetch one artifact of a run to dst; a missing artifact is a one-line error."""
        dst.mkdir(parents=True, exist_ok=True)
        try:
            local = self.client.download_artifacts(run_id, artifact_path, str(dst))
        except Exception as exc:
            raise BenchError(f"run {run_id} has no artifact {artifact_path!r}: "
                             f"{_first_line(exc)}") from None
        return Path(local)


def unreachable(exc: BaseException) -> bool:
    """Whether a tracking error says the server did not answer (refused, timed out, or kept
    failing with server errors through MLflow's retries), not that the request was wrong."""
    import requests

    return any(isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout)
               or any(marker in str(e) for marker in _UNREACHABLE) for e in causes(exc))


def _metrics_record(items: Sequence[Any]) -> Record:
    """MLflow Metric entities as an outbox record (their own timestamps and steps kept)."""
    return {"op": "metrics", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in items]}


def param_text(value: Any) -> str:
    """A config value as it is stored as an MLflow param (before masking)."""
    return _param_value(value)


def _param_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def git_commit(cwd: Path | None = None) -> str:
    """The git commit of the code being run, or 'unknown'."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or here, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def package_versions(names: Sequence[str] = ("cmbench", "torch", "numpy", "mlflow", "pot",
                                             "torch-fidelity")) -> str:
    """'name=version' pairs of the packages that decide the numbers."""
    from importlib import metadata

    parts = []
    for name in names:
        try:
            parts.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return " ".join(parts)
