"""Resolving --teacher: an MLflow run id, a checkpoint path, `analytic` or `auto`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.app.tracking import RUN_ID_PATTERN, Tracker
from bench.core.errors import BenchError, UsageError
from bench.data.datasets import Dataset, GaussianMixture
from bench.diffusion.denoiser import AnalyticDenoiser
from bench.engine.checkpoint import load_checkpoint
from bench.engine.models import load_denoiser
from methods import teacher_method

CHECKPOINT_ARTIFACT = "checkpoints/last.pt"


@dataclass
class Teacher:
    """A frozen D(x; sigma) and where it came from."""

    model: nn.Module
    source: str  # run id, checkpoint path or "analytic"
    kind: str  # "run", "path" or "analytic"
    # the checkpoint's online (not averaged) weights, when it has them apart from `model`'s
    online: dict[str, torch.Tensor] | None = None


def run_checkpoint(tracker: Tracker, run_id: str) -> Path:
    """Local path of a run's last checkpoint (downloaded if the artifact store is remote)."""
    record = tracker.get_run(run_id)
    local = record.local_artifact_dir
    if local is not None and (local / CHECKPOINT_ARTIFACT).is_file():
        return local / CHECKPOINT_ARTIFACT
    return tracker.download_artifact(run_id, CHECKPOINT_ARTIFACT,
                                     tracker.runs_dir / "downloads" / run_id)


def resolve_teacher(spec: str, dataset: Dataset, tracker: Tracker, device: torch.device,
                    ) -> Teacher:
    """Load the teacher named by spec for this dataset."""
    if spec == "analytic":
        if not isinstance(dataset, GaussianMixture):
            raise UsageError(f"--teacher analytic needs a dataset with an exact denoiser "
                             f"(gmm8, gmm25), not {dataset.name}")
        return Teacher(AnalyticDenoiser(dataset.denoise).to(device), "analytic", "analytic")
    if spec in ("", "auto"):
        method = teacher_method()
        runs = tracker.search(dataset.name, f"tags.method = '{method}' and "
                              "attributes.status = 'FINISHED'", max_results=1)
        if not runs:
            hint = " or pass --teacher analytic" if isinstance(dataset, GaussianMixture) else ""
            raise BenchError(f"no finished {method} teacher for {dataset.name} in the store: "
                             f"train one with `bench run --method {method} --dataset "
                             f"{dataset.name}`{hint}")
        spec = runs[0].run_id
    if RUN_ID_PATTERN.match(spec) and not Path(spec).exists():
        record = tracker.get_run(spec)
        if record.tags.get("dataset") != dataset.name:
            raise UsageError(f"teacher run {spec} was trained on "
                             f"{record.tags.get('dataset')!r}, not {dataset.name!r}")
        path = run_checkpoint(tracker, spec)
        kind, source = "run", spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BenchError(f"--teacher {spec!r} is neither a run id, a checkpoint file, "
                             f"'analytic' nor 'auto'")
        kind, source = "path", str(path)
    state = load_checkpoint(path, map_location=device)
    model_dataset = state.get("model", {}).get("dataset")
    if model_dataset not in (None, dataset.name):
        raise UsageError(f"teacher {source} was trained on {model_dataset!r}, not "
                         f"{dataset.name!r}")
    which = state.get("eval_module", "ema")
    online = state.get("modules", {}).get("student") if which != "student" else None
    return Teacher(load_denoiser(state, which, device, f"teacher {source}"), source, kind,
                   online or None)
