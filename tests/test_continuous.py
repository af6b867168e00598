"""The continuous-time methods (ECT, sCT / sCD on TrigFlow, MeanFlow) and what they need: the
JVP of every network, the network options, the parameterisations, their objectives checked
against independent computations, and exact resume."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from bench.core.config import resolve
from bench.data.datasets import get_dataset
from bench.diffusion.denoiser import AnalyticDenoiser, Denoiser
from bench.diffusion.jvp import jvp
from bench.engine.models import model_spec, new_raw_net
from bench.engine.training import (
    BatchStream,
    LoopHooks,
    load_loop_state,
    loop_state_dict,
    new_loop_state,
    train_loop,
)
from bench.nets.build import NetOptions, build_net, count_parameters
from methods import MethodContext, get_method
from methods.ect import ect_gap, ect_r
from methods.scm import trigflow_velocity

SMALL = ["net.width=32", "net.depth=2", "net.emb_dim=16", "train.steps=12", "eval.nfe=[1]",
         "train.warmup_steps=0", "train.checkpoint_every=0"]
IMAGE = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
NETS = [
    ("mlp", (2,), NetOptions()),
    ("unet", (1, 8, 8), NetOptions(**{**IMAGE, "attn_resolutions": (4,)})),
    ("adm", (3, 16, 16), NetOptions(**IMAGE, num_head_channels=16)),
    ("ddpmpp", (3, 16, 16), NetOptions(**IMAGE)),
    ("ncsnpp", (3, 16, 16), NetOptions(**IMAGE)),
    ("mlp", (2,), NetOptions(time_inputs=2)),
    ("unet", (1, 8, 8), NetOptions(**{**IMAGE, "attn_resolutions": (4,)}, time_inputs=2,
                                   double_norm=True)),
    ("adm", (3, 16, 16), NetOptions(**IMAGE, num_head_channels=16, time_inputs=2,
                                    double_norm=True)),
    ("ncsnpp", (3, 16, 16), NetOptions(**IMAGE, time_inputs=2, noise_embedding="positional")),
]


def _ids() -> list[str]:
    return [f"{k}-t{o.time_inputs}{'-dn' if o.double_norm else ''}"
            f"{'-pos' if o.noise_embedding == 'positional' else ''}" for k, _, o in NETS]


@pytest.mark.parametrize(("kind", "shape", "options"), NETS, ids=_ids())
def test_forward_mode_jvp_of_every_network_matches_finite_differences(
        kind: str, shape: tuple[int, ...], options: NetOptions) -> None:
    torch.manual_seed(0)
    net = build_net(kind, shape, 0, options).double().requires_grad_(False)  # type: ignore[arg-type]
    with torch.no_grad():  # away from the zero-initialised output layers
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    k = options.time_inputs
    x = torch.randn(3, *shape, dtype=torch.float64)
    t = torch.rand(3, *((k,) if k > 1 else ()), dtype=torch.float64)
    vx, vt = torch.randn_like(x), torch.randn_like(t)

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return net(a, b, None)

    out, exact = jvp(f, (x, t), (vx, vt))
    out_fd, fd = jvp(f, (x, t), (vx, vt), mode="finite_difference", eps=1e-6)
    plain = f(x, t)
    assert torch.equal(out_fd, plain)  # the central difference's centre is the plain forward
    # forward mode takes attention's math kernel (forward-mode rules), the plain forward a
    # fused one: the same values to float64 rounding
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    assert float((exact - fd).norm() / fd.norm()) < 1e-5
    # and the network's own central difference, computed here without the helper
    by_hand = (f(x + 1e-6 * vx, t + 1e-6 * vt) - f(x - 1e-6 * vx, t - 1e-6 * vt)) / 2e-6
    assert float((exact - by_hand).norm() / by_hand.norm()) < 1e-5


@pytest.mark.parametrize(("kind", "shape", "options"), NETS, ids=_ids())
def test_jvp_under_bf16_autocast_is_the_float32_jvp(
        kind: str, shape: tuple[int, ...], options: NetOptions) -> None:
    """Forward-mode AD through autocast mixes dtypes (group_norm: a bf16 output with a float32
    tangent, refused by the next convolution): under autocast the JVP runs in float32."""
    torch.manual_seed(0)
    net = build_net(kind, shape, 0, options).requires_grad_(False)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    k = options.time_inputs
    x = torch.randn(2, *shape).bfloat16()
    t = torch.rand(2, *((k,) if k > 1 else ()))
    vx, vt = torch.randn_like(x), torch.randn_like(t)

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return net(a, b, None)

    for mode in ("forward", "finite_difference"):
        reference = jvp(f, (x.float(), t), (vx.float(), vt), mode=mode)  # type: ignore[arg-type]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, tangent = jvp(f, (x, t), (vx, vt), mode=mode)  # type: ignore[arg-type]
        assert out.dtype == tangent.dtype == torch.float32
        assert torch.equal(out, reference[0]) and torch.equal(tangent, reference[1])


def test_second_time_input_adds_one_embedding_projection_per_input() -> None:
    # time_inputs = 2 widens only the first embedding layer: + (features x emb_dim) weights
    for kind, shape, options, features in [
            ("mlp", (2,), NetOptions(), 128), ("unet", (1, 8, 8), NetOptions(**IMAGE), 32),
            ("adm", (3, 16, 16), NetOptions(**IMAGE, num_head_channels=16), 32),
            ("ddpmpp", (3, 16, 16), NetOptions(**IMAGE), 32),
            ("ncsnpp", (3, 16, 16), NetOptions(**IMAGE), 64)]:
        one = count_parameters(build_net(kind, shape, 0, options))  # type: ignore[arg-type]
        two = count_parameters(build_net(kind, shape, 0, NetOptions(  # type: ignore[arg-type]
            **{**options.__dict__, "time_inputs": 2})))
        emb_dim = 128 if kind == "mlp" else 4 * 32
        assert two - one == features * emb_dim, kind
    # double norm and the positional embedding add no parameters (ncsnpp drops its Fourier
    # frequencies, a buffer)
    for kind, shape, extra in [("unet", (1, 8, 8), {"double_norm": True}),
                               ("adm", (3, 16, 16), {"double_norm": True,
                                                     "num_head_channels": 16}),
                               ("ncsnpp", (3, 16, 16), {"noise_embedding": "positional"})]:
        base = {**IMAGE, **({"num_head_channels": 16} if kind == "adm" else {})}
        assert count_parameters(build_net(kind, shape, 0, NetOptions(**base))) == \
            count_parameters(build_net(kind, shape, 0, NetOptions(**{**base, **extra})))


def test_double_norm_gives_pixel_normalised_scale_and_shift() -> None:
    from bench.nets.basic import adaptive_norm, pixel_norm
    normed = torch.randn(2, 8, 4, 4)
    params = torch.randn(2, 16, 1, 1) * 5
    out = adaptive_norm(normed, params, double_norm=True)
    scale, shift = params.chunk(2, dim=1)
    assert torch.allclose(out, normed * pixel_norm(scale) + pixel_norm(shift))
    assert torch.allclose(pixel_norm(scale).square().mean(1), torch.ones(2, 1, 1), atol=1e-3)


# --- TrigFlow --------------------------------------------------------------------------------


def test_trigflow_consistency_function_is_the_identity_at_t_0() -> None:
    net = build_net("mlp", (2,), 0, NetOptions(width=32, depth=2))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    f = Denoiser(net, sigma_data=0.5, precond="trigflow")
    x = torch.randn(64, 2)
    assert torch.equal(f(x, torch.zeros(64)), x)
    # and it is cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t) at t = arctan(sigma / sigma_d)
    sigma = torch.full((64,), 1.3)
    t = torch.atan(sigma / 0.5)
    x_t = torch.cos(t)[:, None] * x
    expected = torch.cos(t)[:, None] * x_t - torch.sin(t)[:, None] * 0.5 * net(x_t / 0.5, t)
    assert torch.allclose(f(x, sigma), expected, atol=1e-6)


def test_teacher_velocity_in_trigflow_follows_the_exact_ode_of_the_gmm8_teacher() -> None:
    gmm = get_dataset("gmm8")
    teacher = AnalyticDenoiser(gmm.denoise)  # type: ignore[attr-defined]
    sd = 0.5
    x = torch.randn(256, 2, dtype=torch.float64) * 3.0  # x at sigma = 3 (EDM's variables)
    sig0, sig1 = 3.0, 0.4

    # EDM's PF ODE dx/dsigma = (x - D(x; sigma)) / sigma, RK4 in sigma
    def edm(xs: torch.Tensor, s: float) -> torch.Tensor:
        return (xs - teacher(xs, torch.full((xs.shape[0],), s, dtype=torch.float64))) / s

    # TrigFlow's dx_t/dt from the converted teacher, RK4 in t
    def trig(xt: torch.Tensor, t: float) -> torch.Tensor:
        return trigflow_velocity(teacher, xt, torch.full((xt.shape[0],), t,
                                                          dtype=torch.float64), sd, None)

    def rk4(f: Any, y: torch.Tensor, a: float, b: float, n: int = 400) -> torch.Tensor:
        h = (b - a) / n
        for i in range(n):
            s = a + i * h
            k1 = f(y, s)
            k2 = f(y + h / 2 * k1, s + h / 2)
            k3 = f(y + h / 2 * k2, s + h / 2)
            k4 = f(y + h * k3, s + h)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y

    x_edm = rk4(edm, x, sig0, sig1)
    t0, t1 = math.atan(sig0 / sd), math.atan(sig1 / sd)
    x_t = rk4(trig, math.cos(t0) * x, t0, t1)
    assert torch.allclose(x_t / math.cos(t1), x_edm, atol=1e-6)


# --- methods on gmm8 -----------------------------------------------------------------------------


def _teacher() -> Denoiser:
    cfg = resolve(bench_files=[], flags={"method": "edm", "dataset": "gmm8"}, sets=SMALL).config
    ds = get_dataset("gmm8")
    net = new_raw_net(model_spec(cfg, ds, "edm"), 7)
    return Denoiser(net, sigma_data=ds.sigma_data, precond="edm").eval().requires_grad_(False)


def build(name: str, sets: list[str] = (), teacher: nn.Module | None = None,  # type: ignore[assignment]
          ) -> Any:
    cfg = resolve(bench_files=[], flags={"method": name, "dataset": "gmm8"},
                  sets=[*SMALL, *sets]).config
    ds = get_dataset("gmm8")
    cls = get_method(name)
    spec = model_spec(cfg, ds, cls.precond)
    if teacher is None and cls.needs_teacher:
        teacher = _teacher() if cls.teacher_weights else AnalyticDenoiser(ds.denoise)  # type: ignore[attr-defined]
    ctx = MethodContext(config=cfg, dataset=ds, device=torch.device("cpu"),
                        sigma_data=ds.sigma_data, teacher=teacher, teacher_source="test",
                        new_net=lambda: new_raw_net(spec, 3))
    return cls(ctx)


def test_ect_r_schedule_and_its_stages() -> None:
    t = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0], dtype=torch.float64)
    for stage in range(6):
        r = ect_r(t, stage, q=2.0, k=8.0, b=1.0)
        expected = torch.clamp(t * (1 - 2.0 ** -(stage + 1) * (1 + 8 / (1 + torch.exp(t)))),
                               min=0)
        assert torch.allclose(r, expected) and bool((r >= 0).all()) and bool((r < t).all())
    # near the data r = 0 in early stages; far from it r / t -> 1 - q^-(stage+1)
    assert float(ect_r(t, 0, 2.0, 8.0, 1.0)[0]) == 0.0
    assert float(ect_r(t, 3, 2.0, 8.0, 1.0)[-1] / t[-1]) == pytest.approx(1 - 2.0 ** -4)
    # later stages move r towards t at every t
    assert bool((ect_r(t, 5, 2.0, 8.0, 1.0) >= ect_r(t, 4, 2.0, 8.0, 1.0)).all())
    # the gap t - r stays positive in float32 however late the stage (its weight is 1/gap)
    late = ect_gap(t.float(), 40, 2.0, 8.0, 1.0)
    assert bool((late > 0).all()) and bool(torch.isfinite(1 / late).all())
    assert float((t.float() - ect_r(t.float(), 40, 2.0, 8.0, 1.0))[-1]) == 0.0  # cancelled


def test_ect_target_is_the_data_where_r_is_0() -> None:
    method = build("ect", ["ect.k=1000", "ect.q=1.01"])  # stage 0: r = 0 everywhere
    x0 = method.ctx.dataset.train()[:32]
    g = torch.Generator().manual_seed(4)
    loss = method.loss(x0, None, 0, g)
    t, n = method.draw(x0, torch.Generator().manual_seed(4))
    assert bool((ect_r(t, 0, 1.01, 1000.0, 1.0) == 0).all())
    with torch.no_grad():
        f = method.student(x0 + t[:, None] * n, t)
    expected = (f - x0).square().sum(1).sqrt() / t  # c = 0: the L2 norm, weight 1 / (t - 0)
    assert torch.allclose(loss.detach(), expected, rtol=1e-5)


def test_ect_starts_from_the_teachers_weights_and_refuses_an_analytic_teacher() -> None:
    from bench.core.errors import BenchError
    teacher = _teacher()
    method = build("ect", [], teacher)
    for (k, v), (_, w) in zip(method.student.state_dict().items(),
                              teacher.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    with pytest.raises(BenchError, match="ect tunes a trained network"):
        build("ect", [], AnalyticDenoiser(get_dataset("gmm8").denoise))  # type: ignore[attr-defined]


def test_ddp_wraps_the_module_each_loss_calls() -> None:
    """Under several processes DDP wraps parallel_module(): the student where the loss calls
    it, the raw network for sCT, sCD and MeanFlow, whose losses read the network's output (F,
    u) itself. The loss then goes through the wrapper (a DataParallel here: on the CPU it
    calls its module), and asking for the student's forward past a raw-network wrapper, which
    would train without averaged gradients, is refused."""
    for name in ("ect", "ict", "sct", "scd", "meanflow"):
        method = build(name)
        raw = name in ("sct", "scd", "meanflow")
        assert method.parallel_module() is (method.student.net if raw else method.student)
    torch.manual_seed(0)
    x = torch.randn(8, 2)
    t, r = torch.rand(8) * 0.5 + 0.5, torch.rand(8) * 0.5
    r[:3] = t[:3]  # r = t: the flow map's output does not show u there
    meanflow = build("meanflow")
    alone = meanflow.average_velocity(x, t, r, None)
    meanflow.parallel = nn.DataParallel(meanflow.parallel_module())
    assert torch.equal(meanflow.average_velocity(x, t, r, None), alone)
    with pytest.raises(RuntimeError, match="call self.parallel"):
        meanflow.train_forward  # noqa: B018
    sct = build("sct")
    alone = sct.train_forward_net(x, t, None)
    sct.parallel = nn.DataParallel(sct.parallel_module())
    assert torch.equal(sct.train_forward_net(x, t, None), alone)
    ect = build("ect")
    ect.parallel = nn.DataParallel(ect.parallel_module())
    assert ect.train_forward is ect.parallel


def test_meanflow_target_matches_a_finite_difference_of_u_along_the_path() -> None:
    method = build("meanflow")
    net = method.student.net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(16, 2, dtype=torch.float64)
    e = torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.8 + 0.1
    r = t * torch.rand(16, dtype=torch.float64)
    v = e - x
    z = (1 - t[:, None]) * x + t[:, None] * e

    def u(zz: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:  # u(z, r, t), r held fixed
        return net(zz, torch.stack([tt, tt - r], dim=1))

    h = 1e-6
    dudt = (u(z + h * v, t + h) - u(z - h * v, t - h)) / (2 * h)
    with torch.no_grad():
        target = method.target(z, t, r, v, None)
    assert torch.allclose(target, v - (t - r)[:, None] * dudt, atol=1e-7)
    # r = t: the target is the instantaneous velocity v (flow matching)
    with torch.no_grad():
        assert torch.allclose(method.target(z, t, t, v, None), v)


def test_meanflow_samples_through_the_flow_map_of_a_two_time_network() -> None:
    from bench.core.errors import UsageError
    from bench.diffusion.rng import StackedGenerator
    method = build("meanflow")
    noise = torch.randn(8, 2)
    model = method.student.eval()
    one = method.sample(model, noise, 1, StackedGenerator(0, range(8), torch.device("cpu")))
    with torch.no_grad():
        u = model.net(noise, torch.tensor([[1.0, 1.0]]).expand(8, 2))
    assert torch.allclose(one, noise - u, atol=1e-6)
    assert method.sample_times(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    # the network takes the flow map's two time inputs whatever the config says, and a
    # contradicting value is one line
    assert method.student.net.time_inputs == 2
    with pytest.raises(UsageError, match="takes 2 time input"):
        build("meanflow", ["net.time_inputs=1"])


@pytest.mark.parametrize("name", ["sct", "scd"])
def test_scm_loss_is_finite_trains_the_weighting_and_the_jvp_modes_agree(name: str) -> None:
    method = build(name, ["sct.tangent_warmup=0", "scd.tangent_warmup=0"])
    groups = method.parameters()
    assert len(groups) == 2 and groups[1]["params"] == list(method.weighting.parameters())
    x0 = method.ctx.dataset.train()[:64]
    exact = method.loss(x0, None, 5, torch.Generator().manual_seed(1))
    assert exact.shape == (64,) and torch.isfinite(exact).all()
    exact.mean().backward()
    assert method.weighting.linear.weight.grad is not None
    assert float(method.weighting.linear.bias.grad.abs()) > 0
    fd = build(name, ["sct.tangent_warmup=0", "scd.tangent_warmup=0", f"{name}.jvp="
                      "finite_difference"]).loss(x0, None, 5, torch.Generator().manual_seed(1))
    assert torch.allclose(fd, exact.detach(), rtol=1e-2, atol=1e-4)


def test_scm_two_step_sampling_goes_through_the_papers_t() -> None:
    method = build("sct")
    levels = method.sample_sigmas(2)
    sd = method.sigma_data
    assert levels[0] == 80.0 and levels[1] == pytest.approx(sd * math.tan(1.1))
    assert build("sct", ["sct.mid_t=0.9"]).sample_sigmas(2)[1] == pytest.approx(sd * math.tan(0.9))


def _save(method: Any, state: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save({"student": method.student.state_dict(),
                "modules": {k: m.state_dict() for k, m in method.extra_modules().items()},
                "loop": loop_state_dict(state), "method": method.state_dict(),
                "rng": torch.get_rng_state()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["ect", "sct", "scd", "meanflow"])
def test_resume_mid_run_is_exact(name: str) -> None:
    sets = ["net.dropout=0.1", "ect.stage_iters=4", "sct.tangent_warmup=6",
            "scd.tangent_warmup=6"]
    teacher = _teacher() if name == "ect" else None

    def fresh() -> tuple[Any, Any, BatchStream]:
        method = build(name, sets, copy.deepcopy(teacher) if teacher is not None else None)
        cfg = method.config.train
        state = new_loop_state(method, cfg, 0, torch.device("cpu"))
        data = method.ctx.dataset.train()
        stream = BatchStream(lambda idx: data[idx], data.shape[0], None, 64, 0,
                             torch.device("cpu"))
        return method, state, stream

    torch.manual_seed(11)
    method, state, stream = fresh()
    train_loop(method, method.config.train, stream, state, LoopHooks())
    straight = copy.deepcopy(method.student.state_dict())

    torch.manual_seed(11)
    method, state, stream = fresh()
    train_loop(method, method.config.train, stream, state, LoopHooks(), until=5)
    saved = torch.load(io.BytesIO(_save(method, state)), weights_only=True)
    torch.manual_seed(999)  # whatever the process did in between
    method, state, stream = fresh()
    method.student.load_state_dict(saved["student"])
    for key, module in method.extra_modules().items():
        module.load_state_dict(saved["modules"][key])
    load_loop_state(state, saved["loop"])
    method.load_state_dict(saved["method"])
    torch.set_rng_state(saved["rng"])
    train_loop(method, method.config.train, stream, state, LoopHooks())
    assert state.step == 12
    for key, value in method.student.state_dict().items():
        assert torch.equal(value, straight[key]), key
