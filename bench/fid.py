"""FID on image datasets through torch-fidelity's Inception-v3 feature extractor."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bench.config import RunConfig
from bench.datasets import Dataset
from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.evaluation import MetricSuite

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's Inception-v3


def inception_weights_path(cfg: RunConfig) -> Path:
    """eval.inception_weights, else torch-fidelity's file in the torch hub cache."""
    if cfg.eval.inception_weights:
        return Path(cfg.eval.inception_weights).expanduser()
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def require_inception_weights(cfg: RunConfig) -> Path:
    """The weights file; a missing file is a one-line error saying how to provide it."""
    path = inception_weights_path(cfg)
    if not path.is_file():
        raise BenchError(
            f"FID needs the Inception-v3 weights {INCEPTION_FILE}, not found at {path}: "
            f"copy it there from a machine with internet (torch-fidelity's v0.2.0 release) "
            f"or set eval.inception_weights = \"/path/to/{INCEPTION_FILE}\" in bench.toml")
    return path


def prepare_fid(dataset: Dataset, cfg: RunConfig, cache_dir: Path) -> MetricSuite:
    """Reference statistics and fresh FID accumulators for an image dataset."""
    require_inception_weights(cfg)
    raise BenchError("FID with real Inception weights is not wired into evaluation yet; "
                     "use --set eval.metrics=[] on an embedded dataset")
