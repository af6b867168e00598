"""Pictures and tables a run leaves behind: sample scatter/grids, results.csv, metric vs NFE."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from bench.engine.evaluation import EvalResult


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_scatter(points: torch.Tensor, reference: torch.Tensor | None, title: str,
                 path: Path) -> None:
    """Scatter plot of 2-D samples over the data."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    if reference is not None:
        ref = reference[: len(points)].cpu()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="#bbbbbb", label="data", rasterized=True)
    pts = points.cpu()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="#1f5fbf", label="samples", rasterized=True)
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def grid_pixels(images: torch.Tensor, cols: int, value_range: tuple[float, float] = (-1, 1),
                ) -> torch.Tensor:
    """Images (N, C, H, W) in value_range as one uint8 (C, H', W') grid of `cols` columns,
    separated by 1-pixel white lines."""
    n, c, h, w = images.shape
    rows = math.ceil(n / cols)
    lo, hi = value_range
    pixels = ((images.float().cpu().clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8)
    pad = 1
    grid = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid


def save_grid(images: torch.Tensor, path: Path, value_range: tuple[float, float] = (-1, 1),
              ) -> None:
    """Images (N, C, H, W) in value_range as one PNG grid, upscaled so small images are visible."""
    from PIL import Image

    n, c, h, w = images.shape
    grid = grid_pixels(images, math.ceil(math.sqrt(n)), value_range)
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if c == 1 else array, mode="L" if c == 1 else "RGB")
    scale = max(1, 256 // max(h, w))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    image.save(path)


def save_results_csv(rows: Sequence[dict[str, object]], path: Path) -> None:
    """The tidy results table: method, dataset, nfe, metric, value."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "dataset", "nfe", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)


def tidy_rows(method: str, dataset: str, results: Sequence[EvalResult]) -> list[dict[str, object]]:
    """One row per (nfe, metric), with the measured NFE."""
    rows: list[dict[str, object]] = []
    for r in results:
        for metric, value in {**r.metrics, **r.spread()}.items():
            rows.append({"method": method, "dataset": dataset, "nfe": r.nfe_measured,
                         "metric": metric, "value": value})
        rows.append({"method": method, "dataset": dataset, "nfe": r.nfe_measured,
                     "metric": "seconds_per_sample", "value": r.seconds_per_sample})
    return rows


def save_metric_vs_nfe(results: Sequence[EvalResult], metric: str, label: str, path: Path,
                       ) -> None:
    """The primary metric against NFE on a log axis."""
    plt = _pyplot()
    pts = sorted((r.nfe_measured, r.metrics[metric]) for r in results if metric in r.metrics)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_panels(panels: Sequence[tuple[str, torch.Tensor]], cols: int, path: Path,
                value_range: tuple[float, float] = (-1, 1)) -> None:
    """Captioned image grids side by side in one PNG (e.g. truth | observation | result):
    each panel is (N, C, H, W) in value_range laid out in `cols` columns, upscaled so that an
    image is at least 48 pixels wide."""
    from PIL import Image, ImageDraw

    grids = [grid_pixels(images, cols, value_range) for _, images in panels]
    h, w = panels[0][1].shape[-2:]
    scale = max(1, math.ceil(48 / max(h, w)))
    header, gap = 18, 12
    width = sum(g.shape[2] * scale for g in grids) + gap * (len(grids) + 1)
    height = max(g.shape[1] * scale for g in grids) + header + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    left = gap
    for (caption, _), grid in zip(panels, grids, strict=True):
        array = grid.expand(3, -1, -1).permute(1, 2, 0).numpy()
        tile = Image.fromarray(array, mode="RGB")
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
        canvas.paste(tile, (left, header))
        draw.text((left, 3), caption, fill="black")
        left += tile.width + gap
    canvas.save(path)


def save_conditional_scatter(observed: torch.Tensor, panels: Sequence[tuple[str, torch.Tensor]],
                             title: str, path: Path) -> None:
    """2-D inpainting: for each observed first coordinate (N,), the drawn points (N, K, 2) of
    each panel (exact conditional, edited, unconditional), side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), dpi=110,
                             sharex=True, sharey=True)
    for ax, (caption, points) in zip(axes, panels, strict=True):
        pts = points.reshape(-1, 2).cpu()
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, c="#1f5fbf", alpha=0.4, rasterized=True)
        for x in observed.cpu().tolist():
            ax.axvline(x, color="#bbbbbb", lw=0.5, zorder=0)
        ax.set_title(caption, fontsize=9)
        ax.set_aspect("equal")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
