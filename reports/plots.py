"""The primary metric against NFE (one line per method on a log-2 NFE axis, the paper's numbers
as dashed lines with open markers) and against sampling wall-clock (seconds per sample, each
point labelled with its NFE); PNG and SVG written without dates, so reruns match."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from reports.tables import Table, metric_name, table_title


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "cmbench"
    return plt


def series(table: Table, paper: bool) -> dict[str, list[tuple[int, float, float]]]:
    """label -> sorted (NFE, value, std) points of the primary metric (ours, or the paper's;
    std 0 where no spread was measured); with several protocols, one series per protocol."""
    columns = [c for c in table.columns if c.metric == table.primary and c.is_paper == paper]
    out: dict[str, list[tuple[int, float, float]]] = {}
    for column in columns:
        for row in table.rows:
            if column.key in row.values:
                label = f"{row.label} [{column.protocol}]" if column.protocol else row.label
                out.setdefault(label, []).append(
                    (row.nfe, row.values[column.key], row.std.get(column.key, 0.0)))
    return {label: sorted(points) for label, points in out.items()}


def plot_metric_vs_nfe(table: Table, png: Path, svg: Path) -> None:
    """Write the dataset's primary-metric-vs-NFE plot as PNG and SVG."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    ours, paper = series(table, False), series(table, True)
    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys([*ours, *paper]))
    for i, label in enumerate(labels):
        color = colors[i % len(colors)]
        if label in ours:
            x, y, err = zip(*ours[label], strict=True)
            if any(err):  # error bars: ± one standard deviation over the seeds
                ax.errorbar(x, y, yerr=err, marker="o", color=color, label=label, capsize=3)
            else:
                ax.plot(x, y, marker="o", color=color, label=label)
        if label in paper:
            x, y, _ = zip(*paper[label], strict=True)
            ax.plot(x, y, marker="o", linestyle="--", color=color, markerfacecolor="none",
                    label=f"{label} (paper)")
    values = [v for pts in (*ours.values(), *paper.values()) for _, v, _ in pts]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.set_xlabel("NFE")
    _finish(plt, fig, ax, table, table_title(table), bool(labels), png, svg)


def seconds_series(table: Table) -> dict[str, list[tuple[float, float, int]]]:
    """label -> (seconds per sample, primary metric, NFE) of our rows that carry a measured
    sampling time, in NFE order."""
    key = table.columns[0].key  # the primary metric (under the first protocol)
    out: dict[str, list[tuple[float, float, int]]] = {}
    for row in table.rows:
        seconds = row.extra.get("seconds_per_sample")
        if key in row.values and seconds is not None and seconds > 0:
            out.setdefault(row.label, []).append((seconds, row.values[key], row.nfe))
    return {label: sorted(points, key=lambda p: p[2]) for label, points in out.items()}


def plot_metric_vs_seconds(table: Table, png: Path, svg: Path) -> bool:
    """Write the primary metric against sampling seconds per sample (log axis) as PNG and
    SVG; False (nothing written) when no row has a measured sampling time."""
    from matplotlib.ticker import FuncFormatter

    points = seconds_series(table)
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, pts) in enumerate(points.items()):
        x, y, nfes = zip(*pts, strict=True)
        ax.plot(x, y, marker="o", color=colors[i % len(colors)], label=label)
        for xi, yi, nfe in pts:
            ax.annotate(f"{nfe}", (xi, yi), textcoords="offset points", xytext=(3, 3),
                        fontsize=6, color=colors[i % len(colors)])
    values = [v for pts in points.values() for _, v, _ in pts]
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("sampling seconds per sample (measured; point labels: NFE)")
    _finish(plt, fig, ax, table,
            f"{table.dataset}: {metric_name(table.primary)} against sampling time", True, png,
            svg)
    return True


def _finish(plt: Any, fig: Any, ax: Any, table: Table, title: str, legend: bool, png: Path,
            svg: Path) -> None:
    """The metric's axis label, title, grid and legend; write PNG and SVG (no dates) and
    close the figure."""
    arrow = "lower is better" if table.columns[0].lower_is_better else "higher is better"
    ax.set_ylabel(f"{metric_name(table.primary)} ({arrow})")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, metadata={"Software": None}, bbox_inches="tight")
    fig.savefig(svg, metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    plt.close(fig)
