"""Images per second of a CD training iteration: bench's loop against openai/consistency_models'
CMTrainLoop.run_step, on the same ADM configuration, batch, precision and device.

    python benchmarks/official_cd.py --official PATH/TO/consistency_models [--device cpu]
        [--batch 4] [--iterations 5] [--channels 64] [--size 32] [--out FILE.json]

The official code is imported from its own checkout, unchanged; what it needs that a machine
without its full stack lacks is supplied here at run time, and the JSON says so:

- mpi4py: one process, so a COMM_WORLD of rank 0 and size 1 (torch.distributed is set up with
  gloo or NCCL for one process, as its dist_util would);
- blobfile: only imported (no file is read: no checkpoint is loaded);
- piq: its LPIPS needs VGG16 weights from the internet; both sides use the l2 distance instead
  (the official KarrasDenoiser builds LPIPS in its constructor, so piq.LPIPS is a placeholder and
  loss_norm is set to "l2" afterwards);
- flash-attn 0.2.8: CUDA-only; on the CPU the official AttentionBlock's default attention type
  is set to "legacy" (its own QKVAttentionLegacy), as the same class offers;
- without use_fp16, CMTrainLoop's target update pairs flattened target master parameters with
  the model's unflattened ones and fails on the first step: the same EMA update, per tensor.

Both sides: the class-conditional ADM UNet of the ImageNet-64 configuration at reduced width and
size (the CPU can run it), dropout 0, a frozen teacher of the same architecture with random
weights, Heun teacher steps on N = 40 levels, fixed target EMA 0.95, l2 distance, RAdam at lr
8e-6, the official three EMA rates against bench's one evaluation EMA, each as its own code does
it. The sides alternate iteration blocks; medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch


def _stub_official_imports(cpu: bool) -> list[str]:
    """What the official code imports that this machine may lack; returns what was supplied."""
    supplied = []
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        world = types.SimpleNamespace(rank=0, size=1, Get_rank=lambda: 0, Get_size=lambda: 1,
                                      bcast=lambda value, root=0: value, barrier=lambda: None)
        module = types.ModuleType("mpi4py")
        module.MPI = types.SimpleNamespace(COMM_WORLD=world)  # type: ignore[attr-defined]
        sys.modules["mpi4py"] = module
        supplied.append("mpi4py: a one-process COMM_WORLD")
    try:
        import blobfile  # noqa: F401
    except ImportError:
        module = types.ModuleType("blobfile")
        module.exists = lambda path: False  # type: ignore[attr-defined]
        module.join = os.path.join  # type: ignore[attr-defined]
        sys.modules["blobfile"] = module
        supplied.append("blobfile: imported only (no file read)")
    module = types.ModuleType("piq")

    class LPIPS(torch.nn.Module):  # never called: loss_norm is l2 on both sides
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__()

    module.LPIPS = LPIPS  # type: ignore[attr-defined]
    sys.modules["piq"] = module
    supplied.append("piq.LPIPS: a placeholder (l2 distance; its VGG16 weights need internet)")
    if cpu:
        supplied.append("flash-attn: CUDA-only; AttentionBlock's attention_type = legacy")
    return supplied


def official_side(repo: Path, args: argparse.Namespace, device: torch.device,
                  ) -> tuple[Any, Any, Any, int]:
    """The official CMTrainLoop on the configuration; (step fn, batch, cond, parameters)."""
    supplied = _stub_official_imports(device.type == "cpu")
    sys.path.insert(0, str(repo))
    import torch.distributed as dist
    from cm import logger, unet
    from cm.script_util import (
        create_ema_and_scales_fn,
        create_model_and_diffusion,
        model_and_diffusion_defaults,
    )
    from cm.train_util import CMTrainLoop

    if device.type == "cpu":
        init = unet.AttentionBlock.__init__

        def legacy(self: Any, *a: Any, **k: Any) -> None:
            k["attention_type"] = "legacy"
            init(self, *a, **k)

        unet.AttentionBlock.__init__ = legacy  # type: ignore[method-assign]
    if not dist.is_initialized():
        with tempfile.NamedTemporaryFile(delete=False) as rendezvous:
            pass
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0,
                                world_size=1, init_method=f"file://{rendezvous.name}")
    logger.configure(dir=tempfile.mkdtemp(prefix="official-cm-"), format_strs=[])
    options = model_and_diffusion_defaults()
    options.update(image_size=args.size, num_channels=args.channels, num_res_blocks=2,
                   channel_mult="1,2,2", attention_resolutions="16,8", num_head_channels=32,
                   use_scale_shift_norm=True, resblock_updown=True, class_cond=True,
                   dropout=0.0, use_fp16=args.precision == "fp16", weight_schedule="uniform")
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**options, distillation=True)
    teacher, teacher_diffusion = create_model_and_diffusion(**options, distillation=False)
    diffusion.loss_norm = teacher_diffusion.loss_norm = "l2"
    for net in (model, teacher):
        net.to(device)
        if args.precision == "fp16":
            net.convert_to_fp16()
    target = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batch = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1)
    cond = {"y": torch.randint(0, 1000, (args.batch,), generator=g)}
    loop = CMTrainLoop(
        model=model, target_model=target, teacher_model=teacher,
        teacher_diffusion=teacher_diffusion, training_mode="consistency_distillation",
        ema_scale_fn=create_ema_and_scales_fn("fixed", 0.95, "fixed", 40, 40, 600000, 50000),
        total_training_steps=600000, diffusion=diffusion, data=iter(()),
        batch_size=args.batch, microbatch=-1, lr=8e-6,
        ema_rate="0.999,0.9999,0.9999432189950708", log_interval=10**9, save_interval=10**9,
        resume_checkpoint="", use_fp16=args.precision == "fp16", weight_decay=0.0,
        lr_anneal_steps=0)
    if args.precision != "fp16":
        # its target update pairs flattened target master params (make_master_params) with the
        # model's unflattened ones, which only agree under use_fp16: the same update, per tensor
        from cm.nn import update_ema

        def update_target() -> None:
            rate, _ = loop.ema_scale_fn(loop.global_step)
            with torch.no_grad():
                update_ema(list(target.parameters()), loop.mp_trainer.master_params, rate=rate)

        loop._update_target_ema = update_target  # type: ignore[method-assign]
        supplied.append("CMTrainLoop._update_target_ema: per-tensor (its flattened target "
                        "master params only match the model's under use_fp16)")
    args.supplied = supplied
    return (lambda: loop.run_step(batch, cond)), batch, cond, sum(
        p.numel() for p in model.parameters())


def bench_side(args: argparse.Namespace, device: torch.device) -> tuple[Any, int]:
    """bench's CD training loop on the same configuration; (block fn, parameters)."""
    import methods  # noqa: F401
    from bench.core.config import resolve
    from bench.engine.training import BatchStream, LoopHooks, new_loop_state, train_loop
    from bench.perf.doctor import _build
    from bench.perf.run import SyntheticImages

    sets = [f"device={device.type}", f"train.batch_size={args.batch}",
            f"train.precision={args.precision}", "train.log_every=1000000",
            "train.optimizer=radam", "train.warmup_steps=0",
            "train.checkpoint_every=0", "train.steps=1000000", "train.lr=8e-6",
            "net.kind=adm", f"net.model_channels={args.channels}", "net.channel_mult=[1,2,2]",
            "net.num_res_blocks=2", "net.attn_resolutions=[16,8]", "net.num_head_channels=32",
            "net.scale_shift_norm=true", "net.resblock_updown=true",
            "net.class_conditional=true", "net.dropout=0.0", "cd.distance=l2",
            "cd.solver=heun", "cd.n_scales=40", "cd.init_from=ema", "cd.target_mu=0.95"]
    cfg = resolve(bench_files=[], flags={"method": "cd", "dataset": "imagenet64"},
                  sets=sets).config
    dataset = SyntheticImages((3, args.size, args.size), size=max(4 * args.batch, 16))
    dataset.num_classes = 1000
    labels = torch.randint(0, 1000, (len(dataset),), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    method = _build("cd", cfg, dataset, device)
    state = new_loop_state(method, cfg.train, 0, device)
    stream = BatchStream(dataset.train_batch, len(dataset), labels, args.batch, 0, device)
    hooks = LoopHooks()

    def block(n: int) -> None:
        train_loop(method, cfg.train, stream, state, hooks, until=state.step + n)

    return block, sum(p.numel() for p in method.student.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.precision == "bf16":
        sys.exit("the official code has no bf16 path (fp16 through its MixedPrecisionTrainer)")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    official_step, _, _, official_params = official_side(args.official, args, device)
    bench_block, bench_params = bench_side(args, device)
    official_step()
    bench_block(1)  # warm-up: optimizer state, first allocations
    times: dict[str, list[float]] = {"official": [], "bench": []}
    for _ in range(args.rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iterations):
            official_step()
        sync()
        times["official"].append((time.perf_counter() - t0) / args.iterations)
        t0 = time.perf_counter()
        bench_block(args.iterations)
        sync()
        times["bench"].append((time.perf_counter() - t0) / args.iterations)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": str(device), "precision": args.precision, "batch": args.batch,
        "image_size": args.size, "channels": args.channels,
        "parameters": {"official": official_params, "bench": bench_params},
        "seconds_per_iteration": medians,
        "images_per_second": {k: args.batch / v for k, v in medians.items()},
        "bench_over_official_speed": medians["official"] / medians["bench"],
        "rounds": args.rounds, "iterations_per_round": args.iterations,
        "supplied_to_the_official_code": args.supplied,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
