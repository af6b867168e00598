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
from bench.denoiser import append_dims
from bench.evaluation import generate
from bench.models import model_spec, new_raw_net
from bench.schedules import sampling_sigmas
from bench.tracking import Tracker, default_tracking_uri
from bench.training import BatchStream, LoopHooks, make_optimizer, new_loop_state, train_loop
from methods import MethodContext, get_method

TRAIN_TARGET = 1.10
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


def _config(case: PerfCase) -> RunConfig:
    sets = [*case.sets, "train.checkpoint_every=0", "train.steps=1000000", "sampler=euler"]
    return resolve(bench_files=[], flags={"method": "edm", "dataset": "gmm8"}, sets=sets).config


def _median_ratio(bench_fn: Callable[[], float], bare_fn: Callable[[], float], rounds: int,
                  ) -> tuple[float, float]:
    """Alternate both sides `rounds` times; medians of seconds per unit."""
    bench_times, bare_times = [], []
    for _ in range(rounds):
        bench_times.append(bench_fn())
        bare_times.append(bare_fn())
    return statistics.median(bench_times), statistics.median(bare_times)


def train_overhead(case: PerfCase, iters: int, tracker: Tracker) -> dict[str, Any]:
    """Real training loop vs a bare forward/backward/step loop on the same net and batch."""
    cfg = _config(case)
    spec = model_spec(cfg, case.dataset, "edm")
    device = torch.device("cpu")
    ctx = MethodContext(config=cfg, dataset=case.dataset, device=device,
                        sigma_data=case.dataset.sigma_data, teacher=None, teacher_source="none",
                        new_net=lambda: new_raw_net(spec, 0))
    method = get_method("edm")(ctx)
    state = new_loop_state(method, cfg.train, 0, device)
    stream = BatchStream(case.dataset.train_batch, len(case.dataset.train()), None,
                         cfg.train.batch_size, 0, device)
    run_id = tracker.start_run(experiment="perf", run_name=f"perf-{case.name}", tags={})
    hooks = LoopHooks(log=lambda m, s: tracker.log_metrics(run_id, m, s))

    bare_net = copy.deepcopy(method.student)
    bare_opt = make_optimizer(list(bare_net.parameters()), cfg.train)
    x0, _ = stream.batch(0)
    g = torch.Generator().manual_seed(1)
    sigma = (torch.randn(x0.shape[0], generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(x0.shape, generator=g)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    x_noisy = x0 + append_dims(sigma, x0.ndim) * noise

    def bare_step() -> None:
        loss = (weight * (bare_net(x_noisy, sigma) - x0).square().flatten(1).mean(1)).mean()
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

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
    return {"figure": "train_overhead", "case": case.name, "method": "edm", "nfe": None,
            "ratio": bench_s / bare_s, "target": TRAIN_TARGET, "bench_seconds": bench_s,
            "bare_seconds": bare_s}


def sample_overhead(case: PerfCase, nfe: int, iters: int) -> dict[str, Any]:
    """bench's sampler (noise, counting, Euler) vs a bare loop of the same network calls."""
    cfg = _config(case)
    spec = model_spec(cfg, case.dataset, "edm")
    device = torch.device("cpu")
    ctx = MethodContext(config=cfg, dataset=case.dataset, device=device,
                        sigma_data=case.dataset.sigma_data, teacher=None, teacher_source="none",
                        new_net=lambda: new_raw_net(spec, 0))
    method = get_method("edm")(ctx)
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
            report(f"timing training: {case.name}")
            rows.append(train_overhead(case, iters, tracker))
            for nfe in (1, 2, 4):
                report(f"timing sampling: {case.name}, NFE {nfe}")
                rows.append(sample_overhead(case, nfe, iters))
    return rows


def print_rows(rows: list[dict[str, Any]], console: Any) -> None:
    """A rich table of the figures."""
    from rich.table import Table

    table = Table(title="bench perf (median seconds, ratio = bench / bare PyTorch)")
    for col in ("figure", "case", "nfe", "bench s", "bare s", "ratio", "target"):
        table.add_column(col, justify="right" if col not in ("figure", "case") else "left")
    for r in rows:
        ok = "green" if r["ratio"] <= r["target"] else "red"
        table.add_row(r["figure"], r["case"], "-" if r["nfe"] is None else str(r["nfe"]),
                      f"{r['bench_seconds']:.3e}", f"{r['bare_seconds']:.3e}",
                      f"[{ok}]{r['ratio']:.3f}[/{ok}]", f"{r['target']:.2f}")
    console.print(table)


def write_json(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows plus a description of the machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
