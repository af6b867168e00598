"""Checkpoints: atomic writes, weights_only loads, one-line errors for damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.core.config import TrainConfig
from bench.core.errors import BenchError
from bench.engine.checkpoint import (
    kept_checkpoints,
    load_checkpoint,
    retain,
    save_checkpoint,
)
from bench.engine.training import LoopState, load_loop_state, loop_state_dict, make_optimizer


def test_round_trip_and_no_temporary_left(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "last.pt"
    state = {"step": 3, "modules": {"student": {"w": torch.arange(4.0)}}, "name": "x"}
    save_checkpoint(state, path)
    save_checkpoint({**state, "step": 4}, path)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 4 and torch.equal(loaded["modules"]["student"]["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_truncated_and_foreign_files_are_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(BenchError, match="unreadable") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.ones(2)}, foreign)
    with pytest.raises(BenchError, match="not a cmbench checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(BenchError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_earlier_checkpoints_with_shared_adam_step_counts_load(tmp_path: Path) -> None:
    """Checkpoints of earlier versions hold Adam's per-parameter step counts as views of one
    tensor; loaded, each count is a tensor of its own and a step adds one to each."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = make_optimizer(list(net.parameters()), TrainConfig())
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = LoopState(1, optimizer, None, torch.Generator().manual_seed(0))
    saved = loop_state_dict(state)
    shared = torch.full((len(saved["optimizer"]["state"]),), 7.0)
    for i, values in enumerate(saved["optimizer"]["state"].values()):
        values["step"] = shared[i]  # the earlier layout: views of one tensor
    save_checkpoint({"loop": saved}, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")["loop"]

    fresh = make_optimizer(list(net.parameters()), TrainConfig())
    resumed = LoopState(0, fresh, None, torch.Generator())
    load_loop_state(resumed, loaded)
    net(torch.ones(1, 3)).sum().backward()
    fresh.step()
    assert [float(v["step"]) for v in fresh.state.values()] == [8.0] * 4


def test_retain_keeps_the_last_k_as_links_and_deletes_older(tmp_path: Path) -> None:
    last = tmp_path / "last.pt"
    for step in (10, 20, 30, 40):
        save_checkpoint({"step": step}, last)
        retain(last, step, 3)
    kept = kept_checkpoints(tmp_path)
    assert [s for s, _ in kept] == [20, 30, 40]
    assert kept[-1][1].stat().st_ino == last.stat().st_ino  # the last one: no second copy
    assert load_checkpoint(kept[0][1])["step"] == 20
    assert retain(last, 50, 1) == [] and len(kept_checkpoints(tmp_path)) == 3


def test_a_run_keeps_its_last_checkpoints_and_its_best(bench, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_id_of

    out = bench("run", "--method", "ct", "--dataset", "gmm8", "--steps", "60", "--nfe", "1",
                "--set", "train.checkpoint_every=10", "--set", "train.eval_every=20",
                "--set", "train.keep_checkpoints=3", "--set", "train.keep_best=true",
                "--set", "train.batch_size=64", "--set", "eval.num_samples=300")
    assert out.returncode == 0, out.stderr
    run_id = run_id_of(out.stdout)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(run_id)
    folder = Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.pt", "iter-00000040.pt", "iter-00000050.pt", "iter-00000060.pt", "last.pt"]
    # best.pt: the evaluation (iterations 20, 40, then the final one) with the lowest w2
    values = {m.step: m.value for m in client.get_metric_history(run_id, "by_iteration/w2_nfe1")}
    values[60] = run.data.metrics["w2"]
    best_step = min(values, key=values.__getitem__)
    tags = run.data.tags
    assert tags["best_metric"] == "by_iteration/w2_nfe1" and int(tags["best_step"]) == best_step
    assert float(tags["best_value"]) == pytest.approx(values[best_step])
    best = load_checkpoint(folder / "best.pt")
    assert best["loop"]["step"] == best_step
    assert load_checkpoint(folder / "last.pt")["loop"]["step"] == 60
