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
from urllib.parse import quote, unquote, urlsplit

import pytest

from tests.conftest import bench_env
from tests.servers import (
    PASSWORD,
    Host,
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


# the command on each host (slow), and a lighter one for the default run: one worker
# per host, four shorter trials; the same restart, kill and checks
FULL = {"trials": 8, "workers": 2, "sets": ["train.steps=100"]}
LIGHT = {"trials": 4, "workers": 1, "sets": ["train.steps=100", "train.batch_size=128",
                                             "eval.num_samples=500", "train.checkpoint_every=0"]}


def sweep_on(host_cmd: list[str], folder: Path, storage: str, tracking: str, study: str,
             scale: dict) -> subprocess.Popen[str]:
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "bench", "sweep", "--method", "ct", "--dataset", "gmm8",
            "--space", "ct-schedule", "--trials", str(scale["trials"]),
            "--workers", str(scale["workers"]), "--heartbeat", "2",
            *[a for s in scale["sets"] for a in ("--set", s)],
            "--storage", storage, "--tracking-uri", tracking, "--study", study]
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


@pytest.mark.parametrize("scale", [
    pytest.param(LIGHT, id="light"),
    pytest.param(FULL, id="issue-command", marks=pytest.mark.slow),  # 5-7 min on 2 cores
])
def test_two_hosts_finish_one_study_through_a_database_restart_and_a_killed_host(
        the_lab: tuple[Network, Postgres, MlflowServer], tmp_path: Path, scale: dict) -> None:
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from sweeps.storage import open_storage

    net, pg, server = the_lab
    host1, host2 = net.hosts[0], net.hosts[1]
    storage, study_name, count = pg.url("optuna"), f"two-hosts-{tmp_path.name}", scale["trials"]
    one = sweep_on(host1.command([]), tmp_path / "host1", storage, server.url, study_name, scale)
    two = sweep_on(host2.command([]), tmp_path / "host2", storage, server.url, study_name, scale)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        db = open_storage(storage)  # one pool for all the polling, reconnecting after restart

        def trials() -> list:
            try:
                return optuna.load_study(study_name=study_name, storage=db).trials
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
    except (AssertionError, subprocess.TimeoutExpired) as exc:  # with what the hosts said
        for proc in (one, two):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        said = [f"host{k}: ...{(p.communicate(timeout=30)[0] or '')[-3000:]}"
                for k, p in ((1, one), (2, two))]
        raise AssertionError("\n".join([str(exc), *said])) from exc
    finally:
        for proc in (one, two):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert one.returncode == 0, out_one[-3000:]
    study = optuna.load_study(study_name=study_name, storage=db)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(finished) == count
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    # the trials host2 was running are FAIL, each retried with its parameters (Optuna's
    # heartbeat callback) and the retry finished on host1
    killed = [t for t in failed if t.user_attrs.get("host") == "host2"]
    assert killed, [(t.number, t.state, t.user_attrs) for t in study.trials]
    retried = {t.system_attrs.get("failed_trial"): t for t in study.trials
               if t.system_attrs.get("failed_trial") is not None}
    for t in killed:  # (a trial killed while its parameters were being drawn is retried with
        if t.params:  # the ones it had, the rest drawn anew)
            assert t.number in retried
            assert t.params.items() <= retried[t.number].params.items()
    started = [retried[t.number].datetime_start.timestamp() for t in killed
               if t.number in retried and retried[t.number].datetime_start]
    if started:  # (a retry may stay WAITING when other trials filled the study first)
        print(f"kill -> replacement started: {min(started) - killed_at:.1f} s")
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
    assert len(set(finished_runs)) == count and set(finished_runs) <= set(nested)
    for t in killed:  # KILLED; or FINISHED when the kill came between the run's end and tell
        if "mlflow_run_id" in t.user_attrs and t.user_attrs["mlflow_run_id"] not in finished_runs:
            run = nested[t.user_attrs["mlflow_run_id"]]
            assert run.data.tags.get("sweep.state") == "FAIL", run.data.tags
            assert run.info.status in ("KILLED", "FINISHED"), run.info.status
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


def test_trials_written_from_several_threads_go_through_database_restarts() -> None:
    """Every storage call a sweep makes (Optuna's cache calls the storage's private ones too)
    survives restarts, also a thread whose session still holds the transaction a restart cut."""
    import threading

    import optuna

    from sweeps.storage import open_storage

    problem = postgres_problem()
    if problem:
        pytest.skip(problem)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pg = Postgres().init().start()
    errors: list[BaseException] = []
    told = [0] * 3
    done = threading.Event()

    def worker(k: int) -> None:
        try:
            study = optuna.create_study(study_name=f"s{k}", storage=open_storage(url))
            while not done.is_set():
                trial = study.ask()
                trial.suggest_float("x", 0.0, 1.0)
                trial.set_user_attr("mlflow_run_id", "0" * 32)
                study.tell(trial, trial.params["x"])
                told[k] += 1
        except BaseException as exc:
            errors.append(exc)

    try:
        url = pg.create_database("optuna")
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        started = time.monotonic()  # every worker writing before the first restart
        while not all(told) and not errors and time.monotonic() - started < 120:
            time.sleep(0.1)
        assert all(told), (told, errors)
        for _ in range(3):
            time.sleep(2.0)
            pg.restart()
        before = list(told)
        time.sleep(2.0)
        done.set()
        for t in threads:
            t.join(timeout=150)
        assert not errors, errors[0]
        assert all(after > b for after, b in zip(told, before, strict=True)), (before, told)
        for k in range(3):  # each call once: as many trials as tells, all COMPLETE
            trials = optuna.load_study(study_name=f"s{k}", storage=open_storage(url)).trials
            assert len(trials) == told[k]
            assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    finally:
        done.set()
        pg.close()


def run_on(host: Host, folder: Path, server: MlflowServer, method: str, steps: int,
           log_every: int, *sets: str) -> subprocess.Popen[str]:
    """`bench run` of a small gmm8 configuration on a host, logging to the server."""
    folder.mkdir(parents=True)
    args = [sys.executable, "-m", "bench", "run", "--method", method, "--dataset", "gmm8",
            "--steps", str(steps), "--nfe", "1", "--tracking-uri", server.url,
            "--set", "train.batch_size=64", "--set", f"train.log_every={log_every}",
            "--set", f"train.checkpoint_every={steps // 4}",
            "--set", "eval.num_samples=1000", *(x for item in sets for x in ("--set", item))]
    return subprocess.Popen(host.command(args), cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=bench_env({"OMP_NUM_THREADS": "1"}))


def wait_for_metrics(client: object, method: str) -> None:
    """Until a RUNNING run of the method, started from now on, has logged its first loss."""
    since = int(time.time() * 1000) - 1000

    def logged() -> bool:
        exp = client.get_experiment_by_name("gmm8")  # type: ignore[attr-defined]
        runs = client.search_runs(  # type: ignore[attr-defined]
            [exp.experiment_id], f"tags.method = '{method}' and attributes.start_time >= "
                                 f"{since}") if exp else []
        return any(r.info.status == "RUNNING" and "train/loss" in r.data.metrics for r in runs)

    wait_until(logged, 240, "the run's first metrics")


def test_a_run_keeps_its_metrics_through_a_tracking_server_outage(
        the_lab: tuple[Network, Postgres, MlflowServer], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    net, _, server = the_lab
    outage = float(os.environ.get("CMBENCH_TEST_OUTAGE_SECONDS", "8"))
    steps, log_every = 1000, 10
    folder = tmp_path / "host1"
    proc = run_on(net.hosts[0], folder, server, "edm", steps, log_every)
    client = MlflowClient(tracking_uri=server.url)
    try:
        wait_for_metrics(client, "edm")
        server.stop()
        time.sleep(outage)
        assert proc.poll() is None, "the run stopped while its server was away"
        server.start()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if not server.healthy():
            server.start()
    assert proc.returncode == 0, err[-3000:]
    assert "does not answer" in err and "answers again" in err, err[-3000:]
    run_id = out.split("run id: ")[-1].split()[0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(log_every, steps + 1, log_every))
    assert "by_iteration/w2_nfe1" in run.data.metrics or "w2" in run.data.metrics, run.data.metrics
    assert not list((folder / "runs" / "outbox").glob("*.jsonl"))
    artifacts = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert artifacts == ["checkpoints/last.pt"], artifacts
    print(f"outage {outage:.0f} s: {len(history)} loss points, "
          f"{sum(len(client.get_metric_history(run_id, k)) for k in run.data.metrics)} "
          f"metric values in all")


def test_torchrun_across_two_hosts_ends_with_the_weights_of_one_process(
        the_lab: tuple[Network, Postgres, MlflowServer], tmp_path: Path) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    from tests.test_distributed import RUN, assert_same_weights, checkpoint_of, run_in

    net, _, server = the_lab
    one = tmp_path / "one"
    one.mkdir()
    assert run_in(one, [], RUN).returncode == 0
    host1, host2 = net.hosts[0], net.hosts[1]
    procs = []
    for rank, host in enumerate((host1, host2)):
        folder = tmp_path / host.hostname
        folder.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               f"--node-rank={rank}", "--nproc-per-node=1", f"--master-addr={host1.address}",
               "--master-port=29500", "-m", "bench", *RUN, "--tracking-uri", server.url]
        procs.append(subprocess.Popen(
            host.command(cmd), cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
            env=bench_env({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"})))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    # one run in the tracking server, made by node 0's rank 0, with the weights of one process
    run_id = outputs[0][0].split("run id: ")[-1].split()[0]
    assert "run id: " not in outputs[1][0]
    client = MlflowClient(tracking_uri=server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    # the checkpoint went through the server's artifact proxy into its artifact folder
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    stored = [p for p in server.artifacts.rglob("last.pt") if run_id in p.parts]
    assert stored, sorted(str(p) for p in server.artifacts.rglob("*"))[:20]
    local = client.download_artifacts(run_id, "checkpoints/last.pt", str(tmp_path / "dl"))
    reference, two_nodes = checkpoint_of(one), torch.load(local, weights_only=True)
    assert_same_weights(reference, two_nodes)
    largest = max(float((v - two_nodes["modules"][m][k]).abs().max())
                  for m, module in reference["modules"].items() for k, v in module.items())
    print(f"two nodes vs one process: largest weight difference {largest:.2e}")


@pytest.mark.slow
def test_writes_of_a_run_whose_server_never_came_back_are_delivered_by_bench_sync(
        the_lab: tuple[Network, Postgres, MlflowServer], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    net, _, server = the_lab
    steps, log_every = 600, 10
    folder = tmp_path / "host1"
    proc = run_on(net.hosts[0], folder, server, "ct", steps, log_every,
                  "tracking.outbox_wait=1")
    client = MlflowClient(tracking_uri=server.url)
    try:
        wait_for_metrics(client, "ct")
        server.stop()
        out, err = proc.communicate(timeout=600)  # the run ends while the server is away
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.start()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "`bench sync` delivers them" in err.strip().splitlines()[-1], err[-3000:]
    kept = list((folder / "runs" / "outbox").glob("*.jsonl"))
    assert len(kept) == 1
    run_id = kept[0].stem
    assert client.get_run(run_id).info.status == "RUNNING"
    sync = subprocess.run(net.hosts[0].command([sys.executable, "-m", "bench", "sync",
                                                "--tracking-uri", server.url]),
                          cwd=folder, capture_output=True, text=True, timeout=300,
                          env=bench_env())
    assert sync.returncode == 0, sync.stderr
    assert f"run {run_id}: delivered" in sync.stderr
    assert not list((folder / "runs" / "outbox").glob("*.jsonl"))
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(log_every, steps + 1, log_every))
    assert any(k.startswith("w2") for k in finished.data.metrics), finished.data.metrics
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == \
        ["checkpoints/last.pt"]


def test_bench_servers_checks_the_lab_from_a_host(
        the_lab: tuple[Network, Postgres, MlflowServer], tmp_path: Path) -> None:
    net, pg, server = the_lab
    out = subprocess.run(net.hosts[0].command([sys.executable, "-m", "bench", "servers",
                                               "--storage", pg.url("optuna"),
                                               "--tracking-uri", server.url]),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=bench_env({"COLUMNS": "200"}))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" ok ") == 3, out.stdout  # storage, tracking, artifact proxy
    assert "Optuna's heartbeat" in out.stdout and "mlflow-artifacts:/" in out.stdout
    assert f"--master-addr {net.hosts[0].address}" in out.stdout
    assert "bench:***@" in out.stdout
    no_secret_in(out.stdout + out.stderr, "bench servers")


def test_hosts_opening_a_new_database_at_once_all_get_the_storage(
        loopback_postgres: str) -> None:
    import psycopg

    name = f"fresh{os.getpid()}{int(time.time())}"
    with psycopg.connect(loopback_postgres, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = loopback_postgres.rsplit("/", 1)[0] + f"/{name}"
    start = time.time() + 3  # every process creates Optuna's tables at the same moment
    code = ("import sys, time; from sweeps.storage import open_storage; "
            f"time.sleep(max(0, {start} - time.time())); "
            "print(len(open_storage(sys.argv[1]).get_all_studies()))")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=bench_env())
             for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0 and out.strip() == "0", err[-2000:]


def test_a_password_in_the_tracking_and_storage_urls_is_nowhere_at_rest(
        loopback_postgres: str, tmp_path: Path) -> None:
    # a sweep whose trials train with checkpoints, tracked in PostgreSQL and with its Optuna
    # study in PostgreSQL, both URLs holding the password; then every file the sweep left
    # (checkpoints, artifacts, outbox, locks, the journal of nothing), its output and every
    # row of both databases are searched for the password, plain and percent-encoded
    import psycopg

    name = f"secret_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(loopback_postgres, autocommit=True) as conn:
        for db in (f"{name}_mlflow", f"{name}_optuna"):
            conn.execute(f'CREATE DATABASE "{db}"')
    base = loopback_postgres.rsplit("/", 1)[0]
    tracking, storage = f"{base}/{name}_mlflow", f"{base}/{name}_optuna"
    password = unquote(urlsplit(loopback_postgres).password or "")
    assert len(password) >= 8, "the server has a password"
    secrets = {password, quote(password, safe=""), *SECRETS}

    def nowhere(text: str, where: str) -> None:
        for secret in secrets:
            assert secret not in text, f"the password appears in {where}"

    # the tracking URL in bench.toml, so that it is part of every trial's config
    (tmp_path / "bench.toml").write_text(f'[tracking]\nuri = "{tracking}"\n')
    out = subprocess.run(
        [sys.executable, "-m", "bench", "sweep", "--method", "ct", "--dataset", "gmm8",
         "--space", "ct-schedule", "--trials", "2", "--pruner", "none",
         "--set", "train.steps=60", "--set", "train.checkpoint_every=20",
         "--set", "train.keep_checkpoints=2", "--set", "train.keep_best=true",
         "--set", "eval.num_samples=300", "--storage", storage],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=bench_env())
    assert out.returncode == 0, out.stderr[-3000:]
    checkpoints = list(tmp_path.rglob("*.pt"))
    assert len(checkpoints) >= 4, checkpoints  # last.pt, kept and best of each trial
    nowhere(out.stdout + out.stderr, "the sweep's output")
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "bench.toml":  # the user's own file
            nowhere(path.read_bytes().decode("latin-1"), str(path))
    for db in (f"{name}_mlflow", f"{name}_optuna"):
        with psycopg.connect(f"{base}/{db}") as conn:
            tables = [row[0] for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
            assert tables
            for table in tables:
                rows = conn.execute(f'SELECT * FROM "{table}"').fetchall()
                nowhere(repr(rows), f"table {table} of {db}")
