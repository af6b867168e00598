"""Published numbers that the report puts beside ours: each method declares its own
(`Method.paper`, with the paper and table they come from); values are kept as printed, so a table
shows the paper's own precision."""

from __future__ import annotations

from dataclasses import dataclass

from methods import all_methods


@dataclass(frozen=True)
class PaperNumber:
    """One published value at one NFE."""

    method: str  # bench's method name
    nfe: int
    fid: str  # as printed in the paper
    source: str  # paper and table

    @property
    def value(self) -> float:
        """The value as a number."""
        return float(self.fid)


def paper_numbers(dataset: str) -> list[PaperNumber]:
    """The published numbers for this dataset, in registration order (empty when none)."""
    return [PaperNumber(cls.name, nfe, value, result.source)
            for cls in all_methods() for result in cls.paper if result.dataset == dataset
            for nfe, value in result.pairs()]


def paper_sources(dataset: str) -> list[str]:
    """The distinct sources of a dataset's numbers, sorted."""
    return sorted({p.source for p in paper_numbers(dataset)})
