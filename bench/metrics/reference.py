"""Cached reference statistics for the image metrics: keyed .npz files, written atomically and
read without pickle.

Layout: <runs_dir>/cache/refstats/<dataset>_<split>_<H>x<W>_<tool>_<mode>_<key>.npz, where <key>
is the first 16 hex digits of the SHA-256 of the JSON key: format version, dataset name, split,
image shape, reference image count, tool, mode and the SHA-256 of the extractor's weights. Any
change of these (another clean-fid mode, other weights, ...) is another file, so stale
statistics are never reused. Each file holds:

  key       the JSON key (checked on load)
  mu        (D,) float64 feature mean
  sigma     (D, D) float64 unbiased feature covariance
  count     () int64 number of reference images
  features  (N, D) float32 reference features, when KID or precision/recall asked for them
  radii     (N,) float32 distance to the k-th nearest reference neighbour, for precision/recall
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.core.atomic import atomic_write
from bench.core.errors import BenchError
from bench.metrics.image import ReferenceStats

REFSTATS_VERSION = 1  # bump when the file layout or the computation changes
REFSTATS_FOLDER = "refstats"  # under the cache folder (<runs_dir>/cache)


@dataclass(frozen=True)
class RefStatsKey:
    """Everything the reference statistics depend on."""

    dataset: str
    split: str
    shape: tuple[int, ...]  # (C, H, W) of the dataset's images
    count: int  # reference images used
    tool: str
    mode: str
    extractor: str  # SHA-256 of the extractor weights

    def as_json(self) -> str:
        """Canonical JSON of the key (with the format version)."""
        return json.dumps({"version": REFSTATS_VERSION, "dataset": self.dataset,
                           "split": self.split, "shape": list(self.shape), "count": self.count,
                           "tool": self.tool, "mode": self.mode, "extractor": self.extractor},
                          sort_keys=True)

    def digest(self) -> str:
        """First 16 hex digits of the key's SHA-256."""
        return hashlib.sha256(self.as_json().encode()).hexdigest()[:16]

    def filename(self) -> str:
        """Readable file name ending in the digest."""
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", self.dataset).strip("-")[-40:] or "dataset"
        side = "x".join(str(s) for s in self.shape[-2:])
        return f"{slug}_{self.split}_{side}_{self.tool}_{self.mode}_{self.digest()}.npz"


def refstats_path(cache_dir: Path, key: RefStatsKey) -> Path:
    """Where the statistics for key are cached."""
    return Path(cache_dir) / REFSTATS_FOLDER / key.filename()


def save_reference_stats(stats: ReferenceStats, key: RefStatsKey, path: Path) -> None:
    """Write the statistics as .npz through a temp file and os.replace."""
    arrays: dict[str, np.ndarray] = {
        "key": np.array(key.as_json()),
        "mu": np.asarray(stats.mu, dtype=np.float64),
        "sigma": np.asarray(stats.sigma, dtype=np.float64),
        "count": np.array(stats.count, dtype=np.int64),
    }
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, dtype=np.float32)
    if stats.radii is not None:
        arrays["radii"] = np.asarray(stats.radii, dtype=np.float32)
    # numpy's stub: mypy binds **arrays to savez's allow_pickle: bool, a keyword numpy 1.26 lacks
    atomic_write(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz (never unpickled); an unreadable file is a one-line error."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise BenchError(f"cannot read statistics '{path}': {' '.join(str(err).split())}"
                         ) from None


def load_reference_stats(path: Path, key: RefStatsKey) -> ReferenceStats | None:
    """The cached statistics for key, or None when absent, unreadable or made for another key."""
    if not path.is_file():
        return None
    try:
        data = _read_npz(path)
    except BenchError:
        return None
    if "key" not in data or str(data["key"]) != key.as_json():
        return None
    return ReferenceStats(mu=data["mu"], sigma=data["sigma"], count=int(data["count"]),
                          features=data.get("features"), radii=data.get("radii"),
                          source=str(path))


def load_published_stats(path: Path, feature_dim: int) -> ReferenceStats:
    """Published mu/sigma (clean-fid or guided-diffusion .npz); wrong shapes are one-line errors."""
    if not path.is_file():
        raise BenchError(f"eval.reference_stats: no file at '{path}'")
    data = _read_npz(path)
    if "mu" not in data or "sigma" not in data:
        raise BenchError(f"eval.reference_stats '{path}' has no 'mu' and 'sigma' arrays "
                         f"(found: {', '.join(sorted(data))})")
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        raise BenchError(f"eval.reference_stats '{path}': mu {mu.shape} and sigma {sigma.shape} "
                         f"do not match {feature_dim}-d features")
    return ReferenceStats(mu=mu, sigma=sigma, count=0, source=str(path))
