"""FD_DINOv2: timm's DINOv2 with random weights of the real architecture (no weights can be
downloaded here), loaded from an official-layout file; the metric checked against an
independent Frechet distance on the same features; missing weights stop a run before training."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.core.errors import BenchError
from bench.metrics.dinov2 import (
    DINOV2_MODELS,
    INPUT_SIZE,
    PATCH,
    build_dinov2,
    build_dinov2_network,
    official_pos_embed,
)
from bench.metrics.image import ImageMetrics
from tests.conftest import run_bench
from tests.test_fid import ArrayImages, image_config, image_folder, random_pixels, to_float

pytest.importorskip("timm", reason="fd_dinov2 needs timm (in the test extras)")

OFFICIAL_GRID = 37  # the official checkpoints' 518 / 14 patch grid


def official_checkpoint(key: str, path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A random-weights checkpoint laid out as the official DINOv2 files are (mask_token, a
    37 x 37 positional embedding, no head), saved to path; returns it."""
    torch.manual_seed(seed)
    network = build_dinov2_network(key, None)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    for key in state:  # timm starts LayerScale at 1e-5: the class token would barely see
        if key.endswith(".gamma"):  # the image; trained weights are far from that
            state[key] = torch.full_like(state[key], 0.5)
    dim = state["cls_token"].shape[-1]
    state["pos_embed"] = 0.02 * torch.randn(1, 1 + OFFICIAL_GRID**2, dim)
    state["mask_token"] = torch.zeros(1, dim)
    torch.save(state, path)
    return state


def independent_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance by another route than bench's (scipy sqrtm of S1 S2): the trace of
    sqrt(S1 S2) as the sum of the square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1)."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def check_fd_dinov2(tmp_path: Path, key: str, count: int) -> None:
    weights = tmp_path / DINOV2_MODELS[key].file
    state = official_checkpoint(key, weights, seed=3)
    extractor = build_dinov2(key, weights, torch.device("cpu"))
    loaded = extractor.network.state_dict()
    # the official layout converted: no mask token, the embedding resampled as the official
    # model does it at run time for a 224 x 224 input, every other tensor as saved
    assert loaded["pos_embed"].shape[1] == 1 + (INPUT_SIZE // PATCH) ** 2
    assert torch.equal(loaded["pos_embed"],
                       official_pos_embed(state["pos_embed"], INPUT_SIZE // PATCH))
    assert all(torch.equal(loaded[k], v) for k, v in state.items()
               if k not in ("pos_embed", "mask_token"))

    reference = random_pixels(count, 16, 1)
    generated = random_pixels(count, 16, 2, low=40.0, high=200.0)
    cfg = image_config(tmp_path, num_samples=count, image_metrics=["fd_dinov2"],
                       dinov2_model=key, dinov2_weights=str(weights))
    from bench.engine.fid import prepare_fid

    suite = prepare_fid(ArrayImages(f"dino-{key}", reference), cfg, tmp_path / "cache")
    assert suite.names == ["fd_dinov2", "fd_dinov2_images_per_second"]
    assert suite.notes["dinov2_model"] == key and suite.notes["metric_tool"] == "dinov2"
    (accumulator,) = suite.new()
    assert isinstance(accumulator, ImageMetrics)
    for batch in to_float(generated).split(7):
        accumulator.update(batch)
    value = accumulator.compute()["fd_dinov2"]

    def features(pixels: torch.Tensor) -> np.ndarray:
        return extractor.extract(pixels).features.double().numpy()

    expected = independent_fd(features(generated), features(reference))
    assert value == pytest.approx(expected, rel=1e-6)
    assert value > 0


def test_fd_dinov2_equals_an_independent_frechet_distance(tmp_path: Path) -> None:
    """ViT-S/14 (the same code as ViT-L/14, 384-d features) on a tiny image set."""
    check_fd_dinov2(tmp_path, "vit-s14", 24)


@pytest.mark.slow
def test_fd_dinov2_on_vit_l14(tmp_path: Path) -> None:
    """The metric's own network, ViT-L/14 (1,024-d features), random weights."""
    check_fd_dinov2(tmp_path, "vit-l14", 24)


def test_official_pos_embed_keeps_the_class_token_and_a_matching_grid() -> None:
    embed = torch.randn(1, 1 + OFFICIAL_GRID**2, 8)
    out = official_pos_embed(embed, 16)
    assert out.shape == (1, 1 + 256, 8) and torch.equal(out[:, :1], embed[:, :1])
    assert official_pos_embed(out, 16) is out  # already the grid: untouched
    flat = torch.full((1, 1 + OFFICIAL_GRID**2, 4), 0.5)
    assert torch.allclose(official_pos_embed(flat, 16), torch.full((1, 257, 4), 0.5))
    with pytest.raises(BenchError, match="square"):
        official_pos_embed(torch.randn(1, 1 + 10, 4), 16)


def test_missing_dinov2_weights_fail_a_run_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check a run makes before it builds or trains anything (the command line's one-line
    error and exit code for a missing weights file: test_fid's Inception case, the same path)."""
    from bench.engine.fid import check_metric_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = image_config(tmp_path, image_metrics=["fd_dinov2"])
    with pytest.raises(BenchError) as info:
        check_metric_weights(cfg)
    message = str(info.value)
    assert "\n" not in message and "dinov2_vitl14_pretrain.pth" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "eval.dinov2_weights" in message
    cfg.eval.dinov2_weights = str(tmp_path / "elsewhere.pth")
    with pytest.raises(BenchError, match="elsewhere.pth' does not exist"):
        check_metric_weights(cfg)
    # FD-DINOv2 alone needs no Inception weights
    cfg.eval.dinov2_weights = str(tmp_path / DINOV2_MODELS["vit-l14"].file)
    Path(cfg.eval.dinov2_weights).write_bytes(b"")
    check_metric_weights(cfg)


@pytest.mark.slow  # the same command-line path as test_fid's missing Inception weights
def test_missing_dinov2_weights_stop_bench_run_in_one_line(tmp_path: Path) -> None:
    images = image_folder(tmp_path / "images", 4, 13)
    torch_home = tmp_path / "torch_home"
    result = run_bench(["run", "--method", "edm", "--dataset", f"folder:{images}", "--steps", "1",
                        "--set", "eval.image_metrics=[\"fd_dinov2\"]"], tmp_path, timeout=300,
                       env={"TORCH_HOME": str(torch_home)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "dinov2_vitl14_pretrain.pth" in lines[0] and "eval.dinov2_weights" in lines[0]
    db = tmp_path / "runs" / "mlflow.db"
    if db.is_file():  # stopped before any run was created
        with sqlite3.connect(db) as conn:
            assert list(conn.execute("SELECT status FROM runs")) == []
