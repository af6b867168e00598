"""The end of `bench sweep`: a table of the trials, the best parameters and how to rerun them."""

from __future__ import annotations

from typing import Any

from sweeps.driver import SweepSummary
from sweeps.space import literal

STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan",
               "WAITING": "dim"}


def print_summary(summary: SweepSummary, console: Any) -> None:
    """Print the trial table, the best trial (or the Pareto front) and its `bench run`."""
    from rich.table import Table

    names = list(dict.fromkeys(k for r in summary.rows for k in r.params))
    best = {r.number for r in summary.best}
    multi = len(summary.objectives) > 1
    title = (f"study {summary.study}: {summary.finished} of {summary.target} trials finished "
             f"({summary.ran_here} run here, {summary.seconds:.0f} s)")
    directions = ", ".join(f"{o.label} {'minimised' if o.minimize else 'maximised'}"
                           for o in summary.objectives)
    table = Table(title=title, caption=f"objective: {directions}; * = "
                  + ("Pareto front" if multi else "best"))
    table.add_column("#", justify="right", no_wrap=True, min_width=3)
    table.add_column("state", no_wrap=True, min_width=8)
    for n in names:
        table.add_column(n, justify="right", no_wrap=True, min_width=6)
    for o in summary.objectives:
        table.add_column(o.label, justify="right", no_wrap=True, min_width=6)
    table.add_column("s", justify="right", no_wrap=True, min_width=3)
    table.add_column("MLflow run", no_wrap=True, min_width=8)
    for r in summary.rows:
        mark = (" *" if r.number in best else "")
        values = [f"{v:.4g}" for v in r.values] if r.values else ["-"] * len(summary.objectives)
        style = STATE_STYLE.get(r.state, "")
        table.add_row(f"{r.number}{mark}", f"[{style}]{r.state}[/{style}]" if style else r.state,
                      *(_short(r.params[n]) if n in r.params else "-" for n in names),
                      *values, "-" if r.seconds is None else f"{r.seconds:.0f}",
                      (r.run_id or "-")[:8])
    console.print(table)
    for r in summary.rows:
        if r.note:
            console.print(f"trial {r.number}: {r.note}", markup=False)
    if not summary.best:
        console.print("no trial completed yet")
    elif multi:
        console.print(f"Pareto front ({len(summary.best)} trials, marked *):")
        for r in summary.best:
            scores = ", ".join(f"{o.label} = {v:.4g}"
                               for o, v in zip(summary.objectives, r.values or [], strict=True))
            console.print(f"  trial {r.number}: {scores}")
            console.print(f"    {summary.reproduce[r.number]}", soft_wrap=True, markup=False)
    else:
        r = summary.best[0]
        o = summary.objectives[0]
        assert r.values is not None
        params = ", ".join(f"{k} = {_short(v, 6)}" for k, v in r.params.items())
        console.print(f"best trial {r.number} (*): {o.label} = {r.values[0]:.4g}; {params}")
        console.print("reproduce it with:")
        console.print(f"  {summary.reproduce[r.number]}", soft_wrap=True, markup=False)
    for warning in summary.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print(f"storage: {summary.storage}  study: {summary.study}")
    console.print(f"run id: {summary.parent_run_id}")


def _short(value: Any, digits: int = 4) -> str:
    """A parameter value for the table: floats to a few significant digits."""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return literal(value)
