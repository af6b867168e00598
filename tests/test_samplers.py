"""Samplers and schedules against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from bench.diffusion.denoiser import AnalyticDenoiser, Denoiser, cm_scalings, edm_scalings
from bench.diffusion.rng import SobolGenerator, StackedGenerator
from bench.diffusion.samplers import CallCounter, sample_consistency, sample_euler, sample_heun
from bench.diffusion.schedules import karras_sigmas, sampling_sigmas

S = 0.7  # std of the Gaussian data N(0, S^2 I)
T = 80.0
SIGMA_END = 0.5


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x] for data N(0, S^2 I)."""
    return S**2 / (S**2 + sigma.reshape(-1, *([1] * (x.ndim - 1)))**2) * x


def exact_solution(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """PF-ODE solution x(sigma) = x(T) sqrt((S^2 + sigma^2) / (S^2 + T^2))."""
    return x_t * math.sqrt((S**2 + sigma**2) / (S**2 + T**2))


def solve_error(solver, n: int) -> float:  # noqa: ANN001
    x_t = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * T
    sigmas = karras_sigmas(n + 1, SIGMA_END, T).flip(0)
    out = solver(gaussian_denoiser, x_t, sigmas)
    return float((out - exact_solution(x_t, SIGMA_END)).abs().max())


def test_karras_grid_matches_formula() -> None:
    grid = karras_sigmas(18)
    assert grid[0].item() == pytest.approx(0.002) and grid[-1].item() == pytest.approx(80.0)
    assert torch.all(grid[1:] > grid[:-1])
    i = 5
    expected = (0.002 ** (1 / 7) + i / 17 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert grid[i].item() == pytest.approx(expected, rel=1e-12)
    assert karras_sigmas(1).tolist() == [80.0]
    sched = sampling_sigmas(4)
    assert sched[-1].item() == 0.0 and len(sched) == 5


def test_euler_converges_at_order_one() -> None:
    e1, e2, e3 = (solve_error(sample_euler, n) for n in (64, 128, 256))
    assert 1.8 < e1 / e2 < 2.2 and 1.8 < e2 / e3 < 2.2


def test_heun_converges_at_order_two() -> None:
    e1, e2, e3 = (solve_error(sample_heun, n) for n in (32, 64, 128))
    assert 3.6 < e1 / e2 < 4.4 and 3.6 < e2 / e3 < 4.4


def test_heun_costs_two_n_minus_one_calls() -> None:
    counter = CallCounter(gaussian_denoiser)
    sample_heun(counter, torch.randn(4, 2, dtype=torch.float64) * T, sampling_sigmas(18))
    assert counter.calls == 35
    counter = CallCounter(gaussian_denoiser)
    sample_euler(counter, torch.randn(4, 2, dtype=torch.float64) * T, sampling_sigmas(7))
    assert counter.calls == 7


def test_full_solve_to_zero_is_exact_for_gaussian_data() -> None:
    x_t = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sample_heun(gaussian_denoiser, x_t * T, sampling_sigmas(256))
    expected = exact_solution(x_t * T, 0.0)
    assert torch.allclose(out, expected, atol=2e-3)


def test_consistency_boundary_condition_is_exact() -> None:
    sigma = torch.tensor([0.002], dtype=torch.float32)
    c_skip, c_out, _ = cm_scalings(sigma, 0.5, 0.002)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    net = torch.nn.Linear(3, 2)
    model = Denoiser(lambda x, c, y=None: net(torch.cat([x, c[:, None]], 1)),  # type: ignore
                     sigma_data=0.5, precond="cm")
    x = torch.randn(5, 2)
    assert torch.equal(model(x, torch.full((5,), 0.002)), x)


def test_edm_scalings_match_table() -> None:
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm_scalings(sigma, 0.5)
    assert torch.allclose(c_skip, 0.25 / (sigma**2 + 0.25))
    assert torch.allclose(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    assert torch.allclose(c_in, 1 / (sigma**2 + 0.25).sqrt())


def test_multistep_consistency_sampling_uses_one_call_per_level() -> None:
    counter = CallCounter(gaussian_denoiser)
    rng = StackedGenerator(0, range(8))
    out = sample_consistency(counter, rng.randn((2,)) * 80, torch.tensor([80.0, 0.8, 0.1]), rng,
                             0.002, clamp=(-1.0, 1.0))
    assert counter.calls == 3 and out.abs().max() <= 1.0


def test_per_sample_noise_does_not_depend_on_the_batch() -> None:
    whole = StackedGenerator(3, range(10)).randn((4,))
    part = StackedGenerator(3, range(6, 10)).randn((4,))
    assert torch.equal(whole[6:], part)
    assert not torch.equal(StackedGenerator(4, range(10)).randn((4,)), whole)


def test_analytic_denoiser_wraps_exact_posterior_mean() -> None:
    model = AnalyticDenoiser(gaussian_denoiser)
    x = torch.randn(7, 2)
    out = model(x, torch.tensor(1.5))
    assert out.dtype == torch.float32
    assert torch.allclose(out, S**2 / (S**2 + 2.25) * x, atol=1e-6)


def test_per_sample_noise_is_standard_normal_and_independent() -> None:
    from scipy import stats

    rng = StackedGenerator(0, range(20000))
    z = rng.randn((8,)).double()
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3
    again = rng.randn((8,)).double()
    for a, b in ((z[:, 0], z[:, 1]), (z[:-1, 0], z[1:, 0]), (z[:, 0], again[:, 0])):
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.03


def test_sobol_noise_is_per_sample_and_normal() -> None:
    from scipy import stats

    whole = SobolGenerator(3, range(4096))
    first, second = whole.randn((2,)).double(), whole.randn((2,)).double()
    part = SobolGenerator(3, range(1000, 1500))
    assert torch.equal(part.randn((2,)).double(), first[1000:1500])  # batch never matters
    assert torch.equal(part.randn((2,)).double(), second[1000:1500])
    assert not torch.equal(SobolGenerator(4, range(4096)).randn((2,)).double(), first)
    with pytest.raises(ValueError, match="contiguous"):
        SobolGenerator(3, [0, 2, 4])
    joint = torch.cat([first, second], dim=1)
    for column in joint.T:
        assert stats.kstest(column.numpy(), "norm").pvalue > 1e-3
    assert torch.corrcoef(joint.T).sub(torch.eye(4)).abs().max() < 0.03
    # the point of quasi-random noise: 2-D quadrant counts of 4096 points are almost exact
    quadrant = (first[:, 0] > 0).long() * 2 + (first[:, 1] > 0).long()
    counts = torch.bincount(quadrant, minlength=4)
    assert (counts - 1024).abs().max() <= 4
    plain = StackedGenerator(3, range(4096)).randn((2,)).double()
    plain_counts = torch.bincount((plain[:, 0] > 0).long() * 2 + (plain[:, 1] > 0).long())
    assert (plain_counts - 1024).abs().max() > (counts - 1024).abs().max()


def test_sobol_noise_falls_back_to_streams_beyond_its_coordinates() -> None:
    rng = SobolGenerator(5, range(6), dims=4)
    rng.randn((2,))
    rng.randn((2,))  # the four Sobol coordinates are used up
    extra = rng.randn((2,))
    assert torch.isfinite(extra).all() and extra.shape == (6, 2)
    again = SobolGenerator(5, range(6), dims=4)
    again.randn((4,))
    assert torch.equal(again.randn((2,)), extra)  # the fallback streams are per-sample too
