"""`bench report`: the selected runs -> per-dataset tables (md, tex, csv), plots (PNG, SVG) and
one self-contained HTML page, written to a folder and logged as the artifacts of a report run."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.app.tracking import Tracker
from bench.core.errors import BenchError, UsageError
from reports.plots import plot_metric_vs_nfe, plot_metric_vs_seconds
from reports.store import Select, Selection, select_runs
from reports.tables import Table, build_table, table_title, to_csv, to_html, to_latex, to_markdown

FORMATS = ("md", "tex", "html", "csv")
REPORT_EXPERIMENT = "reports"  # where report runs live (not a dataset, so never read back)
GRIDS_PER_RUN = 3  # sample pictures per run in the HTML: the two smallest NFEs and the largest


@dataclass
class ReportOutput:
    """What a report wrote."""

    out_dir: Path
    tables: list[Table]
    files: list[Path]  # everything written, sorted
    run_id: str | None  # the report run, None when not logged


def parse_formats(text: str) -> list[str]:
    """'md,tex' -> ['md', 'tex']; an unknown format is a usage error."""
    formats = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(f"--format takes a comma-separated subset of {','.join(FORMATS)}, "
                         f"got {text!r}")
    return [f for f in FORMATS if f in formats]


def dataset_dir_name(dataset: str) -> str:
    """A folder name for a dataset (folder:PATH datasets are flattened)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)


def build_report(
    tracker: Tracker,
    datasets: Iterable[str] | None,
    select: Select,
    formats: list[str],
    out_dir: Path,
    pinned: Mapping[tuple[str, str], str | Sequence[str]] | None = None,
    log_run: bool = True,
) -> ReportOutput:
    """Write the report for the datasets (all with runs when None) and log it as a run."""
    selection = select_runs(tracker, datasets, select, pinned)
    datasets_done = sorted(selection.primary)
    tables = [build_table(selection, d) for d in datasets_done]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create the report folder {out_dir}: {exc.strerror}") from None
    files: list[Path] = []
    plots: dict[str, list[Path]] = {}
    writers = {"md": to_markdown, "tex": to_latex, "csv": to_csv}
    for table in tables:
        folder = out_dir / dataset_dir_name(table.dataset)
        folder.mkdir(parents=True, exist_ok=True)
        for fmt, write in writers.items():
            if fmt in formats:
                path = folder / f"table.{fmt}"
                path.write_text(write(table), encoding="utf-8")
                files.append(path)
        png = folder / f"{table.primary}_vs_nfe.png"
        svg = png.with_suffix(".svg")
        plot_metric_vs_nfe(table, png, svg)
        plots[table.dataset] = [png]
        files += [png, svg]
        timed = folder / f"{table.primary}_vs_seconds.png"
        if plot_metric_vs_seconds(table, timed, timed.with_suffix(".svg")):
            plots[table.dataset].append(timed)
            files += [timed, timed.with_suffix(".svg")]
    if "html" in formats:
        page = out_dir / "report.html"
        page.write_text(html_page(tables, selection, tracker, plots), encoding="utf-8")
        files.append(page)
    files.sort()
    run_id = _log_report(tracker, out_dir, files, datasets_done, select, formats) if log_run \
        else None
    return ReportOutput(out_dir, tables, files, run_id)


def _log_report(tracker: Tracker, out_dir: Path, files: list[Path], datasets: list[str],
                select: str, formats: list[str]) -> str:
    run_id = tracker.start_run(experiment=REPORT_EXPERIMENT, run_name="report", tags={
        "kind": "report", "report_datasets": ",".join(datasets), "select": select,
        "formats": ",".join(formats)})
    try:
        for path in files:
            parent = path.parent.relative_to(out_dir).as_posix()
            tracker.log_artifact(run_id, path, None if parent == "." else parent)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
    return run_id


# --- HTML ---------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; text-align: right; border-bottom: 1px solid #ddd; }
th:first-child, td:first-child, td:nth-last-child(-n+2), th:nth-last-child(-n+2) {
  text-align: left; }
thead th { border-bottom: 2px solid #444; }
tr.group td { text-align: left; font-style: italic; background: #f4f4f4; }
td.paper { color: #555; background: #fafaf2; }
figure { display: inline-block; margin: 0.5em; text-align: center; font-size: 0.8em; }
figure img { max-width: 22em; border: 1px solid #eee; }
figure.plot img { max-width: 40em; }
ul.notes { font-size: 0.85em; color: #444; }
"""


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def sample_grids(tracker: Tracker, selection: Selection, dataset: str, table: Table,
                 ) -> list[tuple[str, Path]]:
    """(caption, PNG) of each selected run's sample pictures, in table order."""
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for row in table.rows:
        if not row.run_id or row.run_id in seen:
            continue
        seen.add(row.run_id)
        nfes = sorted({r.nfe for r in table.rows if r.run_id == row.run_id})
        picked = sorted({*nfes[:GRIDS_PER_RUN - 1], nfes[-1]})
        info = selection.runs[(dataset, row.method)]
        for nfe in picked:
            name = f"samples/nfe{nfe:03d}.png"
            if info.artifact_dir is not None:
                path = info.artifact_dir / name
                if not path.is_file():
                    continue
            else:
                try:
                    path = tracker.download_artifact(
                        row.run_id, name, tracker.runs_dir / "downloads" / row.run_id)
                except BenchError:
                    continue
            out.append((f"{row.label}, NFE {nfe} (run {row.run_id[:8]})", path))
    return out


def html_page(tables: list[Table], selection: Selection, tracker: Tracker,
              plots: Mapping[str, list[Path]]) -> str:
    """One self-contained page: tables, plots and sample pictures embedded as data URIs."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             "<title>cmbench report</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
             "<h1>cmbench report</h1>",
             f"<p>{len(tables)} dataset(s), one run per method (select = "
             f"{esc(selection.select)}). Jump to: "
             + ", ".join(f'<a href="#{esc(dataset_dir_name(t.dataset))}">{esc(t.dataset)}</a>'
                         for t in tables) + ".</p>"]
    for table in tables:
        anchor = dataset_dir_name(table.dataset)
        parts.append(f'<section id="{esc(anchor)}">')
        parts.append(f"<h2>{esc(table_title(table))}</h2>")
        parts.append(to_html(table))
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in table.notes)
                     + "</ul>")
        for plot, against in zip(plots[table.dataset], ("NFE", "sampling seconds per sample"),
                                 strict=False):
            parts.append(f'<figure class="plot"><img alt="{esc(table.primary)} against '
                         f'{against}" src="{_data_uri(plot, "image/png")}"></figure>')
        grids = sample_grids(tracker, selection, table.dataset, table)
        if grids:
            parts.append("<h3>Samples</h3>")
            parts += [f'<figure><img alt="{esc(caption)}" src="{_data_uri(path, "image/png")}">'
                      f"<figcaption>{esc(caption)}</figcaption></figure>"
                      for caption, path in grids]
        parts.append("</section>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
