"""bench perf's machinery end to end on the MLP case (the figures themselves come from
`bench perf` on a quiet machine: no timing is asserted here), and the sync-free non-finite
check of the training loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.perf import SAMPLE_NFES, TRAIN_METHODS, cases, run_perf, write_json
from bench.training import BatchStream, LoopHooks, NonFiniteLoss, new_loop_state, train_loop


def test_every_figure_on_the_mlp_case(tmp_path: Path) -> None:
    rows = run_perf(2, lambda line: None, case_names=["gmm8-mlp"], min_seconds=0.0)
    keys = [(r["figure"], r["method"], r["nfe"]) for r in rows]
    expected = ([("train_overhead", m, None) for m in TRAIN_METHODS]
                + [("sample_overhead", "cd", n) for n in SAMPLE_NFES]
                + [("eval_overhead", "cd", None), ("peak_memory_ratio", "cd", None)])
    assert keys == expected
    for row in rows:
        assert row["case"] == "gmm8-mlp"
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["target"] == {"train_overhead": 1.03 if row["method"] == "cd" else 1.05,
                                 "sample_overhead": 1.02, "eval_overhead": 1.05,
                                 "peak_memory_ratio": 1.10}[row["figure"]]
        if row["figure"] == "peak_memory_ratio":
            assert row["bench_bytes"] > row["extra_bytes"] > 0
        else:
            assert row["bench_seconds"] > 0 and row["bare_seconds"] > 0
        assert row["denominator"]
    path = tmp_path / "perf.json"
    write_json(rows, path, seconds=1.0)
    document = json.loads(path.read_text())
    assert document["rows"] == rows
    assert {"cpu", "threads", "torch", "device"} <= set(document["machine"])


class _Exploding:
    """Wraps a method so that its loss turns non-finite from iteration `at` on."""

    def __init__(self, method: object, at: int) -> None:
        self.method = method
        self.at = at

    def __getattr__(self, name: str) -> object:
        return getattr(self.method, name)

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None, step: int,
             generator: torch.Generator) -> torch.Tensor:
        loss = self.method.loss(x0, labels, step, generator)  # type: ignore[attr-defined]
        return loss * float("nan") if step >= self.at else loss


def test_a_non_finite_loss_stops_the_loop_before_any_checkpoint(tmp_path: Path) -> None:
    from bench.perf import _config, _method

    case = cases()[0]
    device = torch.device("cpu")
    cfg = _config(case, "edm", device)
    method = _method(case, "edm", cfg, device)
    state = new_loop_state(method, cfg.train, 0, device)
    stream = BatchStream(case.dataset.train_batch, len(case.dataset), None, 64, 0, device)
    saved: list[int] = []
    hooks = LoopHooks(checkpoint=lambda s: saved.append(s.step))
    train = cfg.train
    train.checkpoint_every, train.log_every = 4, 50
    with pytest.raises(NonFiniteLoss, match="at iteration 6$"):
        train_loop(_Exploding(method, 6), train, stream, state, hooks,  # type: ignore[arg-type]
                   until=20)
    assert saved == [4]  # the checkpoint due at 8 would hold non-finite weights: never written
