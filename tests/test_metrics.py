"""Metrics checked against independent references: scipy formulas, assignment solvers, sklearn."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.datasets import load_digits

from bench.metrics.base import (
    DigitsClassifier,
    FeatureFrechet,
    MetricAccumulator,
    PointMetrics,
    digits_cache_path,
    fd,
    feature_stats,
    frechet_distance,
    gaussian_stats,
    gmm_nll,
    high_quality_fraction,
    load_or_train_digits_classifier,
    mode_recall,
    swd,
    train_digits_classifier,
    w2,
)


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def reference_frechet(mu1, s1, mu2, s2) -> float:
    """tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all symmetric eigenproblems."""
    vals, vecs = scipy.linalg.eigh(s1)
    root1 = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    inner = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sum(np.sqrt(np.clip(inner, 0.0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# Frechet distance ------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 8, 64])
def test_frechet_matches_symmetric_eigen_formula(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = random_spd(rng, dim), random_spd(rng, dim)
    expected = reference_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    got_torch = frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert got_torch == pytest.approx(expected, rel=1e-6)


def test_frechet_equal_gaussians_is_zero():
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(16), random_spd(rng, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_rank_deficient_covariances():
    rng = np.random.default_rng(2)
    v = rng.standard_normal((6, 2))
    s1, s2 = v @ v.T, v @ v.T + 0.5 * np.outer(v[:, 0], v[:, 0])
    mu = np.zeros(6)
    got = frechet_distance(mu, s1, mu, s2)
    assert math.isfinite(got)
    assert got == pytest.approx(reference_frechet(mu, s1, mu, s2), abs=1e-4)


def test_frechet_rejects_large_imaginary_part():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)


def test_gaussian_stats_and_fd():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 3)) @ rng.standard_normal((3, 3))
    mu, sigma = gaussian_stats(torch.from_numpy(x).float())
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-5, atol=1e-6)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    shift = np.array([1.0, -2.0, 0.5])
    assert fd(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    assert abs(fd(x, x)) < 1e-9


# Exact W2 --------------------------------------------------------------------------------------


def test_w2_hand_cases():
    x = np.array([[0.0, 0.0], [2.0, 0.0]])
    assert w2(x, np.array([[2.0, 1.0], [0.0, 1.0]])) == pytest.approx(1.0, rel=1e-12)
    assert w2(x, x[::-1]) == pytest.approx(0.0, abs=1e-12)
    # One point against two: every unit of mass must travel, W2^2 = mean squared distance.
    assert w2(np.array([[0.0]]), np.array([[1.0], [3.0]])) == pytest.approx(math.sqrt(5.0))


def test_w2_translation_gives_norm_of_shift():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 3))
    v = np.array([0.3, -1.2, 2.0])
    assert w2(torch.from_numpy(x), torch.from_numpy(x + v)) == pytest.approx(
        float(np.linalg.norm(v)), rel=1e-9
    )


def test_w2_matches_linear_sum_assignment():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((50, 2)), rng.standard_normal((50, 2)) * 1.5 + 0.3
    cost = cdist(x, y, "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    assert w2(x, y) == pytest.approx(math.sqrt(cost[rows, cols].mean()), rel=1e-9)


def test_w2_two_thousand_points():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2000, 2))
    y = rng.standard_normal((2000, 2)) + np.array([3.0, 0.0])
    assert w2(x, y) == pytest.approx(3.0, abs=0.2)


# Sliced W2 -------------------------------------------------------------------------------------


def test_swd_deterministic_and_zero_on_identical_sets():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((300, 4)), rng.standard_normal((300, 4)) + 0.5
    assert swd(x, y, seed=3) == swd(x, y, seed=3)
    assert swd(x, y, seed=3) != swd(x, y, seed=4)
    assert swd(x, x) == 0.0
    assert swd(x, x[rng.permutation(300)]) == 0.0


def test_swd_translation_along_axis():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((200, 2))
    t = 2.0
    shifted = x + np.array([t, 0.0])
    # Along a unit direction theta the shift is t * theta_1, and E[theta_1^2] = 1/D.
    assert swd(x, shifted, num_projections=4096) == pytest.approx(t / math.sqrt(2), rel=0.03)
    # Projections are 1-Lipschitz, so the sliced distance never exceeds the exact one.
    y = rng.standard_normal((200, 2)) * 0.5
    assert swd(x, y) <= w2(x, y) + 1e-12


@pytest.mark.parametrize("sizes", [(64, 64), (64, 40), (7, 3)])
def test_swd_is_exact_in_one_dimension(sizes):
    rng = np.random.default_rng(sum(sizes))
    x, y = rng.standard_normal((sizes[0], 1)), rng.exponential(size=(sizes[1], 1))
    exact = w2(x, y)
    assert swd(x, y, num_projections=5) == pytest.approx(exact, rel=1e-9)
    if sizes[0] == sizes[1]:
        sorted_w2 = math.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
        assert swd(x, y) == pytest.approx(sorted_w2, rel=1e-12)


# Likelihood and modes --------------------------------------------------------------------------


def test_gmm_nll_single_gaussian_matches_scipy():
    rng = np.random.default_rng(9)
    mean = np.array([0.5, -1.0])
    cov = np.array([[1.0, 0.3], [0.3, 0.5]])
    x = rng.multivariate_normal(mean, cov, size=400)
    dist = torch.distributions.MultivariateNormal(torch.tensor(mean), torch.tensor(cov))
    expected = -scipy.stats.multivariate_normal(mean, cov).logpdf(x).mean()
    assert gmm_nll(torch.from_numpy(x), dist.log_prob) == pytest.approx(expected, rel=1e-10)


def ring_modes(num_modes: int) -> np.ndarray:
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    return 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_mode_recall_and_high_quality_fraction():
    rng = np.random.default_rng(10)
    means, std = ring_modes(8), 0.1
    all_modes = means[rng.integers(0, 8, size=800)] + std * rng.standard_normal((800, 2))
    assert mode_recall(all_modes, means, std) == 1.0
    # A 2-D Gaussian sample lies beyond 3 std with probability exp(-4.5) ~ 1.1%.
    expected_hq = 1.0 - math.exp(-4.5)
    assert high_quality_fraction(all_modes, means, std) == pytest.approx(expected_hq, abs=0.01)

    half_modes = means[rng.integers(0, 4, size=800)] + std * rng.standard_normal((800, 2))
    assert mode_recall(half_modes, means, std) == 0.5

    # Half the samples sit at the centre, far from every mode.
    mixed = np.concatenate([all_modes[:400], np.zeros((400, 2))])
    assert high_quality_fraction(mixed, means, std) == pytest.approx(expected_hq / 2, abs=0.01)
    # A mode with a handful of samples is below min_fraction * N / K and is not recovered.
    sparse = np.concatenate([half_modes, means[4:5] + np.zeros((5, 2))])
    assert mode_recall(sparse, means, std) == 0.5
    assert mode_recall(sparse, means, std, min_fraction=0.0) == 1.0


# Streaming accumulators ------------------------------------------------------------------------


def test_point_metrics_matches_functions():
    rng = np.random.default_rng(11)
    means, std = ring_modes(4), 0.2
    ref = torch.from_numpy(means[rng.integers(0, 4, 300)] + std * rng.standard_normal((300, 2)))
    x = torch.from_numpy(means[rng.integers(0, 4, 300)] + std * rng.standard_normal((300, 2)))

    def log_prob(z: torch.Tensor) -> torch.Tensor:
        comps = torch.distributions.Normal(torch.from_numpy(means), std).log_prob(z[:, None, :])
        return torch.logsumexp(comps.sum(-1), dim=1) - math.log(4)

    names = ["w2", "fd", "swd", "nll", "mode_recall", "hq_fraction"]
    acc = PointMetrics(ref, log_prob, torch.from_numpy(means), std, names)
    assert isinstance(acc, MetricAccumulator)
    assert acc.names == tuple(names)
    for chunk in torch.split(x, [100, 7, 193]):
        acc.update(chunk)
    out = acc.compute()
    assert out == pytest.approx(
        {
            "w2": w2(x, ref),
            "fd": fd(x, ref),
            "swd": swd(x, ref),
            "nll": gmm_nll(x, log_prob),
            "mode_recall": mode_recall(x, means, std),
            "hq_fraction": high_quality_fraction(x, means, std),
        },
        rel=1e-12,
    )
    assert all(isinstance(v, float) for v in out.values())


def test_point_metrics_validates_requests():
    ref = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="nll"):
        PointMetrics(ref, None, None, None, ["nll"])
    with pytest.raises(ValueError, match="mode_recall"):
        PointMetrics(ref, None, None, 0.1, ["mode_recall"])
    with pytest.raises(ValueError, match="valid"):
        PointMetrics(ref, None, None, None, ["fid"])
    with pytest.raises(ValueError, match="before any update"):
        PointMetrics(ref, None, None, None, ["fd"]).compute()


def test_feature_frechet_streaming_matches_all_at_once():
    gen = torch.Generator().manual_seed(12)
    proj = torch.randn(5, 12, generator=gen, dtype=torch.float64)

    def extractor(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ proj) + 100.0  # a large offset stresses the covariance merge

    ref = torch.randn(700, 5, generator=gen, dtype=torch.float64)
    x = 0.8 * torch.randn(1000, 5, generator=gen, dtype=torch.float64) + 0.1
    ref_stats = feature_stats(extractor, ref, batch_size=128)
    ref_mu, ref_sigma = gaussian_stats(extractor(ref))
    np.testing.assert_allclose(ref_stats[0], ref_mu, rtol=1e-12)
    np.testing.assert_allclose(ref_stats[1], ref_sigma, rtol=1e-8, atol=1e-12)

    acc = FeatureFrechet(extractor, ref_stats, name="fcd_test")
    assert isinstance(acc, MetricAccumulator)
    for chunk in torch.split(x, [1, 2, 300, 97, 600]):
        acc.update(chunk)
    expected = frechet_distance(*gaussian_stats(extractor(x)), ref_mu, ref_sigma)
    assert acc.compute()["fcd_test"] == pytest.approx(expected, rel=1e-8)


def test_running_moments_sum_a_devices_features_there_as_numpy_sums_the_hosts():
    """Features on the CPU are summed in numpy; the device path (tensors on a GPU, or on_device
    for CPU tensors) keeps float64 tensor sums where the features are and gives the same mean
    and covariance, equal to those of all the features at once; later batches of another kind
    follow the first one's path."""
    from bench.metrics.base import RunningMoments

    gen = torch.Generator().manual_seed(3)
    offset = torch.linspace(0.0, 100.0, 64)  # a large offset stresses the merge
    batches = [torch.randn(n, 64, generator=gen) * 2 + offset for n in (1, 200, 37, 500)]
    host, device = RunningMoments(), RunningMoments(on_device=True)
    for batch in batches:
        host.update(batch)
        device.update(batch)
    assert isinstance(host.m2, np.ndarray)
    assert isinstance(device.m2, torch.Tensor) and device.m2.dtype == torch.float64
    everything = torch.cat(batches).double().numpy()
    for mu, sigma in (host.stats(), device.stats()):
        assert isinstance(mu, np.ndarray) and isinstance(sigma, np.ndarray)
        np.testing.assert_allclose(mu, everything.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(everything, rowvar=False), rtol=1e-9,
                                   atol=1e-12)
    np.testing.assert_allclose(device.stats()[1], host.stats()[1], rtol=1e-12, atol=1e-12)
    device.update(batches[0].numpy())  # an array after tensors: summed on the tensors' path
    host.update(batches[0].numpy())
    assert isinstance(device.m2, torch.Tensor)
    np.testing.assert_allclose(device.stats()[1], host.stats()[1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="non-empty"):
        RunningMoments(on_device=True).update(torch.zeros(0, 4))


# Digits classifier -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(data.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    num_train = int(0.8 * len(labels))
    train, test = order[:num_train], order[num_train:]
    return images[train], labels[train], images[test], labels[test]


@pytest.fixture(scope="module")
def cached_classifier(
    digits_split, tmp_path_factory
) -> tuple[Path, DigitsClassifier, float]:
    cache_dir = tmp_path_factory.mktemp("digits_cache")
    model, acc = load_or_train_digits_classifier(cache_dir, *digits_split)
    return cache_dir, model, acc


def test_digits_training_is_bitwise_deterministic(digits_split, cached_classifier):
    global_state = torch.get_rng_state()
    first = train_digits_classifier(digits_split[0], digits_split[1]).state_dict()
    second = train_digits_classifier(digits_split[0], digits_split[1]).state_dict()
    assert torch.equal(global_state, torch.get_rng_state())  # no global RNG consumed
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    cached = cached_classifier[1].state_dict()
    assert all(torch.equal(first[key], cached[key]) for key in first)


def test_digits_classifier_accuracy_and_features(digits_split, cached_classifier):
    _, model, acc = cached_classifier
    assert acc >= 0.95
    assert not model.training
    test_x = digits_split[2]
    assert model.features(test_x).shape == (test_x.shape[0], 64)
    assert model(test_x).shape == (test_x.shape[0], 10)
    # The test split is far closer to the training split than noise is, in feature space.
    train_stats = feature_stats(model.features, digits_split[0])
    real = FeatureFrechet(model.features, train_stats)
    real.update(test_x)
    noise = FeatureFrechet(model.features, train_stats)
    noise.update(torch.rand(test_x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert 0 <= real.compute()["fcd"] < 0.1 * noise.compute()["fcd"]


def test_digits_cache_is_reused_and_keyed_by_data(digits_split, cached_classifier):
    cache_dir, model, _ = cached_classifier
    train_x, train_y, test_x, test_y = digits_split
    path = digits_cache_path(cache_dir, train_x, train_y)
    assert sorted(cache_dir.iterdir()) == [path]  # no temp files left behind
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

    # Plant recognisable weights: a second call must load them rather than retrain.
    state["head.bias"] = torch.full_like(state["head.bias"], 7.0)
    torch.save(state, path)
    mtime = os.stat(path).st_mtime_ns
    reloaded, _ = load_or_train_digits_classifier(cache_dir, train_x, train_y, test_x, test_y)
    assert torch.equal(reloaded.head.bias, torch.full((10,), 7.0))
    assert os.stat(path).st_mtime_ns == mtime
    assert not reloaded.training

    changed_x, changed_y = train_x[1:], train_y[1:]
    load_or_train_digits_classifier(cache_dir, changed_x, changed_y, test_x, test_y)
    other = digits_cache_path(cache_dir, changed_x, changed_y)
    assert other != path
    assert sorted(cache_dir.iterdir()) == sorted([path, other])
