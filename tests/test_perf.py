"""bench perf's measurements run end to end on the real loop (figures come from `bench perf`)."""

from __future__ import annotations

import math
from pathlib import Path

from bench.perf import cases, sample_overhead, train_overhead
from bench.tracking import Tracker, default_tracking_uri


def test_perf_rows_on_the_mlp_case(tmp_path: Path) -> None:
    case = cases()[0]
    tracker = Tracker(default_tracking_uri(tmp_path), tmp_path)
    rows = [train_overhead(case, "edm", 5, tracker), train_overhead(case, "cd", 5, tracker),
            sample_overhead(case, 2, 3)]
    for row in rows:
        assert row["bench_seconds"] > 0 and row["bare_seconds"] > 0
        assert math.isfinite(row["ratio"]) and row["target"] >= 1.0
    assert [r["figure"] for r in rows] == ["train_overhead", "train_overhead", "sample_overhead"]
    runs = tracker.search("perf")
    assert len(runs) == 2 and all(r.status == "FINISHED" for r in runs)
