"""Sweep objectives: a metric at an NFE (`w2@1`, `fid@2`); several make a multi-objective study."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from bench.core.errors import UsageError

_PATTERN = re.compile(r"^(?P<metric>[a-z][a-z0-9_]*)@(?P<nfe>[1-9][0-9]*)$")


@dataclass(frozen=True)
class Objective:
    """One metric at one NFE, minimised or maximised."""

    metric: str
    nfe: int
    minimize: bool = True

    @property
    def label(self) -> str:
        """'w2@1'."""
        return f"{self.metric}@{self.nfe}"

    @property
    def key(self) -> str:
        """The MLflow metric name the runner logs for intermediate evaluations: 'w2_nfe1'."""
        return f"{self.metric}_nfe{self.nfe}"

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        """Optuna's direction."""
        return "minimize" if self.minimize else "maximize"


def split_objectives(texts: Iterable[str]) -> list[str]:
    """Repeated --objective options and comma-separated lists -> one list of items."""
    return [part.strip() for text in texts for part in text.split(",") if part.strip()]


def parse_objective(text: str, lower_is_better: dict[str, bool]) -> Objective:
    """'w2@1' -> Objective('w2', 1); a malformed item or unknown metric is a UsageError."""
    m = _PATTERN.match(text.strip())
    if m is None:
        raise UsageError(f"--objective expects METRIC@NFE (e.g. w2@1, fid@2), got {text!r}")
    metric = m["metric"]
    if metric not in lower_is_better:
        raise UsageError(f"unknown objective metric {metric!r}; valid: "
                         f"{', '.join(sorted(lower_is_better))}")
    return Objective(metric, int(m["nfe"]), lower_is_better[metric])


def parse_objectives(texts: Sequence[str], lower_is_better: dict[str, bool],
                     default: str) -> list[Objective]:
    """All objectives of a sweep (default when none is given); duplicates are an error."""
    items = split_objectives(texts) or [default]
    objectives = [parse_objective(t, lower_is_better) for t in items]
    labels = [o.label for o in objectives]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--objective lists the same objective twice: {', '.join(labels)}")
    return objectives


def check_available(objectives: Sequence[Objective], metrics: Sequence[str], dataset: str,
                    ) -> None:
    """Every objective metric must be one the run computes on this dataset."""
    for o in objectives:
        if o.metric not in metrics:
            raise UsageError(f"objective {o.label}: metric {o.metric!r} is not computed on "
                             f"{dataset}; valid: {', '.join(metrics)}")
