"""Paper-style tables: methods down the side grouped as in Song et al. 2023 (diffusion baselines,
distillation, direct training), NFE and the metrics across, the best value per column in bold,
the paper's numbers beside ours; rendered as Markdown, LaTeX (booktabs), CSV, HTML and rich.

Everything is sorted and nothing depends on the clock, so the same store gives the same files.
"""

from __future__ import annotations

import csv
import html
import io
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from bench.app.tracking import RUN_ID_PATTERN
from bench.engine.evaluation import LOWER_IS_BETTER
from methods import all_methods, get_method, method_names
from reports.paper import paper_numbers, paper_sources
from reports.store import RunInfo, Selection

OTHER_GROUP = "Other"  # methods not registered here (a plug-in not installed) go last
METRIC_ORDER = ("fid", "fd_dinov2", "fcd", "w2", "fd", "swd", "nll", "mode_recall",
                "hq_fraction", "is", "kid", "precision", "recall")
PAPER_PREFIX = "paper:"
MISSING = "–"


@dataclass(frozen=True)
class Column:
    """A numeric column: a metric of ours or the paper's number of one."""

    key: str  # metric name, "paper:<metric>", or "<metric> [<protocol letter>]"
    metric: str  # the metric it holds
    lower_is_better: bool
    protocol: str = ""  # the letter of its evaluation protocol when a table has several

    @property
    def is_paper(self) -> bool:
        """Whether the column holds published numbers."""
        return self.key.startswith(PAPER_PREFIX)

    @property
    def arrow(self) -> str:
        """↓ when lower is better, ↑ otherwise."""
        return "↓" if self.lower_is_better else "↑"

    @property
    def header(self) -> str:
        """Plain-text header, e.g. 'FID (paper) ↓' or 'w2 [B] ↓'."""
        tail = " (paper)" if self.is_paper else f" [{self.protocol}]" if self.protocol else ""
        return f"{metric_name(self.metric)}{tail} {self.arrow}"


@dataclass
class Row:
    """One (method, NFE) line."""

    group: str
    method: str
    label: str  # e.g. "EDM (Heun)"
    nfe: int
    values: dict[str, float] = field(default_factory=dict)  # column key -> number
    text: dict[str, str] = field(default_factory=dict)  # column key -> as displayed
    teacher: str = ""  # as displayed; "" = no run
    teacher_logged: str = ""  # the run's `teacher` tag as logged
    run_id: str = ""  # full id; "" = paper only
    extra: dict[str, float] = field(default_factory=dict)  # CSV-only numbers
    std: dict[str, float] = field(default_factory=dict)  # column key -> standard deviation
    interval: dict[str, tuple[float, float]] = field(default_factory=dict)  # bootstrap 95%
    count: dict[str, int] = field(default_factory=dict)  # column key -> seeds it is over
    runs: list[str] = field(default_factory=list)  # every run id the row's numbers come from


@dataclass
class Table:
    """A dataset's table, independent of the output format."""

    dataset: str
    primary: str
    select: str
    columns: list[Column]
    rows: list[Row]
    bold: set[tuple[int, str]]  # (row index, column key)
    notes: list[str]

    def groups(self) -> list[tuple[str, list[tuple[int, Row]]]]:
        """Rows grouped in display order, with their indices."""
        out: list[tuple[str, list[tuple[int, Row]]]] = []
        for i, row in enumerate(self.rows):
            if not out or out[-1][0] != row.group:
                out.append((row.group, []))
            out[-1][1].append((i, row))
        return out

    def cell(self, index: int, key: str) -> str:
        """A numeric cell as displayed (MISSING when empty)."""
        return self.rows[index].text.get(key, MISSING)


def metric_name(metric: str) -> str:
    """How a metric is written in headers and titles: FID, FCD, IS, KID, w2, ..."""
    if metric == "fd_dinov2":
        return "FD-DINOv2"
    return metric.upper() if metric in ("fid", "fcd", "is", "kid") else metric


def table_title(table: Table) -> str:
    """'cifar10: FID against NFE'."""
    return f"{table.dataset}: {metric_name(table.primary)} against NFE"


def run_text(row: Row) -> str:
    """The run id's first 8 characters, or 'paper' for a row only the paper has."""
    return row.run_id[:8] if row.run_id else "paper"


def format_value(value: float) -> str:
    """Three decimals below 10, fewer above, so columns stay narrow and comparable."""
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


def group_of(method: str) -> tuple[int, str, int]:
    """(group position, group name, position in group): groups and their methods in
    registration order; unregistered methods go last."""
    groups: dict[str, list[str]] = {}
    for cls in all_methods():
        groups.setdefault(cls.group, []).append(cls.name)
    for g, (name, members) in enumerate(groups.items()):
        if method in members:
            return g, name, members.index(method)
    return len(groups), OTHER_GROUP, 0


def method_label(method: str, sampler: str) -> str:
    """'EDM (Heun)', 'DDIM (Euler)', 'CD', ... (the method's label, and its sampler where the
    method declares a default one)."""
    if method not in method_names():
        return method
    cls = get_method(method)
    label = cls.display_label()
    if cls.default_sampler:
        label += f" ({(sampler or cls.default_sampler).capitalize()})"
    return label


def teacher_text(teacher: str) -> str:
    """'analytic', 'run 1a2b3c4d', a checkpoint's file name, or '-' for none."""
    if teacher in ("", "none"):
        return "-"
    if RUN_ID_PATTERN.match(teacher):
        return f"run {teacher[:8]}"
    if teacher == "analytic":
        return teacher
    return Path(teacher).name


def _metric_columns(metrics: set[str], primary: str, with_paper: bool,
                    protocols: list[str]) -> list[Column]:
    """The primary metric first (then the paper's FID), then the others in METRIC_ORDER; with
    several protocols one column per (metric, protocol), lettered A, B, ..."""
    ordered = [m for m in METRIC_ORDER if m in metrics and m != primary]
    ordered += sorted(metrics - set(METRIC_ORDER) - {primary})
    letters = [protocol_letter(i) for i in range(len(protocols))] if len(protocols) > 1 else [""]

    def ours(metric: str) -> list[Column]:
        return [Column(f"{metric} [{letter}]" if letter else metric, metric,
                       LOWER_IS_BETTER.get(metric, True), letter) for letter in letters]

    columns = ours(primary)
    if with_paper:
        columns.append(Column(f"{PAPER_PREFIX}fid", "fid", True))
    for m in ordered:
        columns += ours(m)
    return columns


def protocol_letter(index: int) -> str:
    """A, B, ..., Z, AA, AB, ..."""
    text = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        text = chr(ord("A") + rest) + text
    return text


def _bold(rows: list[Row], columns: list[Column]) -> set[tuple[int, str]]:
    """The best displayed value of each column (every tie is bold), and only where it is better
    than every other row beyond the uncertainty: its interval (_ends: mean ± std, else the
    bootstrap interval, else the value alone) apart from theirs."""
    marks: set[tuple[int, str]] = set()
    for column in columns:
        shown = {i: float(r.text[column.key].split()[0]) for i, r in enumerate(rows)
                 if column.key in r.text}
        if not shown:
            continue
        sign = 1.0 if column.lower_is_better else -1.0
        best = min(sign * v for v in shown.values())
        winners = [i for i, v in shown.items() if sign * v == best]
        others = [i for i in shown if i not in winners]

        ends = {i: _ends(rows[i], column.key, sign) for i in shown}
        if all(ends[w][1] < ends[o][0] for w in winners for o in others):
            marks |= {(i, column.key) for i in winners}
    return marks


def format_std(std: float) -> str:
    """A standard deviation to two significant digits: 0.0042, 1.3, 7.2e-06, 0."""
    return f"{std:.2g}"


def _ends(row: Row, key: str, sign: float) -> tuple[float, float]:
    """A row's interval, as (better end, worse end) in the lower-is-better sense: mean ± std,
    else the bootstrap interval, else the value itself."""
    value = sign * row.values[key]
    if key in row.std:
        return value - row.std[key], value + row.std[key]
    if key in row.interval:
        low, high = sorted(sign * v for v in row.interval[key])
        return low, high
    return value, value


def _cell_text(value: float, std: float | None,
               interval: tuple[float, float] | None = None) -> str:
    if std is not None:
        return f"{format_value(value)} ± {format_std(std)}"
    if interval is not None:
        return f"{format_value(value)} [{format_value(interval[0])}, {format_value(interval[1])}]"
    return format_value(value)


def build_table(selection: Selection, dataset: str) -> Table:
    """The dataset's table from the selected runs and the paper's numbers. A row's number is a
    run's mean over its evaluation seed sets (± their standard deviation), or with several
    runs of one method (training seeds) the mean over the runs ± their standard deviation."""
    primary = selection.primary[dataset]
    results = selection.results.filter(pl.col("dataset") == dataset)
    paper = paper_numbers(dataset) if primary == "fid" else []
    shown_metrics = set(results["metric"].unique().to_list()) & set(LOWER_IS_BETTER)
    shown_metrics.add(primary)
    shown = results.filter(pl.col("metric").is_in(sorted(shown_metrics)))
    protocols = sorted(shown["protocol"].unique().to_list())
    letter = {p: protocol_letter(i) for i, p in enumerate(protocols)} if len(protocols) > 1 \
        else {}
    columns = _metric_columns(shown_metrics, primary, bool(paper), protocols)
    rows: dict[tuple[str, int], Row] = {}

    def row_for(method: str, nfe: int, info: RunInfo | None) -> Row:
        key = (method, nfe)
        if key not in rows:
            _, group, _ = group_of(method)
            rows[key] = Row(group, method, method_label(method, info.sampler if info else ""),
                            nfe)
        return rows[key]

    grouped = results.group_by("method", "nfe", "metric", "protocol", maintain_order=True).agg(
        pl.col("run_id"), pl.col("value"), pl.col("std"), pl.col("seeds"), pl.col("low"),
        pl.col("high"))
    for method, nfe, metric, protocol, run_ids, values, stds, seeds, lows, highs in grouped.sort(
            "method", "nfe", "metric", "protocol").iter_rows():
        info = selection.runs[(dataset, method)]
        row = row_for(method, nfe, info)
        row.run_id, row.teacher, row.teacher_logged = info.run_id, teacher_text(info.teacher), \
            info.teacher
        row.runs = sorted(set(row.runs) | set(run_ids))
        key = f"{metric} [{letter[protocol]}]" if protocol in letter else metric
        interval = None
        if len(values) > 1:  # runs of several training seeds
            value, std, count = statistics.fmean(values), statistics.stdev(values), len(values)
        else:
            value, std, count = values[0], stds[0], seeds[0]
            if lows[0] is not None and highs[0] is not None:
                interval = (lows[0], highs[0])
        if metric in shown_metrics:
            row.values[key] = value
            row.text[key] = _cell_text(value, std, interval)
            row.count[key] = count
            if std is not None:
                row.std[key] = std
            if interval is not None:
                row.interval[key] = interval
        else:
            row.extra[metric] = value
    for number in paper:
        row = row_for(number.method, number.nfe, selection.runs.get((dataset, number.method)))
        row.values[f"{PAPER_PREFIX}fid"] = number.value
        row.text[f"{PAPER_PREFIX}fid"] = number.fid
    ordered = sorted(rows.values(), key=lambda r: (*group_of(r.method)[::2], r.method, r.nfe))
    seed_groups = any(len(r.runs) > 1 for r in ordered)  # rows over several training runs
    notes = _notes(dataset, primary, selection.select, bool(paper), seed_groups)
    notes += _uncertainty_notes(ordered, seed_groups)
    if len(protocols) == 1:
        notes.append(f"Protocol of our numbers: {protocols[0]}.")
    for protocol, mark in letter.items():
        notes.append(f"[{mark}]: numbers evaluated under {protocol}; columns of different "
                     "protocols are not comparable.")
    return Table(dataset, primary, selection.select, columns, ordered, _bold(ordered, columns),
                 notes)


def _uncertainty_notes(rows: list[Row], several_runs: bool) -> list[str]:
    """What ± means in this table, and how the bold marks treat it."""
    counts = sorted({n for r in rows for k, n in r.count.items() if k in r.std})
    notes = []
    if any(r.interval for r in rows):
        notes.append("x [lo, hi]: one seed set's value and its 95% bootstrap interval over the "
                     "generated points (eval.bootstrap); bold compares these intervals where no "
                     "std is measured.")
    if counts:
        over = "training seeds (runs)" if several_runs else "evaluation seed sets"
        sizes = "/".join(str(n) for n in counts)
        notes.append(f"x ± s: the mean and sample standard deviation over {sizes} {over}.")
    elif not any(r.interval for r in rows):
        notes.append("One seed set per number: its uncertainty is not measured here (raise "
                     "eval.seeds, or `bench eval --seeds 3`, to see it).")
    return notes


def _notes(dataset: str, primary: str, select: str, with_paper: bool,
           seed_groups: bool) -> list[str]:
    rule = {"latest": "the newest finished run that is not a sweep trial, if there is one",
            "best": f"the finished run with the best {primary} at the smallest NFE all "
                    "candidates were evaluated at"}.get(select, select)
    # `bench suite --seeds`: a method's rows are over the runs of its group of training seeds
    unit = ("One run, or one group of runs trained under several seeds (`bench suite "
            "--seeds`), per method" if seed_groups else "One run per method")
    notes = [
        f"{unit} ({rule}; a re-evaluated NFE counts with its newest value); its rows are the "
        "NFEs it was evaluated at, NFE as measured (network calls per sample).",
        "Bold: the best displayed value of each column (↓ lower is better, ↑ higher is better), "
        "only where its mean ± std interval lies apart from every other row's; no mark where "
        "the difference is within the uncertainty.",
        "Teacher: what a row's method sampled or distilled: analytic = the exact denoiser of the "
        "mixture, run = the tracked EDM run with that id prefix, - = none (trained from data).",
    ]
    if with_paper:
        notes.append("FID (paper): " + "; ".join(paper_sources(dataset)) + ". Ours are "
                     "comparable only at the paper's scale (networks, iterations, 50,000 "
                     "samples, the same Inception features): the papers' protocol is 50,000 "
                     "samples against the training set, TF-Inception features, one seed set.")
    return notes


# --- renderers ----------------------------------------------------------------------------------


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with group rows and bold best values."""

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    headers = ["Method", "NFE", *(c.header for c in table.columns), "Teacher", "Run"]
    align = [":--", "--:", *("--:" for _ in table.columns), ":--", ":--"]
    lines = [f"### {table_title(table)}", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    blanks = " |" * (len(headers) - 1)
    for group, members in table.groups():
        lines.append(f"| *{group}* |{blanks}")
        for i, row in members:
            cells = []
            for c in table.columns:
                text = table.cell(i, c.key)
                cells.append(f"**{text}**" if (i, c.key) in table.bold else text)
            lines.append("| " + " | ".join([esc(row.label), str(row.nfe), *cells,
                                            esc(row.teacher), run_text(row)]) + " |")
    lines.append("")
    lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = re.compile(r"([&%$#_{}])")


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text."""
    text = text.replace("\\", r"\textbackslash{}").replace("~", r"\textasciitilde{}")
    text = _LATEX_SPECIAL.sub(r"\\\1", text).replace("^", r"\textasciicircum{}")
    return text.replace("–", "--").replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$")


def to_latex(table: Table) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); best values in \\textbf."""
    width = 4 + len(table.columns)
    spec = "lr" + "r" * len(table.columns) + "ll"
    headers = ["Method", "NFE", *(c.header for c in table.columns), "Teacher", "Run"]
    lines = [
        f"% {table_title(table)} (cmbench report, select={table.select})",
        "% needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{latex_escape(table_title(table))}.}}",
        f"\\label{{tab:cmbench-{re.sub(r'[^a-zA-Z0-9-]', '-', table.dataset)}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in headers) + " \\\\",
    ]
    for group, members in table.groups():
        lines.append("\\midrule")
        lines.append(f"\\multicolumn{{{width}}}{{l}}{{\\textit{{{latex_escape(group)}}}}} \\\\")
        for i, row in members:
            cells = []
            for c in table.columns:
                text = latex_escape(table.cell(i, c.key))
                cells.append(f"\\textbf{{{text}}}" if (i, c.key) in table.bold else text)
            teacher = latex_escape(row.teacher)
            run = f"\\texttt{{{row.run_id[:8]}}}" if row.run_id else "paper"
            lines.append(" & ".join([latex_escape(row.label), str(row.nfe), *cells, teacher,
                                     run]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    lines += [f"% {latex_escape(note)}" for note in table.notes]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Full-precision numbers, one line per row, full run ids and the teacher as logged."""
    extra = sorted({k for r in table.rows for k in r.extra})
    spread = [c.key for c in table.columns if any(c.key in r.std for r in table.rows)]
    header = ["dataset", "group", "method", "label", "nfe", *(c.key for c in table.columns),
              *(f"{k}_seeds_std" for k in spread), *(f"{k}_seeds_n" for k in spread), *extra,
              "teacher", "run_id"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        numbers = []
        for c in table.columns:
            if c.is_paper:
                numbers.append(row.text.get(c.key, ""))
            else:
                numbers.append(repr(row.values[c.key]) if c.key in row.values else "")
        numbers += [repr(row.std[k]) if k in row.std else "" for k in spread]
        numbers += [str(row.count[k]) if k in row.std else "" for k in spread]
        numbers += [repr(row.extra[k]) if k in row.extra else "" for k in extra]
        writer.writerow([table.dataset, row.group, row.method, row.label, row.nfe, *numbers,
                         row.teacher_logged, row.run_id])
    return buffer.getvalue()


def to_html(table: Table) -> str:
    """An HTML <table> (no page around it); best values in <b>."""
    esc = html.escape
    headers = ["Method", "NFE", *(c.header for c in table.columns), "Teacher", "Run"]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers)
           + "</tr></thead>", "<tbody>"]
    for group, members in table.groups():
        out.append(f'<tr class="group"><td colspan="{len(headers)}">{esc(group)}</td></tr>')
        for i, row in members:
            cells = []
            for c in table.columns:
                text = esc(table.cell(i, c.key))
                cls = ' class="paper"' if c.is_paper else ""
                cells.append(f"<td{cls}><b>{text}</b></td>" if (i, c.key) in table.bold
                             else f"<td{cls}>{text}</td>")
            out.append("<tr>" + f"<td>{esc(row.label)}</td><td>{row.nfe}</td>" + "".join(cells)
                       + f"<td>{esc(row.teacher)}</td>"
                       + f"<td><code>{esc(run_text(row))}</code></td></tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out) + "\n"


def to_rich(table: Table, console: Any = None) -> Any:
    """A rich Table for the terminal (run ids are in the files and the suite's summary). On a
    `console` too narrow for it, a `mean ± std` cell puts the ± on a second line rather than
    letting the terminal break the number anywhere."""
    from rich.measure import Measurement

    one_line = _rich(table, stacked=False)
    if console is None:
        return one_line
    unbounded = console.options.update(width=10**6)  # console.measure stops at the width
    if Measurement.get(console, unbounded, one_line).maximum <= console.width:
        return one_line
    return _rich(table, stacked=True)


def _stack(text: str) -> str:
    """A cell on two lines: the mean over '±std', or a value over its '[lo, hi]' interval."""
    return text.replace(" ± ", "\n±").replace(" [", "\n[")


def _rich(table: Table, stacked: bool) -> Any:
    from rich.markup import escape
    from rich.table import Table as RichTable

    # stacked (a narrow terminal): no outer border, which gives the numbers 4 more columns
    out = RichTable(title=table_title(table), show_edge=not stacked, pad_edge=not stacked)
    out.add_column("Method", no_wrap=not stacked)
    out.add_column("NFE", justify="right")
    for c in table.columns:
        # stacked, a number is never broken: the column is as wide as its widest line
        widest = max((len(line) for i in range(len(table.rows))
                      for line in _stack(table.cell(i, c.key)).splitlines()),
                     default=1) if stacked else None
        out.add_column(c.header, justify="right", min_width=widest)
    out.add_column("Teacher")
    for g, (group, members) in enumerate(table.groups()):
        if g:
            out.add_section()
        out.add_row(f"[italic]{escape(group)}[/italic]")
        for i, row in members:
            cells = []
            for c in table.columns:
                text = escape(table.cell(i, c.key))
                if stacked:
                    text = _stack(text)
                cells.append(f"[bold]{text}[/bold]" if (i, c.key) in table.bold else text)
            out.add_row(escape(row.label), str(row.nfe), *cells, escape(row.teacher))
    return out
