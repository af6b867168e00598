"""Dataset registry: embedded toy sets and digits; readers for CIFAR-10, ImageNet-64, folders.

Embedded datasets need no files: `gmm8`, `gmm25` (Gaussian mixtures with exact density and exact
denoiser), `moons`, `swissroll`, `checkerboard` (2-D) and `digits` (scikit-learn's 8x8 digits).
Path datasets read local files: `cifar10` (python pickle batches, through a restricted
unpickler), `imagenet64` (.npz batches or a class-per-subfolder image folder), `lsun-bedroom`,
`lsun-cat`, `folder:PATH` (image folders) and `points:PATH` (2-D points). Opening a path
dataset is cheap; pixels are read on first use and kept in memory as uint8, converted to float32
in [-1, 1] on request.

Image folders are read recursively and follow links to folders and files, also outside the
folder (except links to the folder itself or above it); each real folder is listed once and each
real file counted once, so a link loop or a link back to a parent neither hangs the scan nor
repeats images. Only PNG, JPEG, WebP and BMP files are decoded; an image whose header claims
more than Pillow's Image.MAX_IMAGE_PIXELS pixels is refused as a likely decompression bomb, and
any unreadable image is a one-line error naming the file.
"""

from __future__ import annotations

import codecs
import math
import os
import pickle
import re
import stat
import warnings
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np
import torch
from torch import Tensor

from bench.core.errors import BenchError, UsageError, unknown_name

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

TRAIN_SIZE = 100_000  # training points drawn for each embedded 2-D dataset
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FOLDER_PREFIX = "folder:"
POINTS_PREFIX = "points:"

_TRAIN_STREAM = 0  # seed-stream tags keep training and reference draws disjoint
_REFERENCE_STREAM = 1
_QMC_REFERENCE_STREAM = 2
_TRAIN_SEED = 20230301  # fixed seed of every embedded training set


def _set_hint(name: str) -> str:
    """Say which config key points a dataset at its files."""
    return f"set data.path (bench.toml [data.{name}] path = ... or --set data.path=...)"


def _one_line(err: BaseException | str) -> str:
    """Squash an exception message onto one line."""
    return " ".join(str(err).split())


def _seeded_generator(name: str, stream: int, seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded from (dataset name, stream, seed), distinct per triple."""
    if seed < 0:
        raise UsageError(f"{name}: seed must be >= 0, got {seed}")
    entropy = [zlib.crc32(name.encode()), stream, seed]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def _normal(u: Tensor) -> Tensor:
    """Standard normals from uniforms in [0, 1) by the inverse CDF (0 maps to a finite value)."""
    return torch.special.ndtri(u.clamp(2.0**-60, 1.0 - 2.0**-53))


def _to_float(pixels: Tensor) -> Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1]."""
    return pixels.to(torch.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# Base classes


class Dataset(ABC):
    """A named dataset: training data in data space plus reference draws for evaluation."""

    name: str  # registry name, e.g. "gmm8", "cifar10", "folder:/x/y"
    kind: Literal["points", "image"]
    shape: tuple[int, ...]  # per-sample shape: (2,) for points, (C, H, W) for images
    sigma_data: float  # RMS over coordinates of the per-coordinate std (EDM preconditioning)
    num_classes: int = 0  # 0 when unconditional
    clamp: tuple[float, float] | None = None  # valid data range for samplers, None = unbounded
    primary_metric: str  # "w2" for points, "fcd" for digits, "fid" for other image sets
    description: str

    @abstractmethod
    def train(self) -> Tensor:
        """Float32 training set (N, *shape) in data space; files are read once and cached."""

    def train_labels(self) -> Tensor | None:
        """Int64 class labels (N,) of the training set, or None when unconditional."""
        return None

    def train_batch(self, index: Tensor) -> Tensor:
        """Float32 training samples at the 1-D `index`, converted only for these rows."""
        return self.train().index_select(0, index)

    @abstractmethod
    def reference(self, n: int, seed: int) -> Tensor:
        """Float32 evaluation samples (at most n) of the true data distribution."""

    def unavailable_reason(self) -> str | None:
        """One-line reason why the data cannot be read (cheap check), or None when ready."""
        return None

    def known_size(self) -> int | None:
        """Number of training samples if known without reading the data, else None."""
        return None

    def __len__(self) -> int:
        """Number of training samples, reading (but not converting) the data if needed."""
        return self.train().shape[0]


class PointsDataset(Dataset):
    """A 2-D dataset defined by a sampler: fixed-seed training set, fresh reference draws."""

    kind: Literal["points", "image"] = "points"
    shape: tuple[int, ...] = (2,)
    primary_metric = "w2"

    def __init__(self, name: str, sigma_data: float, description: str) -> None:
        """Set the metadata; samples are drawn lazily."""
        self.name = name
        self.sigma_data = sigma_data
        self.description = description
        self._train: Tensor | None = None

    uniform_dims: int  # uniforms per point that from_uniform maps to one sample

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw n float32 points (n, 2) from the generating process."""

    @abstractmethod
    def from_uniform(self, u: Tensor) -> Tensor:
        """The same law as a transform: u (n, uniform_dims), float64 in [0, 1) -> (n, 2)."""

    def train(self) -> Tensor:
        """The TRAIN_SIZE training points, identical in every call and every process."""
        if self._train is None:
            self._train = self.sample(TRAIN_SIZE, _seeded_generator(self.name, _TRAIN_STREAM,
                                                                    _TRAIN_SEED))
        return self._train

    def reference(self, n: int, seed: int) -> Tensor:
        """n fresh points from the generating process; different seeds give independent draws."""
        if n < 0:
            raise UsageError(f"{self.name}: number of reference samples must be >= 0, got {n}")
        return self.sample(n, _seeded_generator(self.name, _REFERENCE_STREAM, seed))

    def reference_qmc(self, n: int, seed: int) -> Tensor:
        """n points of a stratified reference: a scrambled Sobol set through from_uniform, so
        each mixture component, moon or square gets its share of points up to a few, and the
        points cover it evenly. Paired with quasi-random sampling noise (eval.noise = "qmc")."""
        if n < 0:
            raise UsageError(f"{self.name}: number of reference samples must be >= 0, got {n}")
        scramble = _seeded_generator(self.name, _QMC_REFERENCE_STREAM, seed).initial_seed()
        engine = torch.quasirandom.SobolEngine(self.uniform_dims, scramble=True, seed=scramble)
        return self.from_uniform(engine.draw(n, dtype=torch.float64))

    def known_size(self) -> int | None:
        """Always TRAIN_SIZE."""
        return TRAIN_SIZE


# ---------------------------------------------------------------------------------------------
# Embedded 2-D datasets


class GaussianMixture(PointsDataset):
    """Isotropic Gaussian mixture sum_k w_k N(m_k, std^2 I) with exact density and denoiser."""

    def __init__(
        self,
        name: str,
        means: Tensor,  # (K, D) component means
        std: float,  # per-coordinate std of every component
        weights: Tensor | None,  # (K,) mixture weights, None = equal
        description: str,
    ) -> None:
        """Store the mixture in float64; sigma_data is its exact RMS per-coordinate std."""
        means = means.to(torch.float64)
        if weights is None:
            weights = torch.full((means.shape[0],), 1.0 / means.shape[0], dtype=torch.float64)
        weights = weights.to(torch.float64)
        weights = weights / weights.sum()
        mean = weights @ means
        variance = (weights[:, None] * (means - mean) ** 2).sum(0) + std**2
        super().__init__(name, round(float(variance.mean().sqrt()), 3), description)
        self.shape = (means.shape[1],)
        self.uniform_dims = 1 + means.shape[1]
        self.means = means
        self.std = float(std)
        self.weights = weights

    @property
    def modes(self) -> Tensor:
        """Component means (K, D), float64: the modes a good sampler must cover."""
        return self.means

    def nearest_mode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Index (N,) of the closest mode to each point and the Euclidean distance (N,) to it."""
        work = x.to(_work_dtype(x))
        means = self.means.to(device=x.device, dtype=work.dtype)
        distance, index = (work[:, None, :] - means[None, :, :]).norm(dim=2).min(dim=1)
        return index, distance.to(x.dtype)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw n float32 points: a component by weight, then Gaussian noise around its mean."""
        if n == 0:
            return torch.empty(0, self.shape[0])
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.shape[0], generator=generator, dtype=torch.float64)
        return (self.means[component] + self.std * noise).to(torch.float32)

    def from_uniform(self, u: Tensor) -> Tensor:
        """u[:, 0] picks the component by the inverse CDF of the weights; the rest are normals."""
        edges = torch.cumsum(self.weights, 0)
        component = torch.searchsorted(edges, u[:, 0].contiguous(), right=True)
        component = component.clamp(max=self.means.shape[0] - 1)
        return (self.means[component] + self.std * _normal(u[:, 1:])).to(torch.float32)

    def _component_logits(self, x: Tensor, variance: Tensor) -> Tensor:
        """log w_k + log N(x; m_k, variance I) for every point and component, (N, K)."""
        dim = x.shape[1]
        means = self.means.to(device=x.device, dtype=x.dtype)
        log_w = self.weights.to(device=x.device, dtype=x.dtype).log()
        sq = (x[:, None, :] - means[None, :, :]).square().sum(dim=2)
        return log_w - sq / (2 * variance) - 0.5 * dim * torch.log(2 * math.pi * variance)

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """Exact log density (N,) of x under the mixture convolved with N(0, sigma^2 I)."""
        work = x.to(_work_dtype(x))
        variance = self.std**2 + _sigma_column(sigma, work).square()
        return torch.logsumexp(self._component_logits(work, variance), dim=1).to(x.dtype)

    def max_log_prob(self, iterations: int = 500) -> float:
        """The density's largest log value, log max_x p(x): the highest of the local maxima
        that mean-shift reaches from each component mean (for an isotropic mixture with one
        std, x = sum_k r_k(x) m_k holds exactly where the gradient vanishes, and the iteration
        never lowers the density). So -max_log_prob() bounds the nll of any sample set below."""
        x = self.means.clone()
        variance = torch.tensor(self.std**2, dtype=x.dtype)
        for _ in range(iterations):
            x = torch.softmax(self._component_logits(x, variance), dim=1) @ self.means
        return float(torch.maximum(self.log_prob(x), self.log_prob(self.means)).max())

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact posterior mean E[x0 | x0 + sigma z = x]; sigma is a scalar or one per row."""
        work = x.to(_work_dtype(x))
        sigma2 = _sigma_column(sigma, work).square()
        variance = self.std**2 + sigma2
        responsibility = torch.softmax(self._component_logits(work, variance), dim=1)
        mean_of_means = responsibility @ self.means.to(device=x.device, dtype=work.dtype)
        return ((self.std**2 * work + sigma2 * mean_of_means) / variance).to(x.dtype)


def _work_dtype(x: Tensor) -> torch.dtype:
    """Compute in at least float32 (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _sigma_column(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Noise level as a (1, 1) or (N, 1) column on x's device and dtype."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.numel() == 1:
        return sigma.reshape(1, 1)
    if sigma.numel() != x.shape[0]:
        raise ValueError(f"sigma has {sigma.numel()} values for {x.shape[0]} points")
    return sigma.reshape(-1, 1)


def gmm8() -> GaussianMixture:
    """8 equal-weight Gaussians, std 0.05, on the unit circle at angles 2 pi k / 8."""
    angle = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    means = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return GaussianMixture("gmm8", means, 0.05, None, "8 Gaussians (std 0.05) on the unit circle")


def gmm25() -> GaussianMixture:
    """25 equal-weight Gaussians, std 0.05, on the grid {-1, -0.5, 0, 0.5, 1}^2."""
    axis = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    means = torch.cartesian_prod(axis, axis)
    return GaussianMixture("gmm25", means, 0.05, None, "25 Gaussians (std 0.05) on a 5x5 grid")


class Moons(PointsDataset):
    """Two interleaved half circles (as sklearn's make_moons), noise 0.05, centred at 0."""

    noise = 0.05
    uniform_dims = 4

    def __init__(self) -> None:
        """Exact RMS per-coordinate std: sqrt((0.7525 + 0.2467) / 2) = 0.707."""
        super().__init__("moons", 0.707, "two interleaved half circles, noise 0.05")

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Pick a moon, an angle uniform in [0, pi], then add Gaussian noise."""
        inner = torch.randint(0, 2, (n,), generator=generator, dtype=torch.bool)
        angle = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self._place(inner, angle, noise)

    def from_uniform(self, u: Tensor) -> Tensor:
        """u[:, 0] picks the moon, u[:, 1] the angle, u[:, 2:] the noise."""
        return self._place(u[:, 0] < 0.5, u[:, 1] * math.pi, _normal(u[:, 2:]))

    def _place(self, inner: Tensor, angle: Tensor, noise: Tensor) -> Tensor:
        """Point on the chosen moon at `angle`, plus scaled noise."""
        x = torch.where(inner, 1 - torch.cos(angle), torch.cos(angle)) - 0.5
        y = torch.where(inner, 0.5 - torch.sin(angle), torch.sin(angle)) - 0.25
        return (torch.stack([x, y], dim=1) + self.noise * noise).to(torch.float32)


class SwissRoll(PointsDataset):
    """2-D Swiss roll (x, z of sklearn's make_swiss_roll) scaled by 1/10 and centred."""

    noise = 0.025  # after scaling
    uniform_dims = 3

    def __init__(self) -> None:
        """Exact RMS per-coordinate std (numerical quadrature): 0.679."""
        super().__init__("swissroll", 0.679, "2-D Swiss roll t (cos t, sin t) / 10, noise 0.025")

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """t uniform in [1.5 pi, 4.5 pi]; the exact mean (2, 2 / (3 pi)) / 10 is subtracted."""
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self._place(t, noise)

    def from_uniform(self, u: Tensor) -> Tensor:
        """u[:, 0] places t on [1.5 pi, 4.5 pi], u[:, 1:] the noise."""
        return self._place(1.5 * math.pi * (1 + 2 * u[:, 0]), _normal(u[:, 1:]))

    def _place(self, t: Tensor, noise: Tensor) -> Tensor:
        """The roll's point at t, centred, plus scaled noise."""
        x = (t * torch.cos(t) - 2.0) / 10
        y = (t * torch.sin(t) - 2 / (3 * math.pi)) / 10
        return (torch.stack([x, y], dim=1) + self.noise * noise).to(torch.float32)


class Checkerboard(PointsDataset):
    """Uniform on the 8 dark squares of a 4x4 checkerboard covering [-1, 1]^2."""

    uniform_dims = 3

    def __init__(self) -> None:
        """Each coordinate is uniform on [-1, 1]: std 1 / sqrt(3) = 0.577."""
        super().__init__("checkerboard", 0.577, "uniform on the dark squares of a 4x4 board")

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Column uniform, row of matching parity uniform, then uniform within the square."""
        column = torch.randint(0, 4, (n,), generator=generator)
        row = 2 * torch.randint(0, 2, (n,), generator=generator) + column % 2
        offset = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        return self._place(column, row, offset)

    def from_uniform(self, u: Tensor) -> Tensor:
        """u[:, 0] picks one of the 8 dark squares, u[:, 1:] the offset inside it."""
        square = (u[:, 0] * 8).long().clamp(max=7)
        column = square % 4
        return self._place(column, 2 * (square // 4) + column % 2, u[:, 1:])

    @staticmethod
    def _place(column: Tensor, row: Tensor, offset: Tensor) -> Tensor:
        """The point at `offset` (in [0, 1)^2) inside square (column, row), in [-1, 1]^2."""
        cell = torch.stack([column, row], dim=1).to(torch.float64)
        return ((cell + offset) * 0.5 - 1.0).to(torch.float32)


class PointsFile(PointsDataset):
    """`points:PATH`: your own 2-D points, an .npy array (N, 2) or an .npz with an array `x`
    (what `bench sample` writes). Read without unpickling; the rows are the training set and,
    drawn uniformly, the evaluation reference. Data is expected at about unit scale
    (sigma_data 0.5; `diffusion.sigma_data` sets another)."""

    uniform_dims = 1

    def __init__(self, path: str) -> None:
        """Nothing is read until the data is needed (unavailable_reason checks the file)."""
        super().__init__(f"{POINTS_PREFIX}{path}", 0.5, f"2-D points from {path}")
        self.path = Path(path).expanduser()

    def unavailable_reason(self) -> str | None:
        """A missing or unreadable file, a wrong shape or a non-finite value, in one line."""
        if not self.path.is_file():
            return f"{self.name}: no file at '{self.path}' - give an .npy (N, 2) or .npz (x)"
        try:
            self.train()
        except BenchError as err:
            return str(err)
        return None

    def train(self) -> Tensor:
        """The file's rows as float32 (N, 2), validated once."""
        if self._train is None:
            self._train = torch.from_numpy(self._read())
        return self._train

    def _read(self) -> np.ndarray:
        file = self.path
        if file.suffix == ".npz":
            array = _npz_member(file, "x")
        else:
            with file.open("rb") as fh:
                if fh.read(6) != b"\x93NUMPY":
                    raise BenchError(f"'{file}' is not an .npy file (nor an .npz by its name)")
            try:
                array = np.load(file, allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise BenchError(f"cannot read '{file}' as an .npy array: {_one_line(err)}"
                                 ) from None
        if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != 2:
            shape = getattr(array, "shape", "?")
            raise BenchError(f"'{file}': points must be an array of shape (N, 2), got {shape}")
        if not (np.issubdtype(array.dtype, np.floating)
                or np.issubdtype(array.dtype, np.integer)):
            raise BenchError(f"'{file}': points must be numbers, got dtype {array.dtype}")
        if array.shape[0] < 2:
            raise BenchError(f"'{file}': needs at least 2 points, got {array.shape[0]}")
        bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
        if bad.size:
            raise BenchError(f"'{file}': row {bad[0]} is not finite ({array[bad[0]].tolist()})")
        return np.ascontiguousarray(array, dtype=np.float32)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n rows drawn uniformly with replacement."""
        data = self.train()
        return data[torch.randint(0, data.shape[0], (n,), generator=generator)]

    def from_uniform(self, u: Tensor) -> Tensor:
        """Row floor(u N) for each uniform u (a stratified choice of rows)."""
        data = self.train()
        index = (u[:, 0] * data.shape[0]).long().clamp_(0, data.shape[0] - 1)
        return data[index]

    def known_size(self) -> int | None:
        """Unknown until the file is read."""
        return None


# ---------------------------------------------------------------------------------------------
# Image datasets


class ImageDataset(Dataset):
    """Images held as uint8 (N, C, H, W); float32 in [-1, 1] is produced on request."""

    kind: Literal["points", "image"] = "image"
    sigma_data = 0.5
    clamp: tuple[float, float] | None = (-1.0, 1.0)
    primary_metric = "fid"

    def __init__(self, name: str, num_classes: int, description: str) -> None:
        """Set the metadata (subclasses set `shape`); pixels are read on first use."""
        self.name = name
        self.num_classes = num_classes
        self.description = description
        self._pixels: Tensor | None = None
        self._labels: Tensor | None = None

    @abstractmethod
    def _load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Read every training image: uint8 (N, C, H, W) and int64 labels (N,) or None."""

    def _ensure_loaded(self) -> Tensor:
        """Read the files once and cache the uint8 pixels and the labels."""
        if self._pixels is None:
            pixels, labels = self._load()
            self._pixels = torch.from_numpy(np.ascontiguousarray(pixels))
            self._labels = None if labels is None else torch.from_numpy(labels.astype(np.int64))
        return self._pixels

    def train_uint8(self) -> Tensor:
        """Training images as uint8 (N, C, H, W) in 0..255 (cached; do not modify)."""
        return self._ensure_loaded()

    def train(self) -> Tensor:
        """Training images as float32 in [-1, 1], converted from the cached uint8 copy."""
        return _to_float(self.train_uint8())

    def train_labels(self) -> Tensor | None:
        """Int64 labels 0..num_classes-1, or None when unconditional."""
        self._ensure_loaded()
        return self._labels

    def train_batch(self, index: Tensor) -> Tensor:
        """Float32 images at the 1-D `index`, converting only these rows."""
        return _to_float(self.train_uint8()[index])

    def reference(self, n: int, seed: int) -> Tensor:
        """The first n training images (all if fewer) as float32; the seed is not used."""
        return _to_float(self.train_uint8()[:n])

    def known_size(self) -> int | None:
        """Image count once loaded, else None (counting would read the files)."""
        return None if self._pixels is None else self._pixels.shape[0]

    def __len__(self) -> int:
        """Number of training images (loads the uint8 pixels, no float copy)."""
        return self.train_uint8().shape[0]


DIGITS_TRAIN_SIZE = 1442  # size of the digits training split below (test: 355)


class Digits(ImageDataset):
    """scikit-learn's 8x8 handwritten digits, values 0..16 mapped linearly to [-1, 1].

    Split (deterministic, no RNG, independent of library versions): within each class, in
    load_digits order, every fifth image (class positions 4, 9, 14, ...) is test, the rest train.
    """

    shape: tuple[int, ...] = (1, 8, 8)
    primary_metric = "fcd"

    def __init__(self) -> None:
        """Metadata only; the bundled data are read on first use."""
        super().__init__("digits", 10, "scikit-learn 8x8 handwritten digits")
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}

    def _split(self, part: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
        """Float32 images in [-1, 1] (N, 1, 8, 8) and int64 labels of one split, cached."""
        if not self._splits:
            from sklearn.datasets import load_digits

            bunch = load_digits()
            levels = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)[:, None])
            labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
            position = torch.zeros_like(labels)
            for label in labels.unique():
                members = labels == label
                position[members] = torch.arange(int(members.sum()))
            is_test = position % 5 == 4
            for key, mask in (("train", ~is_test), ("test", is_test)):
                self._splits[key] = (levels[mask] / 8.0 - 1.0, labels[mask])
        return self._splits[part]

    def _load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Training split rendered as uint8 0..255 (level v -> round(v * 255 / 16))."""
        images, labels = self._split("train")
        pixels = torch.round((images + 1.0) * 127.5).to(torch.uint8)
        return pixels.numpy(), labels.numpy()

    def train(self) -> Tensor:
        """Training split as float32 v / 8 - 1 (exact: 0 -> -1, 16 -> 1); cached, do not modify."""
        return self._split("train")[0]

    def train_labels(self) -> Tensor:
        """Int64 labels 0..9 of the training split."""
        return self._split("train")[1]

    def train_batch(self, index: Tensor) -> Tensor:
        """Float32 training images at the 1-D `index`, from the float32 split held in memory
        (Dataset's rows of train(), not ImageDataset's conversion from uint8)."""
        return Dataset.train_batch(self, index)

    def test(self) -> Tensor:
        """Test split as float32 in [-1, 1], (355, 1, 8, 8)."""
        return self._split("test")[0]

    def test_labels(self) -> Tensor:
        """Int64 labels 0..9 of the test split."""
        return self._split("test")[1]

    def reference(self, n: int, seed: int) -> Tensor:
        """The whole training split if n >= its size, else the first n of a seed-fixed shuffle."""
        train = self.train()
        if n >= train.shape[0]:
            return train
        generator = _seeded_generator(self.name, _REFERENCE_STREAM, seed)
        return train[torch.randperm(train.shape[0], generator=generator)[:n]]

    def known_size(self) -> int | None:
        """Size of the training split."""
        return DIGITS_TRAIN_SIZE


class PathImageDataset(ImageDataset):
    """An image dataset read from a local path set in bench.toml or on the command line."""

    def __init__(self, name: str, path: str | None, num_classes: int, description: str,
                 download_hint: str) -> None:
        """Remember the path and what to download; nothing is read yet."""
        super().__init__(name, num_classes, description)
        self.path = Path(path).expanduser() if path else None
        self.download_hint = download_hint

    def _missing(self, detail: str = "") -> str:
        """The one-line 'no data' message with the download and config hint."""
        where = "no path set" if self.path is None else f"no data at '{self.path}'{detail}"
        return f"{self.name}: {where} - {self.download_hint} and {_set_hint(self.name)}"

    def unavailable_reason(self) -> str | None:
        """Path unset or missing -> the message; subclasses also check the expected files."""
        if self.path is None or not self.path.exists():
            return self._missing()
        return None

    def _checked_path(self) -> Path:
        """The data path, or the one-line BenchError when the data are not there."""
        reason = self.unavailable_reason()
        if reason is not None or self.path is None:
            raise BenchError(reason or self._missing())
        return self.path


# --- CIFAR-10 ---------------------------------------------------------------------------------


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The numpy globals an ndarray pickle needs, under their numpy 1 and numpy 2 names."""
    try:
        multiarray = import_module("numpy._core.multiarray")
        numeric = import_module("numpy._core.numeric")
    except ImportError:
        multiarray = import_module("numpy.core.multiarray")
        numeric = import_module("numpy.core.numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy array globals; anything else is refused."""

    def __init__(self, handle: BinaryIO, source: Path) -> None:
        """Read `handle` with encoding='bytes' (CIFAR-10 batches were pickled by Python 2)."""
        super().__init__(handle, encoding="bytes")
        self.source = source
        self.allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy global or raise BenchError naming the file."""
        found = self.allowed.get((module, name))
        if found is None:
            raise BenchError(f"refusing to load '{self.source}': it references {module}.{name}, "
                             "which a CIFAR-10 batch never contains")
        return found


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> uint8 (N, 3, 32, 32) and int64 labels (N,)."""
    try:
        with file.open("rb") as handle:
            content = _ArrayUnpickler(handle, file).load()
    except BenchError:
        raise
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise BenchError(f"cannot read CIFAR-10 batch '{file}': {_one_line(err)}") from None
    if not isinstance(content, dict):
        raise BenchError(f"'{file}' is not a CIFAR-10 batch (expected a dict)")
    data = content.get(b"data", content.get("data"))
    labels = content.get(b"labels", content.get("labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise BenchError(f"'{file}': b'data' must be a uint8 array (N, 3072), got {got}")
    try:
        labels_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels_array = np.empty(0, dtype=np.int64)
    if labels_array.shape != (data.shape[0],) or not np.all((labels_array >= 0)
                                                            & (labels_array <= 9)):
        raise BenchError(f"'{file}': b'labels' must hold {data.shape[0]} labels in 0..9")
    return data.reshape(-1, 3, 32, 32), labels_array


class Cifar10(PathImageDataset):
    """CIFAR-10 'python version': data_batch_1..5 (train) and test_batch, 32x32 RGB, 10 classes.

    Each batch is a pickled dict: b"data" uint8 (N, 3072), a row holding the 1024 R, then G,
    then B values of a row-major 32x32 image (so it reshapes to (3, 32, 32)), and b"labels".
    """

    shape: tuple[int, ...] = (3, 32, 32)
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))

    def __init__(self, path: str | None) -> None:
        """Point at the extracted cifar-10-batches-py folder or the folder that contains it."""
        super().__init__(
            "cifar10", path, 10, "CIFAR-10 32x32, 50k training images",
            "download the CIFAR-10 python version (cifar-10-python.tar.gz), extract it",
        )
        self._test: tuple[Tensor, Tensor] | None = None

    def _batch_dir(self) -> Path | None:
        """The folder holding the batches, if the path is set and exists."""
        if self.path is None or not self.path.exists():
            return None
        nested = self.path / "cifar-10-batches-py"
        return nested if nested.is_dir() else self.path

    def _missing_files(self, names: tuple[str, ...]) -> str | None:
        """The one-line message when the path or any of the named batches is missing."""
        folder = self._batch_dir()
        if folder is None:
            return self._missing()
        missing = [name for name in names if not (folder / name).is_file()]
        return self._missing(f" (missing {', '.join(missing)})") if missing else None

    def unavailable_reason(self) -> str | None:
        """Missing path or missing data_batch_k files."""
        return self._missing_files(self.train_files)

    def _read(self, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate the named batches."""
        reason = self._missing_files(names)
        folder = self._batch_dir()
        if reason is not None or folder is None:
            raise BenchError(reason or self._missing())
        parts = [_read_cifar_batch(folder / name) for name in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The five training batches."""
        return self._read(self.train_files)

    def _test_split(self) -> tuple[Tensor, Tensor]:
        """test_batch as uint8 pixels and int64 labels, read once."""
        if self._test is None:
            pixels, labels = self._read(("test_batch",))
            self._test = torch.from_numpy(pixels), torch.from_numpy(labels)
        return self._test

    def test(self) -> Tensor:
        """The test_batch images as float32 in [-1, 1]."""
        return _to_float(self._test_split()[0])

    def test_labels(self) -> Tensor:
        """Int64 labels of test_batch."""
        return self._test_split()[1]


# --- image folders --------------------------------------------------------------------------


def _scan(directory: Path) -> tuple[list[os.DirEntry[str]], list[os.DirEntry[str]]]:
    """A folder's image entries and subfolder entries (links followed), each sorted by name."""
    try:
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as err:
        raise BenchError(f"cannot list folder '{directory}': {err.strerror or err}") from None
    images, subfolders = [], []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            subfolders.append(entry)
        elif entry.name.lower().endswith(IMAGE_SUFFIXES):
            images.append(entry)
    return images, subfolders


def _identity(entry: os.DirEntry[str]) -> tuple[int, int, int]:
    """(device, inode, mode) of what an entry names, links followed; BenchError if it is a
    broken link or cannot be read."""
    try:
        info = entry.stat()
    except OSError as err:
        what = "broken link" if entry.is_symlink() else "unreadable"
        raise BenchError(f"{what} '{entry.path}': {err.strerror or err}") from None
    return info.st_dev, info.st_ino, info.st_mode


def _walk_images(root: Path) -> Iterator[Path]:
    """Image files under root, recursively, in a fixed sorted order (files before subfolders).

    Links to folders and to files are followed, also when they point outside root, except a
    link to root itself or to a folder above it. Each real folder (by device and inode) is listed
    once, under the first path the walk finds for it (a folder's listing claims its subfolders
    before any of them is read), and each real file is yielded once, at its first path: a link
    loop or a link back to a parent neither repeats images nor hangs. An unlistable folder, a
    broken link with an image name, or an image name that is not a regular file (a FIFO, a
    device) is a BenchError naming the path.
    """
    try:
        top = root.stat()
        above = [(info.st_dev, info.st_ino) for info in map(os.stat, root.resolve().parents)]
    except OSError as err:
        raise BenchError(f"cannot read folder '{root}': {err.strerror or err}") from None
    folders_seen = {(top.st_dev, top.st_ino), *above}
    files_seen: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        directory = pending.pop()
        images, subfolders = _scan(directory)
        for entry in images:
            device, inode, mode = _identity(entry)
            if not stat.S_ISREG(mode):
                raise BenchError(f"'{entry.path}' has an image name but is not a regular file")
            if (device, inode) not in files_seen:
                files_seen.add((device, inode))
                yield Path(entry.path)
        below = []
        for entry in subfolders:
            device, inode, _ = _identity(entry)
            if (device, inode) not in folders_seen:
                folders_seen.add((device, inode))
                below.append(Path(entry.path))
        pending.extend(reversed(below))


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # the decoders tried, whatever the suffix
_CLAIMED_PIXELS = re.compile(r"\((\d+) pixels\)")


@contextmanager
def _opened_image(file: Path) -> Iterator[PILImage]:
    """The image opened by Pillow (PNG, JPEG, WebP or BMP only); any failure inside, while
    opening or decoding, is a BenchError naming the file. An image over Image.MAX_IMAGE_PIXELS
    is refused (a decompression bomb), not only over twice that as Pillow's own check does."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file, formats=IMAGE_FORMATS) as opened:
                yield opened
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        claimed = _CLAIMED_PIXELS.search(str(err))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
        raise BenchError(f"refusing image '{file}': its header claims {size}, over the limit of "
                         f"{Image.MAX_IMAGE_PIXELS:,} (a decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise BenchError(f"cannot read image '{file}': not a readable PNG, JPEG, WebP or BMP "
                         f"image") from None
    except Exception as err:  # a damaged file can make a decoder raise almost anything
        raise BenchError(f"cannot read image '{file}': {_one_line(err) or type(err).__name__}"
                         ) from None


def _read_image(file: Path, resolution: int) -> np.ndarray:
    """Decode to RGB, centre-crop to a square, resize to resolution: uint8 (3, r, r)."""
    from PIL import Image

    with _opened_image(file) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC,
                             reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def _image_side(file: Path) -> int:
    """Shorter side of an image, read from its header."""
    with _opened_image(file) as opened:
        return min(opened.size)


class ImageFolder(PathImageDataset):
    """Images found recursively under a folder, centre-cropped and resized to a square.

    The walk (`_walk_images`) follows links but lists each real folder and yields each real file
    once, so link loops end and no image is counted twice.
    With `labelled`, the first subfolder below the root names the class (sorted names -> 0..K-1).
    Files are listed once; train_uint8() decodes and caches everything, while train_batch() and
    reference() decode only the files they need until then.
    """

    def __init__(self, name: str, path: str | None, resolution: int | None, labelled: bool,
                 num_classes: int, description: str, download_hint: str) -> None:
        """resolution None = the shorter side of the first image (in listing order)."""
        super().__init__(name, path, num_classes, description, download_hint)
        self.resolution = resolution
        self.labelled = labelled
        self._files: list[Path] | None = None
        self._file_labels: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """(3, r, r); r comes from the first image when no resolution was given."""
        side = self._side()
        return (3, side, side)

    def _first_image(self) -> Path | None:
        """The first image in listing order, without listing the whole tree."""
        if self.path is None or not self.path.is_dir():
            return None
        return next(_walk_images(self.path), None)

    def _empty(self) -> str:
        """The one-line 'no images' message."""
        return (f"{self.name}: no images ({', '.join(IMAGE_SUFFIXES)}) under '{self.path}' - "
                f"{self.download_hint} and {_set_hint(self.name)}")

    def unavailable_reason(self) -> str | None:
        """Missing path, a file instead of a folder, or a folder without images."""
        if self.path is None or not self.path.exists():
            return self._missing()
        if not self.path.is_dir():
            return f"{self.name}: '{self.path}' is not a folder - {_set_hint(self.name)}"
        try:
            first = self._first_image()
        except BenchError as err:
            return str(err)
        return self._empty() if first is None else None

    def _side(self) -> int:
        """The output resolution, from the first image when not given."""
        if self.resolution is None:
            first = self._first_image()
            if first is None:
                raise BenchError(self.unavailable_reason() or self._empty())
            self.resolution = _image_side(first)
        return self.resolution

    def _listing(self) -> tuple[list[Path], np.ndarray | None]:
        """All image files (sorted) and their class labels, listed once."""
        if self._files is None:
            root = self._checked_path()
            files = list(_walk_images(root))
            if self.labelled:
                self._file_labels = self._labels_from_folders(root, files)
            self._files = files
        return self._files, self._file_labels

    def _labels_from_folders(self, root: Path, files: list[Path]) -> np.ndarray:
        """Class index of each file from its first subfolder below the root."""
        classes = []
        for file in files:
            parts = file.relative_to(root).parts
            if len(parts) < 2:
                raise BenchError(f"{self.name}: image '{file}' is not inside a class subfolder "
                                 f"of '{root}'")
            classes.append(parts[0])
        names = sorted(set(classes))
        if len(names) > self.num_classes:
            raise BenchError(f"{self.name}: '{root}' has {len(names)} class subfolders, "
                             f"more than {self.num_classes}")
        lookup = {name: i for i, name in enumerate(names)}
        return np.array([lookup[c] for c in classes], dtype=np.int64)

    def _decode(self, files: list[Path]) -> np.ndarray:
        """Decode the given files into one uint8 (n, 3, r, r) array."""
        side = self._side()
        out = np.empty((len(files), 3, side, side), dtype=np.uint8)
        for i, file in enumerate(files):
            out[i] = _read_image(file, side)
        return out

    def _load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode every image."""
        files, labels = self._listing()
        return self._decode(files), labels

    def train_batch(self, index: Tensor) -> Tensor:
        """Float32 images at the 1-D `index`; decodes only these files until all are cached."""
        if self._pixels is not None:
            return _to_float(self._pixels[index])
        files, _ = self._listing()
        return _to_float(torch.from_numpy(self._decode([files[i] for i in index.tolist()])))

    def reference(self, n: int, seed: int) -> Tensor:
        """The first n images (all if fewer) as float32; the seed is not used."""
        if self._pixels is not None:
            return _to_float(self._pixels[:n])
        files, _ = self._listing()
        return _to_float(torch.from_numpy(self._decode(files[:n])))

    def train_labels(self) -> Tensor | None:
        """Labels from the class subfolders (no decoding), or None when unlabelled."""
        if self._pixels is not None:
            return self._labels
        _, labels = self._listing()
        return None if labels is None else torch.from_numpy(labels)

    def known_size(self) -> int | None:
        """Image count once listed or loaded, else None."""
        if self._pixels is not None:
            return self._pixels.shape[0]
        return None if self._files is None else len(self._files)

    def __len__(self) -> int:
        """Number of training images (lists the files; decodes nothing)."""
        if self._pixels is not None:
            return self._pixels.shape[0]
        return len(self._listing()[0])


class FolderImages(ImageFolder):
    """`folder:PATH`: any folder of images (.png, .jpg, .jpeg, .webp, .bmp, in subfolders too),
    unconditional. Links are followed, each real folder and file is read once (ImageFolder)."""

    def __init__(self, path: str, resolution: int | None) -> None:
        """resolution None = the shorter side of the first image."""
        super().__init__(f"{FOLDER_PREFIX}{path}", path, resolution, False, 0,
                         f"images under {path}", "")

    def _missing(self, detail: str = "") -> str:
        """Ad-hoc folders have no bench.toml key: the path is part of the name."""
        return f"{self.name}: no folder at '{self.path}' - give an existing folder of images"

    def _empty(self) -> str:
        """The one-line 'no images' message."""
        return f"{self.name}: no images ({', '.join(IMAGE_SUFFIXES)}) under '{self.path}'"


# --- ImageNet 64x64 -------------------------------------------------------------------------

_NPZ_BATCH = re.compile(r"^train_data_batch_(\d+)\.npz$")


def _npz_member(file: Path, key: str) -> np.ndarray:
    """One array of an .npz file (never unpickled), with a one-line error naming the file."""
    try:
        with np.load(file, allow_pickle=False) as archive:
            if key not in archive.files:
                raise BenchError(f"'{file}' has no '{key}' array (found: {archive.files})")
            return archive[key]
    except BenchError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise BenchError(f"cannot read '{file}': {_one_line(err)}") from None


def _npz_batch_number(file: Path) -> int:
    """K of train_data_batch_K.npz."""
    match = _NPZ_BATCH.match(file.name)
    return int(match.group(1)) if match else -1


class ImageNet64(ImageFolder):
    """Downsampled ImageNet 64x64: train_data_batch_K.npz files, or one subfolder per class.

    Each .npz holds `data` uint8 (N, 12288) in channel-planar order (reshapes to (3, 64, 64))
    and `labels` 1..1000, stored here 0-based.
    """

    columns = 3 * 64 * 64

    def __init__(self, path: str | None) -> None:
        """Point at the folder of .npz batches (or one level above) or at an image folder."""
        super().__init__(
            "imagenet64", path, 64, True, 1000, "ImageNet 64x64 (downsampled), 1000 classes",
            "download the 64x64 downsampled ImageNet (Imagenet64_train_part1_npz.zip and "
            "Imagenet64_train_part2_npz.zip from image-net.org), extract the .npz batches into "
            "one folder (or give an image folder with one subfolder per class)",
        )
        self._npz: list[Path] | None = None

    def _npz_files(self) -> list[Path]:
        """train_data_batch_K.npz in the folder or one level below, sorted by K (found once)."""
        if self._npz is None:
            found: list[Path] = []
            if self.path is not None and self.path.is_dir():
                for pattern in ("train_data_batch_*.npz", "*/train_data_batch_*.npz"):
                    found += [p for p in self.path.glob(pattern)
                              if _NPZ_BATCH.match(p.name) and p.is_file()]
            self._npz = sorted(found, key=lambda p: (_npz_batch_number(p), str(p)))
        return self._npz

    def unavailable_reason(self) -> str | None:
        """Ready when .npz batches or class-folder images are present."""
        if self._npz_files():
            return None
        return super().unavailable_reason()

    def _load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Read the .npz batches (labels 1..1000 -> 0..999), else decode the image folder."""
        files = self._npz_files()
        if not files:
            return super()._load()
        labels = []
        for file in files:
            batch_labels = _npz_member(file, "labels").reshape(-1).astype(np.int64)
            if batch_labels.size and (batch_labels.min() < 1 or batch_labels.max() > 1000):
                raise BenchError(f"'{file}': labels must be 1-based class ids 1..1000")
            labels.append(batch_labels - 1)
        pixels = np.empty((sum(len(x) for x in labels), 3, 64, 64), dtype=np.uint8)
        start = 0
        for file, batch_labels in zip(files, labels, strict=True):
            data = _npz_member(file, "data")
            if not (data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == self.columns
                    and data.shape[0] == len(batch_labels)):
                raise BenchError(f"'{file}': 'data' must be uint8 ({len(batch_labels)}, "
                                 f"{self.columns}), got {data.dtype} {data.shape}")
            pixels[start:start + len(data)] = data.reshape(-1, 3, 64, 64)
            start += len(data)
        return pixels, np.concatenate(labels)

    def _listing(self) -> tuple[list[Path], np.ndarray | None]:
        """With .npz batches everything is loaded at once, so the listing is not used."""
        if self._npz_files():
            self._ensure_loaded()
            return [], None
        return super()._listing()

    def train_batch(self, index: Tensor) -> Tensor:
        """Float32 images at the 1-D `index`."""
        self._listing()
        return super().train_batch(index)

    def reference(self, n: int, seed: int) -> Tensor:
        """The first n training images (all if fewer); the seed is not used."""
        self._listing()
        return super().reference(n, seed)

    def train_labels(self) -> Tensor | None:
        """Int64 labels 0..999."""
        self._listing()
        return super().train_labels()

    def __len__(self) -> int:
        """Number of training images."""
        self._listing()
        return super().__len__()


def _lsun(category: str, path: str | None) -> ImageFolder:
    """LSUN <category> exported to image files, 256x256, unconditional."""
    return ImageFolder(
        f"lsun-{category}", path, 256, False, 0, f"LSUN {category} 256x256",
        f"download LSUN {category} ({category}_train_lmdb), export it to image files (e.g. "
        "with the LSUN tools' export script)",
    )


# ---------------------------------------------------------------------------------------------
# Registry

DatasetFactory = Callable[[str | None], Dataset]  # path (None when unset) -> dataset


@dataclass(frozen=True)
class DatasetInfo:
    """What `bench datasets` shows for one registered dataset."""

    name: str
    kind: str  # "points" or "image"
    shape: tuple[int, ...]  # per-sample shape
    size: int | None  # training samples; None when unknown without reading the data
    sigma_data: float
    available: bool  # whether the data can be read now
    note: str  # why not available, else ""


_REGISTRY: dict[str, DatasetFactory] = {}


def register_dataset(name: str, factory: DatasetFactory) -> None:
    """Register a dataset factory under a unique name."""
    if name in _REGISTRY or name.startswith(FOLDER_PREFIX):
        raise ValueError(f"dataset name {name!r} is taken or reserved")
    _REGISTRY[name] = factory


def dataset_names() -> list[str]:
    """Registered dataset names, in registration order."""
    return list(_REGISTRY)


def get_dataset(name: str, path: str | None = None, *, resolution: int | None = None) -> Dataset:
    """Open a dataset by name (or `folder:PATH`); BenchError if its data cannot be read.

    `resolution` only applies to `folder:PATH`; for other datasets it must match their shape.
    """
    if name.startswith(FOLDER_PREFIX):
        folder = name[len(FOLDER_PREFIX):] or path
        if not folder:
            raise UsageError("folder: needs a path, e.g. --dataset folder:/data/my_images")
        if resolution is not None and resolution < 1:
            raise UsageError(f"resolution must be >= 1, got {resolution}")
        dataset: Dataset = FolderImages(folder, resolution)
    elif name.startswith(POINTS_PREFIX):
        file = name[len(POINTS_PREFIX):] or path
        if not file:
            raise UsageError("points: needs a file, e.g. --dataset points:/data/points.npy")
        dataset = PointsFile(file)
    elif name in _REGISTRY:
        dataset = _REGISTRY[name](path or None)
    else:
        raise unknown_name("dataset", name, [*_REGISTRY, f"{FOLDER_PREFIX}PATH",
                                             f"{POINTS_PREFIX}PATH"])
    reason = dataset.unavailable_reason()
    if reason is not None:
        raise BenchError(reason)
    if resolution is not None and not name.startswith(FOLDER_PREFIX) \
            and tuple(dataset.shape[-2:]) != (resolution, resolution):
        raise UsageError(f"{name} has a fixed shape {dataset.shape}; resolution {resolution} "
                         "applies only to folder:PATH")
    return dataset


def describe_dataset(name: str) -> Dataset:
    """The dataset object for its metadata (kind, primary metric) without reading its data."""
    if name.startswith(FOLDER_PREFIX):
        return FolderImages(name[len(FOLDER_PREFIX):], None)
    if name.startswith(POINTS_PREFIX):
        return PointsFile(name[len(POINTS_PREFIX):])
    if name not in _REGISTRY:
        raise unknown_name("dataset", name, [*_REGISTRY, f"{FOLDER_PREFIX}PATH",
                                             f"{POINTS_PREFIX}PATH"])
    return _REGISTRY[name](None)


def list_datasets(paths: Mapping[str, str]) -> list[DatasetInfo]:
    """Describe every registered dataset given the configured paths, without reading data."""
    infos = []
    for name, factory in _REGISTRY.items():
        dataset = factory(paths.get(name) or None)
        reason = dataset.unavailable_reason()
        infos.append(DatasetInfo(
            name=name,
            kind=dataset.kind,
            shape=tuple(dataset.shape),
            size=dataset.known_size(),
            sigma_data=dataset.sigma_data,
            available=reason is None,
            note=reason or "",
        ))
    return infos


def _embedded(make: Callable[[], Dataset]) -> DatasetFactory:
    """Factory for a dataset that needs no files; a configured path is an error."""

    def factory(path: str | None) -> Dataset:
        """Build the dataset, refusing a data path."""
        dataset = make()
        if path:
            raise UsageError(f"{dataset.name} is embedded and takes no data.path (got {path!r})")
        return dataset

    return factory


register_dataset("gmm8", _embedded(gmm8))
register_dataset("gmm25", _embedded(gmm25))
register_dataset("moons", _embedded(Moons))
register_dataset("swissroll", _embedded(SwissRoll))
register_dataset("checkerboard", _embedded(Checkerboard))
register_dataset("digits", _embedded(Digits))
register_dataset("cifar10", Cifar10)
register_dataset("imagenet64", ImageNet64)
register_dataset("lsun-bedroom", lambda path: _lsun("bedroom", path))
register_dataset("lsun-cat", lambda path: _lsun("cat", path))
