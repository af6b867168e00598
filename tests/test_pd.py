"""Progressive distillation (Salimans & Ho 2022): the x0 target, the nested grid, the stages, the
Method contract with the analytic gmm8 teacher, and the CLI end to end."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from bench.core.config import RunConfig, resolve
from bench.core.errors import UsageError
from bench.data.datasets import get_dataset
from bench.diffusion.denoiser import AnalyticDenoiser, Denoiser
from bench.diffusion.samplers import euler_step
from bench.engine.evaluation import generate
from bench.engine.models import model_spec, new_raw_net
from bench.engine.training import LoopState, new_loop_state
from methods import MethodContext
from methods.pd import PD, nested_sigmas, pd_x0_target, truncated_snr_weight
from tests.conftest import run_id_of

SETS = ["net.width=32", "net.depth=2", "net.emb_dim=16", "pd.initial_steps=8",
        "pd.iters_per_stage=3", "pd.last_stage_factor=2.0", "train.warmup_steps=0"]


def build(teacher_kind: str = "analytic") -> tuple[PD, RunConfig]:
    """A small PD on gmm8 with the analytic teacher (or a random network teacher)."""
    cfg = resolve(bench_files=[], flags={"method": "pd", "dataset": "gmm8"}, sets=SETS).config
    ds = get_dataset("gmm8")
    spec = model_spec(cfg, ds, "edm")
    teacher: torch.nn.Module = AnalyticDenoiser(ds.denoise)
    if teacher_kind == "network":
        teacher = Denoiser(new_raw_net(spec, 7), sigma_data=ds.sigma_data, precond="edm")
    teacher.eval().requires_grad_(False)
    ctx = MethodContext(config=cfg, dataset=ds, device=torch.device("cpu"),
                        sigma_data=ds.sigma_data, teacher=teacher, teacher_source=teacher_kind,
                        new_net=lambda: new_raw_net(spec, 3))
    return PD(ctx), cfg


def samples(method: PD, ema: torch.nn.Module | None, nfe: int) -> torch.Tensor:
    out: list[torch.Tensor] = []
    model = method.evaluation_model(ema, nfe)
    calls, _ = generate(method, model, method.ctx.dataset, nfe, 64, 32, 5, torch.device("cpu"),
                        False, out.append)
    assert calls == nfe
    return torch.cat(out)


def train(method: PD, cfg: RunConfig, steps: int) -> LoopState:
    """Run `steps` iterations of the loop's update by hand; return the loop state."""
    state = new_loop_state(method, cfg.train, 0, torch.device("cpu"))
    optimizer = state.optimizer
    assert optimizer is not None
    x0 = method.ctx.dataset.train()
    for step in range(steps):
        loss = method.loss(x0[step * 64:(step + 1) * 64], None, step, state.generator)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        method.after_step(step, state.ema)
        state.step = step + 1
    return state


# --- the math ----------------------------------------------------------------------------------


@pytest.mark.parametrize("final", [False, True])
def test_one_student_step_lands_on_two_teacher_steps(final: bool) -> None:
    g = torch.Generator().manual_seed(0)
    ds = get_dataset("gmm8")
    teacher = AnalyticDenoiser(ds.denoise)
    b = 256
    levels = (torch.rand(b, 3, generator=g, dtype=torch.float64) * 20).sort(1, descending=True)
    t, t2, t3 = levels.values.unbind(1)
    t = t + 1e-3
    if final:
        t3 = torch.zeros(b, dtype=torch.float64)
    x_t = torch.randn(b, 2, generator=g, dtype=torch.float64) * t[:, None]
    model = lambda x, s: teacher(x, s)  # noqa: E731
    x_t3 = euler_step(model, euler_step(model, x_t, t, t2), t2, t3)
    target = pd_x0_target(model, x_t, t, t2, t3)
    student = euler_step(lambda x, s: target, x_t, t, t3)
    torch.testing.assert_close(student, x_t3, rtol=1e-10, atol=1e-10)
    if final:
        torch.testing.assert_close(target, x_t3, rtol=1e-12, atol=1e-12)


def test_grid_is_nested_and_reuses_the_karras_levels() -> None:
    for n in (1, 2, 4, 8, 32):
        coarse, fine = nested_sigmas(n, 0.002, 80.0, 7.0), nested_sigmas(2 * n, 0.002, 80.0, 7.0)
        assert len(coarse) == n + 1 and coarse[0].item() == 80.0 and coarse[-1].item() == 0.0
        assert torch.all(coarse[1:] < coarse[:-1])
        assert torch.equal(fine[::2], coarse)
    u = 3 / 8
    expected = (80 ** (1 / 7) + u * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert nested_sigmas(8, 0.002, 80.0, 7.0)[3].item() == pytest.approx(expected, rel=1e-12)
    assert nested_sigmas(1, 0.002, 80.0, 7.0).tolist() == [80.0, 0.0]


def test_truncated_snr_weight() -> None:
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 80.0])
    torch.testing.assert_close(truncated_snr_weight(sigma), torch.tensor([100.0, 4.0, 1, 1, 1]))


def test_stages_are_a_function_of_the_step() -> None:
    method, _ = build()
    assert method.total_steps() == 3 * 2 + 6
    assert [method.stage_of(s) for s in range(12)] == [0] * 3 + [1] * 3 + [2] * 6
    assert [method.student_steps(s) for s in range(3)] == [4, 2, 1]
    assert method.reached_nfes() == [1, 2, 4, 8]
    assert method.schedule_values(4) == {"pd_stage": 1.0, "pd_student_steps": 2.0,
                                         "pd_teacher_steps": 4.0}
    for nfe in (1, 2, 4, 8):
        method.check_nfe(nfe)
    for nfe in (3, 16):
        with pytest.raises(UsageError, match="NFE 1, 2, 4, 8") as info:
            method.check_nfe(nfe)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("initial_steps", 12), ("initial_steps", 1),
                                            ("iters_per_stage", 0), ("last_stage_factor", 0)])
def test_bad_pd_settings_are_usage_errors(key: str, value: int) -> None:
    with pytest.raises(UsageError, match=f"pd.{key}"):
        resolve(bench_files=[], sets=[f"pd.{key}={value}"])


# --- the Method contract -----------------------------------------------------------------------


@pytest.mark.parametrize("teacher_kind", ["analytic", "network"])
def test_loss_step_and_teacher(teacher_kind: str) -> None:
    torch.manual_seed(0)
    method, cfg = build(teacher_kind)
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    state = new_loop_state(method, cfg.train, 0, torch.device("cpu"))
    loss = method.loss(method.ctx.dataset.train()[:64], None, 0, state.generator)
    assert loss.shape == (64,) and torch.isfinite(loss).all()
    before = copy.deepcopy(method.student.state_dict())
    state.optimizer.zero_grad()
    loss.mean().backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    state.optimizer.step()
    method.after_step(0, state.ema)
    assert any(not torch.equal(before[k], v) for k, v in method.student.state_dict().items())
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(teacher_before[k], v), k
    if teacher_kind == "network":  # the student started as a copy, not as the same object
        assert all(p.data_ptr() != q.data_ptr() for p, q in
                   zip(method.student.parameters(), method.teacher.parameters(), strict=True))


def test_the_copied_student_uses_the_runs_dropout() -> None:
    cfg = resolve(bench_files=[], flags={"method": "pd", "dataset": "gmm8"}, sets=SETS).config
    ds = get_dataset("gmm8")
    teacher_cfg = resolve(bench_files=[], sets=[*SETS, "net.dropout=0.2"]).config
    teacher = Denoiser(new_raw_net(model_spec(teacher_cfg, ds, "edm"), 7),
                       sigma_data=ds.sigma_data, precond="edm").eval().requires_grad_(False)
    spec = model_spec(cfg, ds, "edm")
    ctx = MethodContext(config=cfg, dataset=ds, device=torch.device("cpu"),
                        sigma_data=ds.sigma_data, teacher=teacher, teacher_source="test",
                        new_net=lambda: new_raw_net(spec, 3))
    method = PD(ctx)
    rates = {m.p for m in method.student.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.0}
    assert {m.p for m in teacher.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}
    wider = resolve(bench_files=[], sets=[*SETS, "net.width=48"]).config
    ctx.new_net = lambda: new_raw_net(model_spec(wider, ds, "edm"), 3)
    with pytest.raises(UsageError, match="pd copies the teacher"):
        PD(ctx)


def test_stage_end_snapshots_the_average_and_restarts_from_it() -> None:
    method, cfg = build()
    state = train(method, cfg, 3)  # exactly stage 0
    snapshot = method.state_dict()["snapshots"][4]
    for k, v in method.student.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    for k, v in state.ema.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    # stage 1's teacher is that snapshot
    teacher = method._teacher_of(1)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_skipped_last_step_still_ends_the_stage() -> None:
    method, cfg = build()
    train(method, cfg, 2)  # iteration 2, the last of stage 0, is skipped (non-finite loss)
    average = copy.deepcopy(method.extra_modules()["stage_average"].state_dict())
    x0 = method.ctx.dataset.train()[:64]
    loss = method.loss(x0, None, 3, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss).all()
    assert sorted(method.state_dict()["snapshots"]) == [4]
    for k, v in method.student.state_dict().items():
        assert torch.equal(v, average[k]), k


def test_sampling_is_deterministic_and_uses_each_snapshot() -> None:
    method, cfg = build()
    state = train(method, cfg, method.total_steps())
    assert sorted(method.state_dict()["snapshots"]) == [1, 2, 4]
    results = {}
    for nfe in method.reached_nfes():
        first = samples(method, state.ema, nfe)
        assert first.shape == (64, 2) and torch.isfinite(first).all()
        assert torch.equal(first, samples(method, state.ema, nfe))
        results[nfe] = first
    assert method.evaluation_model(None, 8) is method.teacher
    assert method.evaluation_model(None, 1) is not method.evaluation_model(None, 2)
    assert method.sample_sigmas(2) == pytest.approx(nested_sigmas(2, 0.002, 80.0, 7.0).tolist())


def test_checkpoint_round_trip_mid_stage() -> None:
    method, cfg = build()
    state = train(method, cfg, 7)  # stages 0 and 1 done, one iteration into stage 2
    saved = {
        "student": method.student.state_dict(),
        "modules": {k: m.state_dict() for k, m in method.extra_modules().items()},
        "method_state": method.state_dict(),
        "generator": state.generator.get_state(),
    }
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh, _ = build()
    fresh.student.load_state_dict(loaded["student"])
    for name, module in fresh.extra_modules().items():
        module.load_state_dict(loaded["modules"][name])
    fresh.load_state_dict(loaded["method_state"])
    for nfe in (2, 4, 8):
        assert torch.equal(samples(method, None, nfe), samples(fresh, None, nfe)), nfe
    # the rebuilt stage-2 teacher gives the same loss on the same draw
    x0 = method.ctx.dataset.train()[:64]
    g1 = torch.Generator().manual_seed(1)
    g2 = torch.Generator().manual_seed(1)
    assert torch.equal(method.loss(x0, None, 7, g1), fresh.loss(x0, None, 7, g2))


# --- the CLI -----------------------------------------------------------------------------------

TINY = ["--set", "pd.initial_steps=4", "--set", "pd.iters_per_stage=20", "--set",
        "eval.num_samples=300", "--set", "train.log_every=10"]


def client_for(cwd: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")


def test_cli_run_eval_and_nfe_error(bench, tmp_path: Path) -> None:
    result = bench("run", "--method", "pd", "--dataset", "gmm8", "--teacher", "analytic",
                   "--nfe", "1,2,4", *TINY)
    assert result.returncode == 0, result.stderr
    rid = run_id_of(result.stdout)
    client = client_for(tmp_path)
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "pd"
    assert sorted(m.step for m in client.get_metric_history(rid, "w2")) == [1, 2, 4]
    assert sorted(m.step for m in client.get_metric_history(rid, "nfe_measured")) == [1, 2, 4]
    stages = {m.step: m.value for m in client.get_metric_history(rid, "train/pd_student_steps")}
    assert stages[10] == 2 and stages[30] == 1 and max(stages) == 20 + 40
    # the checkpoint restores every snapshot: bench eval reproduces the 2-step number
    w2 = {m.step: m.value for m in client.get_metric_history(rid, "w2")}
    result = bench("eval", "--run", rid, "--nfe", "2")
    assert result.returncode == 0, result.stderr
    again = [m.value for m in client.get_metric_history(rid, "w2") if m.step == 2]
    assert again[-1] == pytest.approx(w2[2], rel=1e-6)

    result = bench("run", "--method", "pd", "--dataset", "gmm8", "--teacher", "analytic",
                   "--nfe", "3", *TINY)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    assert "NFE 1, 2, 4" in errors[0] and "not 3" in errors[0], result.stderr


@pytest.mark.slow
def test_default_budget_beats_ddim(bench, tmp_path: Path) -> None:
    result = bench("run", "--method", "pd", "--dataset", "gmm8", "--teacher", "analytic",
                   timeout=900)
    assert result.returncode == 0, result.stderr
    client = client_for(tmp_path)
    pd_id = run_id_of(result.stdout)
    pd_w2 = {m.step: m.value for m in client.get_metric_history(pd_id, "w2")}
    assert {1, 2, 4, 8} <= set(pd_w2)
    result = bench("run", "--method", "ddim", "--dataset", "gmm8", "--teacher", "analytic",
                   "--nfe", "1,2,4")
    assert result.returncode == 0, result.stderr
    ddim_id = run_id_of(result.stdout)
    ddim_w2 = {m.step: m.value for m in client.get_metric_history(ddim_id, "w2")}
    for nfe in (1, 2, 4):
        assert pd_w2[nfe] < ddim_w2[nfe], (nfe, pd_w2, ddim_w2)
