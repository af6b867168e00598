"""Seeds and uncertainty: evaluation seed sets, training seeds in the suite, the protocol each
number was made under, and tables that bold a value only beyond the uncertainty."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from bench.app import runner
from bench.app.protocol import comparable, logged_protocol
from bench.app.tracking import Tracker, default_tracking_uri
from bench.core.config import resolve
from reports.store import select_runs
from reports.tables import Column, Row, _bold, build_table, protocol_letter, to_csv, to_markdown
from tests.test_reports import template_db, tracker_for  # noqa: F401  (a fixture)


def ddim_run(tracker: Tracker, *sets: str) -> runner.RunOutcome:
    """A DDIM run on gmm8 with the exact denoiser (no training), in this process."""
    cfg = resolve(bench_files=[], flags={"method": "ddim", "dataset": "gmm8",
                                         "teacher": "analytic"},
                  sets=["eval.nfe=[1, 2]", "eval.num_samples=400", *sets]).config
    return runner.start(cfg, tracker, lambda _: None)


def newest(tracker: Tracker, run_id: str, key: str) -> dict[int, float]:
    return {p.step: p.value for p in tracker.metric_points(run_id, key)}


def test_evaluation_seed_sets_log_mean_std_best_and_each_set(
        tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.chdir(tmp_path)
    tracker = tracker_for(tmp_path, template_db)
    one = ddim_run(tracker)
    three = ddim_run(tracker, "eval.seeds=3")
    for nfe in (1, 2):
        sets = [newest(tracker, three.run_id, f"w2_seed{k}")[nfe] for k in range(3)]
        assert len(set(sets)) == 3  # independent noise per set
        assert newest(tracker, three.run_id, "w2")[nfe] == pytest.approx(statistics.fmean(sets),
                                                                          rel=1e-12)
        assert newest(tracker, three.run_id, "w2_seeds_std")[nfe] == pytest.approx(
            statistics.stdev(sets), rel=1e-12)
        assert newest(tracker, three.run_id, "w2_seeds_best")[nfe] == min(sets)
        # the first set is the run's eval.seed: a one-seed number does not move
        assert sets[0] == newest(tracker, one.run_id, "w2")[nfe]
    assert "w2_seeds_std" not in tracker.get_run(one.run_id).metric_keys
    # a column per NFE in the runs table (at the run's last iteration: 0, DDIM does not train)
    per_nfe = newest(tracker, three.run_id, "by_iteration/w2_nfe2")
    assert per_nfe == {0: newest(tracker, three.run_id, "w2")[2]}
    # bench's experiments open on their runs in the MLflow UI, not on its GenAI view
    experiment = tracker.client.get_experiment_by_name("gmm8")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = tracker.get_run(three.run_id).tags
    assert (tags["eval_seeds"], tags["eval_statistic"]) == ("0,1000,2000", "mean")
    protocol = json.loads(tags["protocol_nfe1"])
    assert protocol["seeds"] == [0, 1000, 2000] and protocol["samples"] == 400
    assert protocol["noise"] == "qmc" and protocol["features"] == "data space"
    # a run logged before the protocol tag existed gets the same comparable part from its params
    record = tracker.get_run(one.run_id)
    legacy = logged_protocol({}, record.params, 1, points=True)
    assert comparable(legacy) == comparable(json.loads(record.tags["protocol_nfe1"]))

    table = build_table(select_runs(tracker, ["gmm8"], "latest"), "gmm8")
    row = next(r for r in table.rows if r.method == "ddim" and r.nfe == 1)
    assert row.run_id == three.run_id and row.count["w2"] == 3
    assert row.text["w2"] == f"{row.values['w2']:.3f} ± {row.std['w2']:.2g}"
    assert any("3 evaluation seed sets" in n for n in table.notes)
    assert any(n.startswith("Protocol of our numbers: 400 samples, qmc noise") for n in table.notes)
    csv_rows = to_csv(table).splitlines()
    assert {"w2_seeds_std", "w2_seeds_n"} <= set(csv_rows[0].split(","))


def column(key: str = "w2") -> Column:
    return Column(key, key, True)


def rows(*cells: tuple[float, float | None]) -> list[Row]:
    out = []
    for i, (value, std) in enumerate(cells):
        row = Row("g", f"m{i}", f"m{i}", 1, values={"w2": value},
                  text={"w2": f"{value:.3f}" + (f" ± {std:.2g}" if std is not None else "")})
        if std is not None:
            row.std["w2"] = std
        out.append(row)
    return out


def test_bold_only_beyond_the_uncertainty() -> None:
    col = [column()]
    assert _bold(rows((1.0, 0.1), (1.15, 0.1)), col) == set()  # intervals overlap
    assert _bold(rows((1.0, 0.1), (1.3, 0.1)), col) == {(0, "w2")}
    assert _bold(rows((1.0, None), (1.05, None)), col) == {(0, "w2")}  # no spread measured
    assert _bold(rows((1.0, None), (1.05, 0.1)), col) == set()  # the other's interval reaches
    assert _bold(rows((1.0, 0.01), (1.0, 0.01), (2.0, 0.01)), col) == {(0, "w2"), (1, "w2")}
    higher = [Column("mode_recall", "mode_recall", False)]
    cells = rows((0.9, 0.01), (0.5, 0.01))
    for r in cells:
        r.values = {"mode_recall": r.values["w2"]}
        r.text = {"mode_recall": r.text["w2"]}
        r.std = {"mode_recall": r.std["w2"]}
    assert _bold(cells, higher) == {(0, "mode_recall")}
    assert [protocol_letter(i) for i in (0, 1, 25, 26, 27)] == ["A", "B", "Z", "AA", "AB"]


def test_a_narrow_terminal_puts_the_std_on_a_second_line() -> None:
    from rich.console import Console

    from reports.tables import Table, to_rich

    keys = ["w2", "fd", "swd", "nll", "mode_recall"]
    cells = rows((0.057, 0.00079), (0.155, 0.017), (0.103, 0.003))
    for r in cells:
        r.values = {k: r.values["w2"] for k in keys}
        r.text = {k: r.text["w2"] for k in keys}
        r.std = {k: r.std["w2"] for k in keys}
    table = Table("gmm8", "w2", "latest", [column(k) for k in keys], cells, set(), [])
    for width, stacked in ((200, False), (80, True)):
        console = Console(width=width, record=True, color_system=None)
        console.print(to_rich(table, console))
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= width
        # one line: "0.057 ± 0.00079" whole; stacked: the mean over "±0.00079", never a
        # number cut
        assert ("0.057 ± 0.00079" in text) != stacked
        if stacked:
            assert all(text.count(part) == len(keys)
                       for part in ("0.057", "±0.00079", "0.155", "±0.017"))


def test_two_protocols_are_never_in_one_column(tmp_path: Path,
                                               template_db: Path) -> None:  # noqa: F811
    tracker = tracker_for(tmp_path, template_db)

    def logged(method: str, samples: int, w2: float) -> str:
        run_id = tracker.start_run(experiment="gmm8", run_name=method, tags={
            "method": method, "dataset": "gmm8", "teacher": "analytic"})
        protocol = {"samples": samples, "seeds": [0], "statistic": "single", "noise": "qmc",
                    "reference": f"{samples} exact draws (reference seed 1)",
                    "features": "data space", "tool": "bench", "mode": "exact"}
        tracker.set_tags(run_id, {"protocol_nfe1": json.dumps(protocol)})
        tracker.log_metrics(run_id, {"w2": w2}, 1)
        tracker.end_run(run_id)
        return run_id

    logged("cd", 10000, 0.06)
    logged("ict", 50000, 0.05)
    table = build_table(select_runs(tracker, ["gmm8"], "latest"), "gmm8")
    assert [c.header for c in table.columns] == ["w2 [A] ↓", "w2 [B] ↓"]
    by_method = {r.method: r for r in table.rows}
    assert by_method["cd"].values == {"w2 [A]": 0.06}
    assert by_method["ict"].values == {"w2 [B]": 0.05}
    notes = " ".join(table.notes)
    assert "[A]: numbers evaluated under 10000 samples" in notes
    assert "[B]: numbers evaluated under 50000 samples" in notes
    assert "| w2 [A] ↓ | w2 [B] ↓ |" in to_markdown(table)
    # one number per column: each is the best of its own column
    assert table.bold == {(table.rows.index(by_method["cd"]), "w2 [A]"),
                          (table.rows.index(by_method["ict"]), "w2 [B]")}


def test_suite_seeds_and_eval_seeds_from_the_command_line(bench, tmp_path: Path) -> None:
    done = bench("suite", "--dataset", "gmm8", "--methods", "ddim", "--seeds", "2",
                 "--set", "eval.num_samples=300", "--set", "eval.nfe=[1]")
    assert done.returncode == 0, done.stderr
    assert "ddim (seed 0): w2@1 " in done.stderr + done.stdout
    assert "ddim (seed 1): w2@1 " in done.stderr + done.stdout
    assert "report: " in done.stdout and "report.html" in done.stdout
    tracker = Tracker(default_tracking_uri(tmp_path / "runs"), tmp_path / "runs")
    runs = [r for r in tracker.finished_runs("gmm8") if r.tags.get("method") == "ddim"]
    assert sorted(r.params["seed"] for r in runs) == ["0", "1"]
    assert len({r.tags["seed_group"] for r in runs}) == 1
    table = build_table(select_runs(tracker, ["gmm8"], "latest"), "gmm8")
    row = next(r for r in table.rows if r.method == "ddim")
    assert sorted(row.runs) == sorted(r.run_id for r in runs) and row.count["w2"] == 2
    assert any("2 training seeds (runs)" in n for n in table.notes)
    assert table.notes[0].startswith("One run, or one group of runs trained under several")

    again = bench("eval", "--run", runs[0].run_id, "--nfe", "1", "--seeds", "3")
    assert again.returncode == 0, again.stderr
    assert " ± " in again.stdout and "over the evaluation seed sets" in again.stdout
    protocol = json.loads(tracker.get_run(runs[0].run_id).tags["protocol_nfe1"])
    assert protocol["seeds"] == [0, 1000, 2000]
    bad = bench("eval", "--run", runs[0].run_id, "--seeds", "0")
    assert bad.returncode == 2 and "--seeds" in bad.stderr


def test_compare_two_runs_and_the_results_of_a_notebook(
        tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import pandas as pd
    import polars as pl
    from scipy.stats import ttest_ind

    from reports import results
    from reports.compare import compare_runs

    monkeypatch.chdir(tmp_path)
    tracker = tracker_for(tmp_path, template_db)
    a = ddim_run(tracker, "eval.seeds=3")
    b = ddim_run(tracker, "eval.seeds=4", "eval.seed=7")
    single = ddim_run(tracker)
    diffs = {(d.metric, d.nfe): d for d in compare_runs(tracker, a.run_id, b.run_id)}
    d = diffs["w2", 1]
    assert d.comparable and (d.a_seeds, d.b_seeds) == (3, 4)
    per_set = [[newest(tracker, run.run_id, f"w2_seed{k}")[1] for k in range(n)]
               for run, n in ((a, 3), (b, 4))]
    expected = ttest_ind(*per_set, equal_var=False).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((expected.low, expected.high), rel=1e-9)
    assert d.verdict == ("within the uncertainty" if d.low <= 0 <= d.high else
                         "A better" if d.diff < 0 else "B better")
    unmeasured = compare_runs(tracker, a.run_id, single.run_id)[0]
    assert unmeasured.low is None and unmeasured.verdict == "no interval (spread not measured)"

    frame = results.load(runs_dir=tmp_path / "runs")  # the rows the report uses: the newest run
    assert isinstance(frame, pd.DataFrame) and tuple(frame.columns) == results.COLUMNS
    assert set(frame["run_id"]) == {single.run_id} and set(frame["seed"]) == {0}
    assert set(frame["nfe"]) == {1, 2} and "w2" in set(frame["metric"])
    best = results.load(runs_dir=tmp_path / "runs", datasets=["gmm8"], select="best",
                        polars=True)
    assert isinstance(best, pl.DataFrame) and best["seeds"].max() >= 1


def test_a_bootstrap_interval_where_seeds_are_not_repeated(
        tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.chdir(tmp_path)
    tracker = tracker_for(tmp_path, template_db)
    run = ddim_run(tracker, "eval.bootstrap=8", "eval.nfe=[1]")
    low = newest(tracker, run.run_id, "w2_boot_low")[1]
    high = newest(tracker, run.run_id, "w2_boot_high")[1]
    value = newest(tracker, run.run_id, "w2")[1]
    assert low < high and low <= value * 1.5 and high >= value * 0.5
    table = build_table(select_runs(tracker, ["gmm8"], "latest"), "gmm8")
    row = next(r for r in table.rows if r.method == "ddim")
    assert row.interval["w2"] == (low, high)
    assert row.text["w2"] == f"{value:.3f} [{low:.3f}, {high:.3f}]"
    assert any("bootstrap interval" in n for n in table.notes)
    # the interval decides the bold mark where no std is measured
    rows_ = rows((1.0, None), (1.2, None))
    rows_[0].interval["w2"] = (0.9, 1.25)
    assert _bold(rows_, [column()]) == set()
    rows_[0].interval["w2"] = (0.9, 1.1)
    assert _bold(rows_, [column()]) == {(0, "w2")}
    with pytest.raises(Exception, match="eval.bootstrap resamples 2-D points"):
        from bench.data.datasets import get_dataset
        from bench.engine.evaluation import prepare_metrics

        cfg = resolve(bench_files=[], flags={"method": "edm", "dataset": "digits"},
                      sets=["eval.bootstrap=4"]).config
        prepare_metrics(get_dataset("digits"), cfg, tmp_path / "cache")


def test_nll_is_also_logged_above_its_lower_bound_for_a_log_axis(
        tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """nll can be negative, which MLflow's log-scale axis cannot draw: nll_gap = nll + log
    max p is never negative and keeps the curve's shape (EDM-Heun at NFE 3 has nll ~ 5e5)."""
    import math

    import torch

    from bench.data.datasets import gmm8, gmm25

    for data in (gmm8(), gmm25()):
        top = data.max_log_prob()
        # well-separated equal components: the maximum sits at a mean, w / (2 pi std^2)
        assert top == pytest.approx(-math.log(len(data.means) * 2 * math.pi * data.std**2),
                                    abs=1e-9)
        points = data.sample(20000, torch.Generator().manual_seed(0)).double()
        near = data.means + 1e-3 * torch.randn(data.means.shape, dtype=torch.float64)
        assert float(data.log_prob(torch.cat([points, near])).max()) <= top
    monkeypatch.chdir(tmp_path)
    tracker = tracker_for(tmp_path, template_db)
    run = ddim_run(tracker)
    nll, gap = newest(tracker, run.run_id, "nll"), newest(tracker, run.run_id, "nll_gap")
    assert set(gap) == {1, 2} and min(gap.values()) > 0
    for nfe, value in nll.items():
        assert gap[nfe] == pytest.approx(value + gmm8().max_log_prob(), rel=1e-12)
    table = build_table(select_runs(tracker, ["gmm8"], "latest"), "gmm8")
    assert "nll" in {c.key for c in table.columns}
    assert all("nll_gap" not in c.key for c in table.columns)  # a chart helper, not a column


def test_a_long_evaluation_reports_its_progress(tmp_path: Path) -> None:
    """A line per report interval while one NFE's samples are made (none at the end: the
    result line says it), with counts over every seed set."""
    import torch

    from bench.data.datasets import get_dataset
    from bench.diffusion.denoiser import AnalyticDenoiser
    from bench.engine.evaluation import SampleProgress, evaluate, prepare_metrics
    from methods import MethodContext, get_method

    dataset = get_dataset("gmm8")
    cfg = resolve(bench_files=[], flags={"method": "ddim", "dataset": "gmm8"},
                  sets=["eval.metrics=['w2']", "eval.num_samples=300", "eval.batch_size=100",
                        "eval.seeds=2"]).config
    ctx = MethodContext(config=cfg, dataset=dataset, device=torch.device("cpu"),
                        sigma_data=dataset.sigma_data,
                        teacher=AnalyticDenoiser(dataset.denoise), teacher_source="analytic",
                        new_net=lambda: torch.nn.Identity())
    lines: list[str] = []
    evaluate(get_method("ddim")(ctx), None, dataset, cfg, [2],
             prepare_metrics(dataset, cfg, tmp_path), torch.device("cpu"),
             report=lines.append, report_every=0.0)
    # 2 seed sets x 3 batches of 100: a line after each batch but the last
    assert [line.split(" samples")[0] for line in lines] == [
        f"NFE 2: {done} / 600" for done in range(100, 600, 100)]
    assert all(line.endswith(" s left") and "%), about " in line for line in lines)
    quiet: list[str] = []
    progress = SampleProgress(quiet.append, 1, 50_000, every=3600.0)
    progress.add(25_000)
    assert quiet == []  # nothing before the interval has passed
