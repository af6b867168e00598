"""Benchmark: image-metric throughput through bench versus torch-fidelity called directly, on the
same images with the same (random-weights) Inception-v3.

    python -m bench.perf.fid_throughput --images 64 --repeats 2

bench's side is an evaluation's metric path: suite.new(), update() per generated batch (uint8
quantisation, torch-fidelity's Inception, float64 running moments). torch-fidelity's side is what
its calculate_metrics(fid=True) runs for input1: get_featuresdict_from_dataset (its DataLoader
with its default workers) and fid_features_to_statistics. Reference statistics are prepared
before timing on both sides (both tools cache them). The final distance is timed separately: it
is a fixed cost per evaluation (bench: float64 sqrtm; torch-fidelity: eigvals).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset

from bench.core.config import RunConfig
from bench.data.datasets import ImageDataset
from bench.engine.fid import prepare_fid
from bench.metrics.base import frechet_distance
from bench.metrics.extractors import (
    TORCH_FIDELITY_WEIGHTS,
    TorchFidelityExtractor,
    torch_fidelity_inception_class,
)
from bench.metrics.image import EXTRACT_BATCH, ImageMetrics


class _Pixels(ImageDataset):
    """In-memory uint8 images as a bench image dataset."""

    def __init__(self, pixels: Tensor) -> None:
        """Hold the pixels."""
        super().__init__("throughput-reference", 0, "random images")
        self.shape = tuple(pixels.shape[1:])
        self.pixels = pixels

    def _load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The held pixels."""
        return self.pixels.numpy(), None


class _UInt8Images(TorchDataset):
    """uint8 images as torch-fidelity's Dataset input."""

    def __init__(self, pixels: Tensor) -> None:
        """Hold the pixels."""
        self.pixels = pixels

    def __len__(self) -> int:
        """Number of images."""
        return len(self.pixels)

    def __getitem__(self, i: int) -> Tensor:
        """One uint8 image (3, H, W)."""
        return self.pixels[i]


def random_inception_weights(path: Path, seed: int) -> None:
    """Save random He-initialised weights in torch-fidelity's Inception layout at path."""
    generator = torch.Generator().manual_seed(seed)
    shell = torch_fidelity_inception_class()("inception-v3-compat", ["2048"])
    state: dict[str, Tensor] = {}
    for key, value in shell.state_dict().items():
        if value.dtype == torch.long:
            state[key] = torch.zeros(value.shape, dtype=torch.long)
        elif key.endswith("running_var") or (key.endswith(".weight") and value.ndim == 1):
            state[key] = torch.ones(value.shape)
        elif value.ndim >= 2:
            fan_in = math.prod(value.shape[1:])
            state[key] = torch.randn(value.shape, generator=generator) * math.sqrt(2.0 / fan_in)
        else:
            state[key] = torch.zeros(value.shape)
    torch.save(state, path)


def random_pixels(count: int, side: int, seed: int) -> Tensor:
    """Smooth random uint8 RGB images."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, 3, side + 2, side + 2, generator=generator)
    return (255 * F.avg_pool2d(noise, 3, stride=1)).round().to(torch.uint8)


@dataclass
class ThroughputResult:
    """Images per second of both metric paths (median over repeats) and the distance times."""

    images: int
    bench_images_per_second: float
    torch_fidelity_images_per_second: float
    bench_distance_seconds: float
    torch_fidelity_distance_seconds: float

    @property
    def ratio(self) -> float:
        """bench / torch-fidelity throughput (>= 0.95 is the target)."""
        return self.bench_images_per_second / self.torch_fidelity_images_per_second


def metric_throughput_ratio(images: int = 64, side: int = 32, repeats: int = 2,
                            time_distance: bool = True) -> ThroughputResult:
    """Measure both metric paths on the same images, interleaved, with one Inception network."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.utils import get_featuresdict_from_dataset

    generated = random_pixels(images, side, seed=1)
    generated_float = generated.float() / 127.5 - 1.0
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / TORCH_FIDELITY_WEIGHTS.file
        random_inception_weights(weights, seed=0)
        cfg = RunConfig()
        cfg.device = "cpu"
        cfg.eval.num_samples = images
        cfg.eval.image_metrics = ["fid"]
        cfg.eval.inception_weights = str(weights)
        suite = prepare_fid(_Pixels(random_pixels(16, side, seed=2)), cfg, Path(tmp) / "cache")
    (probe,) = suite.new()
    if not isinstance(probe, ImageMetrics) or probe.reference is None \
            or not isinstance(probe.extractor, TorchFidelityExtractor):
        raise RuntimeError("prepare_fid did not build torch-fidelity's FID suite")
    module = probe.extractor.module
    reference = probe.reference
    bench_rates: list[float] = []
    fidelity_rates: list[float] = []
    bench_moments = None
    fidelity_stats = None

    def run_bench() -> None:
        """One timed pass through bench's accumulator."""
        nonlocal bench_moments
        (acc,) = suite.new()
        if not isinstance(acc, ImageMetrics):
            raise RuntimeError("prepare_fid did not build an ImageMetrics accumulator")
        t0 = time.perf_counter()
        for batch in generated_float.split(EXTRACT_BATCH):
            acc.update(batch)
        bench_rates.append(images / (time.perf_counter() - t0))
        bench_moments = acc.moments

    def run_torch_fidelity() -> None:
        """One timed pass through torch-fidelity's feature and statistics functions."""
        nonlocal fidelity_stats
        t0 = time.perf_counter()
        features = get_featuresdict_from_dataset(_UInt8Images(generated), module, EXTRACT_BATCH,
                                                 False, False, False)
        fidelity_stats = fid_features_to_statistics(features["2048"])
        fidelity_rates.append(images / (time.perf_counter() - t0))

    with torch.no_grad():
        module(generated[:2])  # warm-up: first-call allocations are not part of either path
    for i in range(repeats):
        for run in ((run_bench, run_torch_fidelity) if i % 2 == 0
                    else (run_torch_fidelity, run_bench)):
            run()
    bench_distance = fidelity_distance = float("nan")
    if time_distance and bench_moments is not None and fidelity_stats is not None:
        mu, sigma = bench_moments.stats()
        t0 = time.perf_counter()
        frechet_distance(mu, sigma, reference.mu, reference.sigma)
        bench_distance = time.perf_counter() - t0
        reference32 = {"mu": reference.mu.astype(np.float32), "sigma": reference.sigma}
        t0 = time.perf_counter()
        fid_statistics_to_metric(fidelity_stats, reference32, False)
        fidelity_distance = time.perf_counter() - t0
    return ThroughputResult(images, statistics.median(bench_rates),
                            statistics.median(fidelity_rates), bench_distance, fidelity_distance)


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="generated images per repeat")
    parser.add_argument("--side", type=int, default=32, help="image side before the 299 resize")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timed repeats")
    parser.add_argument("--no-distance", action="store_true", help="skip timing the distance")
    args = parser.parse_args()
    result = metric_throughput_ratio(args.images, args.side, args.repeats, not args.no_distance)
    print(f"images: {result.images}")
    print(f"bench:          {result.bench_images_per_second:.3f} images/s")
    print(f"torch-fidelity: {result.torch_fidelity_images_per_second:.3f} images/s")
    print(f"throughput ratio bench / torch-fidelity: {result.ratio:.3f}")
    print(f"final distance: bench {result.bench_distance_seconds:.1f} s, torch-fidelity "
          f"{result.torch_fidelity_distance_seconds:.1f} s")


if __name__ == "__main__":
    main()
