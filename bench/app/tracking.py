"""MLflow tracking: the only module that imports mlflow.

Contract (reports and sweeps read it): one experiment per dataset; one run per `bench run`;
tags method, dataset, teacher, metric_tool, device, git_commit, versions; params = the resolved
config flattened; training curves against the iteration; evaluation metrics against NFE.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
BUFFER_VALUES = 1000  # asynchronous metrics gathered into one write: at most this many values
BUFFER_SECONDS = 30.0  # ... or what arrived within this long
# scheme://user:password@host: the password runs to the last "@" of the URL, so an unencoded
# "@" or "/" in it is masked too; the user may be empty (redis://:password@host)
_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s\"']*):[^\s\"']*@")
_QUERY_SECRETS = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd|secret|token)=)[^&;\s\"']+",
                            re.IGNORECASE)


def mask_credentials(text: str) -> str:
    """Replace the password of any URL in text (user:password@ or ?password=) by ***."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY_SECRETS.sub(lambda m: f"{m['key']}***", text)


@contextlib.contextmanager
def _store_creation_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on <db>.lock while opening a local sqlite store.

    MLflow creates and migrates the schema of a new sqlite file on first use; two processes
    doing that at once (two `bench run`s on a fresh runs/ folder) break the migration. Other
    stores, and systems without fcntl, are opened without the lock.
    """
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
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
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
        if "://" not in uri:
            return Path(uri)
        return None


@dataclass(frozen=True)
class MetricPoint:
    """One logged metric value."""

    step: int  # the iteration for training curves, the measured NFE for evaluation metrics
    value: float
    timestamp: int  # milliseconds since the epoch


class Tracker:
    """A thin typed wrapper over MlflowClient bound to one store."""

    def __init__(self, uri: str, runs_dir: Path) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # keep schema-migration chatter off the terminal
            logging.getLogger(name).setLevel(logging.WARNING)
        # MLflow prints a server's run links itself, with the URL as given (a password too)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

        self.uri = uri
        self.runs_dir = runs_dir
        self._pending: dict[str, list[Any]] = {}  # run id -> MLflow RunOperations in flight
        self._buffer: dict[str, list[Any]] = {}  # run id -> metrics not yet queued
        self._buffer_since: dict[str, float] = {}  # run id -> when its buffer was started
        try:
            with _store_creation_lock(uri):
                self.client = MlflowClient(tracking_uri=uri)
                self.client.search_experiments(max_results=1)
        except Exception as exc:
            raise BenchError(f"cannot reach the tracking store {mask_credentials(uri)}: "
                             f"{_first_line(exc)}") from None

    # --- experiments and runs -----------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """Id of the experiment `name`, created with artifacts under runs/mlartifacts."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (self.runs_dir / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
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
    ) -> str:
        """Create a run and return its id."""
        all_tags = {k: mask_credentials(str(v)) for k, v in tags.items()}
        all_tags["mlflow.runName"] = run_name
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), tags=all_tags,
                                     run_name=run_name)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark a finished, failed or killed run as running again (resume)."""
        self.client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run as FINISHED, FAILED or KILLED, once its queued metrics are stored."""
        self.flush(run_id)
        self.client.set_terminated(run_id, status=status)

    def get_run(self, run_id: str) -> RunRecord:
        """The run with this id; an unknown id is a one-line error."""
        from mlflow.exceptions import MlflowException

        if not RUN_ID_PATTERN.match(run_id):
            raise BenchError(f"unknown run id {run_id!r} (run ids are 32 hex characters)")
        self.flush(run_id)
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
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
        from mlflow.entities import ViewType

        return sorted(e.name for e in self.client.search_experiments(
            view_type=ViewType.ACTIVE_ONLY, max_results=50000))

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
            self.client.log_batch(run_id, params=items[i:i + 100], synchronous=True)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set several tags."""
        from mlflow.entities import RunTag

        items = [RunTag(k, mask_credentials(str(v))[:5000]) for k, v in tags.items()]
        if items:
            self.client.log_batch(run_id, tags=items, synchronous=True)

    def delete_tag(self, run_id: str, key: str) -> None:
        """Remove a tag (no error when it is absent)."""
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):
            self.client.delete_tag(run_id, key)

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
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if not items:
            return
        if wait:
            self.client.log_batch(run_id, metrics=items, synchronous=True)
            return
        buffered = self._buffer.setdefault(run_id, [])
        if not buffered:
            self._buffer_since[run_id] = time.monotonic()
        buffered.extend(items)
        if (len(buffered) >= BUFFER_VALUES
                or time.monotonic() - self._buffer_since[run_id] >= BUFFER_SECONDS):
            self._send(run_id)

    def _send(self, run_id: str) -> None:
        """Queue the run's buffered metrics as one asynchronous write."""
        buffered = self._buffer.pop(run_id, None)
        if not buffered:
            return
        queued = self._pending.setdefault(run_id, [])
        if len(queued) >= 64:  # long done by now: collect them (and any error)
            for pending in queued[:32]:
                pending.wait()
            del queued[:32]
        queued.append(self.client.log_batch(run_id, metrics=buffered, synchronous=False))

    def flush(self, run_id: str) -> None:
        """Wait until the run's buffered and queued metrics are in the store (an error
        surfaces here)."""
        self._send(run_id)
        for pending in self._pending.pop(run_id, []):
            pending.wait()

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or folder) into the run's artifacts."""
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def download_artifact(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        """Fetch one artifact of a run to dst; a missing artifact is a one-line error."""
        dst.mkdir(parents=True, exist_ok=True)
        try:
            local = self.client.download_artifacts(run_id, artifact_path, str(dst))
        except Exception as exc:
            raise BenchError(f"run {run_id} has no artifact {artifact_path!r}: "
                             f"{_first_line(exc)}") from None
        return Path(local)


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
