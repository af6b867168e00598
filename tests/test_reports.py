"""`bench report` and `bench suite` against a real MLflow sqlite store in tmp_path."""

from __future__ import annotations

import csv
import io
import shutil
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from bench.app.tracking import Tracker, default_tracking_uri
from bench.core.errors import BenchError, UsageError
from reports.build import build_report, parse_formats
from reports.store import select_runs
from reports.suite import check_suite, parse_methods, split_sets
from reports.tables import build_table, format_value, latex_escape, to_csv, to_markdown

TABLE_FILES = ("table.md", "table.tex", "table.csv")


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty store with MLflow's schema, made once: migrating a new sqlite file is slow."""
    runs = tmp_path_factory.mktemp("template") / "runs"
    Tracker(default_tracking_uri(runs), runs)
    return runs / "mlflow.db"


def tracker_for(root: Path, template: Path) -> Tracker:
    """A tracker on a fresh store under root/runs (a copy of the empty template)."""
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, runs / "mlflow.db")
    return Tracker(default_tracking_uri(runs), runs)


def add_run(tracker: Tracker, dataset: str, method: str, results: dict[int, dict[str, float]],
            teacher: str = "none", status: str = "FINISHED", sampler: str = "",
            grid: Path | None = None) -> str:
    """A run as `bench run` logs it: tags, params, metrics with step = NFE."""
    run_id = tracker.start_run(experiment=dataset, run_name=f"{method}-{dataset}", tags={
        "method": method, "dataset": dataset, "teacher": teacher,
        "metrics": ",".join(next(iter(results.values())))})
    tracker.log_params(run_id, {"method": method, "dataset": dataset, "teacher": teacher,
                                "sampler": sampler})
    for nfe, metrics in results.items():
        tracker.log_metrics(run_id, {**metrics, "seconds_per_sample": 1e-4 * nfe,
                                     "nfe_measured": nfe}, nfe)
        if grid is not None:
            tracker.log_artifact(run_id, grid, "samples")
    tracker.end_run(run_id, status)
    time.sleep(0.01)  # distinct start times, so "latest" is well defined
    return run_id


def tiny_png(path: Path, shade: int) -> Path:
    Image.new("L", (4, 4), shade).save(path)
    return path


@pytest.fixture
def store(tmp_path: Path, template_db: Path) -> tuple[Tracker, dict[str, str]]:
    """cifar10 runs with known FID/IS (a paper dataset) and gmm8 runs with known w2."""
    tracker = tracker_for(tmp_path, template_db)
    grid = tiny_png(tmp_path / "nfe001.png", 128)
    ids = {
        "edm": add_run(tracker, "cifar10", "edm", {35: {"fid": 2.5, "is": 9.5}}),
        "pd_old": add_run(tracker, "cifar10", "pd", {1: {"fid": 7.0, "is": 8.0}},
                          teacher="a" * 32),
        "pd": add_run(tracker, "cifar10", "pd", {1: {"fid": 9.25, "is": 8.5},
                                                 2: {"fid": 6.0, "is": 9.0}}, teacher="a" * 32),
        "cd": add_run(tracker, "cifar10", "cd", {1: {"fid": 4.0, "is": 9.0},
                                                 2: {"fid": 3.125, "is": 9.75}},
                      teacher="a" * 32, grid=grid),
        "cd_failed": add_run(tracker, "cifar10", "cd", {1: {"fid": 0.5, "is": 20.0}},
                             status="FAILED"),
        "ct": add_run(tracker, "cifar10", "ct", {1: {"fid": 9.0, "is": 8.0},
                                                 2: {"fid": 6.0, "is": 9.75}}),
        "gmm_edm": add_run(tracker, "gmm8", "edm", {1: {"w2": 0.9}, 3: {"w2": 0.3}}),
        "gmm_cd": add_run(tracker, "gmm8", "cd", {1: {"w2": 0.2}, 2: {"w2": 0.15}},
                          teacher="analytic"),
    }
    # a sweep's own run (tagged as the driver tags it) is not a result: it logs each trial's
    # objective against the trial number
    parent = tracker.start_run(experiment="gmm8", run_name="sweep",
                               tags={"dataset": "gmm8", "method": "cd", "sweep": "true"})
    tracker.log_metrics(parent, {"w2": 0.01}, 1)
    tracker.end_run(parent)
    return tracker, ids


def rows_by_key(table) -> dict[tuple[str, int], int]:  # noqa: ANN001
    return {(r.method, r.nfe): i for i, r in enumerate(table.rows)}


def test_table_cells_bold_marks_and_paper_columns(store) -> None:
    tracker, ids = store
    selection = select_runs(tracker, ["cifar10"], "latest")
    table = build_table(selection, "cifar10")
    assert [c.key for c in table.columns] == ["fid", "paper:fid", "is"]
    index = rows_by_key(table)
    # rows: the paper's group order, ours and the paper's (method, NFE) pairs together
    assert [(r.group, r.method, r.nfe) for r in table.rows] == [
        ("Diffusion baselines", "edm", 35),
        ("Diffusion baselines", "ddim", 10), ("Diffusion baselines", "ddim", 20),
        ("Diffusion baselines", "ddim", 50),
        ("Distillation", "pd", 1), ("Distillation", "pd", 2),
        ("Distillation", "cd", 1), ("Distillation", "cd", 2),
        ("Distillation", "scd", 1), ("Distillation", "scd", 2),
        ("Direct training", "ct", 1), ("Direct training", "ct", 2),
        ("Direct training", "ict", 1), ("Direct training", "ict", 2),
        ("Direct training", "ect", 1), ("Direct training", "ect", 2),
        ("Direct training", "sct", 1), ("Direct training", "sct", 2),
        ("Direct training", "meanflow", 1),
    ]
    # ours: the newest finished run per method (not the older pd, not the failed cd)
    assert table.cell(index["pd", 1], "fid") == "9.250"
    assert table.rows[index["pd", 1]].run_id == ids["pd"]
    assert table.cell(index["cd", 2], "fid") == "3.125"
    assert table.cell(index["edm", 35], "fid") == "2.500"
    assert table.cell(index["ddim", 50], "fid") == "–"
    # the paper's numbers as printed, beside ours
    paper = {(r.method, r.nfe): r.text.get("paper:fid") for r in table.rows}
    assert paper == {("edm", 35): "2.04", ("ddim", 10): "8.23", ("ddim", 20): "6.84",
                     ("ddim", 50): "4.67", ("pd", 1): "8.34", ("pd", 2): "5.58",
                     ("cd", 1): "3.55", ("cd", 2): "2.93", ("ct", 1): "8.70",
                     ("ct", 2): "5.83", ("ict", 1): "2.83", ("ict", 2): "2.46",
                     ("scd", 1): "3.66", ("scd", 2): "2.52", ("ect", 1): "3.60",
                     ("ect", 2): "2.11", ("sct", 1): "2.85", ("sct", 2): "2.06",
                     ("meanflow", 1): "2.92"}
    # bold: lowest FID (ours and paper), highest IS with both ties
    assert {k for k in table.bold} == {
        (index["edm", 35], "fid"), (index["edm", 35], "paper:fid"),
        (index["cd", 2], "is"), (index["ct", 2], "is")}
    # the teacher each row used
    assert table.rows[index["cd", 1]].teacher == "run aaaaaaaa"
    assert table.rows[index["ct", 1]].teacher == "-"
    assert table.rows[index["edm", 35]].label == "EDM (Heun)"
    assert any("Song et al. 2023" in n and "Table 1" in n for n in table.notes)

    md = to_markdown(table)
    assert "| EDM (Heun) | 35 | **2.500** | **2.04** | 9.500 | - | " in md
    assert "| DDIM (Euler) | 50 | – | 4.67 | – |  | paper |" in md
    assert md.startswith("### cifar10: FID against NFE\n")
    assert "| *Distillation* |" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    cd2 = next(r for r in rows if r["method"] == "cd" and r["nfe"] == "2")
    assert (cd2["fid"], cd2["paper:fid"], cd2["is"]) == ("3.125", "2.93", "9.75")
    assert cd2["teacher"] == "a" * 32 and cd2["run_id"] == ids["cd"]
    assert cd2["seconds_per_sample"] == repr(2e-4)


def test_points_dataset_has_no_paper_column_and_ignores_untagged_runs(store) -> None:
    tracker, ids = store
    table = build_table(select_runs(tracker, ["gmm8"], "latest"), "gmm8")
    assert [c.key for c in table.columns] == ["w2"]
    assert [(r.method, r.nfe, r.text["w2"]) for r in table.rows] == [
        ("edm", 1, "0.900"), ("edm", 3, "0.300"), ("cd", 1, "0.200"), ("cd", 2, "0.150")]
    assert table.bold == {(3, "w2")}
    assert table.rows[2].teacher == "analytic"


def test_select_best_and_newest_value_of_a_reevaluated_nfe(tmp_path: Path,
                                                            template_db: Path) -> None:
    tracker = tracker_for(tmp_path, template_db)
    good = add_run(tracker, "gmm8", "cd", {1: {"w2": 0.2}, 2: {"w2": 0.5}})
    newer = add_run(tracker, "gmm8", "cd", {1: {"w2": 0.4}, 2: {"w2": 0.1}, 4: {"w2": 0.05}})
    assert select_runs(tracker, ["gmm8"], "latest").runs["gmm8", "cd"].run_id == newer
    # best: the primary metric at the smallest NFE that every candidate evaluated (1)
    assert select_runs(tracker, ["gmm8"], "best").runs["gmm8", "cd"].run_id == good
    # `bench eval` again at NFE 1 logs a newer value, which counts
    time.sleep(0.01)
    tracker.log_metrics(newer, {"w2": 0.1}, 1)
    selection = select_runs(tracker, ["gmm8"], "best")
    assert selection.runs["gmm8", "cd"].run_id == newer
    table = build_table(selection, "gmm8")
    assert [r.text["w2"] for r in table.rows] == ["0.100", "0.100", "0.050"]
    # a pinned run wins over the rule
    pinned = select_runs(tracker, ["gmm8"], "best", {("gmm8", "cd"): good})
    assert pinned.runs["gmm8", "cd"].run_id == good
    # a sweep trial is never "latest" while a plain run exists, but can be "best"
    parent = tracker.start_run(experiment="gmm8", run_name="sweep", tags={"dataset": "gmm8"})
    trial = tracker.start_run(experiment="gmm8", run_name="trial", parent_run_id=parent,
                              tags={"method": "cd", "dataset": "gmm8"})
    tracker.log_metrics(trial, {"w2": 0.01}, 1)
    tracker.end_run(trial)
    assert select_runs(tracker, ["gmm8"], "latest").runs["gmm8", "cd"].run_id == newer
    assert select_runs(tracker, ["gmm8"], "best").runs["gmm8", "cd"].run_id == trial


def test_report_files_run_and_grids(store, tmp_path: Path) -> None:
    tracker, ids = store
    out = tmp_path / "out"
    output = build_report(tracker, None, "latest", list(parse_formats("md,tex,html,csv")), out)
    names = {p.relative_to(out).as_posix() for p in output.files}
    assert names == {"report.html",
                     *(f"{d}/{m}_vs_{x}.{e}" for d, m in (("cifar10", "fid"), ("gmm8", "w2"))
                       for x in ("nfe", "seconds") for e in ("png", "svg")),
                     *(f"{d}/{f}" for d in ("cifar10", "gmm8") for f in TABLE_FILES)}
    tex = (out / "cifar10" / "table.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\textbf{2.500}" in tex
    assert "\\multicolumn{7}{l}{\\textit{Direct training}}" in tex
    page = (out / "report.html").read_text()
    assert "<b>2.500</b>" in page and "CD, NFE 1 (run " in page
    assert page.count("data:image/png;base64,") == 4 + 1  # 2 x 2 plots, one sample picture
    assert "w2 against sampling seconds per sample" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere
    run = MlflowClient(tracking_uri=tracker.uri).get_run(output.run_id)
    assert run.data.tags["report_datasets"] == "cifar10,gmm8"
    logged = Path(run.info.artifact_uri.removeprefix("file://"))
    assert (logged / "cifar10" / "table.md").read_text() == \
        (out / "cifar10" / "table.md").read_text()
    assert (logged / "report.html").is_file()
    # the report run is not read back as a result; --format picks the files
    again = build_report(tracker, None, "latest", ["md"], tmp_path / "again")
    assert [t.dataset for t in again.tables] == ["cifar10", "gmm8"]
    assert sorted(p.name for p in again.files) == [
        "fid_vs_nfe.png", "fid_vs_nfe.svg", "fid_vs_seconds.png", "fid_vs_seconds.svg",
        "table.md", "table.md", "w2_vs_nfe.png", "w2_vs_nfe.svg", "w2_vs_seconds.png",
        "w2_vs_seconds.svg"]


def test_user_errors(store, tmp_path: Path, template_db: Path) -> None:
    tracker, _ = store
    with pytest.raises(UsageError, match="unknown dataset 'nope'"):
        select_runs(tracker, ["nope"])
    with pytest.raises(BenchError, match="no finished runs for moons"):
        select_runs(tracker, ["moons"])
    with pytest.raises(BenchError, match="no finished runs in the store"):
        select_runs(tracker_for(tmp_path / "empty", template_db))
    with pytest.raises(UsageError, match="--select"):
        select_runs(tracker, None, "worst")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--format"):
        parse_formats("md,pdf")


def test_small_helpers() -> None:
    assert parse_formats("csv, md") == ["md", "csv"]
    assert parse_methods("ict,cd,edm,cd") == ["edm", "cd", "ict"]
    with pytest.raises(UsageError, match="unknown method 'xyz'"):
        parse_methods("cd,xyz")
    assert split_sets(["train.steps=5", "cd:cd.n_scales=9", "data.path=folder:x"]) == \
        (["train.steps=5", "data.path=folder:x"], {"cd": ["cd.n_scales=9"]})
    with pytest.raises(UsageError, match="'pdd' is not a method"):
        split_sets(["pdd:pd.iters_per_stage=3"])
    assert [format_value(v) for v in (0.12345, 12.345, 123.45, 12345.6, -0.5)] == \
        ["0.123", "12.35", "123.5", "12346", "-0.500"]
    assert latex_escape("mode_recall & 50% ↓ – #1") == \
        "mode\\_recall \\& 50\\% $\\downarrow$ -- \\#1"


def test_report_cli_is_deterministic_and_errors_are_one_line(bench, tmp_path: Path,
                                                             template_db: Path) -> None:
    tracker = tracker_for(tmp_path, template_db)
    add_run(tracker, "gmm8", "edm", {1: {"w2": 0.9}, 3: {"w2": 0.3}})
    add_run(tracker, "gmm8", "cd", {1: {"w2": 0.2}}, teacher="analytic")
    result = bench("report")
    assert result.returncode == 0, result.stderr
    reports = tmp_path / "runs" / "reports"
    first = {p.relative_to(reports): p.read_bytes() for p in reports.rglob("*") if p.is_file()}
    assert len(first) == 8  # report.html, 4 tables, w2 vs NFE and vs seconds (png, svg)
    shutil.rmtree(reports)
    result = bench("report", "--dataset", "gmm8")
    assert result.returncode == 0, result.stderr
    second = {p.relative_to(reports): p.read_bytes() for p in reports.rglob("*") if p.is_file()}
    assert second == first
    for args, code, fragment in ((["--dataset", "nope"], 2, "unknown dataset 'nope'"),
                                 (["--dataset", "digits"], 1, "no finished runs for digits")):
        result = bench("report", *args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == code and len(lines) == 1 and fragment in lines[0], \
            result.stderr


FAST_SUITE = ["--set", "train.steps=20", "--set", "pd:pd.iters_per_stage=3", "--set",
              "eval.num_samples=200", "--set", "eval.batch_size=200"]


def test_suite_runs_skips_resumes_and_reports(bench, tmp_path: Path, template_db: Path) -> None:
    tracker_for(tmp_path, template_db)
    result = bench("suite", "--dataset", "gmm8", *FAST_SUITE)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri=default_tracking_uri(tmp_path / "runs"))
    exp = client.get_experiment_by_name("gmm8")
    runs = {r.data.tags["method"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["cd", "ct", "ddim", "ect", "edm", "ict", "meanflow", "pd", "scd",
                            "sct"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # ECT tunes the suite's own EDM run (it needs weights); the distillations take the
    # exact denoiser
    assert {m: runs[m].data.tags["teacher"] for m in runs} == {
        "edm": "none", "ddim": "analytic", "pd": "analytic", "cd": "analytic", "ct": "none",
        "ict": "none", "ect": runs["edm"].info.run_id, "sct": "none", "scd": "analytic",
        "meanflow": "none"}
    reports = tmp_path / "runs" / "reports"
    for name in (*(f"gmm8/{f}" for f in TABLE_FILES), "gmm8/w2_vs_nfe.png",
                 "gmm8/w2_vs_nfe.svg", "gmm8/w2_vs_seconds.png", "gmm8/w2_vs_seconds.svg",
                 "report.html"):
        assert (reports / name).is_file(), name
    md = (reports / "gmm8" / "table.md").read_text()
    for method in ("EDM (Heun)", "DDIM (Euler)", "PD", "CD", "CT", "iCT", "ECT", "sCT", "sCD",
                   "MeanFlow"):
        assert f"| {method} | " in md

    # a killed run with the same config is resumed, finished ones are skipped
    cd_id = runs["cd"].info.run_id
    client.set_terminated(cd_id, "KILLED")
    result = bench("suite", "--dataset", "gmm8", "--methods", "cd,edm", *FAST_SUITE)
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert "edm on gmm8 already finished" in said and f"resuming killed run {cd_id}" in said
    assert client.get_run(cd_id).info.status == "FINISHED"
    assert len(client.search_runs([exp.experiment_id], "tags.method = 'cd'")) == 1

    # the report is regenerated from the store alone
    tables = {f: (reports / "gmm8" / f).read_text() for f in TABLE_FILES}
    shutil.rmtree(reports)
    result = bench("report")
    assert result.returncode == 0, result.stderr
    assert {f: (reports / "gmm8" / f).read_text() for f in TABLE_FILES} == tables


def test_suite_user_errors(bench, tmp_path: Path) -> None:
    for args, fragment in ((["--methods", "cd,xyz"], "unknown method 'xyz'"),
                           (["--set", "train.stepz=3"], "train.stepz"),
                           (["--set", "pdd:pd.iters_per_stage=3"], "'pdd' is not a method")):
        with pytest.raises(UsageError, match=fragment):
            check_suite(*suite_args(args), tmp_path)
    result = bench("suite", "--dataset", "nope")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "unknown dataset 'nope'" in lines[0], \
        result.stderr
    assert not (tmp_path / "runs").exists()


def suite_args(args: list[str]) -> tuple[str, list[str], list[str]]:
    """(dataset, methods, sets) as the CLI passes them."""
    dataset, methods, sets = "gmm8", "edm,cd", []
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag == "--methods":
            methods = value
        else:
            sets.append(value)
    return dataset, parse_methods(methods), sets


@pytest.mark.slow
def test_suite_on_digits_distils_from_its_own_teacher(bench, tmp_path: Path) -> None:
    result = bench("suite", "--dataset", "digits", "--set", "train.steps=10", "--set",
                   "pd:pd.iters_per_stage=2", "--set", "eval.num_samples=100", "--set",
                   "eval.batch_size=100", timeout=1800)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri=default_tracking_uri(tmp_path / "runs"))
    exp = client.get_experiment_by_name("digits")
    runs = {r.data.tags["method"]: r for r in client.search_runs([exp.experiment_id])}
    edm_id = runs["edm"].info.run_id
    assert {m: runs[m].data.tags["teacher"] for m in ("ddim", "pd", "cd")} == \
        {"ddim": edm_id, "pd": edm_id, "cd": edm_id}
    md = (tmp_path / "runs" / "reports" / "digits" / "table.md").read_text()
    assert "FCD ↓" in md and f"run {edm_id[:8]}" in md
