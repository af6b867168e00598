"""Beyond one machine, with real servers: PostgreSQL for Optuna and for MLflow's backend store,
`mlflow server` with served artifacts, and hosts made of Linux network namespaces (each its own
address and host name). `.ci/run` starts a PostgreSQL on loopback for the single-host tests
(CMBENCH_TEST_POSTGRES); without it they start their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import bench_env
from tests.servers import (
    PASSWORD,
    MlflowServer,
    Network,
    Postgres,
    lab,
    namespace_problem,
    postgres_problem,
)

pytestmark = pytest.mark.servers

WRONG = 'wr"ong@pass/word'  # not the servers' password
SECRETS = (PASSWORD, quote(PASSWORD, safe=""), WRONG, quote(WRONG, safe=""))


def no_secret_in(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"the password appears in {where}"


@pytest.fixture(scope="module")
def the_lab() -> Iterator[tuple[Network, Postgres, MlflowServer]]:
    """Three hosts: host1 and host2 run bench, host3 runs PostgreSQL and `mlflow server`."""
    for problem in (namespace_problem(), postgres_problem()):
        if problem:
            pytest.skip(problem)
    with lab(3) as made:
        yield made


@pytest.fixture(scope="module")
def loopback_postgres() -> Iterator[str]:
    """A PostgreSQL on loopback: the one .ci/run started, or one of our own."""
    url = os.environ.get("CMBENCH_TEST_POSTGRES")
    if url:
        yield url
        return
    problem = postgres_problem()
    if problem:
        pytest.skip(problem)
    pg = Postgres().init().start()
    try:
        yield pg.url("postgres")
    finally:
        pg.close()


def sweep_on(host_cmd: list[str], folder: Path, storage: str, tracking: str, study: str,
             steps: int) -> subprocess.Popen[str]:
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "bench", "sweep", "--method", "ct", "--dataset", "gmm8",
            "--space", "ct-schedule", "--trials", "8", "--workers", "2", "--heartbeat", "2",
            "--set", f"train.steps={steps}", "--storage", storage, "--tracking-uri", tracking,
            "--study", study]
    return subprocess.Popen(host_cmd + args, cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=bench_env({"OMP_NUM_THREADS": "1"}))


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_hosts_finish_one_study_through_a_database_restart_and_a_killed_host(
        the_lab: tuple[Network, Postgres, MlflowServer], tmp_path: Path) -> None:
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    net, pg, server = the_lab
    host1, host2 = net.hosts[0], net.hosts[1]
    storage, study_name = pg.url("optuna"), "two-hosts"
    one = sweep_on(host1.command([]), tmp_path / "host1", storage, server.url, study_name, 150)
    two = sweep_on(host2.command([]), tmp_path / "host2", storage, server.url, study_name, 150)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def trials() -> list:
            try:
                return optuna.load_study(study_name=study_name, storage=storage).trials
            except KeyError:  # not created yet
                return []

        # the database restarts once a trial has finished: every connection is cut
        wait_until(lambda: any(t.state.is_finished() for t in trials()), 240, "a trial")
        pg.restart()
        # then host2 dies (SIGKILL to its sweep and workers) while it trains a trial
        wait_until(lambda: any(t.state == TrialState.RUNNING and
                               t.user_attrs.get("host") == "host2" and
                               "mlflow_run_id" in t.user_attrs for t in trials()),
                   240, "a trial on host2")
        killed_at = time.time()
        os.killpg(two.pid, signal.SIGKILL)
        out_two = two.communicate(timeout=30)[0]
        out_one = one.communicate(timeout=400)[0]
    finally:
        for proc in (one, two):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert one.returncode == 0, out_one[-3000:]
    study = optuna.load_study(study_name=study_name, storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(finished) == 8
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    # the trials host2 was running are FAIL, each retried with its parameters (Optuna's
    # heartbeat callback) and the retry finished on host1
    killed = [t for t in failed if t.user_attrs.get("host") == "host2"]
    assert killed, [(t.number, t.state, t.user_attrs) for t in study.trials]
    retried = {t.system_attrs.get("failed_trial"): t for t in study.trials
               if t.system_attrs.get("failed_trial") is not None}
    for t in killed:
        if t.params:
            assert t.number in retried and retried[t.number].params == t.params
    replacement = min(retried[t.number].datetime_start.timestamp() for t in killed
                      if t.number in retried and retried[t.number].datetime_start)
    print(f"kill -> replacement started: {replacement - killed_at:.1f} s")
    # MLflow: one parent, its nested runs are the trials' runs, the killed ones KILLED
    client = MlflowClient(tracking_uri=server.url)
    experiment = client.get_experiment_by_name("gmm8")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`sweep.study` = '{study_name}'", max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = {r.info.run_id: r for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    finished_runs = [t.user_attrs["mlflow_run_id"] for t in finished]
    assert len(set(finished_runs)) == 8 and set(finished_runs) <= set(nested)
    for t in killed:
        if "mlflow_run_id" in t.user_attrs and t.user_attrs["mlflow_run_id"] not in finished_runs:
            assert nested[t.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    assert not [r for r in nested.values() if r.info.status == "RUNNING"]
    # the password is nowhere: output of both hosts, params and tags of every run
    no_secret_in(out_one + out_two, "the sweep output")
    for r in runs:
        no_secret_in(repr(r.data.params) + repr(r.data.tags), f"run {r.info.run_id}")
    assert "bench:***@" in out_one


def test_storage_errors_are_one_line_with_the_password_masked(loopback_postgres: str,
                                                              bench: object) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(loopback_postgres)
    wrong = f"postgresql://bench:{quote(WRONG, safe='')}@127.0.0.1:{parts.port}/postgres"
    closed = f"postgresql://bench:{quote(WRONG, safe='')}@127.0.0.1:1/postgres"
    for url, fragment in ((wrong, "password authentication failed"),
                          (closed, "cannot open the Optuna storage")):
        out = bench("sweep", "--method", "ct", "--dataset", "gmm8", "--space", "ct-schedule",  # type: ignore[operator]
                    "--trials", "1", "--storage", url)
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "Traceback" not in text, text
        assert fragment in text and "bench:***@127.0.0.1" in text, text
        no_secret_in(text, "the error")


def test_a_database_away_longer_than_the_retry_bound_is_one_clear_error() -> None:
    from bench.core.errors import BenchError
    from sweeps.storage import open_storage

    problem = postgres_problem()
    if problem:
        pytest.skip(problem)
    pg = Postgres().init().start()
    try:
        url = pg.create_database("optuna")
        storage = open_storage(url)
        assert storage.get_all_studies() == []
        # a restart is survived: the pool reconnects (pre-ping) or the call is retried
        pg.restart()
        assert storage.get_all_studies() == []
        # a database that stays away: retried for the bound, then one line, password masked
        storage.retry_seconds = 3.0
        pg.stop()
        started = time.monotonic()
        with pytest.raises(BenchError) as err:
            storage.get_all_studies()
        assert 3.0 <= time.monotonic() - started < 30
        message = str(err.value)
        assert message.startswith("lost the Optuna storage postgresql://bench:***@127.0.0.1")
        assert "\n" not in message
        no_secret_in(message, "the error")
    finally:
        pg.close()
