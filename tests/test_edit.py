"""Zero-shot editing: the bases, the replacement, the exact mixture conditional, the one-call
edits, and `bench edit` end to end on tiny real runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench.app.edit import EditRequest, check_request, default_sigma
from bench.core.errors import UsageError
from bench.data.datasets import get_dataset
from bench.diffusion.editing import (
    ColourBasis,
    PatchBasis,
    PixelBasis,
    Replacement,
    colour_known,
    colour_matrix,
    edit_consistency,
    edit_levels,
    gmm_conditional_moments,
    gmm_conditional_sample,
    inpaint_mask,
    lerp,
    patch_known,
    patch_matrix,
    per_row_w2,
    psnr,
    slerp,
    stroke_edit,
    stroke_painting,
)
from bench.diffusion.rng import StackedGenerator
from bench.diffusion.samplers import CallCounter
from tests.conftest import run_id_of


def toy_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for f(x, sigma): shrinks x towards 0 by the EDM skip factor."""
    return x * (0.25 / (sigma**2 + 0.25)).reshape(-1, *([1] * (x.ndim - 1))) + 0.1


@pytest.mark.parametrize("matrix", [colour_matrix(), patch_matrix(2), patch_matrix(4)],
                         ids=["colour", "patch2", "patch4"])
def test_bases_are_orthonormal(matrix: torch.Tensor) -> None:
    eye = torch.eye(matrix.shape[0], dtype=torch.float64)
    torch.testing.assert_close(matrix @ matrix.T, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(matrix.T @ matrix, eye, atol=1e-12, rtol=0)


def test_first_basis_vectors_are_luminance_and_patch_mean() -> None:
    lum = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64)
    torch.testing.assert_close(colour_matrix()[0], lum / lum.norm())
    torch.testing.assert_close(patch_matrix(3)[0], torch.full((9,), 1 / 3, dtype=torch.float64))
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    means = torch.nn.functional.avg_pool2d(x, 3)
    coefficient0 = PatchBasis(3).encode(x)[..., 0]
    torch.testing.assert_close(coefficient0, 3 * means, atol=1e-5, rtol=0)


@pytest.mark.parametrize("basis", [ColourBasis(), PatchBasis(2), PatchBasis(4), PixelBasis()],
                         ids=["colour", "patch2", "patch4", "pixel"])
def test_decode_inverts_encode(basis: object) -> None:
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(basis.decode(basis.encode(x)), x, atol=1e-5, rtol=0)  # type: ignore[attr-defined]


def replacements() -> list[tuple[str, Replacement]]:
    mask = inpaint_mask("random", (3, 8, 8), 0, range(4))
    return [("pixels", Replacement(PixelBasis(), mask)),
            ("colour", Replacement(ColourBasis(), colour_known())),
            ("patch", Replacement(PatchBasis(2), patch_known(2)))]


@pytest.mark.parametrize(("name", "replacement"), replacements(),
                         ids=[n for n, _ in replacements()])
def test_replacement_keeps_the_observed_part(name: str, replacement: Replacement) -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    out = replacement.replace(x, y)
    a_out, a_x, a_y = (replacement.basis.encode(t) for t in (out, x, y))
    known = replacement.known.expand_as(a_out)
    if name == "pixels":  # A = I: bit for bit
        assert torch.equal(a_out[known], a_y[known])
    torch.testing.assert_close(a_out[known], a_y[known], atol=1e-5, rtol=0)
    torch.testing.assert_close(a_out[~known], a_x[~known], atol=1e-5, rtol=0)


def test_algorithm4_keeps_the_observation_and_spends_one_call_per_level() -> None:
    truth = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = inpaint_mask("center", (1, 8, 8), 0, range(5))
    assert int((~mask).sum()) == 16 and not bool(mask[0, 0, 3, 3])
    replacement = Replacement(PixelBasis(), mask)
    y = replacement.observe(truth, torch.zeros(1, 1, 8, 8))
    sigmas = edit_levels(4, 0.002, 80.0, 7.0)
    assert sigmas[0] == pytest.approx(80.0) and sigmas == sorted(sigmas, reverse=True)
    counter = CallCounter(toy_model)
    out = edit_consistency(counter, y, replacement, sigmas, StackedGenerator(0, range(5)),
                           0.002, (-1.0, 1.0))
    assert counter.calls == 4
    assert torch.equal(out[mask.expand_as(out)], truth[mask.expand_as(truth)])
    assert not torch.equal(out, y)
    # superres: the result's patch means are the observation's
    sr = Replacement(PatchBasis(2), patch_known(2))
    y = sr.observe(truth, torch.zeros(1, 1, 8, 8))
    out = edit_consistency(toy_model, y, sr, sigmas[:2], StackedGenerator(0, range(5)), 0.002)
    pool = torch.nn.functional.avg_pool2d
    torch.testing.assert_close(pool(out, 2), pool(truth, 2), atol=1e-5, rtol=0)
    # colorisation: the result has the grey image's luminance
    rgb = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(8)) * 2 - 1
    colour = Replacement(ColourBasis(), colour_known())
    y = colour.observe(rgb, torch.zeros(1, 3, 8, 8))
    out = edit_consistency(toy_model, y, colour, sigmas[:3], StackedGenerator(0, range(3)), 0.002)
    weights = torch.tensor([0.2989, 0.5870, 0.1140]).reshape(1, 3, 1, 1)
    torch.testing.assert_close((out * weights).sum(1), (rgb * weights).sum(1), atol=1e-5, rtol=0)
    assert not torch.allclose(out, rgb, atol=1e-2)


def test_random_masks_depend_on_the_image_index_only() -> None:
    whole = inpaint_mask("random", (1, 8, 8), 7, range(6))
    part = inpaint_mask("random", (1, 8, 8), 7, range(3, 6))
    assert torch.equal(whole[3:], part)
    assert 0.3 < float(whole.float().mean()) < 0.7
    half = inpaint_mask("half", (1, 8, 8), 0, range(1))
    assert bool(half[0, 0, 3].all()) and not bool(half[0, 0, 4].any())


def test_exact_conditional_of_the_mixture_matches_closed_form_and_rejection() -> None:
    gmm = get_dataset("gmm8")
    known = torch.tensor([True, False])
    x = torch.tensor([[0.0, 0.0], [0.70, 0.0], [0.95, 0.0], [-0.5, 0.0]], dtype=torch.float64)
    draws = gmm_conditional_sample(gmm, x, known, 40000, torch.Generator().manual_seed(4))
    assert draws.shape == (4, 40000, 2)
    assert torch.equal(draws[..., 0], x[:, None, 0].expand(4, 40000))
    mean, var = gmm_conditional_moments(gmm, x, known)
    torch.testing.assert_close(draws[..., 1].mean(1), mean[:, 0], atol=0.012, rtol=0)
    torch.testing.assert_close(draws[..., 1].var(1), var[:, 0], atol=0.012, rtol=0.02)
    # at x = 0.95 the component at angle 0 has nearly all the weight: y ~ N(0, 0.05^2)
    assert mean[2, 0] == pytest.approx(0.0, abs=1e-6)
    assert var[2, 0] == pytest.approx(0.0025, rel=0.01)
    # Monte-Carlo rejection: points of the mixture whose x lies within 0.005 of x = 0.70
    big = gmm.sample(4_000_000, torch.Generator().manual_seed(5)).double()
    near = big[(big[:, 0] - 0.70).abs() < 0.005, 1]
    assert near.numel() > 2000
    exact = draws[1, :, 1]
    # the two modes (y = +-0.707) get the same mass, and each the same shape
    assert float((near > 0).double().mean()) == pytest.approx(
        float((exact > 0).double().mean()), abs=0.02)
    assert per_row_w2(near[None, :2000].abs(), exact[None, :2000].abs())[0] < 0.01


def test_per_row_w2_is_the_sorted_matching() -> None:
    a = torch.tensor([[0.0, 1.0, 2.0]])
    b = torch.tensor([[2.0, 3.0, 1.0]])
    assert per_row_w2(a, b)[0] == pytest.approx(1.0)


def test_slerp_endpoints_and_norm() -> None:
    g = torch.Generator().manual_seed(6)
    z0, z1 = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0, atol=1e-6, rtol=0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1, atol=1e-6, rtol=0)
    u = z0 / z0.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    v = z1 / z1.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    mid = slerp(u, v, 0.5).flatten(1).norm(dim=1)
    torch.testing.assert_close(mid, torch.ones(3), atol=1e-5, rtol=0)  # stays on the sphere
    assert bool((lerp(u, v, 0.5).flatten(1).norm(dim=1) < 0.9).all())  # lerp cuts inside
    torch.testing.assert_close(slerp(z0, z0, 0.3), z0, atol=1e-5, rtol=0)  # parallel


def test_stroke_painting_and_sdedit() -> None:
    y = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    stroke = stroke_painting(y, 2)
    levels = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
    assert bool((stroke[..., None] - levels).abs().min(-1).values.lt(1e-6).all())
    assert torch.equal(stroke[..., 0:2, 0:2], stroke[..., 0:1, 0:1].expand(-1, -1, 2, 2))
    counter = CallCounter(toy_model)
    out = stroke_edit(counter, stroke, edit_levels(3, 0.002, 1.0, 7.0),
                      StackedGenerator(0, range(4)), 0.002, (-1.0, 1.0))
    assert counter.calls == 3 and out.shape == y.shape and float(out.abs().max()) <= 1.0


def test_psnr() -> None:
    truth = torch.zeros(2, 1, 4, 4)
    x = truth.clone()
    x[0] += 0.2  # MSE 0.04 on a range of 2: 10 log10(4 / 0.04) = 20 dB
    x[1, 0, 0, 0] = 2.0  # MSE 4 / 16
    torch.testing.assert_close(psnr(x, truth), torch.tensor([20.0, 10 * math.log10(16)],
                                                            dtype=torch.float64))


@pytest.mark.parametrize(("task", "dataset", "method", "fragment"), [
    ("colorize", "digits", "cd", "colorisation needs a colour dataset; digits has 1 channel"),
    ("inpaint", "digits", "edm", "needs a consistency model run (cd, scd, ct, ict, ect, sct)"),
    ("inpaint", "digits", "ddim", "run 0123 is ddim"),
    ("superres", "digits", "ct", "--factor must be >= 2 and divide"),
    ("denoise", "gmm8", "cd", "only --task inpaint"),
    ("inpaint", "moons", "cd", "use gmm8 or gmm25"),
    ("paint", "digits", "cd", "unknown task 'paint'"),
])
def test_bad_requests_are_usage_errors(task: str, dataset: str, method: str,
                                       fragment: str) -> None:
    request = EditRequest(run_id="0123", task=task, factor=3)
    with pytest.raises(UsageError, match=None) as info:
        check_request(request, get_dataset(dataset), method)
    assert fragment in str(info.value)
    check_request(EditRequest(run_id="0123", task="superres", factor=4), get_dataset("digits"),
                  "ict")
    with pytest.raises(UsageError, match="exactly one network call"):
        check_request(EditRequest(run_id="0123", task="denoise", nfe=(1, 2)),
                      get_dataset("digits"), "cd")


def test_default_start_levels() -> None:
    # Algorithm 4 on images starts at half sigma_data (never above sigma_max), on 2-D mixtures
    # at sigma_max; the one-call and stroke tasks keep their own
    digits, gmm8 = get_dataset("digits"), get_dataset("gmm8")
    for task in ("inpaint", "colorize", "superres"):
        assert default_sigma(task, digits, 80.0) == pytest.approx(0.25)
        assert default_sigma(task, digits, 0.1) == 0.1
        assert default_sigma(task, gmm8, 80.0) == 80.0
    assert default_sigma("denoise", digits, 80.0) == 0.5
    assert default_sigma("stroke", digits, 80.0) == 1.0
    assert default_sigma("interpolate", digits, 80.0) is None
    levels = edit_levels(4, 0.002, 0.25, 7.0)
    assert levels[0] == pytest.approx(0.25) and levels == sorted(levels, reverse=True)
    assert len(levels) == 4 and levels[-1] > 0.002


# --- end to end -------------------------------------------------------------------------------

TINY_NET = ["--set", "net.model_channels=8", "--set", "net.channel_mult=[1]",
            "--set", "net.attn_resolutions=[]", "--set", "eval.num_samples=64",
            "--set", "eval.batch_size=64"]


def test_bench_edit_with_an_unknown_run_is_one_line(bench) -> None:  # noqa: ANN001
    result = bench("edit", "--run", "0" * 32, "--task", "inpaint")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown run id" in lines[0], result.stderr


@pytest.mark.slow
def test_bench_edit_on_digits_logs_a_nested_run(bench, tmp_path: Path) -> None:  # noqa: ANN001
    from mlflow.tracking import MlflowClient

    wide = {"COLUMNS": "200"}
    result = bench("run", "--method", "edm", "--dataset", "digits", "--steps", "2", "--nfe", "1",
                   *TINY_NET)
    assert result.returncode == 0, result.stderr
    edm_id = run_id_of(result.stdout)
    result = bench("run", "--method", "cd", "--dataset", "digits", "--steps", "2", "--nfe", "1",
                   "--teacher", edm_id, *TINY_NET)
    assert result.returncode == 0, result.stderr
    cd_id = run_id_of(result.stdout)

    result = bench("edit", "--run", cd_id, "--task", "inpaint", "--n", "8", "--nfe", "1,2",
                   env=wide)
    assert result.returncode == 0, result.stderr
    assert "psnr_baseline" in result.stdout and "fcd_truth" in result.stdout
    edit_id = run_id_of(result.stdout)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(edit_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == cd_id
    assert run.data.tags["edit"] == "inpaint" and "method" not in run.data.tags
    assert run.data.params["edit.sigma"] == "0.25" and run.data.tags["sigmas_nfe1"] == "[0.25]"
    assert run.info.experiment_id == client.get_run(cd_id).info.experiment_id
    for key in ("psnr", "psnr_baseline", "fcd", "fcd_baseline", "fcd_truth", "nfe_measured"):
        assert sorted(m.step for m in client.get_metric_history(edit_id, key)) == [1, 2], key
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    for name in ("edit/nfe001.png", "edit/nfe002.png", "edit/results.csv"):
        assert (artifacts / name).is_file(), name

    result = bench("edit", "--run", cd_id, "--task", "denoise", "--n", "4")
    assert result.returncode == 0, result.stderr
    rid = run_id_of(result.stdout)
    assert [m.step for m in client.get_metric_history(rid, "nfe_measured")] == [1]

    for args, code, fragment in (
            (["--run", cd_id, "--task", "colorize"], 2, "colorisation needs a colour dataset"),
            (["--run", edm_id, "--task", "inpaint"], 2, "is edm"),
            (["--run", cd_id, "--task", "interpolate", "--nfe", "2"], 2, "exactly one"),
            (["--run", cd_id, "--task", "inpaint", "--n", "400"], 2, "355 held-out images")):
        result = bench("edit", *args)
        assert result.returncode == code, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and fragment in lines[0], result.stderr
        assert "Traceback" not in result.stderr
    edit_runs = client.search_runs([run.info.experiment_id], "tags.edit != ''")
    assert len(edit_runs) == 2 and {r.info.status for r in edit_runs} == {"FINISHED"}


@pytest.mark.slow
def test_gmm8_conditional_w2_beats_unconditional(bench, tmp_path: Path) -> None:  # noqa: ANN001
    from mlflow.tracking import MlflowClient

    result = bench("run", "--method", "cd", "--dataset", "gmm8", "--teacher", "analytic",
                   "--steps", "1500", "--nfe", "1", "--set", "eval.num_samples=500")
    assert result.returncode == 0, result.stderr
    result = bench("edit", "--run", run_id_of(result.stdout), "--task", "inpaint", "--n", "16",
                   "--nfe", "1,2,4,8")
    assert result.returncode == 0, result.stderr
    rid = run_id_of(result.stdout)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    w2 = {m.step: m.value for m in client.get_metric_history(rid, "w2")}
    free = {m.step: m.value for m in client.get_metric_history(rid, "w2_unconditional")}
    # at 1 NFE from sigma_max the edit is the unconditional sample (the observed coordinate
    # drowned in 80 z); each later level lets the replaced coordinate steer the hidden one
    assert abs(w2[1] - free[1]) < 0.01, (w2, free)
    for nfe in (2, 4, 8):
        assert w2[nfe] < free[nfe], (w2, free)
