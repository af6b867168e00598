"""The Method contract, checked for every registered method through one parametrized fixture,
plus the consistency-model specifics (Song et al. 2023; Song & Dhariwal 2023)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.core.config import RunConfig, resolve
from bench.data.datasets import get_dataset
from bench.diffusion.denoiser import Denoiser
from bench.diffusion.schedules import ct_mu_schedule, ct_n_schedule, ict_n_schedule
from bench.engine.evaluation import generate
from bench.engine.models import model_spec, new_raw_net
from bench.engine.training import new_loop_state
from methods import Method, MethodContext, get_method, method_names
from methods.consistency import pseudo_huber
from methods.ct import CT

SETS = ["net.width=32", "net.depth=2", "net.emb_dim=16", "train.steps=100", "eval.nfe=[1]",
        "sampler=euler", "pd.initial_steps=4", "pd.iters_per_stage=10", "cd.n_scales=10",
        "ct.s1=20", "ict.s0=4", "ict.s1=32", "net.dropout=0.1"]


def build(name: str, extra: list[str] = ()) -> tuple[Method, RunConfig]:  # type: ignore[assignment]
    cfg = resolve(bench_files=[], flags={"method": name, "dataset": "gmm8"},
                  sets=[*SETS, *extra]).config
    ds = get_dataset("gmm8")
    teacher_cfg = resolve(bench_files=[], flags={"method": "edm", "dataset": "gmm8"},
                          sets=[*SETS, *extra]).config
    spec = model_spec(teacher_cfg, ds, "edm")
    teacher = Denoiser(new_raw_net(spec, 7), sigma_data=ds.sigma_data, precond="edm")
    teacher.eval().requires_grad_(False)
    cls = get_method(name)
    cm_spec = model_spec(cfg, ds, cls.precond)
    ctx = MethodContext(config=cfg, dataset=ds, device=torch.device("cpu"),
                        sigma_data=ds.sigma_data, teacher=teacher if cls.needs_teacher else None,
                        teacher_source="test", new_net=lambda: new_raw_net(cm_spec, 3))
    return cls(ctx), cfg


@pytest.fixture(params=method_names())
def method_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def samples(method: Method, ema: torch.nn.Module | None, nfe: int) -> torch.Tensor:
    out: list[torch.Tensor] = []
    model = method.evaluation_model(ema, nfe)
    generate(method, model, method.ctx.dataset, nfe, 64, 32, 5, torch.device("cpu"), False,
             out.append)
    return torch.cat(out)


def test_contract(method_name: str) -> None:
    torch.manual_seed(0)
    method, cfg = build(method_name)
    teacher = method.ctx.teacher
    teacher_before = copy.deepcopy(teacher.state_dict()) if teacher is not None else None
    state = new_loop_state(method, cfg.train, 0, torch.device("cpu"))
    nfe = 1
    method.check_nfe(nfe)
    if method.trains:
        student = method.student
        assert student is not None
        x0 = method.ctx.dataset.train()[:64]
        loss = method.loss(x0, None, 0, state.generator)
        assert loss.shape == (64,) and torch.isfinite(loss).all()
        before = copy.deepcopy(student.state_dict())
        state.optimizer.zero_grad()
        loss.mean().backward()
        trained = {id(p) for group in method.parameters() for p in group["params"]}
        for name, module in method.extra_modules().items():
            # a target network takes no gradient; a module the optimizer trains (sCM's
            # learned weighting) takes one
            for p in module.parameters():
                assert (p.grad is not None) == (id(p) in trained), name
        state.optimizer.step()
        method.after_step(0, state.ema)
        assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    if teacher is not None:
        for k, v in teacher.state_dict().items():
            assert torch.equal(teacher_before[k], v), k
    first = samples(method, state.ema, nfe)
    assert torch.isfinite(first).all() and first.shape == (64, 2)
    assert torch.equal(first, samples(method, state.ema, nfe))
    # checkpoint round trip into a freshly built method
    fresh, _ = build(method_name)
    fresh_state = new_loop_state(fresh, cfg.train, 0, torch.device("cpu"))
    if method.student is not None:
        fresh.student.load_state_dict(method.student.state_dict())
    for name, module in fresh.extra_modules().items():
        module.load_state_dict(method.extra_modules()[name].state_dict())
    if state.ema is not None:
        fresh_state.ema.load_state_dict(state.ema.state_dict())
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(first, samples(fresh, fresh_state.ema, nfe))


def test_consistency_boundary_holds_for_trained_students() -> None:
    for name in ("cd", "ct", "ict"):
        method, _ = build(name)
        x = torch.randn(8, 2)
        assert torch.equal(method.student(x, torch.full((8,), 0.002)), x)


def test_ct_schedules_match_the_formulas() -> None:
    k_total, s0, s1, mu0 = 800_000, 2, 150, 0.9
    assert ct_n_schedule(0, k_total, s0, s1) == s0
    assert ct_n_schedule(k_total, k_total, s0, s1) == s1 + 1
    k = 123_456
    expected = math.ceil(math.sqrt(k / k_total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
    n = ct_n_schedule(k, k_total, s0, s1)
    assert n == expected
    assert ct_mu_schedule(n, s0, mu0) == pytest.approx(math.exp(s0 * math.log(mu0) / n))
    assert ct_mu_schedule(n, s0, mu0, official=True) == pytest.approx(
        math.exp(s0 * math.log(mu0) / (n - 1)))
    # iCT doubling curriculum: K' = floor(K / (log2 floor(s1/s0) + 1))
    k_prime = math.floor(400_000 / (math.log2(128) + 1))
    assert ict_n_schedule(0, 400_000, 10, 1280) == 11
    assert ict_n_schedule(k_prime, 400_000, 10, 1280) == 21
    assert ict_n_schedule(400_000, 400_000, 10, 1280) == 1281


def test_ct_x_hat_uses_the_same_noise() -> None:
    method, _ = build("ct")
    assert isinstance(method, CT)
    x0 = torch.randn(16, 2)
    z = torch.randn(16, 2)
    sigma_next, sigma = torch.rand(16) + 1, torch.rand(16)
    x = x0 + sigma_next[:, None] * z
    out = method.x_hat(x0, x, z, sigma_next, sigma, None)
    assert torch.equal(out, x0 + sigma[:, None] * z)


def test_pseudo_huber_hand_computed() -> None:
    d = pseudo_huber(0.5)
    x = torch.tensor([[3.0, 4.0]])
    y = torch.zeros(1, 2)
    # sqrt(3^2 + 4^2 + 0.5^2) - 0.5
    assert d(x, y).item() == pytest.approx(math.sqrt(25.25) - 0.5, rel=1e-6)


def test_online_and_target_share_the_dropout_mask() -> None:
    """With mu = 0 and x_hat == x (sigma_n = sigma_{n+1}), the loss is exactly zero only if
    both passes drew the same dropout mask."""
    method, _ = build("ct", ["net.dropout=0.5"])
    assert isinstance(method, CT)
    method.x_hat = lambda x0, x, z, sn, s, y: x  # type: ignore[method-assign]
    method.target = method.student
    method.grid = lambda n: torch.full((n,), 1.0)  # type: ignore[method-assign]
    loss = method.loss(torch.randn(32, 2), None, 0, torch.Generator().manual_seed(0))
    assert torch.equal(loss, torch.zeros(32))


def test_ict_index_distribution_is_the_discretised_lognormal() -> None:
    method, _ = build("ict")
    probs = method.index_probs(11)  # type: ignore[attr-defined]
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6) and (probs >= 0).all()
    sigmas = method.grid(11).double()
    mid = (sigmas[1:].log() + sigmas[:-1].log()) / 2
    # the mode of the index distribution sits near exp(P_mean) = 0.33
    assert abs(mid[int(probs.argmax())].exp().item() - math.exp(-1.1)) < 1.0


def test_consistency_weighting_is_configurable() -> None:
    """Uniform lambda (the paper's CD/CT) leaves the distance as is; inverse_gap divides each
    sample's distance by t_{n+1} - t_n, the same weight iCT always uses."""
    x0 = torch.randn(64, 2)
    losses = {}
    for weighting in ("uniform", "inverse_gap"):
        method, _ = build("cd", [f'cd.weighting="{weighting}"', "net.dropout=0.0"])
        losses[weighting] = method.loss(x0, None, 0, torch.Generator().manual_seed(4))
    grid = method.grid(10)
    n = torch.randint(0, 9, (64,), generator=torch.Generator().manual_seed(4))
    gap = grid[n + 1] - grid[n]
    torch.testing.assert_close(losses["inverse_gap"], losses["uniform"] / gap)
    ict, _ = build("ict")
    assert ict.weighting == "inverse_gap"
    assert build("ct")[0].weighting == "uniform"
    with pytest.raises(Exception, match="cd.weighting"):
        build("cd", ['cd.weighting="snr"'])


def test_cd_lognormal_indices_match_icts_distribution() -> None:
    cd, _ = build("cd", ['cd.indices="lognormal"', "cd.p_mean=-1.1", "cd.p_std=2.0"])
    ict, _ = build("ict")
    torch.testing.assert_close(cd.index_probs(11), ict.index_probs(11))
    uniform, _ = build("cd")
    torch.testing.assert_close(uniform.index_probs(11), torch.full((10,), 0.1))
    n = cd.draw_indices(11, 4000, torch.Generator().manual_seed(0))
    assert n.min() >= 0 and n.max() <= 9


def test_image_samples_are_scored_inside_the_data_range() -> None:
    """generate clips image samples to the dataset's range; 2-D samples are left alone."""
    from bench.perf.run import SyntheticImages

    images = SyntheticImages((1, 4, 4), size=8)
    for dataset, expected in ((images, 1.0), (get_dataset("gmm8"), 3.0)):
        cfg = resolve(bench_files=[], flags={"method": "edm", "dataset": "gmm8"},
                      sets=["sampler=euler", "net.model_channels=8", "net.channel_mult=[1]",
                            "net.attn_resolutions=[]", "net.num_res_blocks=1"]).config
        spec = model_spec(cfg, dataset, "edm")
        ctx = MethodContext(config=cfg, dataset=dataset, device=torch.device("cpu"),
                            sigma_data=dataset.sigma_data, teacher=None, teacher_source="",
                            new_net=lambda spec=spec: new_raw_net(spec, 0))
        method = get_method("edm")(ctx)
        out: list[torch.Tensor] = []

        class Constant(torch.nn.Module):
            def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: object = None,
                        ) -> torch.Tensor:
                return torch.full_like(x, 3.0)

        generate(method, Constant(), dataset, 1, 4, 4, 0, torch.device("cpu"), False, out.append)
        assert torch.equal(out[0], torch.full_like(out[0], expected))


def test_quasi_random_evaluation_lowers_the_w2_floor(tmp_path) -> None:
    """DDIM with 64 steps on the exact denoiser is close to exact sampling: with quasi-random
    noise and the stratified reference its w2 is below that of random noise and draws (0.07
    to 0.16 between two random draws of the data, README)."""
    from bench.core.errors import UsageError
    from bench.diffusion.denoiser import AnalyticDenoiser
    from bench.engine.evaluation import evaluate, prepare_metrics, uses_qmc
    from bench.perf.run import SyntheticImages

    dataset = get_dataset("gmm8")
    w2: dict[str, float] = {}
    for noise in ("random", "qmc"):
        cfg = resolve(bench_files=[], flags={"method": "ddim", "dataset": "gmm8"},
                      sets=[f"eval.noise='{noise}'", "eval.metrics=['w2']"]).config
        ctx = MethodContext(config=cfg, dataset=dataset, device=torch.device("cpu"),
                            sigma_data=dataset.sigma_data,
                            teacher=AnalyticDenoiser(dataset.denoise), teacher_source="analytic",
                            new_net=lambda: torch.nn.Identity())
        method = get_method("ddim")(ctx)
        suite = prepare_metrics(dataset, cfg, tmp_path)
        result = evaluate(method, None, dataset, cfg, [64], suite, torch.device("cpu"))[0]
        w2[noise] = result.metrics["w2"]
    assert w2["qmc"] < 0.06 and w2["qmc"] < w2["random"], w2
    cfg = resolve(bench_files=[], flags={"method": "edm", "dataset": "digits"},
                  sets=["eval.noise='qmc'"]).config
    with pytest.raises(UsageError, match="eval.noise = qmc is for 2-D datasets"):
        uses_qmc(SyntheticImages((1, 4, 4), size=8), cfg)
    auto = resolve(bench_files=[], flags={"method": "edm", "dataset": "digits"}, sets=[]).config
    assert not uses_qmc(SyntheticImages((1, 4, 4), size=8), auto) and uses_qmc(dataset, auto)
