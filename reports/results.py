"""Results in a notebook: the tidy rows a report is made of, from any tracking store.

    from reports import results

    df = results.load()                                   # runs/mlflow.db here, pandas
    df = results.load("postgresql://...", datasets=["cifar10"], select="best")
    frame = results.load(polars=True)                     # a polars DataFrame

One row per (dataset, method, run, nfe, metric): the run's training `seed`, the `value` (the
mean over the evaluation's seed sets; the value itself with one set), its `std` over those sets
(missing with one set) and their count `seeds`, and the `protocol` the number was made under
(two numbers compare only with the same protocol). The runs are the ones `bench report` would
show (`select`: the newest finished run of each method, or the best; the training seeds of a
`bench suite --seeds` run all count), and so are the rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.app.tracking import Tracker, resolve_tracking_uri
from reports.store import RESULT_SCHEMA, Select, select_runs

COLUMNS = tuple(RESULT_SCHEMA)


def load(tracking_uri: str | None = None, datasets: Iterable[str] | None = None,
         select: Select = "latest", *, runs_dir: str | Path = "runs",
         polars: bool = False) -> Any:
    """The tidy results of the store as a pandas DataFrame (a polars one with polars=True).

    tracking_uri: an MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the sqlite store
    in `runs_dir`); datasets: the datasets to read (default: every dataset with runs);
    select: "latest" or "best", as `bench report --select`."""
    runs = Path(runs_dir)
    tracker = Tracker(resolve_tracking_uri(tracking_uri, "", runs), runs)
    frame = select_runs(tracker, datasets, select).results.select(COLUMNS)
    return frame if polars else frame.to_pandas()
