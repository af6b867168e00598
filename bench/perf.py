"""`bench perf`: bench's overhead over bare PyTorch loops, measured in one process.

training overhead = seconds per iteration of the real training loop (data, noise, LR schedule,
  gradient clipping, eval EMA, logging to a real MLflow store) / seconds per iteration of a bare
  loop doing the same forward, backward and optimizer step on the same net and batch;
sampling overhead = bench's evaluation sampler (per-sample noise, call counting, the sampler)
  / a bare loop of the same network calls.
Both sides alternate in short blocks and the ratio of medians is reported, so a noisy machine
affects both alike.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.config import RunConfig, resolve
from bench.datasets import Dataset, get_dataset
from bench.denoiser import Denoiser, append_dims
from bench.evaluation import generate
from bench.models import model_spec, new_raw_net
from bench.samplers import heun_step
from bench.schedules import sampling_sigmas
from bench.tracking import Tracker, default_tracking_uri
from bench.training import BatchStream, LoopHooks, make_optimizer, new_loop_state, train_loop
from methods import MethodContext, get_method

TRAIN_TARGETS = {"edm": 1.10, "cd": 1.15}
SAMPLE_TARGET = 1.05


class SyntheticImages(Dataset):
    """Fixed random images of a given shape: timing only, never scored."""

    kind = "image"
    sigma_data = 0.5
    num_classes = 0
    clamp = (-1.0, 1.0)
    primary_metric = "fid"
    description = "random images for timing"

    def __init__(self, shape: tuple[int, ...], size: int = 256) -> None:
        self.name = "synthetic-" + "x".join(map(str, shape))
        self.shape = shape
        g = torch.Generator().manual_seed(0)
        self._data = torch.rand((size, *shape), generator=g) * 2 - 1

    def train(self) -> torch.Tensor:
        """The random images."""
        return self._data

    def reference(self, n: int, seed: int) -> torch.Tensor:
        """The first n random images."""
        return self._data[:n]


@dataclass
class PerfCase:
    """One configuration to time."""

    name: str
    dataset: Dataset
    sets: list[str]
    sample_batch: int


def cases() -> list[PerfCase]:
    """The 2-D MLP of gmm8 and a 16x16 UNet with 32 channels at batch 32."""
    unet = ["net.model_channels=32", "net.channel_mult=[1,2,2]", "net.num_res_blocks=2",
            "net.attn_resolutions=[8]", "train.batch_size=32"]
    return [
        PerfCase("gmm8-mlp", get_dataset("gmm8"), ["train.batch_size=512"], 1000),
        PerfCase("unet16-c32", SyntheticImages((3, 16, 16)), unet, 32),
    ]


def _config(case: PerfCase, method: str = "edm") -> RunConfig:
    sets = [*case.sets, "train.checkpoint_every=0", "train.steps=1000000", "sampler=euler",
            "cd.solver=heun", "cd.distance=l2", "cd.n_scales=18"]
    return resolve(bench_files=[], flags={"method": method, "dataset": "gmm8"},
                   sets=sets).config


MIN_SECONDS = 8.0  # both sides together: small cases get more rounds, so their medians settle


def _median_ratio(bench_fn: Callable[[], float], bare_fn: Callable[[], float], rounds: int,
                  ) -> tuple[float, float]:
    """Alternate both sides at least `rounds` times and for at least MIN_SECONDS; medians of
    seconds per unit."""
    bench_times: list[float] = []
    bare_times: list[float] = []
    start = time.perf_counter()
    while len(bench_times) < rounds or time.perf_counter() - start < MIN_SECONDS:
        bench_times.append(bench_fn())
        bare_times.append(bare_fn())
    return statistics.median(bench_times), statistics.median(bare_times)


def _method(case: PerfCase, name: str, cfg: RunConfig) -> Any:
    """A method on the case's net; distillation gets a frozen random-weights EDM teacher."""
    device = torch.device("cpu")
    cls = get_method(name)
    teacher = None
    if cls.needs_teacher:
        teacher = Denoiser(new_raw_net(model_spec(cfg, case.dataset, "edm"), 1),
                           sigma_data=case.dataset.sigma_data, precond="edm")
        teacher.eval().requires_grad_(False)
    spec = model_spec(cfg, case.dataset, cls.precond)
    ctx = MethodContext(config=cfg, dataset=case.dataset, device=device,
                        sigma_data=case.dataset.sigma_data, teacher=teacher,
                        teacher_source="random", new_net=lambda: new_raw_net(spec, 0))
    return cls(ctx)


def _bare_edm(method: Any, cfg: RunConfig, x0: torch.Tensor) -> Callable[[], None]:
    """Forward, backward and optimizer step of the EDM loss on fixed inputs."""
    net = copy.deepcopy(method.student)
    opt = make_optimizer(list(net.parameters()), cfg.train)
    g = torch.Generator().manual_seed(1)
    sigma = (torch.randn(x0.shape[0], generator=g) * 1.2 - 1.2).exp()
    x_noisy = x0 + append_dims(sigma, x0.ndim) * torch.randn(x0.shape, generator=g)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2

    def step() -> None:
        loss = (weight * (net(x_noisy, sigma) - x0).square().flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _bare_cd(method: Any, cfg: RunConfig, x0: torch.Tensor) -> Callable[[], None]:
    """The raw passes of one CD iteration: student forward+backward, the teacher's Heun
    forwards and the target forward, on fixed inputs (no optimizer)."""
    student = copy.deepcopy(method.student)
    target = copy.deepcopy(student).requires_grad_(False)
    teacher = method.teacher
    g = torch.Generator().manual_seed(1)
    grid = method.grid(cfg.cd.n_scales)
    n = torch.randint(0, grid.numel() - 1, (x0.shape[0],), generator=g)
    s_next, s = grid[n + 1], grid[n]
    x = x0 + append_dims(s_next, x0.ndim) * torch.randn(x0.shape, generator=g)

    def step() -> None:
        out = student(x, s_next)
        with torch.no_grad():
            x_hat = heun_step(teacher, x, s_next, s)
            wanted = target(x_hat, s)
        student.zero_grad(set_to_none=True)
        (out - wanted).square().flatten(1).mean(1).mean().backward()

    return step


BARE = {"edm": (_bare_edm, "forward+backward+optimizer step"),
        "cd": (_bare_cd, "student fwd+bwd + teacher Heun fwds + target fwd")}


def train_overhead(case: PerfCase, name: str, iters: int, tracker: Tracker) -> dict[str, Any]:
    """Real training loop vs the bare passes of the same iteration on the same net and batch."""
    cfg = _config(case, name)
    device = torch.device("cpu")
    method = _method(case, name, cfg)
    state = new_loop_state(method, cfg.train, 0, device)
    stream = BatchStream(case.dataset.train_batch, len(case.dataset.train()), None,
                         cfg.train.batch_size, 0, device)
    run_id = tracker.start_run(experiment="perf", run_name=f"perf-{name}-{case.name}", tags={})
    hooks = LoopHooks(log=lambda m, s: tracker.log_metrics(run_id, m, s))
    x0, _ = stream.batch(0)
    make_bare, denominator = BARE[name]
    bare_step = make_bare(method, cfg, x0)
    block = 5

    def bench_block() -> float:
        t0 = time.perf_counter()
        train_loop(method, cfg.train, stream, state, hooks, until=state.step + block)
        return (time.perf_counter() - t0) / block

    def bare_block() -> float:
        t0 = time.perf_counter()
        for _ in range(block):
            bare_step()
        return (time.perf_counter() - t0) / block

    bench_block()
    bare_block()
    bench_s, bare_s = _median_ratio(bench_block, bare_block, max(iters // block, 3))
    tracker.end_run(run_id)
    return {"figure": "train_overhead", "case": case.name, "method": name, "nfe": None,
            "ratio": bench_s / bare_s, "target": TRAIN_TARGETS[name], "bench_seconds": bench_s,
            "bare_seconds": bare_s, "denominator": denominator}


def sample_overhead(case: PerfCase, nfe: int, iters: int) -> dict[str, Any]:
    """bench's sampler (noise, counting, Euler) vs a bare loop of the same network calls."""
    cfg = _config(case)
    device = torch.device("cpu")
    method = _method(case, "edm", cfg)
    model = method.student.eval()
    bare_model = copy.deepcopy(model)
    n = case.sample_batch
    sigmas = [float(s) for s in sampling_sigmas(nfe, cfg.diffusion.sigma_min,
                                                cfg.diffusion.sigma_max, cfg.diffusion.rho)]
    z = torch.randn((n, *case.dataset.shape), generator=torch.Generator().manual_seed(2))

    def bench_once() -> float:
        _, seconds = generate(method, model, case.dataset, nfe, n, n, 0, device, False,
                              lambda x: None)
        return seconds

    def bare_once() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = z * sigmas[0]
            for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
                d = bare_model(x, torch.full((n,), s))
                x = d if s_next == 0 else x + (s_next - s) * (x - d) / s
        return time.perf_counter() - t0

    bench_once()
    bare_once()
    bench_s, bare_s = _median_ratio(bench_once, bare_once, iters)
    return {"figure": "sample_overhead", "case": case.name, "method": "edm", "nfe": nfe,
            "ratio": bench_s / bare_s, "target": SAMPLE_TARGET, "bench_seconds": bench_s,
            "bare_seconds": bare_s}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "processor": platform.processor(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def run_perf(iters: int, report: Callable[[str], None]) -> list[dict[str, Any]]:
    """All figures, as rows."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(default_tracking_uri(Path(tmp)), Path(tmp))
        for case in cases():
            for name in ("edm", "cd"):
                report(f"timing {name} training: {case.name}")
                rows.append(train_overhead(case, name, iters, tracker))
            for nfe in (1, 2, 4):
                report(f"timing sampling: {case.name}, NFE {nfe}")
                rows.append(sample_overhead(case, nfe, iters))
    return rows


def print_rows(rows: list[dict[str, Any]], console: Any) -> None:
    """A rich table of the figures."""
    from rich.table import Table

    table = Table(title="bench perf (median seconds, ratio = bench / bare PyTorch)")
    for col in ("figure", "case", "method", "nfe", "bench s", "bare s", "ratio", "target"):
        table.add_column(col, justify="right" if col not in ("figure", "case") else "left")
    for r in rows:
        ok = "green" if r["ratio"] <= r["target"] else "red"
        table.add_row(r["figure"], r["case"], r["method"],
                      "-" if r["nfe"] is None else str(r["nfe"]),
                      f"{r['bench_seconds']:.3e}", f"{r['bare_seconds']:.3e}",
                      f"[{ok}]{r['ratio']:.3f}[/{ok}]", f"{r['target']:.2f}")
    console.print(table)


def write_json(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows plus a description of the machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
