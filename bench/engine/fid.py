"""Image metrics - FID, IS, KID, precision/recall - through torch-fidelity's or clean-fid's
Inception-v3, and FD_DINOv2 through DINOv2 ViT-L/14 (bench.metrics.dinov2), against reference
statistics computed once and cached.

Which tool and mode (eval.metric_tool, eval.clean_fid_mode) decide the extractor and the
preprocessing exactly as that tool does it; generated images stream from the sampler into the
extractor batch by batch, quantised to uint8 as the tools quantise. FID is our float64
frechet_distance on running moments; IS, KID and precision/recall follow torch-fidelity's
estimators and seeds. Where each tool's weights are looked for: bench.fid_extractors. The cache
(<runs_dir>/cache/refstats/) and its key: bench.fid_stats.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from bench.core.config import RunConfig
from bench.core.errors import BenchError, UsageError
from bench.data.datasets import Dataset
from bench.metrics.base import MetricAccumulator, MetricSuite, RunningMoments
from bench.metrics.dinov2 import (
    DinoV2Extractor,
    build_dinov2,
    locate_dinov2_weights,
    timm_module,
)
from bench.metrics.extractors import (
    CLEAN_FID,
    TORCH_FIDELITY,
    ImageFeatureExtractor,
    build_extractor,
    file_sha256,
    images_to_uint8,
    locate_weights,
    metric_mode,
)
from bench.metrics.image import (
    EXTRACT_BATCH,
    IMAGE_METRICS,
    INCEPTION_METRICS,
    IS_SPLITS,
    KID_SUBSETS,
    PRC_NEIGHBORHOOD,
    ImageMetrics,
    ReferenceStats,
    kid_subset_size,
    knn_radii,
    metric_log_names,
    png_writer,
)
from bench.metrics.reference import (
    RefStatsKey,
    load_published_stats,
    load_reference_stats,
    refstats_path,
    save_reference_stats,
)

REFERENCE_SPLITS = ("train", "test")

__all__ = [
    "ImageFeatureExtractor",
    "image_metrics",
    "check_metric_weights",
    "locate_weights",
    "precompute_reference_stats",
    "prepare_fid",
    "prepare_image_metrics",
    "reference_key",
]


def image_metrics(cfg: RunConfig) -> list[str]:
    """eval.image_metrics, checked and in canonical order."""
    chosen = list(cfg.eval.image_metrics)
    unknown = [m for m in chosen if m not in IMAGE_METRICS]
    if unknown or not chosen:
        raise UsageError(f"eval.image_metrics must be a non-empty subset of "
                         f"{', '.join(IMAGE_METRICS)}, got {chosen}")
    return [m for m in IMAGE_METRICS if m in chosen]


def _device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu (as the runner resolves it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def _reference_pixels(dataset: Dataset, split: str) -> tuple[int, Tensor | None]:
    """Size of the split and, for the test split, its float images (train streams batches)."""
    if split == "train":
        return len(dataset), None
    test = getattr(dataset, "test", None)
    if split != "test" or not callable(test):
        have = "train, test" if callable(test) else "train"
        raise UsageError(f"eval.reference_split {split!r} is not available for {dataset.name}; "
                         f"valid: {have}")
    images = test()
    return images.shape[0], images


def _reference_batches(dataset: Dataset, test_images: Tensor | None, count: int,
                       batch_size: int) -> Iterator[Tensor]:
    """The first count reference images as uint8 batches."""
    for start in range(0, count, batch_size):
        index = torch.arange(start, min(start + batch_size, count))
        images = dataset.train_batch(index) if test_images is None else test_images[index]
        pixels = images_to_uint8(images)
        yield pixels.repeat(1, 3, 1, 1) if pixels.shape[1] == 1 else pixels


def reference_key(dataset: Dataset, cfg: RunConfig, extractor: ImageFeatureExtractor,
                  split_size: int) -> RefStatsKey:
    """The cache key of the reference statistics for this dataset, config and extractor."""
    requested = int(getattr(cfg.eval, "reference_num_samples", 0) or 0)
    count = min(split_size, requested) if requested > 0 else split_size
    return RefStatsKey(dataset=dataset.name, split=cfg.eval.reference_split,
                       shape=tuple(dataset.shape), count=count, tool=extractor.tool,
                       mode=extractor.mode, extractor=extractor.identity)


def compute_reference_stats(dataset: Dataset, test_images: Tensor | None, count: int,
                            extractor: ImageFeatureExtractor, keep_features: bool,
                            with_radii: bool) -> ReferenceStats:
    """Features of the first count reference images: moments, and features/radii if asked."""
    moments = RunningMoments()
    kept: list[Tensor] = []
    for pixels in _reference_batches(dataset, test_images, count, EXTRACT_BATCH):
        features = extractor.extract(pixels.to(extractor.device)).features
        moments.update(features)  # on the extractor's device (RunningMoments)
        if keep_features:
            kept.append(features.cpu())
    mu, sigma = moments.stats()
    stats = ReferenceStats(mu=mu, sigma=sigma, count=count)
    if keep_features:
        features = torch.cat(kept)
        stats.features = features.numpy()
        if with_radii:
            stats.radii = knn_radii(features.to(extractor.device)).cpu().numpy()
    return stats


def _cached_reference(dataset: Dataset, cfg: RunConfig, cache_dir: Path,
                      extractor: ImageFeatureExtractor, metrics: list[str],
                      ) -> tuple[ReferenceStats, Path]:
    """Load the cached statistics or compute and cache them (with what the metrics need)."""
    split_size, test_images = _reference_pixels(dataset, cfg.eval.reference_split)
    key = reference_key(dataset, cfg, extractor, split_size)
    if key.count < 2:
        raise BenchError(f"{dataset.name}: reference statistics need at least 2 images in the "
                         f"{key.split} split, found {key.count}")
    _check_counts(cfg, metrics, key.count)
    path = refstats_path(cache_dir, key)
    need_features = "kid" in metrics or "prc" in metrics
    need_radii = "prc" in metrics
    stats = load_reference_stats(path, key)
    if stats is not None and (stats.features is not None or not need_features):
        if need_radii and stats.radii is None and stats.features is not None:
            features = torch.from_numpy(stats.features).to(extractor.device)
            stats.radii = knn_radii(features).cpu().numpy()
            save_reference_stats(stats, key, path)
        return stats, path
    stats = compute_reference_stats(dataset, test_images, key.count, extractor, need_features,
                                    need_radii)
    save_reference_stats(stats, key, path)
    stats.source = str(path)
    return stats, path


def _published_reference(extractor: ImageFeatureExtractor, metrics: list[str],
                         path: Path) -> ReferenceStats:
    """mu/sigma from eval.reference_stats; KID and precision/recall need features it lacks."""
    needs = [m for m in metrics if m in ("kid", "prc")]
    if needs:
        raise UsageError(f"eval.reference_stats '{path}' holds only mu and sigma; "
                         f"{' and '.join(needs)} need reference features: drop them from "
                         f"eval.image_metrics or unset eval.reference_stats")
    return load_published_stats(path, extractor.feature_dim)


def _check_counts(cfg: RunConfig, metrics: list[str], reference_count: int) -> None:
    """Sample-count requirements of IS, KID and precision/recall, checked before any work."""
    n = cfg.eval.num_samples
    if "is" in metrics and n < IS_SPLITS:
        raise UsageError(f"IS uses {IS_SPLITS} splits: eval.num_samples must be >= {IS_SPLITS}")
    if "kid" in metrics and kid_subset_size(n, reference_count) < 2:
        raise UsageError("KID needs at least 2 generated and 2 reference images")
    if "prc" in metrics and min(n, reference_count) <= PRC_NEIGHBORHOOD:
        raise UsageError(f"precision/recall need more than {PRC_NEIGHBORHOOD} generated and "
                         f"reference images")


def prepare_image_metrics(dataset: Dataset, cfg: RunConfig, cache_dir: Path,
                          extractor: ImageFeatureExtractor) -> MetricSuite:
    """Reference statistics (cached) and a factory of fresh accumulators, for any extractor."""
    if dataset.kind != "image" or len(dataset.shape) != 3 or dataset.shape[0] not in (1, 3):
        raise UsageError(f"image metrics need an RGB or grey image dataset, not {dataset.name}")
    metrics = [m for m in image_metrics(cfg) if m in INCEPTION_METRICS]
    published = str(getattr(cfg.eval, "reference_stats", "") or "")
    notes = {
        "metric_tool": extractor.tool,
        "metric_mode": extractor.mode,
        "metric_num_samples": str(cfg.eval.num_samples),
        "reference_split": cfg.eval.reference_split,
        "image_metrics": ",".join(metrics),
        "inception_weights_sha256": extractor.identity,
    }
    reference: ReferenceStats | None = None
    _check_counts(cfg, [m for m in metrics if m == "is"], 0)
    if published:
        path = Path(published).expanduser()
        reference = _published_reference(extractor, metrics, path)
        notes.update({"reference_split": "published", "reference_stats": str(path),
                      "reference_stats_sha256": file_sha256(path)})
    elif metrics != ["is"]:
        reference, path = _cached_reference(dataset, cfg, cache_dir, extractor, metrics)
        notes.update({"reference_stats": str(path),
                      "reference_num_samples": str(reference.count)})
    reference_count = reference.count if reference is not None else 0
    if "is" in metrics:
        notes["is_splits"] = str(IS_SPLITS)
    if "kid" in metrics:
        notes["kid_subset_size"] = str(kid_subset_size(cfg.eval.num_samples, reference_count))
        notes["kid_subsets"] = str(KID_SUBSETS)
    if "prc" in metrics:
        notes["prc_neighborhood"] = str(PRC_NEIGHBORHOOD)
    png_root: Path | None = None
    if cfg.eval.save_png:
        png_root = Path(cache_dir).parent / "png" / time.strftime("%Y%m%d-%H%M%S")
        notes["png_dir"] = str(png_root)
    evaluations = itertools.count()

    def new() -> list[MetricAccumulator]:
        """Fresh accumulators for one evaluation (one NFE)."""
        writer = None
        if png_root is not None:
            writer = png_writer(png_root / f"eval{next(evaluations):03d}")
        return [ImageMetrics(extractor, reference, metrics, cfg.eval.num_samples, writer)]

    return MetricSuite(metric_log_names(metrics), new, notes)


def configured_extractor(cfg: RunConfig) -> tuple[ImageFeatureExtractor, Path]:
    """The extractor eval.metric_tool / eval.clean_fid_mode ask for, and its weights file.

    The weights are located first, so a machine without them fails here in one line.
    """
    tool = cfg.eval.metric_tool
    if tool not in (TORCH_FIDELITY, CLEAN_FID):
        raise UsageError(f"eval.metric_tool must be {TORCH_FIDELITY} or {CLEAN_FID}, got {tool!r}")
    mode = metric_mode(tool, cfg.eval.clean_fid_mode)
    weights = locate_weights(tool, mode, cfg.eval.inception_weights)
    with_logits = "is" in image_metrics(cfg)
    return build_extractor(tool, mode, weights, with_logits, _device(cfg.device)), weights


def check_metric_weights(cfg: RunConfig) -> None:
    """Every weights file (and library) the chosen image metrics need is there; else one line
    naming the file and how to get it. Cheap: nothing is built."""
    chosen = image_metrics(cfg)
    if any(m in INCEPTION_METRICS for m in chosen):
        locate_weights(cfg.eval.metric_tool,
                       metric_mode(cfg.eval.metric_tool, cfg.eval.clean_fid_mode),
                       cfg.eval.inception_weights)
    if "fd_dinov2" in chosen:
        locate_dinov2_weights(cfg.eval.dinov2_model, cfg.eval.dinov2_weights)
        timm_module()


def configured_dinov2(cfg: RunConfig) -> tuple[DinoV2Extractor, Path]:
    """The DINOv2 extractor eval.dinov2_model asks for and its weights file (located first, so
    a machine without them fails here in one line)."""
    weights = locate_dinov2_weights(cfg.eval.dinov2_model, cfg.eval.dinov2_weights)
    return build_dinov2(cfg.eval.dinov2_model, weights, _device(cfg.device)), weights


def prepare_dinov2_metric(dataset: Dataset, cfg: RunConfig, cache_dir: Path,
                          extractor: ImageFeatureExtractor) -> MetricSuite:
    """FD_DINOv2 alone: reference statistics of the DINOv2 features (cached like Inception's,
    keyed by the DINOv2 weights) and a factory of fresh accumulators."""
    if dataset.kind != "image" or len(dataset.shape) != 3 or dataset.shape[0] not in (1, 3):
        raise UsageError(f"fd_dinov2 needs an RGB or grey image dataset, not {dataset.name}")
    reference, path = _cached_reference(dataset, cfg, cache_dir, extractor, ["fid"])
    notes = {"dinov2_model": extractor.mode, "dinov2_weights_sha256": extractor.identity,
             "dinov2_reference_stats": str(path),
             "dinov2_reference_num_samples": str(reference.count)}

    def new() -> list[MetricAccumulator]:
        return [ImageMetrics(extractor, reference, ["fid"], cfg.eval.num_samples,
                             fd_name="fd_dinov2")]

    return MetricSuite(["fd_dinov2", "fd_dinov2_images_per_second"], new, notes)


def prepare_fid(dataset: Dataset, cfg: RunConfig, cache_dir: Path) -> MetricSuite:
    """The image-metric suite of a run: weights checked (all of them before any other work),
    extractors built, references cached."""
    chosen = image_metrics(cfg)
    inception = [m for m in chosen if m in INCEPTION_METRICS]
    located = configured_extractor(cfg) if inception else None
    dino = configured_dinov2(cfg) if "fd_dinov2" in chosen else None
    suites: list[MetricSuite] = []
    if located is not None:
        extractor, weights = located
        suites.append(prepare_image_metrics(dataset, cfg, cache_dir, extractor))
        suites[-1].notes["inception_weights"] = str(weights)
    if dino is not None:
        extractor, weights = dino
        suites.append(prepare_dinov2_metric(dataset, cfg, cache_dir, extractor))
        suites[-1].notes["dinov2_weights"] = str(weights)
        if located is None:  # the protocol's tool and reference are DINOv2's
            suites[-1].notes.update({
                "metric_tool": extractor.tool, "metric_mode": extractor.mode,
                "metric_num_samples": str(cfg.eval.num_samples),
                "reference_split": cfg.eval.reference_split,
                "reference_num_samples": suites[-1].notes["dinov2_reference_num_samples"],
                "image_metrics": "fd_dinov2"})
    if len(suites) == 1:
        return suites[0]
    first, second = suites

    def new() -> list[MetricAccumulator]:
        return [*first.new(), *second.new()]

    notes = {**first.notes, **second.notes, "image_metrics": ",".join(chosen)}
    return MetricSuite([*first.names, *second.names], new, notes)


def precompute_reference_stats(dataset: Dataset, cfg: RunConfig, cache_dir: Path,
                                ) -> list[Path]:
    """Compute (or find) the cached reference statistics for `bench refstats`: Inception's
    (unless fd_dinov2 is the only image metric) and DINOv2's (when fd_dinov2 is one); return
    the files."""
    chosen = image_metrics(cfg)
    paths = []
    if any(m in INCEPTION_METRICS for m in chosen):
        extractor, _ = configured_extractor(cfg)
        metrics = [m for m in chosen if m in INCEPTION_METRICS and m != "is"] or ["fid"]
        paths.append(_cached_reference(dataset, cfg, cache_dir, extractor, metrics)[1])
    if "fd_dinov2" in chosen:
        dino, _ = configured_dinov2(cfg)
        paths.append(_cached_reference(dataset, cfg, cache_dir, dino, ["fid"])[1])
    return paths
