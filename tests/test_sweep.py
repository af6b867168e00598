"""`bench sweep` end to end: real Optuna storages, real MLflow stores and real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from bench.core.errors import UsageError
from sweeps.objective import parse_objectives
from sweeps.space import builtin_spaces, literal, load_space, load_space_file
from tests.conftest import run_id_of
from tests.test_cli import assert_one_line_error

# a trial in a couple of seconds: few iterations, small batches, a small evaluation
TINY = ["--set", "train.steps=40", "--set", "train.batch_size=64", "--set",
        "eval.num_samples=200", "--set", "train.log_every=10", "--set", "train.checkpoint_every=0"]
CT = ["sweep", "--method", "ct", "--dataset", "gmm8", "--space", "ct-schedule"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def journal(path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(path)))


def client_for(cwd: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")


def nested_runs(client: MlflowClient, parent: str) -> list:
    exp = client.get_experiment_by_name("gmm8")
    return client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


# --- space files -----------------------------------------------------------------------------


def test_builtin_spaces_load_and_cover_the_issue() -> None:
    names = set(builtin_spaces())
    assert {"ct-schedule", "cd-ema", "cd-n", "pd-steps", "ict-curriculum"} <= names
    assert {f"{m}-lr" for m in ("edm", "cd", "ct", "ict", "pd")} <= names
    for name, path in builtin_spaces().items():
        space = load_space_file(path, name)
        assert space.params and space.description and space.methods, name
    assert [p.name for p in load_space(["ct-schedule"]).params] == ["ct.s0", "ct.s1", "ct.mu0"]
    combined = load_space(["ct-schedule", "ct-lr"])
    assert combined.label == "ct-schedule+ct-lr" and len(combined.params) == 4


@pytest.mark.parametrize(("text", "fragment"), [
    ("[params\n", "not valid TOML"),
    ("description = 'x'\n", "no parameters"),
    ("foo = 1\n[params.'train.lr']\ntype = 'float'\nlow = 1\nhigh = 2\n", "unknown top-level"),
    ("[params.'train.lr']\nlow = 1\nhigh = 2\n", "type must be one of"),
    ("[params.'train.lr']\ntype = 'float'\nhigh = 2\n", "low is required"),
    ("[params.'train.lr']\ntype = 'float'\nlow = 2\nhigh = 1\n", "low must be < high"),
    ("[params.'train.lr']\ntype = 'float'\nlow = 0\nhigh = 1\nlog = true\n", "needs low > 0"),
    ("[params.'train.lr']\ntype = 'float'\nlow = 1\nhigh = 2\nchoices = [1]\n", "not allowed"),
    ("[params.'ct.s0']\ntype = 'int'\nlow = 1.5\nhigh = 4\n", "must be an integer"),
    ("[params.'cd.solver']\ntype = 'categorical'\nchoices = []\n", "non-empty list"),
    ("[params.'cd.solver']\ntype = 'categorical'\nchoices = ['a', 'a']\n", "distinct"),
    ("[params.'train.lr']\ntype = 'float'\nlow = 1e-4\nhigh = 1\nlog = true\nstep = 0.1\n",
     "step cannot be combined"),
    ("[params]\n'train.lr' = 3\n", "must be a table"),
])
def test_malformed_space_files_are_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_space([str(path)])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_literals_read_back_as_the_same_value() -> None:
    from bench.core.config import parse_set

    for value in (3, 0.1, 1e-05, True, "heun", "true", "a b", "1e-3"):
        assert parse_set(f"k={literal(value)}")[1] == value


# --- objectives ------------------------------------------------------------------------------


def test_objective_parsing() -> None:
    lower = {"w2": True, "mode_recall": False, "fid": True}
    (o,) = parse_objectives(["w2@1"], lower, "fid@1")
    assert (o.metric, o.nfe, o.direction, o.key) == ("w2", 1, "minimize", "w2_nfe1")
    assert [o.label for o in parse_objectives([], lower, "fid@1")] == ["fid@1"]
    both = parse_objectives(["w2@1, mode_recall@2"], lower, "w2@1")
    assert [(o.label, o.direction) for o in both] == [("w2@1", "minimize"),
                                                     ("mode_recall@2", "maximize")]
    assert len(parse_objectives(["w2@1", "w2@2"], lower, "w2@1")) == 2
    for bad, fragment in (("w2@x", "METRIC@NFE"), ("w2", "METRIC@NFE"), ("@1", "METRIC@NFE"),
                          ("w2@0", "METRIC@NFE"), ("foo@1", "unknown objective metric 'foo'")):
        with pytest.raises(UsageError, match=fragment):
            parse_objectives([bad], lower, "w2@1")
    with pytest.raises(UsageError, match="twice"):
        parse_objectives(["w2@1,w2@1"], lower, "w2@1")


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"spaces": ("nope",)}, "unknown space 'nope'; valid: cd-ema"),
    ({"objectives": ("w2@x",)}, "--objective expects METRIC@NFE"),
    ({"objectives": ("foo@1",)}, "unknown objective metric 'foo'"),
    ({"objectives": ("fid@1",)}, "metric 'fid' is not computed on gmm8"),
    ({"spaces": ("bad.toml",)}, "unknown config key 'ct.s9'"),
    ({"spaces": ("cd-n",)}, "space cd-n is for cd, not ct"),
    ({"sets": ("ct.s0=3",)}, "ct.s0 is swept by space ct-schedule and fixed by --set"),
    ({"sets": ("eval.nfe=[2]",)}, "objective NFE 1 is not in eval.nfe"),
    ({"pruner": "best"}, "--pruner must be one of"),
    ({"method": "nope"}, "unknown method 'nope'"),
])
def test_bad_sweep_input_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          changes: dict, fragment: str) -> None:
    from sweeps import SweepRequest, run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "bad.toml").write_text("[params.'ct.s9']\ntype = 'int'\nlow = 1\nhigh = 4\n")
    request = SweepRequest(**{"method": "ct", "dataset": "gmm8", "spaces": ("ct-schedule",),
                              "trials": 2, **changes})
    lines: list[str] = []
    with pytest.raises(UsageError) as info:
        run_sweep(request, lines.append)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert lines == []
    assert not (tmp_path / "runs" / "optuna.journal").exists()


def test_bad_sweep_input_on_the_command_line_is_one_line(bench) -> None:
    assert_one_line_error(bench(*CT, "--trials", "2", "--objective", "w2@x"), 2, "w2@x")
    assert_one_line_error(bench("sweep", "--method", "ct", "--dataset", "gmm8", "--space",
                                "nope", "--trials", "2"), 2, "unknown space 'nope'")


def test_storage_credentials_are_masked(bench) -> None:
    result = bench(*CT, "--trials", "1", *TINY, "--storage",
                   "postgresql://alice:s3cret@127.0.0.1:1/optuna")
    assert result.returncode == 1
    assert "s3cret" not in result.stdout + result.stderr
    assert "alice:***@" in result.stderr


# --- studies ---------------------------------------------------------------------------------


def test_two_workers_on_a_journal_file_with_nested_mlflow_runs(bench, tmp_path: Path) -> None:
    result = bench(*CT, "--trials", "3", "--workers", "2", *TINY, "--pruner", "none")
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="ct-gmm8-ct-schedule",
                              storage=journal(tmp_path / "runs" / "optuna.journal"))
    assert states(study) == ["COMPLETE"] * 3
    assert len({t.user_attrs["pid"] for t in study.trials}) <= 2
    assert "best trial" in result.stdout and "bench run --method ct --dataset gmm8" in result.stdout

    client = client_for(tmp_path)
    parent_id = run_id_of(result.stdout)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "true"
    children = nested_runs(client, parent_id)
    assert len(children) == 3
    assert sorted(int(r.data.tags["sweep.trial"]) for r in children) == [0, 1, 2]
    assert all(r.info.status == "FINISHED" and r.data.tags["sweep.state"] == "COMPLETE"
               for r in children)
    best = [r for r in children if r.data.tags.get("sweep.best") == "true"]
    assert len(best) == 1
    assert best[0].info.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    assert parent.data.tags["sweep.best_run_id"] == best[0].info.run_id
    assert parent.data.metrics["best_w2_nfe1"] == pytest.approx(study.best_value)
    assert best[0].data.params["ct.s0"] == str(study.best_params["ct.s0"])

    # the same command again: the study is complete, nothing runs, same parent run
    again = bench(*CT, "--trials", "3", "--workers", "2", *TINY, "--pruner", "none")
    assert again.returncode == 0, again.stderr
    assert "already holds 3 finished trials" in again.stderr
    assert run_id_of(again.stdout) == parent_id
    assert len(nested_runs(client, parent_id)) == 3


@pytest.mark.slow  # workers, resuming and the journal run by default in the tests around it
def test_two_workers_on_sqlite_multi_objective_then_resume(
        bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [*CT, "--workers", "2", "--storage", url, "--study", "mo",
            "--objective", "w2@1,mode_recall@2", *TINY]
    result = bench(*args, "--trials", "2")
    assert result.returncode == 0, result.stderr
    assert "pruning is off" in result.stderr and "Pareto front" in result.stdout
    study = optuna.load_study(study_name="mo", storage=url)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert states(study) == ["COMPLETE"] * 2
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2

    more = bench(*args, "--trials", "3")
    assert more.returncode == 0, more.stderr
    assert "2 of 3 trials finished" in more.stderr
    assert states(optuna.load_study(study_name="mo", storage=url)) == ["COMPLETE"] * 3
    client = client_for(tmp_path)
    parent_id = run_id_of(more.stdout)
    assert parent_id == run_id_of(result.stdout)
    children = nested_runs(client, parent_id)
    assert len(children) == 3
    assert any(r.data.tags.get("sweep.pareto") == "true" for r in children)

    # the same study with another objective is refused
    from sweeps import SweepRequest, run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    request = SweepRequest(method="ct", dataset="gmm8", spaces=("ct-schedule",), trials=3,
                           storage=url, study="mo", objectives=("w2@1,mode_recall@1",),
                           sets=tuple(TINY[1::2]))
    with pytest.raises(UsageError, match="study 'mo' was made with other objectives"):
        run_sweep(request, lambda message: None)


def test_pruned_trial_ends_its_run_cleanly(bench, tmp_path: Path) -> None:
    space = tmp_path / "lr.toml"
    space.write_text("[params.'train.lr']\ntype = 'float'\nlow = 1e-9\nhigh = 1e-2\nlog = true\n")
    (tmp_path / "runs").mkdir()
    storage = journal(tmp_path / "runs" / "optuna.journal")
    study = optuna.create_study(study_name="prune", storage=storage, direction="minimize")
    for lr in (1e-2, 1e-2, 1e-2, 1e-9):  # the median pruner starts after 3 finished trials
        study.enqueue_trial({"train.lr": lr})
    result = bench("sweep", "--method", "ct", "--dataset", "gmm8", "--space", str(space),
                   "--study", "prune", "--trials", "4",
                   "--set", "train.steps=40", "--set", "train.eval_every=20",
                   "--set", "eval.metrics=['w2']",
                   "--set", "train.batch_size=128", "--set", "eval.num_samples=200",
                   "--set", "train.warmup_steps=0", "--set", "train.checkpoint_every=0",
                   "--set", "train.ema_rate=0")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    study = optuna.load_study(study_name="prune", storage=storage)
    assert states(study) == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    pruned = study.trials[3]
    assert list(pruned.intermediate_values) == [20]
    run = client_for(tmp_path).get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["sweep.state"] == "PRUNED"
    assert run.data.tags["stopped"].startswith("pruned by the sweep")
    assert "error" not in run.data.tags
    assert "pruned at iteration 20" in result.stdout


# --- killed workers --------------------------------------------------------------------------


def start_sweep(tmp_path: Path, args: list[str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_running(path: Path, study_name: str, count: int, timeout: float = 240,
                     ) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials whose worker has recorded its pid and its MLflow run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            try:
                study = optuna.load_study(study_name=study_name, storage=journal(path))
            except KeyError:
                study = None
            if study is not None:
                running = [t for t in study.get_trials(states=(TrialState.RUNNING,))
                           if "pid" in t.user_attrs and "mlflow_run_id" in t.user_attrs]
                if len(running) >= count:
                    return running
        time.sleep(0.2)
    raise AssertionError("no running trial appeared")


def test_killed_worker_trial_is_failed_and_the_study_completes(tmp_path: Path) -> None:
    args = [*CT, "--trials", "3", "--workers", "2", "--pruner", "none", *TINY,
            "--set", "train.steps=150"]
    path = tmp_path / "runs" / "optuna.journal"
    proc = start_sweep(tmp_path, args)
    victim = wait_for_running(path, "ct-gmm8-ct-schedule", 1)[0]
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "killed by signal 9" in err and f"trial {victim.number} marked failed" in err

    rerun = subprocess.run([sys.executable, "-m", "bench", *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr
    study = optuna.load_study(study_name="ct-gmm8-ct-schedule", storage=journal(path))
    trials = study.get_trials()
    assert sum(t.state in FINISHED for t in trials) == 3
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [victim.number]
    client = client_for(tmp_path)
    runs = nested_runs(client, run_id_of(rerun.stdout))
    assert len(runs) == 4
    numbers = [int(r.data.tags["sweep.trial"]) for r in runs]
    assert len(set(numbers)) == 4
    killed = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["sweep.state"] == "FAIL"


def test_killed_sweep_resumes_on_rerun(tmp_path: Path) -> None:
    args = [*CT, "--trials", "2", "--pruner", "none", *TINY, "--set", "train.steps=150"]
    path = tmp_path / "runs" / "optuna.journal"
    proc = start_sweep(tmp_path, args)
    victim = wait_for_running(path, "ct-gmm8-ct-schedule", 1)[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)

    rerun = subprocess.run([sys.executable, "-m", "bench", *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"trial {victim.number} marked failed" in rerun.stderr
    study = optuna.load_study(study_name="ct-gmm8-ct-schedule", storage=journal(path))
    assert sum(t.state in FINISHED for t in study.trials) == 2
    assert [t.number for t in study.trials if t.state == TrialState.FAIL] == [victim.number]
    client = client_for(tmp_path)
    parent = client.get_run(run_id_of(rerun.stdout))
    assert parent.info.status == "FINISHED"
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "KILLED"


def test_timeout_stops_starting_trials(bench, tmp_path: Path) -> None:
    result = bench(*CT, "--trials", "50", "--timeout", "0.5", *TINY)
    assert result.returncode == 0, result.stderr
    assert "--timeout reached" in result.stderr
    study = optuna.load_study(study_name="ct-gmm8-ct-schedule",
                              storage=journal(tmp_path / "runs" / "optuna.journal"))
    assert len(study.trials) < 50
    assert client_for(tmp_path).get_run(run_id_of(result.stdout)).info.status == "KILLED"


def test_sigterm_to_the_sweep_stops_its_workers(tmp_path: Path) -> None:
    args = [*CT, "--trials", "2", "--workers", "2", "--pruner", "none", *TINY,
            "--set", "train.steps=400"]
    path = tmp_path / "runs" / "optuna.journal"
    proc = start_sweep(tmp_path, args)
    victim = wait_for_running(path, "ct-gmm8-ct-schedule", 1)[0]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "sweep interrupted (SIGTERM)" in err.splitlines()[-1]
    with pytest.raises(ProcessLookupError):  # the worker was stopped and reaped, not orphaned
        os.kill(victim.user_attrs["pid"], 0)
    study = optuna.load_study(study_name="ct-gmm8-ct-schedule", storage=journal(path))
    assert study.trials[victim.number].state == TrialState.FAIL
    client = client_for(tmp_path)
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "KILLED"


def test_a_trial_killed_before_recording_its_run_id_still_ends_that_run_killed(
        tmp_path: Path) -> None:
    from bench.app.tracking import Tracker
    from sweeps.driver import WorkerPlan, close_stale

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs")
    parent = tracker.start_run(experiment="gmm8", run_name="sweep", tags={"sweep": "true"})
    storage = journal(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name="s", storage=storage)
    other = optuna.create_study(study_name="t", storage=storage)
    trial, decoy_trial = study.ask(), other.ask()
    # the worker created its run (tags come with it) and died before `mlflow_run_id` was set
    run = tracker.start_run(experiment="gmm8", run_name="s-trial-0", parent_run_id=parent,
                            tags={"sweep.study": "s", "sweep.trial": str(trial.number)})
    decoy = tracker.start_run(experiment="gmm8", run_name="t-trial-0", parent_run_id=parent,
                              tags={"sweep.study": "t", "sweep.trial": str(decoy_trial.number)})
    trial.set_user_attr("host", "elsewhere")
    trial.set_user_attr("heartbeat", time.time() - 3600)
    plan = WorkerPlan(storage="", study="s", trials=1, method="ct", dataset="gmm8", params=[],
                      objectives=[], fixed_sets=[], eval_sets=[], user_sets=[], pruner="none",
                      startup_trials=0, tracking_uri="", runs_dir=str(tmp_path / "runs"),
                      parent_run_id=parent, deadline=None, lock="", stale_seconds=60)
    notes: list[str] = []
    failed = close_stale(study, storage, tracker, plan, notes.append)
    assert [s.number for s in failed] == [trial.number] and failed[0].run_id is None
    assert study.trials[0].state == TrialState.FAIL
    assert f"trial {trial.number} marked failed: no heartbeat from elsewhere" in notes[0]
    assert tracker.get_run(run).status == "KILLED"
    assert tracker.client.get_run(run).data.tags["sweep.state"] == "FAIL"
    assert tracker.get_run(decoy).status == "RUNNING"  # another study's trial 0 is untouched
