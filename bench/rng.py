"""Per-sample random streams: sample i depends on (seed, i) only, never on its batch.

Noise comes from a counter-based generator: every value is a hash of (seed, sample index, draw
number, element index), computed with vectorised integer ops. So a batch of any size costs a few
tensor ops (no per-sample generator objects), and the values are the same on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

MASK32 = 0xFFFFFFFF


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for stream `index` of a run seeded with `seed` (for torch.Generator)."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash (C. Wellons) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _fold(value: int) -> int:
    """A 32-bit digest of an arbitrary non-negative Python int."""
    out = 0x2545F491
    while True:
        out = int(mix32(torch.tensor((out ^ (value & MASK32)) & MASK32)))
        value >>= 32
        if value == 0:
            return out


class StackedGenerator:
    """Standard normal noise with one independent stream per sample index (EDM style)."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu",
                 ) -> None:
        self.device = torch.device(device)
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > MASK32):
            raise ValueError("sample indices must lie in [0, 2^32)")
        seed_key = _fold(seed)
        self._key1 = mix32(mix32(idx ^ seed_key) ^ 0x68E31DA4).to(self.device)
        self._key2 = mix32(self._key1 ^ 0xB5297A4D)
        self._draws = 0  # number of randn calls so far: each call is a fresh block of the stream

    def __len__(self) -> int:
        return int(self._key1.shape[0])

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape (len(self), *shape), by Box-Muller in float64."""
        per_sample = math.prod(shape)
        draw = int(mix32(torch.tensor(self._draws * 0x9E3779B9 & MASK32)))
        self._draws += 1
        element = torch.arange(per_sample, dtype=torch.int64, device=self.device)
        h = mix32((element[None, :] * 0x27D4EB2F & MASK32) ^ self._key1[:, None] ^ draw)
        u1 = mix32(h ^ self._key2[:, None])
        u2 = mix32(u1 ^ 0x165667B1)
        scale = 1.0 / 4294967296.0
        r = torch.sqrt(-2.0 * torch.log((u1.to(torch.float64) + 0.5) * scale))
        z = r * torch.cos(2.0 * math.pi * (u2.to(torch.float64) + 0.5) * scale)
        return z.to(dtype).reshape(len(self), *shape)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped like the batch x, one stream per row."""
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} but {len(self)} sample streams")
        return self.randn(x.shape[1:], dtype=x.dtype)


SOBOL_DIMS = 256  # Sobol coordinates per sample path: 128 draws of 2-D noise
_SOBOL_STREAM = MASK32  # stream tag of the scramble seed (sample streams use 0 .. 2^32 - 1)


class SobolGenerator(StackedGenerator):
    """Randomised quasi-Monte Carlo normal noise for low-dimensional data.

    Sample i's noise is point i of one Owen-scrambled Sobol sequence (seeded with `seed`) mapped
    through the inverse normal CDF, so sample i still depends on (seed, i) only, while a set of
    samples covers the noise space far more evenly than independent draws: the number of points
    sent to each mode of a mixture barely fluctuates. Successive randn calls take successive
    coordinates of the point; draws beyond `dims` coordinates fall back to the pseudo-random
    per-sample streams of StackedGenerator.
    """

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu",
                 dims: int = SOBOL_DIMS) -> None:
        super().__init__(seed, indices, device)
        idx = list(indices)
        if idx and idx != list(range(idx[0], idx[0] + len(idx))):
            raise ValueError("quasi-random noise needs a contiguous range of sample indices")
        if not 1 <= dims <= torch.quasirandom.SobolEngine.MAXDIM:
            raise ValueError(f"dims must be in [1, {torch.quasirandom.SobolEngine.MAXDIM}]")
        engine = torch.quasirandom.SobolEngine(dims, scramble=True,
                                               seed=sample_seed(seed, _SOBOL_STREAM))
        if idx:
            engine.fast_forward(idx[0])
        self._points = engine.draw(len(idx), dtype=torch.float64)
        self._used = 0  # coordinates consumed by earlier draws

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The next math.prod(shape) coordinates of each sample's Sobol point, as normals."""
        per_sample = math.prod(shape)
        if self._used + per_sample > self._points.shape[1]:
            return super().randn(shape, dtype)
        u = self._points[:, self._used:self._used + per_sample]
        self._used += per_sample
        z = torch.special.ndtri(u.clamp(2.0**-60, 1.0 - 2.0**-53))
        return z.to(device=self.device, dtype=dtype).reshape(len(self), *shape)
