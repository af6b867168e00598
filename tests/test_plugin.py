"""A method from outside the repository: examples/cmbench-uedm (the README's "Adding a method"
example) built as a wheel, pip-installed into a folder of its own and found through the
`cmbench.methods` entry-point group, then run through every command a built-in method runs
through. Nothing of the project is edited."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, run_bench, run_id_of
from tests.plugin_wheel import build_wheel

EXAMPLE = REPO / "examples" / "cmbench-uedm"
TINY = ["--set", "train.steps=60", "--set", "eval.num_samples=200", "--set",
        "eval.batch_size=200", "--set", "train.checkpoint_every=0"]


def install(project: Path, root: Path) -> dict[str, str]:
    """pip-install the project's wheel into root/site; the environment that sees it."""
    wheel = build_wheel(project, root)
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--disable-pip-version-check", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    return {"PYTHONPATH": str(site)}


def test_readme_shows_the_example_verbatim() -> None:
    readme = (REPO / "README.md").read_text()
    for path in (EXAMPLE / "cmbench_uedm" / "__init__.py", EXAMPLE / "pyproject.toml"):
        assert path.read_text().strip() in readme, f"README's copy of {path.name} differs"


class Installed:
    """The example installed in a folder of its own, a working folder, and its first run."""

    def __init__(self, root: Path) -> None:
        self.env = install(EXAMPLE, root / "dist")
        self.cwd = root / "work"
        self.cwd.mkdir()
        # run: its presets (odd NFEs for Heun) apply, its own parameters are optimised and saved
        self.run_id = run_id_of(self.bench("run", "--method", "uedm", "--dataset", "gmm8",
                                           *TINY).stdout)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{self.cwd / 'runs' / 'mlflow.db'}")

    def bench(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = run_bench(list(args), self.cwd, env=self.env)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return Installed(tmp_path_factory.mktemp("plugin"))


def test_plugin_method_runs_like_a_builtin(installed: Installed) -> None:
    listing = installed.bench("methods").stdout
    assert "uedm (cmbench_uedm): EDM with a learned uncertainty weighting" in listing
    assert "uedm-lr" in listing

    rid, client, cwd = installed.run_id, installed.client, installed.cwd
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "uedm"
    assert run.data.params["uedm.weighting_width"] == "32"
    steps = sorted(m.step for m in client.get_metric_history(rid, "w2"))
    assert [s for s in steps if s != 7] == [1, 3, 5, 9, 17]  # (7: the evaluation below)
    (ckpt,) = (cwd / "runs" / "mlartifacts").glob(f"{rid}/artifacts/checkpoints/last.pt")
    saved = torch.load(ckpt, weights_only=True)
    assert list(saved["modules"]) == ["student", "ema", "weighting"]
    groups = saved["loop"]["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups][1:] == [4]  # the weighting's 2 weights, 2 biases
    assert all(i in saved["loop"]["optimizer"]["state"] for i in groups[1]["params"])

    # eval at another NFE, into the same run
    installed.bench("eval", "--run", rid, "--nfe", "7")
    assert 7 in {m.step for m in client.get_metric_history(rid, "w2")}

    # its config section is validated like a built-in one
    bad = run_bench(["run", "--method", "uedm", "--dataset", "gmm8", "--set",
                     "uedm.p_std=-1"], cwd, env=installed.env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.strip()] == [
        "bench: error: uedm.p_std must be > 0, got -1"]


@pytest.mark.slow  # sweeps, the suite and reports of built-in methods run by default elsewhere
def test_plugin_method_sweeps_joins_the_suite_and_the_report(installed: Installed) -> None:
    cwd = installed.cwd
    # sweep over the space the plug-in ships
    installed.bench("sweep", "--method", "uedm", "--dataset", "gmm8", "--space", "uedm-lr",
                    "--study", "plug", "--trials", "2", *TINY)
    study = optuna.load_study(study_name="plug", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(cwd / "runs" / "optuna.journal"))))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(1e-4 <= t.params["train.lr"] <= 1e-2 for t in study.trials)

    # the suite knows it (its first run is the one it would make) and reports it
    said = " ".join(installed.bench("suite", "--dataset", "gmm8", "--methods", "uedm",
                                    *TINY).stderr.split())
    assert "uedm on gmm8 already finished" in said
    (cwd / "runs" / "reports" / "gmm8" / "table.md").unlink()
    installed.bench("report")
    table = (cwd / "runs" / "reports" / "gmm8" / "table.md").read_text()
    assert "| *Diffusion baselines* |" in table and "| EDM-uw (Heun) | 17 |" in table


@pytest.mark.parametrize(("target", "fragment"), [
    ("cmbench_missing:Method", "method plug-in 'broken' (cmbench_missing:Method) failed to "
                               "load: ModuleNotFoundError"),
    ("json:JSONDecoder", "method plug-in 'broken' (json:JSONDecoder) must name a Method "
                         "subclass whose name is 'broken'"),
])
def test_a_broken_plugin_is_one_line(tmp_path: Path, target: str, fragment: str) -> None:
    project = tmp_path / "broken"
    (project / "cmbench_broken").mkdir(parents=True)
    (project / "cmbench_broken" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "cmbench-broken"\nversion = "0.1"\n'
        f'[project.entry-points."cmbench.methods"]\nbroken = "{target}"\n')
    result = run_bench(["methods"], tmp_path, env=install(project, tmp_path / "dist"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
