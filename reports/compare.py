"""`bench report --compare RUN_A RUN_B`: two runs' numbers at every NFE both were evaluated at,
their difference and its 95% interval, and whether the difference is beyond the uncertainty.

Each run's number is its mean over its evaluation seed sets (`eval.seeds`, `bench eval
--seeds`), with their standard deviation s and count n. The interval of the difference of the
means is Welch's: (a - b) ± t(0.975, nu) sqrt(s_a^2 / n_a + s_b^2 / n_b), nu the
Welch-Satterthwaite degrees of freedom. A run evaluated under one seed set has no measured
spread: its comparisons say so instead of guessing. Numbers made under different protocols
(sample count, reference, features) are not compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.app.tracking import RUN_ID_PATTERN, Tracker
from bench.core.errors import BenchError, UsageError
from bench.engine.evaluation import LOWER_IS_BETTER
from reports.store import EVAL_METRICS, eval_results

LEVEL = 0.95


@dataclass(frozen=True)
class Difference:
    """One metric at one NFE of the two runs."""

    metric: str
    nfe: int
    a: float
    b: float
    a_std: float | None
    b_std: float | None
    a_seeds: int
    b_seeds: int
    comparable: bool  # the same protocol
    low: float | None = None  # the 95% interval of a - b (None: not measured)
    high: float | None = None

    @property
    def diff(self) -> float:
        return self.a - self.b

    @property
    def verdict(self) -> str:
        """'A better', 'B better', 'within the uncertainty', 'no interval (spread not
        measured)' or 'protocols differ'."""
        if not self.comparable:
            return "protocols differ"
        if self.low is None or self.high is None:
            return "no interval (spread not measured)"
        if self.low <= 0.0 <= self.high:
            return "within the uncertainty"
        lower = LOWER_IS_BETTER.get(self.metric, True)
        return "A better" if (self.diff < 0) == lower else "B better"


def welch_interval(a: float, sa: float, na: int, b: float, sb: float, nb: int,
                   level: float = LEVEL) -> tuple[float, float]:
    """Welch's interval for the difference of two means from their sample standard
    deviations and counts (each count at least 2)."""
    from scipy.stats import t

    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0.0:
        return a - b, a - b
    nu = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    half = float(t.ppf(0.5 + level / 2, nu)) * se
    return a - b - half, a - b + half


def compare_runs(tracker: Tracker, run_a: str, run_b: str) -> list[Difference]:
    """The differences of the two runs at every (metric, NFE) both have, sorted."""
    records = []
    for run_id in (run_a, run_b):
        if not RUN_ID_PATTERN.match(run_id):
            raise UsageError(f"--compare takes run ids (32 hex characters), got {run_id!r}")
        record = tracker.get_run(run_id)
        if "method" not in record.tags or "dataset" not in record.tags:
            raise BenchError(f"run {run_id} is not a run of a method (no method and dataset "
                             f"tags)")
        records.append(record)
    if records[0].tags.get("dataset") != records[1].tags.get("dataset"):
        raise BenchError(f"runs {run_a} and {run_b} are on different datasets "
                         f"({records[0].tags.get('dataset')}, {records[1].tags.get('dataset')})")
    rows = [{(r["metric"], r["nfe"]): r for r in eval_results(tracker, record,
                                                              EVAL_METRICS).iter_rows(named=True)}
            for record in records]
    shared = sorted(set(rows[0]) & set(rows[1]), key=lambda k: (k[0], k[1]))
    if not shared:
        raise BenchError(f"runs {run_a} and {run_b} share no evaluated metric and NFE")
    out = []
    for key in shared:
        ra, rb = rows[0][key], rows[1][key]
        low = high = None
        same = ra["protocol"] == rb["protocol"]
        if same and ra["std"] is not None and rb["std"] is not None:
            low, high = welch_interval(ra["value"], ra["std"], ra["seeds"], rb["value"],
                                       rb["std"], rb["seeds"])
        out.append(Difference(key[0], key[1], ra["value"], rb["value"], ra["std"], rb["std"],
                              ra["seeds"], rb["seeds"], same, low, high))
    return out
