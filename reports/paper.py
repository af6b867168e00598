"""Published FID-vs-NFE numbers that the report puts beside ours (../shared/DESIGN.md, section 3).

Song et al. 2023, "Consistency Models" (arXiv 2303.01469): Table 1 (CIFAR-10, with the DDIM and
EDM baselines it quotes) and Table 2 (ImageNet 64x64, LSUN Bedroom 256 and LSUN Cat 256).
Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models" (arXiv 2310.14189):
the iCT rows. Values are kept as printed, so a table shows the paper's own precision.
"""

from __future__ import annotations

from dataclasses import dataclass

CM_PAPER = "Song et al. 2023 (arXiv 2303.01469)"
ICT_PAPER = "Song & Dhariwal 2023 (arXiv 2310.14189)"


@dataclass(frozen=True)
class PaperNumber:
    """One published FID at one NFE."""

    method: str  # bench's method name
    nfe: int
    fid: str  # as printed in the paper
    source: str  # paper and table

    @property
    def value(self) -> float:
        """The FID as a number."""
        return float(self.fid)


def _rows(method: str, source: str, pairs: str) -> list[PaperNumber]:
    """'1/8.34 2/5.58' -> PaperNumbers."""
    out = []
    for pair in pairs.split():
        nfe, fid = pair.split("/")
        out.append(PaperNumber(method, int(nfe), fid, source))
    return out


_CIFAR = f"{CM_PAPER}, Table 1"
_TABLE2 = f"{CM_PAPER}, Table 2"
_ICT_CIFAR = f"{ICT_PAPER}, Table 2 (iCT, not iCT-deep)"
_ICT_IMAGENET = f"{ICT_PAPER}, Table 3 (iCT, not iCT-deep)"

PAPER_NUMBERS: dict[str, list[PaperNumber]] = {
    "cifar10": [
        *_rows("ddim", _CIFAR, "50/4.67 20/6.84 10/8.23"),
        *_rows("edm", _CIFAR, "35/2.04"),
        *_rows("pd", _CIFAR, "1/8.34 2/5.58"),
        *_rows("cd", _CIFAR, "1/3.55 2/2.93"),
        *_rows("ct", _CIFAR, "1/8.70 2/5.83"),
        *_rows("ict", _ICT_CIFAR, "1/2.83 2/2.46"),
    ],
    "imagenet64": [
        *_rows("edm", _TABLE2, "79/2.44"),
        *_rows("pd", _TABLE2, "1/15.39 2/8.95"),
        *_rows("cd", _TABLE2, "1/6.20 2/4.70"),
        *_rows("ct", _TABLE2, "1/13.0 2/11.1"),
        *_rows("ict", _ICT_IMAGENET, "1/4.02 2/3.20"),
    ],
    "lsun-bedroom": [
        *_rows("pd", _TABLE2, "1/16.92 2/8.47"),
        *_rows("cd", _TABLE2, "1/7.80 2/5.22"),
        *_rows("ct", _TABLE2, "1/16.0 2/7.85"),
    ],
    "lsun-cat": [
        *_rows("pd", _TABLE2, "1/29.6 2/15.5"),
        *_rows("cd", _TABLE2, "1/11.0 2/8.84"),
        *_rows("ct", _TABLE2, "1/20.7 2/11.7"),
    ],
}


def paper_numbers(dataset: str) -> list[PaperNumber]:
    """The published numbers for this dataset (empty when the paper has none)."""
    return list(PAPER_NUMBERS.get(dataset, []))


def paper_sources(dataset: str) -> list[str]:
    """The distinct sources of a dataset's numbers, sorted."""
    return sorted({p.source for p in PAPER_NUMBERS.get(dataset, [])})
