"""The evaluation protocol: how a run's numbers at one NFE were made.

Every evaluation records it as the run's tag `protocol_nfe<n>` (JSON): the sample count, the seed
sets and the statistic the metric's own name holds (the value of one set, or the mean over
several), the noise (quasi-random or random), the reference set (an exact draw, a split and its
size, or published statistics with their sha256), the features (data space, the digits
classifier, Inception-v3 with its weights' sha256) and the metric tool and mode. Two numbers are
comparable when everything but the seeds agrees: `comparable()` is that part, written out, and
reports put numbers with different ones in different columns. Runs logged before the tag
existed get theirs from their params and tags (`logged_protocol`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.core.config import RunConfig
from bench.data.datasets import Dataset
from bench.engine.evaluation import evaluation_seeds, uses_qmc
from bench.metrics.base import MetricSuite

TAG_PREFIX = "protocol_nfe"
SEED_FIELDS = ("seeds", "statistic")  # what may differ between comparable numbers


def _make(samples: int, seeds: list[int], noise: str, reference: str, features: str, tool: str,
          mode: str) -> dict[str, Any]:
    return {"samples": samples, "seeds": seeds,
            "statistic": "mean" if len(seeds) > 1 else "single", "noise": noise,
            "reference": reference, "features": features, "tool": tool, "mode": mode}


def _image_parts(values: Mapping[str, str]) -> tuple[str, str, str, str]:
    """(reference, features, tool, mode) of an image evaluation, from the metric suite's notes
    (which are also the run's tags)."""
    parts = []
    if "inception_weights_sha256" in values or "dinov2_weights_sha256" not in values:
        parts.append(f"Inception-v3 (sha256 {values.get('inception_weights_sha256', '?')})")
    if "dinov2_weights_sha256" in values:
        parts.append(f"DINOv2 {values.get('dinov2_model', '?')} (sha256 "
                     f"{values['dinov2_weights_sha256']})")
    features = "; ".join(parts)
    if values.get("reference_split") == "published":
        reference = (f"published statistics {Path(values.get('reference_stats', '?')).name} "
                     f"(sha256 {values.get('reference_stats_sha256', '?')})")
    else:
        reference = (f"{values.get('reference_split', '?')} split, "
                     f"{values.get('reference_num_samples', '?')} images")
    return reference, features, values.get("metric_tool", "?"), values.get("metric_mode", "?")


def _points_reference(samples: int, reference_seed: object) -> str:
    return f"{samples} exact draws (reference seed {reference_seed})"


def _digits_reference(samples: int) -> str:
    return f"the first {samples} training images"


DIGITS_FEATURES = "the digits classifier (cached, deterministic)"


def evaluation_protocol(dataset: Dataset, cfg: RunConfig, suite: MetricSuite) -> dict[str, Any]:
    """The protocol of an evaluation of `dataset` under `cfg` with the metric suite `suite`."""
    n = cfg.eval.num_samples
    noise = "qmc" if uses_qmc(dataset, cfg) else "random"
    seeds = evaluation_seeds(cfg)
    if dataset.kind == "points":
        return _make(n, seeds, noise, _points_reference(n, cfg.eval.reference_seed),
                     "data space", "bench", "exact")
    if "reference_split" in suite.notes:
        return _make(n, seeds, noise, *_image_parts(suite.notes))
    return _make(n, seeds, noise, _digits_reference(n), DIGITS_FEATURES, "bench",
                 "classifier-features")


def logged_protocol(tags: Mapping[str, str], params: Mapping[str, str], nfe: int,
                    points: bool, digits: bool = False) -> dict[str, Any]:
    """The protocol of a run's evaluation at `nfe`: its tag, or for a run logged before the tag
    existed, what its params and tags say (one seed set, eval.seed); `points` and `digits` say
    which kind of dataset the run is on."""
    recorded = tags.get(f"{TAG_PREFIX}{nfe}")
    if recorded:
        try:
            value = json.loads(recorded)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
    n = int(params.get("eval.num_samples", "0") or 0)
    seeds = [int(params.get("eval.seed", "0") or 0)]
    noise = params.get("eval.noise", "auto")
    if noise == "auto":
        noise = "qmc" if points else "random"
    if points:
        return _make(n, seeds, noise, _points_reference(n, params.get("eval.reference_seed", "1")),
                     "data space", "bench", "exact")
    if digits:
        return _make(n, seeds, noise, _digits_reference(n), DIGITS_FEATURES, "bench",
                     "classifier-features")
    return _make(n, seeds, noise, *_image_parts(tags))


def comparable(protocol: Mapping[str, Any]) -> str:
    """The part two comparable numbers share (all but the seeds), as one line: e.g. '2000
    samples, qmc noise, reference 2000 exact draws (reference seed 1), features data space,
    bench exact'."""
    return (f"{protocol.get('samples', '?')} samples, {protocol.get('noise', '?')} noise, "
            f"reference {protocol.get('reference', '?')}, features {protocol.get('features', '?')}"
            f", {protocol.get('tool', '?')} {protocol.get('mode', '?')}")


def seed_count(protocol: Mapping[str, Any]) -> int:
    """How many seed sets the protocol's statistic is over."""
    seeds = protocol.get("seeds", [])
    return len(seeds) if isinstance(seeds, list) and seeds else 1
