"""`bench doctor`: what works on this machine for the real job, one row per check.

- device: torch, CUDA runtime and driver, each GPU, bf16 support, CPU and threads.
- train: every training method's iteration on its paper network (the CIFAR-10 preset's; on a GPU
  also CD on the ImageNet-64 ADM with 1,000 classes) at a small batch, in fp32, bf16 and fp16:
  the real training loop for `iterations` iterations after one warm-up, the loss finite at every
  iteration, images per second and the peak memory above the start (CUDA: max allocated; CPU:
  VmHWM reset before the iterations). Distillation gets a frozen random-weights teacher of the
  same architecture; a preset distance whose weights are missing is replaced by l2 (said so).
- sample: CD sampling at NFE 1 and 2, eager and through sample.compile (torch.compile; on CUDA
  in "reduce-overhead" mode, which replays CUDA graphs): images per second and the largest
  difference between the compiled samples and the eager ones.
- ddp: one DistributedDataParallel step over every GPU with NCCL (gloo on two CPU processes
  without a GPU), the gradients equal on every rank.
- weights: the Inception-v3 files of each metric tool and the VGG16 weights of LPIPS.

On the CPU the subset is smaller (CPU_SUBSET): fp16 needs CUDA's gradient scaler, the training
rows run 3 iterations at batch 2 (an iteration of the paper network takes seconds there), and the
compile check runs on the gmm8 network (compiling the paper network takes minutes). Nothing here
needs MLflow or Optuna.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.core.errors import BenchError
from bench.core.memory import reset_peak_rss, status_kib

PRECISIONS = ("fp32", "bf16", "fp16")
GROUPS = ("train", "sample", "ddp", "weights")
SAMPLE_NFES = (1, 2)
COMPILE_TOLERANCE = {"fp32": 1e-3}  # largest |compiled - eager| sample difference allowed
CPU_SUBSET = ("CPU subset: fp32 and bf16, 3 iterations at batch 2, compile checked on the "
              "gmm8 network")

Report = Callable[[str], None]


@dataclass
class Check:
    """One row of the doctor's table."""

    group: str  # device, train, sample, ddp, weights
    subject: str  # what was checked (a method and its network, a file)
    precision: str = ""
    status: str = "ok"  # ok, FAIL, skip, missing
    detail: str = ""
    images_per_second: float | None = None
    peak_mib: float | None = None
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class DoctorOptions:
    """What to check and at which size."""

    device: torch.device
    iterations: int | None = None  # None: 20 on a GPU, 3 on the CPU
    batch: int | None = None  # None: 2 on the CPU, 16 on a GPU
    methods: list[str] | None = None  # None: every training method
    precisions: tuple[str, ...] = PRECISIONS
    only: tuple[str, ...] = GROUPS  # the groups of checks to run (the device's always runs)

    @property
    def train_batch(self) -> int:
        return self.batch or (16 if self.device.type == "cuda" else 2)

    @property
    def train_iterations(self) -> int:
        return self.iterations or (20 if self.device.type == "cuda" else 3)


# --- device -------------------------------------------------------------------------------------


def device_checks(device: torch.device) -> list[Check]:
    """torch and its build, the CPU, and each GPU with its driver."""
    from bench.perf.run import cpu_name

    cpu = cpu_name()
    rows = [Check("device", "torch", detail=f"torch {torch.__version__}, Python "
                                             f"{platform.python_version()}",
                  values={"torch": torch.__version__, "cuda_build": torch.version.cuda}),
            Check("device", "cpu", detail=f"{cpu}: {os.cpu_count()} cores, "
                                          f"{torch.get_num_threads()} torch threads",
                  values={"cpu": cpu, "cores": os.cpu_count(),
                          "threads": torch.get_num_threads()})]
    if not torch.cuda.is_available():
        why = ("torch built without CUDA" if torch.version.cuda is None
               else f"CUDA {torch.version.cuda} build, no GPU or driver visible")
        rows.append(Check("device", "gpu", status="skip", detail=why))
        return rows
    driver = _nvidia_smi("driver_version")
    for k in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(k)
        rows.append(Check(
            "device", f"cuda:{k}",
            detail=(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, capability "
                    f"{props.major}.{props.minor}, driver {driver or '?'}, CUDA "
                    f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, bf16 "
                    f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"),
            values={"name": props.name, "memory_bytes": props.total_memory,
                    "capability": f"{props.major}.{props.minor}", "driver": driver,
                    "cudnn": torch.backends.cudnn.version()}))
    return rows


def _nvidia_smi(query: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


# --- training -----------------------------------------------------------------------------------


class _Peak:
    """Peak memory above the start of a block: CUDA max allocated, or the CPU's VmHWM (reset
    through /proc/self/clear_refs where Linux allows it; otherwise not measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif reset_peak_rss():
            self.start = status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def mib(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        if not os.access("/proc/self/clear_refs", os.W_OK):
            return None
        return max(status_kib("VmHWM") * 1024 - self.start, 0) / 2**20


@dataclass
class PaperNet:
    """A dataset preset whose network the training rows use, and the shape of its images."""

    preset: str
    shape: tuple[int, int, int]
    num_classes: int


CIFAR10 = PaperNet("cifar10", (3, 32, 32), 0)
IMAGENET64 = PaperNet("imagenet64", (3, 64, 64), 1000)


def _paper_config(method: str, net: PaperNet, precision: str, batch: int,
                  device: torch.device, extra: list[str]) -> Any:
    from bench.core.config import default_bench_files, resolve

    sets = [f"train.batch_size={batch}", f"train.precision={precision}", "train.log_every=1",
            "train.checkpoint_every=0", "train.steps=1000000", f"device={device.type}",
            "train.compile=false", *extra]
    return resolve(bench_files=default_bench_files(Path.cwd()),
                   flags={"method": method, "dataset": net.preset}, sets=sets).config


def _substitute(method: str, exc: BenchError) -> tuple[str, str] | None:
    """An override for what a preset needs that the doctor's setting lacks, and why: l2 for a
    distance whose weights are missing; the teacher's average as the student's start (the
    random teacher keeps no online weights)."""
    text = str(exc)
    if "weights" in text and ("lpips" in text or "VGG16" in text):
        return f"{method}.distance=l2", "no LPIPS weights: l2 distance"
    if "init_from" in text and "no online weights" in text:
        return f"{method}.init_from=ema", "random teacher: student from its average"
    return None


def train_check(method: str, net: PaperNet, precision: str, opts: DoctorOptions) -> Check:
    """`iterations` real training iterations of `method` on the preset's network."""
    from bench.engine.training import BatchStream, LoopHooks, new_loop_state, train_loop
    from bench.perf.run import SyntheticImages

    device = opts.device
    batch = opts.train_batch
    subject = f"{method} / {net.preset} net"
    if precision == "fp16" and device.type != "cuda":
        return Check("train", subject, precision, "skip", "fp16 needs CUDA (gradient scaler)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Check("train", subject, precision, "skip", "this GPU has no bf16")
    dataset = SyntheticImages(net.shape, size=max(4 * batch, 16))
    dataset.num_classes = net.num_classes
    extra: list[str] = []
    notes: list[str] = []
    while True:
        try:
            cfg = _paper_config(method, net, precision, batch, device, extra)
            instance = _build(method, cfg, dataset, device)
            break
        except BenchError as exc:
            substitute = _substitute(method, exc)
            if substitute is None or substitute[0] in extra:
                return Check("train", subject, precision, "FAIL", _line(exc))
            extra.append(substitute[0])
            notes.append(substitute[1])
    note = "".join(f"{n}; " for n in notes)
    params = sum(p.numel() for p in instance.student.parameters()) if instance.student else 0
    losses: list[float] = []
    hooks = LoopHooks(log=lambda metrics, step: losses.append(float(metrics["loss"])))
    try:
        state = new_loop_state(instance, cfg.train, 0, device)
        stream = BatchStream(dataset.train_batch, len(dataset), None, batch, 0, device)
        train_loop(instance, cfg.train, stream, state, hooks, until=1)  # warm-up
        with _Peak(device) as peak:
            _sync(device)
            t0 = time.perf_counter()
            train_loop(instance, cfg.train, stream, state, hooks, until=1 + opts.train_iterations)
            _sync(device)
            seconds = time.perf_counter() - t0
    except Exception as exc:  # a failing iteration is the doctor's finding, not its crash
        return Check("train", subject, precision, "FAIL", f"{type(exc).__name__}: {_line(exc)}")
    finite = all(math.isfinite(v) for v in losses)
    status = "ok" if finite and len(losses) == 1 + opts.train_iterations else "FAIL"
    detail = (f"{note}{opts.train_iterations} iterations at batch {batch}, loss "
              f"{losses[-1]:.4g}" if losses else f"{note}no loss logged")
    if not finite:
        detail = f"{note}non-finite loss in {sum(not math.isfinite(v) for v in losses)} iterations"
    return Check("train", subject, precision, status, detail,
                 images_per_second=batch * opts.train_iterations / seconds, peak_mib=peak.mib(),
                 values={"net": cfg.net.kind, "parameters": params, "batch": batch,
                         "iterations": opts.train_iterations, "seconds": seconds,
                         "loss_first": losses[0] if losses else None,
                         "loss_last": losses[-1] if losses else None,
                         "substitute": extra})


def _build(name: str, cfg: Any, dataset: Any, device: torch.device) -> Any:
    """The method on cfg's network; distillation gets a frozen random-weights teacher."""
    from bench.diffusion.denoiser import Denoiser
    from bench.engine.models import model_spec, new_raw_net
    from methods import MethodContext, get_method, teacher_method

    cls = get_method(name)
    teacher = None
    if cls.needs_teacher:
        precond = get_method(teacher_method()).precond
        teacher = Denoiser(new_raw_net(model_spec(cfg, dataset, precond), 1),
                           sigma_data=dataset.sigma_data, precond=precond)
        teacher.to(device).eval().requires_grad_(False)
    spec = model_spec(cfg, dataset, cls.precond)
    return cls(MethodContext(config=cfg, dataset=dataset, device=device,
                             sigma_data=dataset.sigma_data, teacher=teacher,
                             teacher_source="random", new_net=lambda: new_raw_net(spec, 0)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- sampling -----------------------------------------------------------------------------------


def sample_checks(opts: DoctorOptions) -> list[Check]:
    """CD sampling, eager then compiled, at each NFE of SAMPLE_NFES: images per second and the
    largest difference between the two."""
    from bench.core.config import resolve
    from bench.engine.evaluation import generate, sampling_model
    from bench.perf.run import SyntheticImages

    device = opts.device
    cuda = device.type == "cuda"
    if cuda:
        net, count = CIFAR10, 64
        cfg = _paper_config("cd", net, "fp32", count, device, ["cd.distance=l2"])
        dataset: Any = SyntheticImages(net.shape, size=count)
        subject = "cd / cifar10 net"
    else:
        from bench.data.datasets import get_dataset

        count = 512
        cfg = resolve(bench_files=[], flags={"method": "cd", "dataset": "gmm8"},
                      sets=["device=cpu", "cd.distance=l2"]).config
        dataset = get_dataset("gmm8")
        subject = "cd / gmm8 net"
    if shutil.which(os.environ.get("CXX", "g++")) is None and not cuda:
        return [Check("sample", subject, "fp32", "skip", "torch.compile on the CPU needs a C++ "
                      "compiler (g++), not found")]
    method = _build("cd", cfg, dataset, device)
    # torch's C++ extension loader warns that a CPU machine has no CUDA runtime: not a finding
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    compiled_cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(
        update={"compile": True})})
    cache: dict[int, torch.nn.Module] = {}
    rows = []
    for nfe in SAMPLE_NFES:
        model = method.evaluation_model(None, nfe).to(device).eval()
        outputs: dict[str, torch.Tensor] = {}
        speed: dict[str, float] = {}

        def run(target: torch.nn.Module, sink: list[torch.Tensor], nfe: int = nfe) -> float:
            sink.clear()
            _sync(device)
            t0 = time.perf_counter()
            generate(method, target, dataset, nfe, count, count, 0, device, False,
                     lambda x: sink.append(x.detach().float().cpu()))
            _sync(device)
            return time.perf_counter() - t0

        try:
            for name in ("eager", "compiled"):
                target = (model if name == "eager"
                          else sampling_model(model, compiled_cfg, device, cache))
                chunks: list[torch.Tensor] = []
                warm = run(target, chunks)  # compiles (and records CUDA graphs) on first call
                seconds = min(run(target, chunks) for _ in range(3))
                outputs[name] = torch.cat(chunks)
                speed[name] = count / seconds
                speed[f"{name}_first_call_seconds"] = warm
        except Exception as exc:  # a compiler that fails is the finding
            rows.append(Check("sample", f"{subject}, NFE {nfe}", "fp32", "FAIL",
                              f"{type(exc).__name__}: {_line(exc)}"))
            continue
        diff = float((outputs["compiled"] - outputs["eager"]).abs().max())
        ok = diff <= COMPILE_TOLERANCE["fp32"]
        rows.append(Check(
            "sample", f"{subject}, NFE {nfe}", "fp32", "ok" if ok else "FAIL",
            f"{count} samples: eager {speed['eager']:.0f}/s, compiled {speed['compiled']:.0f}/s "
            f"({'CUDA graphs' if cuda else 'inductor'}; first call "
            f"{speed['compiled_first_call_seconds']:.0f} s), max |compiled - eager| "
            f"{diff:.1e}" + ("" if ok else f" > {COMPILE_TOLERANCE['fp32']:.0e}"),
            images_per_second=speed["compiled"],
            values={**speed, "max_abs_diff": diff, "samples": count}))
    return rows


# --- distributed --------------------------------------------------------------------------------


def ddp_check(device: torch.device) -> Check:
    """One DDP step on every GPU with NCCL, or on two CPU processes with gloo: the averaged
    gradients equal on every rank and to the mean of each rank's own."""
    cuda = device.type == "cuda"
    world = torch.cuda.device_count() if cuda else 2
    backend = "nccl" if cuda else "gloo"
    if cuda and not torch.distributed.is_nccl_available():
        return Check("ddp", "nccl", status="FAIL", detail="torch built without NCCL")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen(
            [sys.executable, "-m", "bench.perf.doctor", "ddp-rank", str(rank), str(world),
             backend, tmp], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) for rank in range(world)]
        t0 = time.perf_counter()
        try:
            outs = [p.communicate(timeout=180) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return Check("ddp", backend, status="FAIL", detail="no answer in 180 s")
        seconds = time.perf_counter() - t0
        failed = [(k, p.returncode, err) for k, (p, (_, err)) in enumerate(zip(procs, outs,
                                                                                 strict=True))
                  if p.returncode != 0]
        if failed:
            k, code, err = failed[0]
            last = (err.strip().splitlines() or [f"exit code {code}"])[-1]
            return Check("ddp", backend, status="FAIL", detail=f"rank {k}: {last}")
        results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    spread = max(abs(r["grad_sum"] - results[0]["grad_sum"]) for r in results)
    expected = sum(r["own_grad_sum"] for r in results) / world
    error = abs(results[0]["grad_sum"] - expected)
    ok = spread <= 1e-5 and error <= 1e-4 * max(1.0, abs(expected))
    where = f"{world} GPUs" if cuda else f"{world} CPU processes (no GPU: gloo stands in for NCCL)"
    return Check("ddp", backend, status="ok" if ok else "FAIL",
                 detail=f"one DDP step on {where}: gradients equal across ranks "
                        f"(spread {spread:.1e}), mean of the ranks' own (error {error:.1e}), "
                        f"{seconds:.1f} s",
                 values={"world_size": world, "spread": spread, "error": error,
                         "seconds": seconds})


def _ddp_rank(rank: int, world: int, backend: str, folder: str) -> dict[str, float]:
    """One rank of ddp_check (a child process): its gradient sums, averaged and its own."""
    import torch.distributed as dist

    from bench.engine.distributed import leave_process_group

    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            init_method=f"file://{folder}/rendezvous")
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(),
                                  torch.nn.Linear(64, 8)).to(device)
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank + 1)).to(device)
        own = torch.autograd.grad(net(x).square().mean(), list(net.parameters()))
        _ddp_backward(net, x, [rank] if device.type == "cuda" else None)
        grad_sum = sum(float(p.grad.double().sum()) for p in net.parameters()
                       if p.grad is not None)
        own_sum = sum(float(g.double().sum()) for g in own)
    finally:
        leave_process_group()  # frees the wrapper _ddp_backward made, then the group
    return {"grad_sum": grad_sum, "own_grad_sum": own_sum}


def _ddp_backward(net: torch.nn.Module, x: torch.Tensor, device_ids: list[int] | None) -> None:
    """One backward pass of net wrapped in DistributedDataParallel (the wrapper is left
    unreferenced on return)."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(net, device_ids=device_ids)  # alive until backward ends
    ddp(x).square().mean().backward()


# --- weights ------------------------------------------------------------------------------------


def weight_checks() -> list[Check]:
    """The metric networks' weights: present (with the path) or missing (with where to put
    them)."""
    from bench.metrics.extractors import CLEAN_FID, TORCH_FIDELITY, locate_weights
    from methods.lpips_distance import VGG16_FILE, vgg_weights_path

    rows = []
    for tool, mode, use in ((TORCH_FIDELITY, "", "FID, IS, KID, precision/recall (default)"),
                            (CLEAN_FID, "clean", "FID with eval.metric_tool = clean-fid"),
                            (CLEAN_FID, "legacy_pytorch", "clean-fid legacy_pytorch")):
        subject = f"Inception-v3 ({tool}{' ' + mode if mode else ''})"
        try:
            path = locate_weights(tool, mode or "clean", "")
        except BenchError as exc:
            rows.append(Check("weights", subject, status="missing",
                              detail=f"{use}: {_line(exc).split(': ', 1)[-1]}"))
            continue
        rows.append(Check("weights", subject, detail=f"{use}: {path}",
                          values={"path": str(path)}))
    vgg = vgg_weights_path()
    rows.append(Check("weights", "VGG16 (LPIPS)", status="ok" if vgg.is_file() else "missing",
                      detail=(f"LPIPS distance (cd, ct presets): {vgg}" if vgg.is_file() else
                              f"LPIPS distance (cd, ct presets): {VGG16_FILE} not found at "
                              f"{vgg}; copy it there from a machine with internet")))
    return rows


# --- the whole check ----------------------------------------------------------------------------


def run_doctor(opts: DoctorOptions, report: Report) -> list[Check]:
    """Every check, in the table's order."""
    from bench.perf.run import train_methods

    rows = device_checks(opts.device)
    cuda = opts.device.type == "cuda"
    if "train" in opts.only:
        for name in opts.methods or train_methods():
            for precision in opts.precisions:
                report(f"training {name} ({precision})")
                rows.append(train_check(name, CIFAR10, precision, opts))
        if cuda and (opts.methods is None or "cd" in opts.methods):
            for precision in opts.precisions:
                report(f"training cd on the ImageNet-64 network ({precision})")
                rows.append(train_check("cd", IMAGENET64, precision, opts))
    if "sample" in opts.only:
        report("sampling, eager and compiled")
        rows.extend(sample_checks(opts))
    if "ddp" in opts.only:
        report("DDP")
        rows.append(ddp_check(opts.device))
    if "weights" in opts.only:
        rows.extend(weight_checks())
    return rows


def print_checks(rows: list[Check], console: Any, seconds: float, device: torch.device) -> None:
    """The rows as a rich table."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal and console.width < 160:  # a log file: room for the details
        console = Console(file=console.file, width=160, force_terminal=False)
    title = f"bench doctor on {device} ({seconds:.0f} s)"
    if device.type != "cuda":
        title += f"; {CPU_SUBSET}"
    table = Table(title=title, box=box.SIMPLE, padding=(0, 1, 0, 0), pad_edge=False)
    for col in ("check", "subject", "prec.", "status", "images/s", "peak MiB", "detail"):
        table.add_column(col, justify="right" if col in ("images/s", "peak MiB") else "left",
                         no_wrap=col != "detail", ratio=1 if col == "detail" else None,
                         overflow="fold")
    styles = {"ok": "green", "FAIL": "red", "skip": "yellow", "missing": "yellow"}
    for k, r in enumerate(rows):
        if k and r.group != rows[k - 1].group:
            table.add_section()
        style = styles.get(r.status, "default")
        table.add_row(r.group if k == 0 or r.group != rows[k - 1].group else "", r.subject,
                      r.precision, f"[{style}]{r.status}[/{style}]",
                      f"{r.images_per_second:.1f}" if r.images_per_second else "",
                      f"{r.peak_mib:.0f}" if r.peak_mib is not None else "", r.detail)
    console.print(table)


def write_json(rows: list[Check], path: Path, device: torch.device, seconds: float) -> None:
    """The rows, the device and the wall-clock seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"device": str(device), "seconds": seconds,
                "subset": None if device.type == "cuda" else CPU_SUBSET,
                "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


if __name__ == "__main__" and sys.argv[1:2] == ["ddp-rank"]:
    _rank, _world, _backend, _folder = sys.argv[2:6]
    print(json.dumps(_ddp_rank(int(_rank), int(_world), _backend, _folder)))
