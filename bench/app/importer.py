"""`bench import`: a checkpoint released with the consistency-models PyTorch code
(openai/consistency_models: edm_imagenet64_ema.pt, cd_imagenet64_l2.pt, cd_imagenet64_lpips.pt,
ct_imagenet64.pt and the LSUN-256 ones) becomes a FINISHED cmbench run, so that `bench eval
--run ID` evaluates it like a run trained here.

The file is a plain state dict of the official UNetModel, read with weights_only=True. Its keys
are mapped to ours by bench.nets.adm (to_official_key: an explicit table), strictly: a missing or
unexpected key, or a wrong shape, is a one-line error. The run follows the tracking contract of
trained runs: tags method / dataset / teacher, the resolved config (the paper preset of the
method and dataset, plus --set) as params and as config.toml, and checkpoints/last.pt in the
project's checkpoint format, with the imported weights as student, EMA (the released files are
the EMA weights) and, for consistency models, target network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.app.runner import checkpoint_path
from bench.app.tracking import RUN_ID_PATTERN, Tracker, git_commit, package_versions
from bench.core.config import (
    RunConfig,
    default_bench_files,
    dumps,
    flatten,
    public_dict,
    resolve,
)
from bench.core.errors import BenchError, UsageError, unreadable_reason
from bench.data.datasets import describe_dataset
from bench.engine.checkpoint import save_checkpoint
from bench.engine.models import denoiser_from_spec, model_spec
from bench.metrics.extractors import file_sha256
from bench.nets.adm import ADMUNet, from_official
from methods import all_methods, get_method, teacher_method

IMPORT_DATASETS = ("imagenet64", "lsun-bedroom", "lsun-cat")  # where the PyTorch code has them

Reporter = Callable[[str], None]


@dataclass(frozen=True)
class ImportRequest:
    """What `bench import` was asked to do."""

    checkpoint: Path  # the official .pt file (a state dict of UNetModel)
    kind: str  # the method it was trained with (one that declares official_import)
    dataset: str  # "imagenet64", "lsun-bedroom" or "lsun-cat"
    name: str | None = None  # run name; default <kind>-<dataset>-<file stem>
    teacher: str = "auto"  # cd: the EDM teacher's run id, or auto (newest finished edm run)
    sets: tuple[str, ...] = ()  # --set overrides of the preset (e.g. a net width)


def read_official(path: Path) -> dict[str, torch.Tensor]:
    """The official state dict at path (weights_only=True); one-line errors."""
    if not path.is_file():
        raise BenchError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or holding more than tensors
        raise BenchError(f"{path} {unreadable_reason(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise BenchError(f"{path} is not a state dict of tensors (the official UNetModel's)")
    return state


def _teacher_run(tracker: Tracker, teacher: str, dataset: str) -> str:
    """The teacher's run id for an imported distilled model (its evaluation rebuilds it)."""
    if teacher in ("", "auto"):
        method = teacher_method()
        runs = tracker.search(dataset, f"tags.method = '{method}' and "
                              "attributes.status = 'FINISHED'", max_results=1)
        if not runs:
            raise BenchError(f"no finished {method} run on {dataset} to serve as the teacher: "
                             f"import the teacher's checkpoint first (bench import --kind "
                             f"{method} --dataset {dataset} --checkpoint ....pt) or pass "
                             f"--teacher")
        return runs[0].run_id
    if not RUN_ID_PATTERN.match(teacher):
        raise UsageError(f"--teacher must be a run id or auto, got {teacher!r}")
    record = tracker.get_run(teacher)
    if record.tags.get("dataset") != dataset:
        raise UsageError(f"teacher run {teacher} is on {record.tags.get('dataset')!r}, not "
                         f"{dataset!r}")
    return teacher


def imported_config(request: ImportRequest, cwd: Path) -> RunConfig:
    """The paper preset of (kind, dataset) with the request's --set overrides."""
    kinds = [cls.name for cls in all_methods() if cls.official_import]
    if request.kind not in kinds:
        raise UsageError(f"--kind must be one of {', '.join(kinds)}, got {request.kind!r}")
    if request.dataset not in IMPORT_DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(IMPORT_DATASETS)} (the "
                         f"datasets of the released PyTorch checkpoints), got "
                         f"{request.dataset!r}")
    cfg = resolve(bench_files=default_bench_files(cwd),
                  flags={"method": request.kind, "dataset": request.dataset},
                  sets=list(request.sets)).config
    if cfg.net.kind != "adm":
        raise UsageError(f"the released checkpoints are ADM UNets; net.kind is {cfg.net.kind!r}")
    return cfg


def _modules(kind: str, cfg: RunConfig, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The networks a run of `kind` checkpoints, all holding the imported weights."""
    modules: dict[str, Any] = {"student": weights}
    for name in get_method(kind).imported_modules(cfg):  # e.g. a target network theta^-
        modules[name] = weights
    if cfg.train.ema_rate > 0:
        modules["ema"] = weights
    return modules


def import_checkpoint(tracker: Tracker, request: ImportRequest, cwd: Path,
                      report: Reporter) -> str:
    """Create a FINISHED run from an official checkpoint; return its run id."""
    cfg = imported_config(request, cwd)
    state = read_official(request.checkpoint)
    needs_teacher = get_method(request.kind).needs_teacher
    teacher = _teacher_run(tracker, request.teacher, request.dataset) if needs_teacher else "none"
    cfg = cfg.model_copy(update={"teacher": teacher})
    dataset = describe_dataset(request.dataset)
    spec = model_spec(cfg, dataset, get_method(request.kind).precond)
    denoiser = denoiser_from_spec(spec, seed=cfg.seed)
    if not isinstance(denoiser.net, ADMUNet):
        raise UsageError("the released checkpoints are ADM UNets")
    from_official(denoiser.net, state, str(request.checkpoint))
    report(f"loaded {len(state)} tensors from {request.checkpoint} into net adm "
           f"({sum(p.numel() for p in denoiser.parameters()):,} parameters): no missing or "
           f"unexpected key")
    weights = denoiser.state_dict()
    modules = _modules(request.kind, cfg, weights)
    checkpoint = {
        "model": spec,
        "modules": modules,
        "eval_module": "ema" if "ema" in modules else "student",
        "loop": {"step": cfg.train.steps, "optimizer": {},
                 "ema": weights if "ema" in modules else {},
                 "generator": torch.empty(0, dtype=torch.uint8)},  # no RNG to resume
        "method_state": {},
        "config": public_dict(cfg),  # no password at rest
        "imported_from": str(request.checkpoint),
    }
    sha = file_sha256(request.checkpoint)
    tags = {
        "method": request.kind,
        "dataset": request.dataset,
        "teacher": teacher,
        "teacher_kind": "run" if needs_teacher else "none",
        "imported_from": str(request.checkpoint.resolve()),
        "imported_sha256": sha,
        "device": "cpu",
        "git_commit": git_commit(),
        "versions": package_versions(),
    }
    name = request.name or f"{request.kind}-{request.dataset}-{request.checkpoint.stem}"
    run_id = tracker.start_run(experiment=request.dataset, run_name=name, tags=tags,
                               params=flatten(public_dict(cfg)),
                               files={"config.toml": dumps(cfg)})
    try:
        path = checkpoint_path(tracker, run_id)
        save_checkpoint(checkpoint, path)
        if tracker.get_run(run_id).local_artifact_dir is None:
            tracker.log_artifact(run_id, path, "checkpoints")
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
    return run_id
