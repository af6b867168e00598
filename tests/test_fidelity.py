"""The presets train as the published models were trained (Song et al. 2023 and its two
official codes, Song & Dhariwal 2023): one test per difference the paper-fidelity review found."""

from __future__ import annotations

import copy
import math
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bench.core.config import RunConfig, default_bench_files, resolve
from bench.core.errors import BenchError
from bench.data.datasets import get_dataset
from bench.data.shard import Shard
from bench.diffusion.denoiser import Denoiser
from bench.diffusion.schedules import ct_n_schedule
from bench.engine.models import model_spec, new_raw_net
from bench.engine.training import BatchStream, LoopHooks, new_loop_state, train_loop
from bench.nets.build import NetOptions, build_net, has_dropout
from methods import MethodContext, get_method
from methods.cd import CD
from methods.ct import CT
from methods.lpips_distance import lpips_network, lpips_of
from methods.pd import PD

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["net.width=32", "net.depth=2", "net.emb_dim=16", "train.steps=20", "eval.nfe=[1]",
         "cd.n_scales=10", "train.warmup_steps=0"]


def config(method: str, dataset: str = "gmm8", sets: list[str] = ()) -> RunConfig:  # type: ignore[assignment]
    return resolve(bench_files=[], flags={"method": method, "dataset": dataset},
                   sets=[*SMALL, *sets]).config


def preset(method: str, dataset: str, sets: list[str] = ()) -> RunConfig:  # type: ignore[assignment]
    """The shipped bench.toml's preset for method on dataset."""
    return resolve(bench_files=default_bench_files(ROOT), flags={"method": method,
                                                                 "dataset": dataset},
                   sets=list(sets)).config


def teacher_net(dropout: float, seed: int = 7) -> Denoiser:
    """An EDM teacher on gmm8 whose network was built (trained) with `dropout`."""
    cfg = config("edm", sets=[f"net.dropout={dropout}"])
    ds = get_dataset("gmm8")
    net = new_raw_net(model_spec(cfg, ds, "edm"), seed)
    return Denoiser(net, sigma_data=ds.sigma_data, precond="edm").eval().requires_grad_(False)


def build(name: str, sets: list[str], teacher: nn.Module | None = None,
          online: dict[str, torch.Tensor] | None = None) -> Any:
    cfg = config(name, sets=sets)
    ds = get_dataset("gmm8")
    cls = get_method(name)
    spec = model_spec(cfg, ds, cls.precond)
    ctx = MethodContext(config=cfg, dataset=ds, device=torch.device("cpu"),
                        sigma_data=ds.sigma_data, teacher=teacher, teacher_source="test",
                        new_net=lambda: new_raw_net(spec, 3), teacher_online=online)
    return cls(ctx)


def dropout_masks(module: nn.Module, into: list[torch.Tensor]) -> list[Any]:
    """Record, per dropout call inside module, which inputs it zeroed."""
    def hook(layer: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        into.append((out == 0) & (args[0] != 0))
    return [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Dropout)]


# --- CD: the run's dropout, one mask for the online and target passes ---------------------------

def test_cd_student_takes_the_runs_dropout_not_the_teachers() -> None:
    teacher = teacher_net(dropout=0.13)
    assert has_dropout(teacher)
    method = build("cd", ["net.dropout=0.0", "cd.target_mu=0.95"], teacher)
    rates = {m.p for m in method.student.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.0} and not method.dropout_active
    assert method.target is not None
    assert {m.p for m in method.target.modules() if isinstance(m, nn.Dropout)} == {0.0}
    assert {m.p for m in teacher.modules() if isinstance(m, nn.Dropout)} == {0.13}


@pytest.mark.parametrize("target_mu", [0.0, 0.95])
def test_cd_online_and_target_passes_share_the_dropout_mask(target_mu: float) -> None:
    method = build("cd", ["net.dropout=0.3", f"cd.target_mu={target_mu}"],
                   teacher_net(dropout=0.13))
    assert method.dropout_active
    target = method.target if method.target is not None else method.student
    target_masks: list[torch.Tensor] = []
    online_masks: list[torch.Tensor] = []
    handles = dropout_masks(target, target_masks) if target is not method.student else []
    g = torch.Generator().manual_seed(0)
    x0 = get_dataset("gmm8").train_batch(torch.arange(64))
    if target is method.student:  # one module makes both passes: the first call is the target's
        seen: list[torch.Tensor] = []
        handles = dropout_masks(method.student, seen)
        method.loss(x0, None, 0, g)
        half = len(seen) // 2
        target_masks, online_masks = seen[:half], seen[half:]
    else:
        handles += dropout_masks(method.student, online_masks)
        method.loss(x0, None, 0, g)
    for h in handles:
        h.remove()
    assert target_masks and len(target_masks) == len(online_masks)
    for t, o in zip(target_masks, online_masks, strict=True):
        assert 0.1 < float(t.float().mean()) < 0.5  # dropout 0.3 is really active
        assert torch.equal(t, o)


def test_cd_init_from_online_and_the_ema_from_the_teachers_average() -> None:
    teacher = teacher_net(dropout=0.0)
    online = {k: v + 0.01 for k, v in teacher.state_dict().items()}
    method = build("cd", ["cd.init_from=\"online\"", "train.ema_rate=0.99"], teacher, online)
    for k, v in method.student.state_dict().items():
        assert torch.equal(v, online[k]), k
    state = new_loop_state(method, method.config.train, 0, torch.device("cpu"))
    assert state.ema is not None
    for k, v in state.ema.state_dict().items():
        assert torch.equal(v, teacher.state_dict()[k]), k
    same = build("cd", ["cd.init_from=\"ema\""], teacher, online)
    for k, v in same.student.state_dict().items():
        assert torch.equal(v, teacher.state_dict()[k]), k
    with pytest.raises(BenchError, match="keeps no online weights"):
        build("cd", ["cd.init_from=\"online\""], teacher, None)


def test_presets_say_which_teacher_weights_cd_starts_from() -> None:
    assert preset("cd", "cifar10").cd.init_from == "online"  # JAX code: finetune from params
    for dataset in ("imagenet64", "lsun-bedroom", "lsun-cat"):
        assert preset("cd", dataset).cd.init_from == "ema"  # PyTorch code: edm_*_ema.pt


# --- CT: mu(k) as the official codes compute it ---------------------------------------------

@pytest.mark.parametrize("dataset", ["cifar10", "imagenet64", "lsun-bedroom", "lsun-cat"])
def test_ct_paper_presets_take_the_official_target_rate(dataset: str) -> None:
    cfg = preset("ct", dataset, ["train.steps=1000"])
    assert cfg.ct.mu_official
    method = get_method("ct").__new__(CT)
    method.options = cfg.ct
    method.config = cfg
    method.total_steps = lambda: 1000  # type: ignore[method-assign]
    c = cfg.ct
    for step in (0, 300, 999):
        # create_ema_and_scales_fn: scales = ceil(sqrt(...) - 1), mu = exp(-c / scales) with
        # c = -ln(mu0) s0, then N = scales + 1
        scales = math.ceil(math.sqrt(step / 1000 * ((c.s1 + 1) ** 2 - c.s0 ** 2) + c.s0 ** 2) - 1)
        scales = max(scales, 1)
        assert method.n_scales(step) == scales + 1 == ct_n_schedule(step, 1000, c.s0, c.s1)
        assert method.target_mu(step) == pytest.approx(math.exp(math.log(c.mu0) * c.s0 / scales))
    assert not config("ct").ct.mu_official  # the paper's formula stays the default


# --- LPIPS as each official code computes it -------------------------------------------------

def test_lpips_avgpool_replaces_every_max_pooling() -> None:
    standard = lpips_network("max", pretrained_backbone=False)
    avg = lpips_network("avg", pretrained_backbone=False)
    kinds = [type(m) for m in standard.net.modules() if isinstance(m, nn.MaxPool2d | nn.AvgPool2d)]
    assert kinds == [nn.MaxPool2d] * 4
    pools = [m for m in avg.net.modules() if isinstance(m, nn.MaxPool2d | nn.AvgPool2d)]
    assert [type(m) for m in pools] == [nn.AvgPool2d] * 4
    assert all(m.kernel_size == 2 and m.stride == 2 for m in pools)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    assert not torch.allclose(lpips_of(standard)(x, y), lpips_of(avg)(x, y))


def test_lpips_resizes_only_images_smaller_than_256() -> None:
    model = lpips_network("avg", pretrained_backbone=False)
    distance = lpips_of(model)
    g = torch.Generator().manual_seed(0)
    small = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    small2 = (small + 0.1 * torch.randn(small.shape, generator=g)).clamp(-1, 1)
    up = nn.functional.interpolate(small, size=(224, 224), mode="bilinear", align_corners=False)
    up2 = nn.functional.interpolate(small2, size=(224, 224), mode="bilinear",
                                    align_corners=False)
    assert torch.allclose(distance(small, small2), model(up, up2).flatten())
    big = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    big2 = (big + 0.1 * torch.randn(big.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(distance(big, big2), model(big, big2).flatten())


def test_presets_pick_the_lpips_of_each_official_code() -> None:
    assert preset("cd", "cifar10").cd.distance == "lpips"
    assert preset("ct", "cifar10").ct.distance == "lpips"
    for dataset in ("imagenet64", "lsun-bedroom", "lsun-cat"):
        assert preset("cd", dataset).cd.distance == "lpips_avgpool"
        assert preset("ct", dataset).ct.distance == "lpips_avgpool"


def test_lpips_without_the_vgg_weights_stops_at_start(
        bench: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    done = bench("run", "--method", "ct", "--dataset", "digits", "--steps", "2",
                 "--set", "ct.distance=\"lpips_avgpool\"",
                 env={"TORCH_HOME": str(tmp_path / "torch-home")})
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "VGG16 weights vgg16-397923af.pth" in lines[0], done.stderr


# --- horizontal flips -----------------------------------------------------------------------

def _images() -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    data = torch.arange(40 * 2 * 4 * 4, dtype=torch.float32).reshape(40, 2, 4, 4)
    return (lambda idx: data[idx]), 40


def test_hflip_flips_about_half_the_images_as_a_function_of_seed_and_step() -> None:
    fetch, n = _images()
    plain = BatchStream(fetch, n, None, 16, 5, torch.device("cpu"))
    flipped = BatchStream(fetch, n, None, 16, 5, torch.device("cpu"), hflip=True)
    again = BatchStream(fetch, n, None, 16, 5, torch.device("cpu"), hflip=True)
    counts = []
    for step in (0, 1, 7):
        x, _ = plain.batch(step)
        y, _ = flipped.batch(step)
        mask = flipped.flips(step)
        assert torch.equal(y[mask], x[mask].flip(-1)) and torch.equal(y[~mask], x[~mask])
        assert torch.equal(again.batch(step)[0], y)  # a resumed run: the same flips
        counts.append(int(mask.sum()))
    assert all(2 <= c <= 14 for c in counts) and len({tuple(flipped.flips(s).tolist())
                                                       for s in (0, 1, 7)}) == 3
    # two processes take their rows of the same flipped global batch
    parts = [BatchStream(fetch, n, None, 16, 5, torch.device("cpu"), Shard(r, 2), hflip=True)
             for r in range(2)]
    assert torch.equal(torch.cat([p.batch(3)[0] for p in parts]), flipped.batch(3)[0])


def test_hflip_is_on_for_the_image_presets_only(
        bench: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    for dataset in ("cifar10", "imagenet64", "lsun-bedroom", "lsun-cat"):
        assert preset("edm", dataset).data.hflip and preset("cd", dataset).data.hflip
    for dataset in ("gmm8", "gmm25", "digits"):
        assert not preset("edm", dataset).data.hflip
    done = bench("run", "--method", "edm", "--dataset", "gmm8", "--set", "data.hflip=true")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "bench: error: data.hflip flips images; gmm8 holds points"


def test_meanflow_cifar10_preset_is_the_official_script() -> None:
    """Gsunshine/py-meanflow scripts/cifar10_v0.sh: 8 x 128, lr 6e-4 after 200 epochs of
    warm-up, 16,000 epochs, logit-normal (-2, 2) for t and r, 75% r != t, p 0.75."""
    cfg = preset("meanflow", "cifar10")
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.beta2) == (1024, 6e-4, 0.999)
    assert (cfg.train.steps, cfg.train.warmup_steps) == (784000, 9800)
    assert (cfg.net.kind, cfg.net.dropout) == ("ddpmpp", 0.2)
    c = cfg.meanflow
    assert (c.p_mean, c.p_std, c.ratio_neq, c.norm_p) == (-2.0, 2.0, 0.75, 0.75)


# --- iCT preset ------------------------------------------------------------------------------

def test_ict_cifar10_preset_is_the_papers() -> None:
    cfg = preset("ict", "cifar10")
    assert cfg.net.kind == "ncsnpp" and cfg.net.dropout == 0.3 and cfg.net.fourier_scale == 0.02
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == ("radam", 1e-4, 1024)
    assert (cfg.train.steps, cfg.train.ema_rate, cfg.train.warmup_steps) == (400000, 0.99993, 0)
    assert cfg.sample.sigmas == [80.0, 0.821]
    assert (cfg.ict.s0, cfg.ict.s1) == (10, 1280)


def test_ncsnpp_fourier_scale_is_a_network_option() -> None:
    def freqs(scale: float) -> torch.Tensor:
        options = NetOptions(model_channels=32, channel_mult=(1,), num_res_blocks=1,
                             attn_resolutions=(), fourier_scale=scale)
        net = build_net("ncsnpp", (3, 8, 8), 0, options, seed=0)
        return net.fourier.freqs  # type: ignore[union-attr,return-value]

    assert float(freqs(16.0).std()) == pytest.approx(16.0, rel=0.3)
    assert float(freqs(0.02).std()) == pytest.approx(0.02, rel=0.3)
    assert torch.allclose(freqs(0.02) * 800, freqs(16.0))  # same draws, scaled


# --- PD as the CM paper's baseline -----------------------------------------------------------

PD_SETS = ["pd.initial_steps=8", "pd.iters_per_stage=3", "pd.long_stages=2",
           "pd.last_stage_factor=2.0", "pd.stage_lr=\"linear\"", "train.lr=0.01",
           "train.ema_rate=0.0"]


def test_pd_stages_decay_the_lr_to_zero_and_restart_the_optimizer() -> None:
    method = build("pd", PD_SETS, teacher_net(dropout=0.0))
    assert isinstance(method, PD)
    # 8 -> 4 -> 2 -> 1 student steps: 3, 6 and 6 iterations (the last two twice as long)
    assert method.total_steps() == 15
    assert [method.stage_of(s) for s in range(15)] == [0] * 3 + [1] * 6 + [2] * 6
    assert [method.resets_optimizer(s) for s in range(15)] == [
        s in (3, 9) for s in range(15)]
    logged: dict[int, float] = {}
    states: list[int] = []
    cfg = method.config.train.model_copy(update={"log_every": 1})
    state = new_loop_state(method, cfg, 0, torch.device("cpu"))
    ds = method.ctx.dataset
    stream = BatchStream(ds.train_batch, len(ds), None, 64, 0, torch.device("cpu"))
    opt = state.optimizer
    assert opt is not None
    first = next(iter(opt.param_groups[0]["params"]))

    def log(metrics: dict[str, float], step: int) -> None:
        logged[step - 1] = metrics["lr"]
        states.append(int(opt.state[first]["step"]))

    train_loop(method, cfg, stream, state, LoopHooks(log=log))
    expected = [0.01 * (1 - k / 3) for k in range(3)] + [0.01 * (1 - k / 6) for k in range(6)] * 2
    assert [logged[s] for s in range(15)] == pytest.approx(expected)
    # Adam's own step count: 1, 2, 3 in stage 0, then afresh from 1 in each later stage
    assert states == [1, 2, 3, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]


def test_pd_cifar10_preset_is_the_cm_papers_baseline_and_salimans_ho_a_variant() -> None:
    cfg = preset("pd", "cifar10")
    p, t = cfg.pd, cfg.train
    assert (p.initial_steps, p.iters_per_stage, p.long_stages, p.last_stage_factor) == (
        8192, 50000, 2, 2.0)  # a 4096-step student; the 2- and 1-step stages twice as long
    assert (p.stage_lr, p.init_from, t.batch_size, t.lr, t.ema_rate, t.grad_clip) == (
        "linear", "online", 512, 5e-5, 0.0, 1.0)
    sh = preset("pd", "cifar10", ["variant=\"salimans-ho\""])
    assert (sh.train.batch_size, sh.pd.long_stages, sh.pd.last_stage_factor) == (128, 0, 1.0)
    assert sh.pd.stage_lr == "linear" and sh.pd.init_from == "ema"


# --- fp16: a step the scaler skips moves nothing ---------------------------------------------

class OverflowOnce(CD):
    """CD whose loss overflows the fp16 scale once, at iteration 1; records what each loss
    call saw."""

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.blown = False
        self.seen: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.ema: nn.Module | None = None
        self.after: list[int] = []

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None, step: int,
             generator: torch.Generator) -> torch.Tensor:
        snapshot = {f"student.{k}": v.clone() for k, v in self.student.state_dict().items()}
        assert self.target is not None and self.ema is not None
        snapshot |= {f"target.{k}": v.clone() for k, v in self.target.state_dict().items()}
        snapshot |= {f"ema.{k}": v.clone() for k, v in self.ema.state_dict().items()}
        self.seen.append((step, snapshot))
        out = super().loss(x0, labels, step, generator)
        if step == 1 and not self.blown:
            self.blown = True
            # a mean loss of 1e36: finite, but not once scaled by 2^16
            return out * (1e36 / float(out.detach().mean()))
        return out

    def after_step(self, step: int, ema: nn.Module | None) -> None:
        self.after.append(step)
        super().after_step(step, ema)


def test_a_step_the_gradient_scaler_skips_moves_no_average_and_no_counter() -> None:
    cfg = config("cd", sets=["cd.target_mu=0.9", "train.ema_rate=0.9", "train.steps=3"])
    ds = get_dataset("gmm8")
    spec = model_spec(cfg, ds, "cm")
    ctx = MethodContext(config=cfg, dataset=ds, device=torch.device("cpu"),
                        sigma_data=ds.sigma_data, teacher=teacher_net(0.0),
                        teacher_source="test", new_net=lambda: new_raw_net(spec, 3))
    method = OverflowOnce(ctx)
    state = new_loop_state(method, cfg.train, 0, torch.device("cpu"))
    state.scaler = torch.amp.GradScaler("cpu")  # the loop's fp16 path, on the CPU
    method.ema = state.ema
    stream = BatchStream(ds.train_batch, len(ds), None, 64, 0, torch.device("cpu"))
    train_loop(method, cfg.train, stream, state, LoopHooks())
    steps = [s for s, _ in method.seen]
    assert steps == [0, 1, 1, 2]  # iteration 1 retried: the schedules' k did not move
    assert method.after == [0, 1, 2]  # the target updated once per taken step
    assert state.step == 3 and state.scaler_skips == 1
    skipped, retried = method.seen[1][1], method.seen[2][1]
    for key, value in skipped.items():  # student, target and EMA: untouched by the skip
        assert torch.equal(value, retried[key]), key
    assert state.scaler.get_scale() == 65536.0 / 2


def test_copy_of_teacher_keeps_the_teacher_itself_intact() -> None:
    teacher = teacher_net(dropout=0.13)
    before = copy.deepcopy(teacher.state_dict())
    build("cd", ["net.dropout=0.0"], teacher)
    assert {m.p for m in teacher.modules() if isinstance(m, nn.Dropout)} == {0.13}
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])


# --- the CLI: CD on CIFAR-10 from a teacher trained with dropout 0.13 --------------------------

@pytest.mark.slow  # the dropout rules themselves are tested above, without the CLI
def test_cd_on_cifar10_from_a_dropout_teacher_trains_without_dropout(tmp_path: Path) -> None:
    """`bench run --method cd --dataset cifar10` on a tiny CIFAR-10 pickle folder, from an EDM
    teacher trained with dropout 0.13 (the cifar10 preset's): the student's run has dropout 0,
    and its network in training mode gives the same output under any RNG state (no mask at
    all), while the teacher's does not. The network is a small NCSN++ and FID runs on two
    samples through a random-weights Inception of torch-fidelity's layout (no weights here)."""
    from bench.engine.checkpoint import load_checkpoint
    from bench.engine.models import load_denoiser
    from tests.conftest import run_bench
    from tests.test_datasets import write_cifar
    from tests.test_fid import torch_fidelity_shell_state

    write_cifar(tmp_path / "cifar", per_batch=4, seed=0, protocol=4)
    torch.save(torch_fidelity_shell_state(0), tmp_path / "inception.pth")
    common = ["--dataset", "cifar10", "--set", f"data.path={tmp_path / 'cifar'}", "--steps",
              "2", "--set", "train.batch_size=4", "--nfe", "1", "--set", "eval.num_samples=2",
              "--set", "eval.batch_size=2", "--set", "eval.inception_weights=inception.pth",
              "--set", "net.model_channels=16", "--set", "net.channel_mult=[1,1]", "--set",
              "net.num_res_blocks=1", "--set", "net.attn_resolutions=[]"]
    edm = run_bench(["run", "--method", "edm", *common], tmp_path)
    assert edm.returncode == 0, edm.stderr
    cd = run_bench(["run", "--method", "cd", "--teacher", "auto", *common,
                    "--set", "cd.distance=\"l2\""], tmp_path)
    assert cd.returncode == 0, cd.stderr
    assert "presets: *.cifar10, cd.cifar10" in cd.stderr
    runs = sorted((tmp_path / "runs" / "mlartifacts").rglob("checkpoints/last.pt"),
                  key=lambda p: p.stat().st_mtime)
    teacher_state, student_state = (load_checkpoint(p) for p in runs)
    assert teacher_state["model"]["net"]["dropout"] == 0.13
    assert student_state["model"]["net"]["dropout"] == 0.0
    teacher = load_denoiser(teacher_state, "student", torch.device("cpu"), "teacher").train()
    student = load_denoiser(student_state, "student", torch.device("cpu"), "cd").train()
    assert not has_dropout(student) and has_dropout(teacher)
    x = torch.randn(2, 3, 32, 32)
    sigma = torch.full((2,), 2.0)
    with torch.no_grad():
        torch.manual_seed(1)
        online = student(x, sigma, None)
        torch.manual_seed(2)  # another RNG state: a dropout mask would differ
        target = student(x, sigma, None)
        assert torch.equal(online, target)
        torch.manual_seed(1)
        first = teacher(x, sigma, None)
        torch.manual_seed(2)
        assert not torch.equal(first, teacher(x, sigma, None))
        torch.manual_seed(1)  # the same replayed state: the same mask, the same output
        assert torch.equal(first, teacher(x, sigma, None))


def test_pd_init_from_online_starts_the_first_student_from_the_raw_weights() -> None:
    teacher = teacher_net(dropout=0.13)
    online = {k: v - 0.01 for k, v in teacher.state_dict().items()}
    method = build("pd", ["pd.initial_steps=4", "pd.init_from=\"online\"", "net.dropout=0.0"],
                   teacher, online)
    for k, v in method.student.state_dict().items():
        assert torch.equal(v, online[k]), k
    assert not has_dropout(method.student)
    with pytest.raises(BenchError, match="pd.init_from = online"):
        build("pd", ["pd.initial_steps=4", "pd.init_from=\"online\""], teacher, None)
