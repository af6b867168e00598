"""Tests for bench.data.datasets: exact mixture math, embedded sets, file readers and errors."""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from bench.core.errors import BenchError, UsageError
from bench.data import datasets
from bench.data.datasets import (
    DIGITS_TRAIN_SIZE,
    TRAIN_SIZE,
    Cifar10,
    DatasetInfo,
    Digits,
    GaussianMixture,
    ImageNet64,
    get_dataset,
    list_datasets,
    register_dataset,
)
from tests.test_cli import assert_one_line_error

POINTS = ["gmm8", "gmm25", "moons", "swissroll", "checkerboard"]


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    """The error message, asserted to be a single line."""
    message = str(err.value)
    assert "\n" not in message and message
    return message


def single_gaussian(mean: tuple[float, float], std: float) -> GaussianMixture:
    """A one-component mixture, for closed-form checks."""
    return GaussianMixture("single", torch.tensor([mean], dtype=torch.float64), std, None, "")


# --- Gaussian mixtures ------------------------------------------------------------------------


def test_gmm8_parameters():
    gmm = get_dataset("gmm8")
    assert isinstance(gmm, GaussianMixture)
    angle = 2 * math.pi * np.arange(8) / 8
    expected = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    np.testing.assert_allclose(gmm.means.numpy(), expected, atol=1e-15)
    assert gmm.std == 0.05
    np.testing.assert_allclose(gmm.weights.numpy(), np.full(8, 1 / 8))
    assert gmm.modes.shape == (8, 2)
    # per-coordinate variance: E[cos^2] + std^2 = 0.5 + 0.0025
    assert gmm.sigma_data == round(math.sqrt(0.5025), 3) == 0.709
    assert (gmm.kind, gmm.shape, gmm.clamp, gmm.num_classes) == ("points", (2,), None, 0)
    assert gmm.primary_metric == "w2"


def test_gmm25_parameters():
    gmm = get_dataset("gmm25")
    assert isinstance(gmm, GaussianMixture)
    grid = {(float(a), float(b)) for a in (-1, -0.5, 0, 0.5, 1) for b in (-1, -0.5, 0, 0.5, 1)}
    assert {tuple(m) for m in gmm.means.tolist()} == grid
    assert gmm.means.shape == (25, 2)
    assert gmm.std == 0.05
    np.testing.assert_allclose(gmm.weights.numpy(), np.full(25, 1 / 25))
    assert gmm.sigma_data == 0.709


@pytest.mark.parametrize("name", ["gmm8", "gmm25"])
@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_log_prob_matches_scipy(name, sigma):
    gmm = get_dataset(name)
    assert isinstance(gmm, GaussianMixture)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:8] = gmm.means[:8] + 0.01  # near modes, where the density is large
    variance = gmm.std**2 + sigma**2
    expected = logsumexp([
        np.log(w) + multivariate_normal(mean=m, cov=variance * np.eye(2)).logpdf(x.numpy())
        for w, m in zip(gmm.weights.numpy(), gmm.means.numpy(), strict=True)
    ], axis=0)
    got = gmm.log_prob(x, sigma)
    assert got.dtype == torch.float64 and got.shape == (64,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)
    got32 = gmm.log_prob(x.float(), sigma)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-4, atol=1e-3)


def test_log_prob_stable_far_from_modes():
    gmm = get_dataset("gmm8")
    assert isinstance(gmm, GaussianMixture)
    far = torch.tensor([[30.0, -40.0]])
    value = gmm.log_prob(far)
    # the nearest component dominates: log N(far; m_k, std^2 I) up to log(w) terms
    assert torch.isfinite(value).all() and value.item() < -1e5


@pytest.mark.parametrize("sigma", [0.002, 0.1, 1.0, 80.0])
def test_denoise_single_gaussian_closed_form(sigma):
    mean, std = (0.3, -0.7), 0.2
    gmm = single_gaussian(mean, std)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    expected = (std**2 * x + sigma**2 * torch.tensor(mean, dtype=torch.float64)) / (
        std**2 + sigma**2)
    torch.testing.assert_close(gmm.denoise(x, sigma), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gmm.denoise(x.float(), torch.tensor(sigma)), expected.float(),
                               rtol=1e-5, atol=1e-5)


def test_denoise_matches_monte_carlo_posterior():
    gmm = get_dataset("gmm8")
    assert isinstance(gmm, GaussianMixture)
    generator = torch.Generator().manual_seed(2)
    prior = gmm.sample(400_000, generator).double()
    sigma = 0.4
    x = torch.tensor([[0.9, 0.2], [0.0, 0.0], [-0.5, 0.6], [0.1, -1.2]], dtype=torch.float64)
    log_w = -(x[:, None, :] - prior[None]).square().sum(-1) / (2 * sigma**2)
    weights = torch.softmax(log_w, dim=1)
    estimate = weights @ prior
    torch.testing.assert_close(gmm.denoise(x, sigma), estimate, rtol=0, atol=0.01)


def test_denoise_limits_and_broadcasting():
    gmm = get_dataset("gmm25")
    assert isinstance(gmm, GaussianMixture)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # sigma -> 0: the posterior mean is x itself (error ~ sigma^2 / std^2)
    torch.testing.assert_close(gmm.denoise(x, 1e-5), x, rtol=0, atol=1e-6)
    # sigma -> large: the posterior mean is the mixture mean
    mixture_mean = (gmm.weights @ gmm.means).expand_as(x)
    torch.testing.assert_close(gmm.denoise(x, 1e4), mixture_mean, rtol=0, atol=1e-6)
    # per-row sigma equals the row-by-row computation, for shapes (N,) and (N, 1)
    sigma = torch.logspace(math.log10(0.002), math.log10(80.0), 50, dtype=torch.float64)
    rows = torch.cat([gmm.denoise(x[i:i + 1], sigma[i]) for i in range(50)])
    torch.testing.assert_close(gmm.denoise(x, sigma), rows)
    torch.testing.assert_close(gmm.denoise(x, sigma[:, None]), rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_denoise_stable_across_sigma_range(dtype):
    gmm = get_dataset("gmm8")
    assert isinstance(gmm, GaussianMixture)
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [40.0, -60.0], [-200.0, 5.0]], dtype=dtype)
    for sigma in (0.002, 0.01, 1.0, 10.0, 80.0):
        out = gmm.denoise(x, sigma)
        assert out.dtype == dtype and out.device == x.device and torch.isfinite(out).all()
        reference = gmm.denoise(x.double(), sigma)
        torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-4)
    # at small sigma a far-away point is pulled to the closest component's posterior mean
    far = gmm.denoise(torch.tensor([[40.0, -60.0]], dtype=torch.float64), 0.002)
    index, _ = gmm.nearest_mode(torch.tensor([[40.0, -60.0]]))
    expected = (0.05**2 * torch.tensor([[40.0, -60.0]], dtype=torch.float64)
                + 0.002**2 * gmm.means[index]) / (0.05**2 + 0.002**2)
    torch.testing.assert_close(far, expected)


def test_nearest_mode():
    gmm = get_dataset("gmm8")
    assert isinstance(gmm, GaussianMixture)
    index, distance = gmm.nearest_mode(gmm.means.float() * 1.1)
    assert index.tolist() == list(range(8))
    torch.testing.assert_close(distance, torch.full((8,), 0.1), rtol=1e-5, atol=1e-6)


# --- embedded 2-D datasets ------------------------------------------------------------------


@pytest.mark.parametrize("name", POINTS)
def test_points_train_deterministic_and_scaled(name):
    first = get_dataset(name)
    train = first.train()
    assert train.shape == (TRAIN_SIZE, 2) and train.dtype == torch.float32
    assert len(first) == first.known_size() == TRAIN_SIZE
    assert first.train() is train
    assert torch.equal(get_dataset(name).train(), train)
    # declared sigma_data is the RMS per-coordinate std of the data
    rms_std = train.double().var(dim=0).mean().sqrt().item()
    assert abs(rms_std - first.sigma_data) < 0.005
    assert 0.5 <= first.sigma_data <= 1.0
    assert train.double().mean(dim=0).abs().max().item() < 0.02  # centred


@pytest.mark.parametrize("name", POINTS)
def test_points_reference_draws(name):
    dataset = get_dataset(name)
    a, b = dataset.reference(5000, seed=0), dataset.reference(5000, seed=1)
    assert a.shape == (5000, 2) and a.dtype == torch.float32
    assert torch.equal(a, dataset.reference(5000, seed=0))
    # different seeds: no shared points; neither shares points with the training set
    pooled = torch.cat([a, b, dataset.train()])
    assert torch.unique(pooled, dim=0).shape[0] == pooled.shape[0]
    # independent draws from the same law: first two moments agree
    for draw in (a, b):
        torch.testing.assert_close(draw.mean(0), dataset.train().mean(0), rtol=0, atol=0.05)
        torch.testing.assert_close(draw.std(0), dataset.train().std(0), rtol=0, atol=0.05)


# first training point and sum of |x| over the training set: the sets must never change silently
# (a seed derived from Python's per-process hash() or a changed sampler would break these)
GOLDEN_TRAIN = {
    "gmm8": ((0.065442, -1.006188), 122729.398),
    "gmm25": ((0.491909, -0.462877), 121585.125),
    "moons": ((-0.509262, -0.152759), 114571.891),
    "swissroll": ((-1.163011, 0.07669), 115406.95),
    "checkerboard": ((-0.829547, -0.847482), 100115.448),
}


@pytest.mark.parametrize("name", POINTS)
def test_train_matches_golden_values(name):
    train = get_dataset(name).train().double()
    first, abs_sum = GOLDEN_TRAIN[name]
    torch.testing.assert_close(train[0], torch.tensor(first, dtype=torch.float64), rtol=0,
                               atol=1e-5)
    assert train.abs().sum().item() == pytest.approx(abs_sum, rel=1e-6)


def test_checkerboard_support():
    points = get_dataset("checkerboard").train()
    assert points.abs().max() <= 1.0
    cell = torch.floor((points + 1.0) / 0.5).long().clamp(max=3)
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()  # only the dark squares


def test_negative_seed_is_refused():
    with pytest.raises(UsageError) as err:
        get_dataset("moons").reference(10, seed=-1)
    one_line(err)


# --- digits ---------------------------------------------------------------------------------


def test_digits_split_and_scaling():
    from sklearn.datasets import load_digits

    digits = get_dataset("digits")
    assert isinstance(digits, Digits)
    train, test = digits.train(), digits.test()
    labels, test_labels = digits.train_labels(), digits.test_labels()
    assert labels is not None
    assert train.shape == (DIGITS_TRAIN_SIZE, 1, 8, 8) == (1442, 1, 8, 8)
    assert test.shape == (355, 1, 8, 8)
    assert train.dtype == torch.float32 and labels.dtype == torch.int64
    assert train.min() == -1.0 and train.max() == 1.0
    assert digits.known_size() == DIGITS_TRAIN_SIZE
    assert (digits.num_classes, digits.primary_metric, digits.sigma_data) == (10, "fcd", 0.5)
    assert digits.clamp == (-1.0, 1.0) and digits.kind == "image"
    # the split partitions load_digits: every fifth image of each class is test
    bunch = load_digits()
    target = torch.from_numpy(bunch.target)
    counts = torch.bincount(target, minlength=10)
    assert torch.equal(torch.bincount(test_labels, minlength=10), counts // 5)
    assert torch.equal(torch.bincount(labels, minlength=10) + counts // 5, counts)
    first_zero = torch.from_numpy(bunch.images[(bunch.target == 0)][:4]).float() / 8 - 1
    torch.testing.assert_close(train[labels == 0][:4, 0], first_zero)
    fifth_zero = torch.from_numpy(bunch.images[bunch.target == 0][4]).float() / 8 - 1
    torch.testing.assert_close(test[test_labels == 0][0, 0], fifth_zero)


def test_digits_deterministic_reference_and_uint8():
    digits = get_dataset("digits")
    other = get_dataset("digits")
    assert torch.equal(digits.train(), other.train())
    assert torch.equal(digits.train_labels(), other.train_labels())
    assert torch.equal(digits.reference(5000, seed=3), digits.train())
    a, b = digits.reference(100, seed=0), digits.reference(100, seed=1)
    assert a.shape == (100, 1, 8, 8) and not torch.equal(a, b)
    assert torch.equal(a, other.reference(100, seed=0))
    assert torch.isin(a.flatten(1).sum(1), digits.train().flatten(1).sum(1)).all()
    pixels = digits.train_uint8()
    assert pixels.dtype == torch.uint8 and pixels.max() == 255
    torch.testing.assert_close(pixels.float() / 127.5 - 1, digits.train(), rtol=0,
                               atol=1 / 255 + 1e-6)
    index = torch.tensor([5, 0, 17])
    assert torch.equal(digits.train_batch(index), digits.train()[index])


# --- CIFAR-10 -------------------------------------------------------------------------------


def write_cifar(folder: Path, per_batch: int, seed: int, protocol: int) -> tuple[np.ndarray, ...]:
    """Write data_batch_1..5 and test_batch as the real files are; return the train arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch_labels = rng.integers(0, 10, size=per_batch).tolist()
        content = {b"batch_label": name.encode(), b"labels": batch_labels, b"data": batch,
                   b"filenames": [f"img{i}.png".encode() for i in range(per_batch)]}
        with (folder / name).open("wb") as handle:
            pickle.dump(content, handle, protocol=protocol)
        if name != "test_batch":
            data.append(batch)
            labels.append(batch_labels)
    return np.concatenate(data), np.concatenate(labels)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_round_trip(tmp_path, protocol):
    data, labels = write_cifar(tmp_path, per_batch=3, seed=0, protocol=protocol)
    cifar = get_dataset("cifar10", str(tmp_path))
    assert isinstance(cifar, Cifar10)
    pixels = cifar.train_uint8()
    assert pixels.shape == (15, 3, 32, 32) and pixels.dtype == torch.uint8
    # row layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
    for i, c, h, w in [(0, 0, 0, 0), (4, 1, 5, 31), (14, 2, 31, 7)]:
        assert pixels[i, c, h, w].item() == data[i, c * 1024 + h * 32 + w]
    assert torch.equal(pixels.reshape(15, -1), torch.from_numpy(data))
    assert torch.equal(cifar.train_labels(), torch.from_numpy(labels))
    train = cifar.train()
    assert train.dtype == torch.float32
    torch.testing.assert_close(train, torch.from_numpy(data).float().reshape(15, 3, 32, 32)
                               / 127.5 - 1)
    assert torch.equal(cifar.reference(4, seed=9), train[:4])
    assert torch.equal(cifar.reference(100, seed=9), train)
    assert torch.equal(cifar.train_batch(torch.tensor([3, 1])), train[[3, 1]])
    assert cifar.test().shape == (3, 3, 32, 32) and cifar.test_labels().shape == (3,)
    assert (cifar.sigma_data, cifar.num_classes, cifar.primary_metric) == (0.5, 10, "fid")
    assert cifar.known_size() == 15 and len(cifar) == 15


def test_cifar10_accepts_parent_folder(tmp_path):
    data, _ = write_cifar(tmp_path / "cifar-10-batches-py", per_batch=2, seed=1, protocol=4)
    cifar = get_dataset("cifar10", str(tmp_path))
    assert torch.equal(cifar.train_uint8().reshape(10, -1), torch.from_numpy(data))


def test_cifar10_missing_batch(tmp_path):
    write_cifar(tmp_path, per_batch=2, seed=1, protocol=4)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(BenchError) as err:
        get_dataset("cifar10", str(tmp_path))
    message = one_line(err)
    assert "data_batch_3" in message and "cifar-10-python.tar.gz" in message


class Exploit:
    """Pickles as a call to os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_forbidden_global(tmp_path):
    write_cifar(tmp_path, per_batch=2, seed=1, protocol=4)
    marker = tmp_path / "pwned"
    with (tmp_path / "data_batch_2").open("wb") as handle:
        pickle.dump({b"data": Exploit(marker), b"labels": [0]}, handle)
    cifar = get_dataset("cifar10", str(tmp_path))
    with pytest.raises(BenchError) as err:
        cifar.train()
    message = one_line(err)
    assert "data_batch_2" in message and "system" in message
    assert not marker.exists()


def test_cifar10_wrong_shape_batch(tmp_path):
    write_cifar(tmp_path, per_batch=2, seed=1, protocol=4)
    with (tmp_path / "data_batch_4").open("wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(BenchError) as err:
        get_dataset("cifar10", str(tmp_path)).train()
    assert "data_batch_4" in one_line(err)


# --- ImageNet 64x64 -------------------------------------------------------------------------


def test_imagenet64_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    batches = {}
    for k in (10, 2):  # numeric order: batch 2 before batch 10
        data = rng.integers(0, 256, size=(3, 12288), dtype=np.uint8)
        labels = rng.integers(1, 1001, size=3)
        labels[0] = 1000 if k == 10 else 1
        np.savez(tmp_path / f"train_data_batch_{k}.npz", data=data, labels=labels.tolist(),
                 mean=np.zeros(12288))
        batches[k] = (data, labels)
    (tmp_path / "val_data.npz").write_bytes(b"not used")
    imagenet = get_dataset("imagenet64", str(tmp_path))
    assert isinstance(imagenet, ImageNet64)
    assert imagenet.shape == (3, 64, 64) and imagenet.num_classes == 1000
    pixels = imagenet.train_uint8()
    expected = np.concatenate([batches[2][0], batches[10][0]]).reshape(6, 3, 64, 64)
    assert torch.equal(pixels, torch.from_numpy(expected))
    assert pixels[4, 2, 63, 1].item() == batches[10][0][1, 2 * 4096 + 63 * 64 + 1]
    labels = imagenet.train_labels()
    assert torch.equal(labels, torch.from_numpy(np.concatenate([batches[2][1], batches[10][1]])
                                                - 1))
    assert labels.min() == 0 and labels.max() == 999
    assert torch.equal(imagenet.reference(2, seed=0), imagenet.train()[:2])
    assert len(imagenet) == 6 and len(get_dataset("imagenet64", str(tmp_path))) == 6


def test_imagenet64_wrong_shape_npz(tmp_path):
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 3072), np.uint8),
             labels=np.array([1, 2]))
    imagenet = get_dataset("imagenet64", str(tmp_path))
    with pytest.raises(BenchError) as err:
        imagenet.train()
    message = one_line(err)
    assert "train_data_batch_1.npz" in message and "12288" in message


def test_imagenet64_npz_with_objects_is_refused(tmp_path):
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.array([{"a": 1}], dtype=object),
             labels=np.array([1]))
    with pytest.raises(BenchError) as err:
        get_dataset("imagenet64", str(tmp_path)).train()
    assert "train_data_batch_1.npz" in one_line(err)


def test_imagenet64_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    expected = {}
    for synset in ("n02", "n01"):
        (tmp_path / synset).mkdir()
        for i in range(2):
            array = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / synset / f"{i}.png")
            expected[(synset, i)] = array
    imagenet = get_dataset("imagenet64", str(tmp_path))
    assert torch.equal(imagenet.train_labels(), torch.tensor([0, 0, 1, 1]))
    pixels = imagenet.train_uint8()
    assert torch.equal(pixels[2], torch.from_numpy(expected[("n02", 0)].transpose(2, 0, 1)))


# --- image folders --------------------------------------------------------------------------


def write_pngs(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """Write count random RGB PNGs (width, height) named 00.png, 01.png, ...; return HWC arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(count):
        array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"{i:02d}.png")
        arrays.append(array)
    return arrays


def test_image_folder_round_trip(tmp_path):
    top = write_pngs(tmp_path, 2, (8, 8), seed=0)
    nested = write_pngs(tmp_path / "sub", 2, (8, 8), seed=1)
    Image.fromarray(top[0][:, :, 0]).save(tmp_path / "sub" / "gray.PNG")  # grey -> RGB
    (tmp_path / "notes.txt").write_text("ignored")
    folder = get_dataset(f"folder:{tmp_path}")
    assert folder.shape == (3, 8, 8) and folder.num_classes == 0
    assert folder.train_labels() is None
    # lazy paths first: reference and train_batch decode only what they need
    first = folder.reference(2, seed=0)
    batch = folder.train_batch(torch.tensor([3, 0]))
    pixels = folder.train_uint8()
    expected = [*top, *nested, np.repeat(top[0][:, :, :1], 3, axis=2)]
    assert pixels.shape == (5, 3, 8, 8)
    # walk order: a folder's files (sorted by name) before its subfolders
    for got, want in zip(pixels, expected, strict=True):
        assert torch.equal(got, torch.from_numpy(want.transpose(2, 0, 1)))
    assert torch.equal(first, folder.train()[:2])
    assert torch.equal(batch, folder.train()[[3, 0]])
    assert folder.known_size() == 5 and len(folder) == 5
    lazy = get_dataset(f"folder:{tmp_path}")
    assert len(lazy) == 5 and lazy._pixels is None  # counted from the listing, nothing decoded


def test_image_folder_crop_and_resolution(tmp_path):
    (wide,) = write_pngs(tmp_path, 1, (12, 8), seed=2)
    folder = get_dataset(f"folder:{tmp_path}")
    assert folder.shape == (3, 8, 8)
    assert torch.equal(folder.train_uint8()[0], torch.from_numpy(wide[:, 2:10].transpose(2, 0, 1)))
    small = get_dataset(f"folder:{tmp_path}", resolution=4)
    assert small.shape == (3, 4, 4) and small.train().shape == (1, 3, 4, 4)
    assert small.train().min() >= -1 and small.train().max() <= 1


def test_lsun_resizes_to_256(tmp_path):
    write_pngs(tmp_path, 1, (300, 260), seed=3)
    lsun = get_dataset("lsun-cat", str(tmp_path))
    assert lsun.shape == (3, 256, 256) and lsun.num_classes == 0
    assert lsun.train_uint8().shape == (1, 3, 256, 256)


# --- errors and registry --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "imagenet64", "lsun-bedroom", "lsun-cat"])
def test_missing_path_is_one_line(tmp_path, name):
    for path in (None, str(tmp_path / "absent")):
        with pytest.raises(BenchError) as err:
            get_dataset(name, path)
        message = one_line(err)
        assert message.startswith(f"{name}: ") and "download" in message
        assert f"[data.{name}] path" in message and "--set data.path=" in message
    assert "absent" in message


def test_empty_folder_is_one_line(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(BenchError) as err:
        get_dataset(f"folder:{tmp_path}")
    assert "no images" in one_line(err)
    with pytest.raises(BenchError) as err:
        get_dataset(f"folder:{tmp_path / 'absent'}")
    one_line(err)
    with pytest.raises(BenchError) as err:
        get_dataset("lsun-bedroom", str(tmp_path))
    assert "no images" in one_line(err)


def test_corrupt_image_names_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    folder = get_dataset(f"folder:{tmp_path}", resolution=8)
    with pytest.raises(BenchError) as err:
        folder.train()
    assert "bad.png" in one_line(err)
    with pytest.raises(BenchError) as err:
        get_dataset(f"folder:{tmp_path}").shape  # noqa: B018
    assert "bad.png" in one_line(err)


def png_bytes(width: int, height: int, idat: bytes) -> bytes:
    """An RGB PNG whose IHDR claims width x height, with the given IDAT payload (valid CRCs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def damaged_images() -> dict[str, bytes]:
    """File contents an image folder may hold that no decoder should turn into pixels."""
    rows = b"".join(b"\0" + bytes(3 * 8) for _ in range(8))  # 8x8 black, filter byte 0 per row
    gif = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(gif, "GIF")
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)
                    ).save(whole, "PNG")
    return {
        "truncated": whole.getvalue()[:len(whole.getvalue()) // 2],
        "garbage-zlib": png_bytes(8, 8, b"not a zlib stream"),
        "short-zlib": png_bytes(8, 8, zlib.compress(rows[:40])),
        "zero-width": png_bytes(0, 8, zlib.compress(rows)),
        "gif-named-png": gif.getvalue(),
        "text": b"not an image at all",
    }


@pytest.mark.parametrize("name", list(damaged_images()))
def test_damaged_image_is_one_line_naming_it(tmp_path, name):
    write_pngs(tmp_path, 1, (8, 8), seed=5)
    bad = tmp_path / "zz-bad.png"
    bad.write_bytes(damaged_images()[name])
    folder = get_dataset(f"folder:{tmp_path}", resolution=8)
    with pytest.raises(BenchError) as err:
        folder.train()
    message = one_line(err)
    assert f"'{bad}'" in message and message.startswith("cannot read image")


@pytest.mark.parametrize("side", [10_000, 100_000])
def test_decompression_bomb_is_refused_naming_the_file(tmp_path, side):
    """A header claiming side x side pixels: 10^8 is over Image.MAX_IMAGE_PIXELS, where Pillow
    only warns; 10^10 is over twice it, where Pillow raises. Both are refused the same way,
    from the header alone (the shape) and when decoding at a given resolution."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(side, side, zlib.compress(b"\0" * 64)))
    assert side * side > Image.MAX_IMAGE_PIXELS
    for read in (lambda: get_dataset(f"folder:{tmp_path}").shape,
                 lambda: get_dataset(f"folder:{tmp_path}", resolution=8).train()):
        with pytest.raises(BenchError) as err:
            read()
        message = one_line(err)
        assert f"refusing image '{bomb}'" in message
        assert f"{side * side:,} pixels" in message and "decompression bomb" in message


def test_decompression_bomb_fails_bench_run_in_one_line(bench, tmp_path):
    images = tmp_path / "images"
    write_pngs(images, 1, (8, 8), seed=6)
    bomb = images / "00.png"  # the first image: its header sets the resolution
    bomb.write_bytes(png_bytes(100_000, 100_000, zlib.compress(b"\0" * 64)))
    result = bench("run", "--method", "edm", "--dataset", f"folder:{images}", "--steps", "1",
                   timeout=300)
    assert_one_line_error(result, 1, f"refusing image '{bomb}'", "decompression bomb")
    assert not (tmp_path / "mlruns").exists()


def test_truncated_image_fails_bench_refstats_in_one_line(bench, tmp_path):
    """refstats decodes every image (through a random-weights Inception of torch-fidelity's
    layout: no weights can be downloaded here); a truncated file is one line naming it."""
    from tests.test_fid import torch_fidelity_shell_state

    images = tmp_path / "images"
    write_pngs(images, 3, (8, 8), seed=7)
    bad = images / "01.png"
    bad.write_bytes(damaged_images()["truncated"])
    torch.save(torch_fidelity_shell_state(0), tmp_path / "inception.pth")
    result = bench("refstats", "--dataset", f"folder:{images}", "--set",
                   "eval.inception_weights=inception.pth", timeout=300)
    assert_one_line_error(result, 1, f"cannot read image '{bad}'", "truncated")


# --- image folders with links ------------------------------------------------------------------


def link_maze(root: Path) -> None:
    """x.png, a/y.png, b/z.png under root, tied together by links: a/to-b -> b, b/to-a -> a
    (a loop), four links to root itself (a walk that followed them would branch 4-fold at each
    level), a link to root's parent, a link to an image and a hard link to another."""
    write_pngs(root, 1, (8, 8), seed=8)
    (root / "00.png").rename(root / "x.png")
    for sub, name in (("a", "y.png"), ("b", "z.png")):
        write_pngs(root / sub, 1, (8, 8), seed=9)
        (root / sub / "00.png").rename(root / sub / name)
    (root / "a" / "to-b").symlink_to("../b")
    (root / "b" / "to-a").symlink_to("../a")
    for i in range(4):
        (root / f"again{i}").symlink_to(".")
    (root / "a" / "up").symlink_to("../..")
    (root / "xx-link.png").symlink_to("x.png")
    os.link(root / "b" / "z.png", root / "b" / "zz-hard.png")


@pytest.mark.timeout(60)
def test_link_loops_end_fast_with_each_image_once(tmp_path):
    root = tmp_path / "maze"
    link_maze(root)
    folder = get_dataset(f"folder:{root}")
    assert len(folder) == 3
    assert [p.relative_to(root).as_posix() for p in folder._listing()[0]] == \
        ["x.png", "a/y.png", "b/z.png"]
    assert folder.train().shape == (3, 3, 8, 8)


def test_self_link_does_not_duplicate_images(tmp_path):
    write_pngs(tmp_path, 2, (8, 8), seed=10)
    (tmp_path / "again").symlink_to(".")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "back").symlink_to("..")
    assert len(get_dataset(f"folder:{tmp_path}")) == 2


def test_links_outside_the_folder_are_followed(tmp_path):
    outside = write_pngs(tmp_path / "elsewhere", 2, (8, 8), seed=11)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cats").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "data" / "dogs").symlink_to(tmp_path / "elsewhere")  # the same folder again
    folder = get_dataset(f"folder:{tmp_path / 'data'}")
    pixels = folder.train_uint8()
    assert [p.parent.name for p in folder._listing()[0]] == ["cats", "cats"]
    for got, want in zip(pixels, outside, strict=True):
        assert torch.equal(got, torch.from_numpy(want.transpose(2, 0, 1)))


def test_class_folder_linked_from_another_keeps_its_own_label(tmp_path):
    """imagenet64 as class subfolders: n01/extra -> ../n02 is claimed by n02's own entry at the
    top, so n02's images keep label 1 and are not counted again under n01."""
    for synset in ("n01", "n02"):
        write_pngs(tmp_path / synset, 2, (64, 64), seed=12)
    (tmp_path / "n01" / "extra").symlink_to("../n02")
    imagenet = get_dataset("imagenet64", str(tmp_path))
    assert torch.equal(imagenet.train_labels(), torch.tensor([0, 0, 1, 1]))


@pytest.mark.timeout(60)
def test_fifo_and_broken_link_with_image_names_are_one_line(tmp_path):
    write_pngs(tmp_path, 1, (8, 8), seed=13)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(BenchError) as err:
        len(get_dataset(f"folder:{tmp_path}"))
    assert f"'{fifo}'" in one_line(err) and "not a regular file" in one_line(err)
    fifo.unlink()
    broken = tmp_path / "gone.png"
    broken.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(BenchError) as err:
        len(get_dataset(f"folder:{tmp_path}"))
    assert f"broken link '{broken}'" in one_line(err)


def test_imagenet64_ignores_a_fifo_named_like_a_batch(tmp_path):
    os.mkfifo(tmp_path / "train_data_batch_1.npz")
    with pytest.raises(BenchError) as err:
        get_dataset("imagenet64", str(tmp_path))
    assert "no images" in one_line(err)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UsageError) as err:
        get_dataset("cifar100")
    message = one_line(err)
    for name in [*POINTS, "digits", "cifar10", "imagenet64", "lsun-bedroom", "lsun-cat",
                 "folder:PATH"]:
        assert name in message


def test_embedded_dataset_refuses_a_path():
    with pytest.raises(UsageError) as err:
        get_dataset("gmm8", "/some/path")
    one_line(err)


def test_fixed_resolution_mismatch():
    with pytest.raises(UsageError) as err:
        get_dataset("digits", resolution=16)
    one_line(err)


def test_register_dataset_rejects_duplicates():
    with pytest.raises(ValueError):
        register_dataset("gmm8", lambda path: datasets.gmm8())
    with pytest.raises(ValueError):
        register_dataset("folder:x", lambda path: datasets.gmm8())


def test_list_datasets(tmp_path):
    write_cifar(tmp_path, per_batch=2, seed=0, protocol=4)
    infos = {info.name: info for info in list_datasets({"cifar10": str(tmp_path)})}
    assert set(infos) == {*POINTS, "digits", "cifar10", "imagenet64", "lsun-bedroom", "lsun-cat"}
    assert all(isinstance(info, DatasetInfo) for info in infos.values())
    assert infos["gmm8"] == DatasetInfo("gmm8", "points", (2,), TRAIN_SIZE, 0.709, True, "")
    assert infos["digits"].size == DIGITS_TRAIN_SIZE and infos["digits"].shape == (1, 8, 8)
    assert infos["cifar10"].available and infos["cifar10"].note == ""
    assert infos["cifar10"].size is None  # not read just to count
    imagenet = infos["imagenet64"]
    assert not imagenet.available and imagenet.size is None and imagenet.shape == (3, 64, 64)
    assert "set data.path" in imagenet.note and "\n" not in imagenet.note


@pytest.mark.parametrize("name", POINTS)
def test_from_uniform_has_the_sampler_law(name):
    from bench.metrics.base import swd

    dataset = get_dataset(name)
    u = torch.rand(20000, dataset.uniform_dims, generator=torch.Generator().manual_seed(0),
                   dtype=torch.float64)
    mapped = dataset.from_uniform(u)
    assert mapped.shape == (20000, 2) and mapped.dtype == torch.float32
    drawn = dataset.reference(20000, seed=0)
    torch.testing.assert_close(mapped.mean(0), drawn.mean(0), rtol=0, atol=0.03)
    torch.testing.assert_close(mapped.std(0), drawn.std(0), rtol=0, atol=0.03)
    # about as close to a draw of the data as another draw of the data is
    assert swd(mapped, drawn) < 2.5 * swd(dataset.reference(20000, seed=1), drawn)


@pytest.mark.parametrize("name", POINTS)
def test_stratified_reference(name):
    dataset = get_dataset(name)
    a = dataset.reference_qmc(2000, seed=1)
    assert a.shape == (2000, 2) and torch.isfinite(a).all()
    assert torch.equal(a, dataset.reference_qmc(2000, seed=1))
    assert not torch.equal(a, dataset.reference_qmc(2000, seed=2))
    with pytest.raises(UsageError):
        dataset.reference_qmc(10, seed=-1)


def test_stratified_reference_balances_the_modes():
    from bench.metrics.base import w2

    dataset = get_dataset("gmm8")
    mode, _ = dataset.nearest_mode(dataset.reference_qmc(2000, seed=1).double())
    assert torch.bincount(mode, minlength=8).tolist() == [250] * 8
    random_mode, _ = dataset.nearest_mode(dataset.reference(2000, seed=1).double())
    assert torch.bincount(random_mode, minlength=8).sub(250).abs().max() > 5
    # two stratified draws are far closer to each other than two random draws
    qmc = w2(dataset.reference_qmc(2000, seed=1), dataset.reference_qmc(2000, seed=2))
    random = w2(dataset.reference(2000, seed=1), dataset.reference(2000, seed=2))
    assert qmc < 0.03 < 0.08 < random


def test_points_file_is_read_without_pickle_and_validated(tmp_path: Path) -> None:
    points = np.random.default_rng(0).normal(size=(32, 2)).astype(np.float64)
    np.save(tmp_path / "p.npy", points)
    np.savez(tmp_path / "s.npz", x=points[:10], nfe=np.int64(1))  # as `bench sample` writes
    data = get_dataset(f"points:{tmp_path / 'p.npy'}")
    assert data.kind == "points" and data.primary_metric == "w2" and len(data) == 32
    torch.testing.assert_close(data.train(), torch.from_numpy(points).float())
    assert len(get_dataset("points:", str(tmp_path / "s.npz"))) == 10
    # the stratified reference of 2^k points takes each of 2^k rows exactly once
    qmc = data.reference_qmc(32, 0)
    assert sorted(map(tuple, qmc.tolist())) == sorted(map(tuple, data.train().tolist()))
    assert data.reference(5, 0).shape == (5, 2)
    with pytest.raises(UsageError, match="points: needs a file"):
        get_dataset("points:")
    np.save(tmp_path / "one.npy", points[:1])
    with pytest.raises(BenchError, match="at least 2 points"):
        get_dataset(f"points:{tmp_path / 'one.npy'}")
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(BenchError, match="must be numbers"):
        get_dataset(f"points:{tmp_path / 'text.npy'}")
