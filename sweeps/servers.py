"""`bench servers`: check, from this host, the shared servers a lab's hosts use (the Optuna
storage and the MLflow tracking server) and print the settings each host passes to `bench`.

It checks what goes wrong when a lab sets up: the database driver, the database (reachable,
password accepted, Optuna's heartbeat available), the tracking server (reachable, its MLflow
version against ours, artifacts served through its proxy so that every host's checkpoints reach
it). Passwords are masked in everything it prints.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from bench.app.tracking import Tracker, mask_credentials
from bench.core.errors import BenchError
from sweeps.storage import heartbeat_enabled, open_storage


@dataclass(frozen=True)
class Check:
    """One line of the check: what, where, whether it works, and why not."""

    what: str
    target: str  # masked
    ok: bool
    detail: str


def check_storage(url: str) -> Check:
    """The Optuna storage: opened, its studies listed, its liveness named."""
    shown = mask_credentials(url)
    try:
        storage = open_storage(url)
        storage.retry_seconds = 5.0  # a check does not wait for a database that went away
        studies = storage.get_all_studies()
    except BenchError as exc:
        return Check("Optuna storage", shown, False, str(exc))
    liveness = ("Optuna's heartbeat (a killed trial is retried)" if heartbeat_enabled(storage)
                else "bench's heartbeat in the journal")
    if url.startswith("sqlite:"):
        kind = "sqlite database (this machine only: other hosts need PostgreSQL or MySQL)"
    elif "://" in url:
        kind = "database"
    else:
        kind = "journal file (other hosts need it on a file system they all mount)"
    return Check("Optuna storage", shown, True,
                 f"{kind}; {len(studies)} studies; liveness: {liveness}")


def check_tracking(uri: str, runs_dir: Path) -> list[Check]:
    """The tracking store: reachable; for a server, its version and its artifact proxy."""
    import mlflow
    import requests

    shown = mask_credentials(uri)
    try:
        tracker = Tracker(uri, runs_dir)
    except BenchError as exc:
        return [Check("MLflow tracking", shown, False, str(exc))]
    if not tracker.remote:
        return [Check("MLflow tracking", shown, True,
                      "a store on this machine: other hosts cannot log to it (run "
                      "`mlflow server` and give every host --tracking-uri http://HOST:PORT)")]
    base = uri.rstrip("/")
    try:
        version = requests.get(f"{base}/version", timeout=10).text.strip()
        proxy = requests.get(f"{base}/api/2.0/mlflow-artifacts/artifacts", timeout=10)
    except requests.RequestException as exc:
        return [Check("MLflow tracking", shown, False,
                      mask_credentials(str(exc).splitlines()[0]))]
    checks = [Check("MLflow tracking", shown, True,
                    f"server MLflow {version}" + ("" if version == mlflow.__version__ else
                                                  f" (this host has {mlflow.__version__})"))]
    if proxy.status_code == 200:
        checks.append(Check("artifact proxy", f"{shown} (mlflow-artifacts:/)", True,
                            "checkpoints and pictures of every host go through the server"))
    else:
        checks.append(Check("artifact proxy", shown, False,
                            f"not served (HTTP {proxy.status_code}): start the server with "
                            f"--artifacts-destination DIR so every host's checkpoints reach "
                            f"it"))
    return checks


def this_host_address(*urls: str) -> str:
    """The address other hosts most likely reach this one at: the source address of the route
    to the first server named in urls (no packet is sent), else to any outside address."""
    from urllib.parse import urlsplit

    targets = [h for h in (urlsplit(u).hostname for u in urls if "://" in u) if h]
    for target in [*targets, "10.255.255.255"]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect((target, 1))
                address = str(sock.getsockname()[0])
            except OSError:
                continue
            if not address.startswith("127.") or target in ("localhost", "127.0.0.1"):
                return address
    return "127.0.0.1"
