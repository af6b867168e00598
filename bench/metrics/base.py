"""Sample-quality metrics: Frechet distances, exact and sliced W2, likelihood, mode coverage."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from torch import Tensor, nn

from bench.core.atomic import atomic_write

ArrayLike = Tensor | np.ndarray
_Rows = TypeVar("_Rows", np.ndarray, Tensor)
LogProbFn = Callable[[Tensor], Tensor]
Extractor = Callable[[Tensor], Tensor]

POINT_METRICS: tuple[str, ...] = ("w2", "fd", "swd", "nll", "mode_recall", "hq_fraction")

_FRECHET_EPS = 1e-6        # ridge added to both covariances when sqrtm fails
_FRECHET_IMAG_ATOL = 1e-3  # largest tolerated imaginary part on the diagonal of sqrtm(S1 S2)
_SQRTM_REL_ERR = 1e-5      # relative Frobenius residual ||X X - A|| / ||A|| accepted from sqrtm
_EMD_MAX_ITER = 10_000_000  # network-simplex iterations: ample for 2,000 x 2,000 point sets
_EMD_OPTIMAL = 1            # POT's result_code for a converged (optimal) transport plan


def _to_numpy64(x: ArrayLike) -> np.ndarray:
    """Return x (tensor or array) as a float64 numpy array."""
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return arr.astype(np.float64, copy=False)


def _rows(arr: _Rows, name: str) -> _Rows:
    """arr (an array or a tensor) as (N, D) with N > 0 (a vector becomes one column), failing
    with one line otherwise."""
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape "
                         f"{tuple(arr.shape)}")
    return arr


def _as_float64(x: ArrayLike, name: str) -> np.ndarray:
    """Return x as a float64 numpy array of shape (N, D), failing with one line otherwise."""
    return _rows(_to_numpy64(x), name)


# 1. Frechet distance between Gaussians --------------------------------------------------------


def _sqrtm_checked(a: np.ndarray) -> np.ndarray | None:
    """Matrix square root of a, or None if sqrtm fails, is non-finite or is inaccurate."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            root = scipy.linalg.sqrtm(a)
        except (np.linalg.LinAlgError, ValueError):
            return None
    if not np.isfinite(root).all():
        return None
    scale = max(float(np.linalg.norm(a)), np.finfo(np.float64).tiny)
    if float(np.linalg.norm(root @ root - a)) / scale > _SQRTM_REL_ERR:
        return None
    return root


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike
) -> float:
    """Frechet distance ||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) (Dowson & Landau 1982)."""
    m1, m2 = np.atleast_1d(_to_numpy64(mu1)), np.atleast_1d(_to_numpy64(mu2))
    s1, s2 = np.atleast_2d(_to_numpy64(sigma1)), np.atleast_2d(_to_numpy64(sigma2))
    dim = m1.shape[0]
    if m2.shape != (dim,) or s1.shape != (dim, dim) or s2.shape != (dim, dim):
        raise ValueError(
            f"shape mismatch: mu1 {m1.shape}, mu2 {m2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}"
        )
    covmean = _sqrtm_checked(s1 @ s2)
    if covmean is None:
        offset = np.eye(dim) * _FRECHET_EPS
        covmean = _sqrtm_checked((s1 + offset) @ (s2 + offset))
        if covmean is None:
            raise ValueError("sqrtm(sigma1 @ sigma2) failed even with an eps*I ridge")
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > _FRECHET_IMAG_ATOL:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary part ({max_imag:.3g})")
        covmean = covmean.real
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def gaussian_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (rows are samples) of features, in float64."""
    f = _as_float64(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def fd(x: ArrayLike, y: ArrayLike) -> float:
    """Frechet distance in data space between two sample sets."""
    return frechet_distance(*gaussian_stats(x), *gaussian_stats(y))


# 2. Optimal transport ---------------------------------------------------------------------------


def w2(x: ArrayLike, y: ArrayLike) -> float:
    """Exact W2 between two equal-weight empirical sets (network simplex on an N x M cost)."""
    import ot  # POT imports scikit-learn and most of scipy (~2 s): only where W2 is computed

    xs, ys = _as_float64(x, "x"), _as_float64(y, "y")
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"dimension mismatch: x has D={xs.shape[1]}, y has D={ys.shape[1]}")
    cost = cdist(xs, ys, metric="sqeuclidean")
    a = np.full(xs.shape[0], 1.0 / xs.shape[0])
    b = np.full(ys.shape[0], 1.0 / ys.shape[0])
    value, log = ot.emd2(a, b, cost, numItermax=_EMD_MAX_ITER, log=True)
    if log["result_code"] != _EMD_OPTIMAL or log["warning"] is not None:
        raise RuntimeError(f"exact OT did not converge: {log['warning']}")
    return math.sqrt(max(float(value), 0.0))


def _w2_squared_sorted(xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """Squared 1-D W2 per column of two sorted projection matrices (rows are samples)."""
    n, m = xp.shape[0], yp.shape[0]
    if n == m:
        return np.mean((xp - yp) ** 2, axis=0)
    # Unequal counts: both quantile functions are step functions; integrate on the merged grid.
    levels = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(levels, prepend=0.0)
    mids = levels - widths / 2.0
    ix = np.minimum(np.floor(mids * n).astype(np.int64), n - 1)
    iy = np.minimum(np.floor(mids * m).astype(np.int64), m - 1)
    return widths @ ((xp[ix] - yp[iy]) ** 2)


def swd(x: ArrayLike, y: ArrayLike, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced W2: sqrt of the mean squared exact 1-D W2 over seeded random unit directions."""
    xs, ys = _as_float64(x, "x"), _as_float64(y, "y")
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"dimension mismatch: x has D={xs.shape[1]}, y has D={ys.shape[1]}")
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    directions = np.random.default_rng(seed).standard_normal((xs.shape[1], num_projections))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    xp = np.sort(xs @ directions, axis=0)
    yp = np.sort(ys @ directions, axis=0)
    return math.sqrt(max(float(np.mean(_w2_squared_sorted(xp, yp))), 0.0))


# 3. Likelihood and mode coverage ---------------------------------------------------------------


def gmm_nll(x: ArrayLike, log_prob_fn: LogProbFn) -> float:
    """Mean negative log-likelihood of x under log_prob_fn (called on x as a tensor)."""
    xt = torch.as_tensor(x)
    with torch.no_grad():
        log_prob = torch.as_tensor(log_prob_fn(xt)).detach().cpu().to(torch.float64)
    if log_prob.shape != (xt.shape[0],):
        raise ValueError(f"log_prob_fn must return shape ({xt.shape[0]},), got {log_prob.shape}")
    return float(-log_prob.mean())


def _within_radius(x: ArrayLike, means: ArrayLike, std: float, radius_std: float) -> np.ndarray:
    """Boolean (N, K) matrix: sample n lies within radius_std * std of mode k."""
    xs, ms = _as_float64(x, "x"), _as_float64(means, "means")
    if xs.shape[1] != ms.shape[1]:
        raise ValueError(f"dimension mismatch: x has D={xs.shape[1]}, means has D={ms.shape[1]}")
    if std <= 0 or radius_std <= 0:
        raise ValueError(f"std and radius_std must be positive, got {std} and {radius_std}")
    return cdist(xs, ms, metric="euclidean") <= radius_std * std


def mode_recall(
    x: ArrayLike,
    means: ArrayLike,
    std: float,
    *,
    radius_std: float = 3.0,
    min_fraction: float = 0.25,
) -> float:
    """Fraction of the K equal-weight modes holding >= min_fraction * N / K nearby samples."""
    near = _within_radius(x, means, std, radius_std)
    num_samples, num_modes = near.shape
    counts = near.sum(axis=0)
    return float(np.mean(counts >= min_fraction * num_samples / num_modes))


def high_quality_fraction(
    x: ArrayLike, means: ArrayLike, std: float, radius_std: float = 3.0
) -> float:
    """Fraction of samples within radius_std * std of some mode."""
    return float(np.mean(_within_radius(x, means, std, radius_std).any(axis=1)))


# 4. Streaming accumulators ----------------------------------------------------------------------


@runtime_checkable
class MetricAccumulator(Protocol):
    """Consumes batches of generated samples (data space) and returns named metric values."""

    names: tuple[str, ...]

    def update(self, x: Tensor) -> None:
        """Add a batch of generated samples."""
        ...

    def compute(self) -> dict[str, float]:
        """Return every metric in names from the samples seen so far."""
        ...


@dataclass
class MetricSuite:
    """Builds fresh accumulators for each NFE; the expensive reference work is done once."""

    names: list[str]
    new: Callable[[], list[MetricAccumulator]]
    notes: dict[str, str] = field(default_factory=dict)  # e.g. classifier accuracy
    # a lower bound per metric that can be negative (nll >= -log max p): logged as
    # <metric>_gap (GAP) = value - bound >= 0 as well, which a log-scale chart axis can draw
    floors: dict[str, float] = field(default_factory=dict)


GAP = "_gap"  # suffix of a metric less its lower bound (MetricSuite.floors)
BOOTSTRAP_SEED = 0  # the resampling's seed: the same points give the same interval
BOOT_LOW, BOOT_HIGH = "_boot_low", "_boot_high"  # a metric's 95% bootstrap interval


class PointMetrics:
    """Low-dimensional metrics on all collected samples against a reference sample set."""

    def __init__(
        self,
        reference: Tensor,
        log_prob_fn: LogProbFn | None,
        means: Tensor | None,
        std: float | None,
        metrics: Sequence[str],
        *,
        num_projections: int = 256,
        seed: int = 0,
        bootstrap: int = 0,
    ) -> None:
        unknown = sorted(set(metrics) - set(POINT_METRICS))
        if unknown:
            valid = ", ".join(POINT_METRICS)
            raise ValueError(f"unknown point metric(s) {unknown}; valid: {valid}")
        if "nll" in metrics and log_prob_fn is None:
            raise ValueError("metric 'nll' needs a dataset with an exact log density")
        needs_modes = {"mode_recall", "hq_fraction"} & set(metrics)
        if needs_modes and (means is None or std is None):
            raise ValueError(f"metric(s) {sorted(needs_modes)} need mixture means and std")
        self.names: tuple[str, ...] = tuple(dict.fromkeys(metrics))
        self.reference = reference
        self.log_prob_fn = log_prob_fn
        self.means = means
        self.std = std
        self.num_projections = num_projections  # random directions for "swd"
        self.seed = seed                        # seed of the "swd" directions
        self.bootstrap = bootstrap              # resamples for a bootstrap interval (0: none)
        self._batches: list[Tensor] = []

    def update(self, x: Tensor) -> None:
        """Store a batch of samples (detached, on CPU)."""
        self._batches.append(x.detach().cpu().reshape(x.shape[0], -1))

    def compute(self) -> dict[str, float]:
        """Compute the requested metrics on every sample seen so far."""
        if not self._batches:
            raise ValueError("PointMetrics.compute called before any update")
        x = torch.cat(self._batches)
        ref = self.reference.detach().cpu().reshape(self.reference.shape[0], -1)
        out = self._metrics(x, ref)
        if self.bootstrap:
            # the generated points resampled with replacement (the reference held fixed); a
            # percentile interval per metric. Under quasi-random noise the resampling ignores
            # the stratification, so the interval is wider than the spread over seed sets.
            rng = np.random.default_rng(BOOTSTRAP_SEED)
            draws = [self._metrics(x[torch.from_numpy(rng.integers(0, len(x), len(x)))], ref)
                     for _ in range(self.bootstrap)]
            for name in self.names:
                values = np.array([d[name] for d in draws])
                out[f"{name}{BOOT_LOW}"] = float(np.percentile(values, 2.5))
                out[f"{name}{BOOT_HIGH}"] = float(np.percentile(values, 97.5))
        return out

    def _metrics(self, x: Tensor, ref: Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.names:
            if name == "w2":
                out[name] = w2(x, ref)
            elif name == "fd":
                out[name] = fd(x, ref)
            elif name == "swd":
                out[name] = swd(x, ref, self.num_projections, self.seed)
            elif name == "nll":
                assert self.log_prob_fn is not None
                out[name] = gmm_nll(x, self.log_prob_fn)
            elif name == "mode_recall":
                assert self.means is not None and self.std is not None
                out[name] = mode_recall(x, self.means, self.std)
            else:
                assert self.means is not None and self.std is not None
                out[name] = high_quality_fraction(x, self.means, self.std)
        return out


class RunningMoments:
    """Streaming float64 mean and covariance (Chan et al. pairwise merge of centred sums).

    Batches on the CPU (arrays or tensors) are summed in numpy. A batch of tensors on another
    device is summed there, in float64 torch ops, so that an evaluation on a GPU neither copies
    its features back nor waits for the host's BLAS batch by batch; stats() brings the sums
    back once. Where the first batch goes, the later ones follow. `on_device` sums CPU tensors
    in torch as well (the device path's arithmetic, on the CPU)."""

    def __init__(self, on_device: bool = False) -> None:
        self.on_device = on_device
        self.count = 0
        self.mean: np.ndarray | Tensor | None = None
        self.m2: np.ndarray | Tensor | None = None  # sum of outer products of centred features

    def _float64(self, features: ArrayLike) -> np.ndarray | Tensor:
        """The batch as (N, D) float64, in numpy or, on the device path, as a tensor there."""
        where = self.mean if self.mean is not None else features
        if not isinstance(where, Tensor) or (where.device.type == "cpu" and not self.on_device):
            return _as_float64(features, "features")
        return _rows(torch.as_tensor(features).detach().to(where.device, torch.float64),
                     "features")

    def update(self, features: ArrayLike) -> None:
        """Merge a batch of features (rows are samples) into the running sums."""
        f = self._float64(features)
        n_b = f.shape[0]
        mean_b = f.mean(0)
        centred = f - mean_b
        m2_b = centred.T @ centred
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if f.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature dimension changed from {self.mean.shape[0]} to {f.shape[1]}")
        n_a = self.count
        total = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta[:, None] * delta[None, :] * (n_a * n_b / total)
        self.count = total

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance of everything seen so far, as numpy arrays."""
        if self.mean is None or self.m2 is None or self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        return _to_numpy64(self.mean).copy(), _to_numpy64(self.m2 / (self.count - 1))


def feature_stats(
    extractor: Extractor, data: Tensor, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Streaming float64 mean and covariance of extractor(data), batch by batch."""
    moments = RunningMoments()
    with torch.no_grad():
        for start in range(0, data.shape[0], batch_size):
            moments.update(extractor(data[start : start + batch_size]))
    return moments.stats()


class FeatureFrechet:
    """Frechet distance in an extractor's feature space against precomputed reference stats."""

    def __init__(
        self,
        extractor: Extractor,
        reference_features_stats: tuple[np.ndarray, np.ndarray],
        name: str = "fcd",
    ) -> None:
        self.names: tuple[str, ...] = (name,)
        self.extractor = extractor
        self.reference_mu = np.asarray(reference_features_stats[0], dtype=np.float64)
        self.reference_sigma = np.asarray(reference_features_stats[1], dtype=np.float64)
        self._moments = RunningMoments()

    def update(self, x: Tensor) -> None:
        """Extract features of a batch and merge them into the running moments."""
        with torch.no_grad():
            self._moments.update(self.extractor(x))

    def compute(self) -> dict[str, float]:
        """Frechet distance between the generated features and the reference stats."""
        mu, sigma = self._moments.stats()
        return {self.names[0]: frechet_distance(mu, sigma, self.reference_mu, self.reference_sigma)}


# 5. Digits classifier for the Frechet classifier distance ("fcd") ------------------------------

DIGITS_CLASSIFIER_VERSION = "v1"  # bump when the architecture or the training recipe changes


class DigitsClassifier(nn.Module):
    """Small CNN for 8x8 digits in [-1, 1]; features() is the 64-d penultimate layer."""

    def __init__(
        self,
        width: int = 16,
        feature_dim: int = 64,
        num_classes: int = 10,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, device=device)           # 8x8
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, device=device)   # 8x8 -> pool 4x4
        self.fc = nn.Linear(2 * width * 16, feature_dim, device=device)          # feature layer
        self.head = nn.Linear(feature_dim, num_classes, device=device)           # logits

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features, shape (N, feature_dim)."""
        h = F.silu(self.conv1(x))
        h = F.avg_pool2d(F.silu(self.conv2(h)), 2)
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, shape (N, num_classes)."""
        return self.head(self.features(x))


@dataclasses.dataclass(frozen=True)
class DigitsTrainConfig:
    """Deterministic training recipe of the digits classifier (part of the cache key)."""

    epochs: int = 15             # passes over the training split
    batch_size: int = 64         # fixed-order minibatches from a seeded permutation per epoch
    lr: float = 2e-3             # peak AdamW learning rate of the one-cycle schedule
    weight_decay: float = 1e-4   # AdamW decoupled weight decay
    seed: int = 0                # torch.Generator seed for the init and the batch order


def _init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default conv/linear init, drawn from an explicit generator."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)


@contextlib.contextmanager
def _reproducible() -> Iterator[None]:
    """Deterministic algorithms on one intra-op thread for the block; restore both afterwards."""
    # One thread makes the weights independent of the core count (and is fastest for a net this
    # small, especially on a busy machine); the previous settings come back on exit.
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _check_digits(x: Tensor, y: Tensor, split: str) -> None:
    """Fail with one line unless x is (N, 1, 8, 8) and y is (N,) integer labels."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"{split}_x must have shape (N, 1, 8, 8), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],) or y.dtype.is_floating_point:
        raise ValueError(f"{split}_y must be integer labels of shape ({x.shape[0]},)")


def train_digits_classifier(
    train_x: Tensor, train_y: Tensor, config: DigitsTrainConfig = DigitsTrainConfig()
) -> DigitsClassifier:
    """Train the digits classifier deterministically on CPU in float32; return it in eval mode."""
    _check_digits(train_x, train_y, "train")
    x = train_x.detach().cpu().to(torch.float32)
    y = train_y.detach().cpu().to(torch.int64)
    generator = torch.Generator().manual_seed(config.seed)
    model = DigitsClassifier(device="meta").to_empty(device="cpu")
    _init_parameters(model, generator)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    with _reproducible():
        for _ in range(config.epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            for start in range(0, x.shape[0], config.batch_size):
                idx = order[start : start + config.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
    return model.eval()


def classifier_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of model on (x, y)."""
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start : start + batch_size].to(torch.float32))
            correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    return correct / x.shape[0]


def digits_cache_path(
    cache_dir: Path,
    train_x: Tensor,
    train_y: Tensor,
    config: DigitsTrainConfig = DigitsTrainConfig(),
) -> Path:
    """Cache file for a classifier: version plus a short hash of the training data and recipe."""
    digest = hashlib.sha256()
    digest.update(DIGITS_CLASSIFIER_VERSION.encode())
    digest.update(repr(dataclasses.astuple(config)).encode())
    x = np.ascontiguousarray(train_x.detach().cpu().to(torch.float32).numpy())
    y = np.ascontiguousarray(train_y.detach().cpu().to(torch.int64).numpy())
    for arr in (x, y):
        digest.update(repr(arr.shape).encode())
        digest.update(arr.tobytes())
    name = f"digits_classifier_{DIGITS_CLASSIFIER_VERSION}_{digest.hexdigest()[:12]}.pt"
    return Path(cache_dir) / name


def _save_atomic(state: dict[str, Tensor], path: Path) -> None:
    """Write a state_dict with torch.save through a temp file and os.replace."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_or_train_digits_classifier(
    cache_dir: Path,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    config: DigitsTrainConfig = DigitsTrainConfig(),
) -> tuple[DigitsClassifier, float]:
    """Load the cached digits classifier or train and cache it; return it and its test accuracy."""
    _check_digits(test_x, test_y, "test")
    path = digits_cache_path(cache_dir, train_x, train_y, config)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitsClassifier(device="meta")
        model.load_state_dict(state, assign=True)
        model.eval()
    else:
        model = train_digits_classifier(train_x, train_y, config)
        _save_atomic({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    return model, classifier_accuracy(model, test_x.cpu(), test_y.cpu())
