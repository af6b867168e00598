"""IS, KID and precision/recall on image features, with torch-fidelity's estimators and seeds,
and the streaming accumulator that scores generated images against reference statistics."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.metrics.base import RunningMoments, frechet_distance
from bench.metrics.extractors import ImageFeatureExtractor, images_to_uint8

IMAGE_METRICS = ("fid", "is", "kid", "prc", "fd_dinov2")  # eval.image_metrics
INCEPTION_METRICS = ("fid", "is", "kid", "prc")  # those on Inception-v3 features
IS_SPLITS = 10  # torch-fidelity's isc_splits
KID_SUBSETS = 100  # torch-fidelity's kid_subsets
KID_SUBSET_SIZE = 1000  # torch-fidelity's kid_subset_size, capped by the sample counts
PRC_NEIGHBORHOOD = 3  # torch-fidelity's prc_neighborhood (k of the k-NN radius)
TORCH_FIDELITY_SEED = 2020  # torch-fidelity's rng_seed: IS shuffle and KID subsets
EXTRACT_BATCH = 64  # images per extractor forward (torch-fidelity's default batch_size)
_ROW_BLOCK = 2048  # rows per torch.cdist block in precision/recall
_COL_BLOCK = 8192  # columns per torch.cdist block in precision/recall


def metric_log_names(metrics: Sequence[str]) -> list[str]:
    """Logged names for the selected metrics, plus the extraction throughput."""
    names: list[str] = []
    for metric in IMAGE_METRICS:
        if metric in metrics:
            names += {"fid": ["fid"], "is": ["is", "is_std"], "kid": ["kid", "kid_std"],
                      "prc": ["precision", "recall"], "fd_dinov2": ["fd_dinov2"]}[metric]
    return [*names, "feature_images_per_second"]


# --- Inception score ----------------------------------------------------------------------------


def inception_score_split_ids(num_samples: int, splits: int = IS_SPLITS,
                              seed: int = TORCH_FIDELITY_SEED) -> np.ndarray:
    """Split of each sample index, as torch-fidelity's seeded shuffle and chunking assign it."""
    permutation = np.random.RandomState(seed).permutation(num_samples)
    chunk_of_position = np.empty(num_samples, dtype=np.int64)
    for i in range(splits):
        chunk_of_position[i * num_samples // splits:(i + 1) * num_samples // splits] = i
    ids = np.empty(num_samples, dtype=np.int64)
    ids[permutation] = chunk_of_position
    return ids


class StreamingInceptionScore:
    """Inception score over a known number of samples without keeping the logits.

    Per split s: mean_i KL(p_i || q_s) = mean_i sum_c p_ic log p_ic - sum_c q_sc log q_sc, with
    q_s the split's mean of p; the splits are torch-fidelity's (Salimans et al. 2016).
    """

    def __init__(self, num_samples: int, splits: int = IS_SPLITS,
                 seed: int = TORCH_FIDELITY_SEED) -> None:
        """Fix each sample's split up front."""
        if num_samples < splits:
            raise ValueError(f"IS needs at least {splits} samples, got {num_samples}")
        self.num_samples = num_samples
        self.splits = splits
        self.split_ids = torch.from_numpy(inception_score_split_ids(num_samples, splits, seed))
        self.seen = 0
        self.sum_p: Tensor | None = None
        self.sum_p_log_p = torch.zeros(splits, dtype=torch.float64)
        self.count = torch.zeros(splits, dtype=torch.float64)

    def update(self, logits: Tensor) -> None:
        """Add the logits (B, K) of the next B samples in order."""
        batch = logits.shape[0]
        if self.seen + batch > self.num_samples:
            raise ValueError(f"IS was set up for {self.num_samples} samples, got more")
        ids = self.split_ids[self.seen:self.seen + batch]
        logits64 = logits.detach().to("cpu", torch.float64)
        p = logits64.softmax(dim=1)
        p_log_p = (p * logits64.log_softmax(dim=1)).sum(dim=1)
        if self.sum_p is None:
            self.sum_p = torch.zeros(self.splits, p.shape[1], dtype=torch.float64)
        self.sum_p.index_add_(0, ids, p)
        self.sum_p_log_p.index_add_(0, ids, p_log_p)
        self.count.index_add_(0, ids, torch.ones(batch, dtype=torch.float64))
        self.seen += batch

    def compute(self) -> tuple[float, float]:
        """Mean and (population) std over the splits of exp(mean KL)."""
        if self.seen != self.num_samples or self.sum_p is None:
            raise ValueError(f"IS was set up for {self.num_samples} samples, got {self.seen}")
        q = self.sum_p / self.count[:, None]
        mean_kl = self.sum_p_log_p / self.count - torch.xlogy(q, q).sum(dim=1)
        scores = mean_kl.exp().numpy()
        return float(np.mean(scores)), float(np.std(scores))


# --- KID ----------------------------------------------------------------------------------------


def _mmd2_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 (Binkowski et al. 2018)."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + 1.0) ** 3
    k_yy = (y @ y.T / dim + 1.0) ** 3
    k_xy = (x @ y.T / dim + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid_subset_size(num_generated: int, num_reference: int) -> int:
    """torch-fidelity's subset size 1000, capped by both sample counts."""
    return min(KID_SUBSET_SIZE, num_generated, num_reference)


def kernel_inception_distance(generated: np.ndarray, reference: np.ndarray,
                              subsets: int = KID_SUBSETS,
                              seed: int = TORCH_FIDELITY_SEED) -> tuple[float, float]:
    """Mean and std of the MMD^2 over subsets drawn as torch-fidelity draws them, in float64."""
    size = kid_subset_size(len(generated), len(reference))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {size}")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = generated[rng.choice(len(generated), size, replace=False)].astype(np.float64)
        y = reference[rng.choice(len(reference), size, replace=False)].astype(np.float64)
        mmds[i] = _mmd2_poly(x, y)
    return float(np.mean(mmds)), float(np.std(mmds))


# --- precision and recall -----------------------------------------------------------------------


def knn_radii(features: Tensor, k: int = PRC_NEIGHBORHOOD) -> Tensor:
    """Distance of each row to its k-th nearest other row (the (k+1)-th counting itself)."""
    if features.shape[0] <= k:
        raise ValueError(f"precision/recall needs more than {k} samples, got {features.shape[0]}")
    radii = []
    for rows in features.split(_ROW_BLOCK):
        best: Tensor | None = None
        for cols in features.split(_COL_BLOCK):
            block = torch.cdist(rows, cols)
            merged = block if best is None else torch.cat([best, block], dim=1)
            best = merged.topk(min(k + 1, merged.shape[1]), dim=1, largest=False).values
        assert best is not None
        radii.append(best[:, k])
    return torch.cat(radii)


def coverage(queries: Tensor, points: Tensor, radii: Tensor) -> float:
    """Fraction of queries inside at least one ball (points[j], radii[j])."""
    inside = []
    for rows in queries.split(_ROW_BLOCK):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for cols, r in zip(points.split(_COL_BLOCK), radii.split(_COL_BLOCK), strict=True):
            hit |= (torch.cdist(rows, cols) <= r[None, :]).any(dim=1)
        inside.append(hit)
    return torch.cat(inside).float().mean().item()


def precision_recall(generated: Tensor, reference: Tensor, reference_radii: Tensor,
                     k: int = PRC_NEIGHBORHOOD) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as torch-fidelity's prc."""
    precision = coverage(generated, reference, reference_radii)
    recall = coverage(reference, generated, knn_radii(generated, k))
    return precision, recall


# --- the accumulator ----------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """What the metrics need from the reference set."""

    mu: np.ndarray  # (D,) float64 mean of the features
    sigma: np.ndarray  # (D, D) float64 unbiased covariance
    count: int  # reference images behind the statistics
    features: np.ndarray | None = None  # (N, D) float32, for KID and precision/recall
    radii: np.ndarray | None = None  # (N,) float32 k-NN radii, for precision/recall
    source: str = ""  # the .npz the statistics came from


def png_writer(folder: Path) -> Callable[[Tensor, int], None]:
    """A function writing uint8 images (B, C, H, W) as folder/<index>.png from a start index."""
    from PIL import Image

    def write(images: Tensor, start: int) -> None:
        """One PNG per image, numbered from start."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays = images.cpu().numpy().transpose(0, 2, 3, 1)
        for i, array in enumerate(arrays):
            picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
            picture.save(folder / f"{start + i:06d}.png")

    return write


class ImageMetrics:
    """Streams generated [-1, 1] images through the extractor and scores them at compute()."""

    def __init__(
        self,
        extractor: ImageFeatureExtractor,
        reference: ReferenceStats | None,  # None only when IS is the only metric
        metrics: Sequence[str],  # subset of IMAGE_METRICS
        num_samples: int,  # images the evaluation will stream (IS fixes its splits on it)
        write_png: Callable[[Tensor, int], None] | None = None,
        fd_name: str = "fid",  # the Frechet distance's name (fd_dinov2 on DINOv2 features)
    ) -> None:
        """Fresh accumulators; the reference work was done before."""
        self.fd_name = fd_name
        self.names: tuple[str, ...] = (tuple(metric_log_names(metrics)) if fd_name == "fid"
                                       else (fd_name, f"{fd_name}_images_per_second"))
        self.extractor = extractor
        self.reference = reference
        self.metrics = tuple(metrics)
        self.write_png = write_png
        self.moments = RunningMoments()
        self.inception_score = StreamingInceptionScore(num_samples) if "is" in metrics else None
        self.keep_features = "kid" in metrics or "prc" in metrics
        self.features: list[Tensor] = []
        self.count = 0
        self.seconds = 0.0

    def update(self, x: Tensor) -> None:
        """Quantise a batch to uint8 as the tools do, extract its features and accumulate them."""
        t0 = time.perf_counter()
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"image metrics expect (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
        images = images_to_uint8(x)
        if self.write_png is not None:
            self.write_png(images, self.count)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if images.device != self.extractor.device:
            self.extractor.to(images.device)
        for chunk in images.split(EXTRACT_BATCH):
            batch = self.extractor.extract(chunk)
            # summed where they were made (RunningMoments): a GPU's features stay on the GPU
            features = batch.features.detach().to(torch.float32)
            if "fid" in self.metrics:
                self.moments.update(features)
            if self.keep_features:
                self.features.append(features.cpu())
            if self.inception_score is not None:
                if batch.logits is None:
                    raise RuntimeError("IS needs an extractor built with logits")
                self.inception_score.update(batch.logits)
        if self.extractor.device.type == "cuda":  # the seconds of the work, not of its queueing
            torch.cuda.synchronize(self.extractor.device)
        self.count += x.shape[0]
        self.seconds += time.perf_counter() - t0

    def compute(self) -> dict[str, float]:
        """Every selected metric and the images per second of the feature extraction."""
        out: dict[str, float] = {}
        ref = self.reference
        if "fid" in self.metrics and ref is not None:
            mu, sigma = self.moments.stats()
            out[self.fd_name] = frechet_distance(mu, sigma, ref.mu, ref.sigma)
        if self.inception_score is not None:
            out["is"], out["is_std"] = self.inception_score.compute()
        generated = torch.cat(self.features) if self.features else None
        if "kid" in self.metrics and ref is not None and ref.features is not None \
                and generated is not None:
            out["kid"], out["kid_std"] = kernel_inception_distance(generated.numpy(),
                                                                   ref.features)
        if "prc" in self.metrics and ref is not None and ref.features is not None \
                and ref.radii is not None and generated is not None:
            device = self.extractor.device
            out["precision"], out["recall"] = precision_recall(
                generated.to(device), torch.from_numpy(ref.features).to(device),
                torch.from_numpy(ref.radii).to(device))
        speed = self.names[-1]  # feature_images_per_second, or fd_dinov2_images_per_second
        missing = [n for n in self.names if n not in out and n != speed]
        if missing:
            raise RuntimeError(f"image metrics {missing} lack their reference data")
        out[speed] = self.count / max(self.seconds, 1e-12)
        return out
