"""Per-sample random streams: sample i depends on (seed, i) only, never on its batch.

Noise comes from a counter-based generator: every value is a hash of (seed, sample index, draw
number, element index), computed with vectorised integer ops. So a batch of any size costs a few
array ops (no per-sample generator objects), and the values are the same on every device. The
hash is written once, in operators that Python ints, numpy arrays and torch tensors share: the
integer work runs in numpy's uint32 on the CPU (a fraction of a torch op's fixed cost per
operation, and products wrap mod 2^32 by themselves) and as int64 tensor ops masked to 32 bits
on any other device; Box-Muller runs in torch's kernels on both.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
_SCALE = 1.0 / 4294967296.0  # 2^-32: uint32 -> (0, 1)
RESERVE_MAX_VALUES = 1 << 16  # reserve() only where fixed costs dominate (float64 values)

# 32-bit values: a Python int, a uint32 or int64 numpy array, or an int64 torch tensor (arrays
# hashed in place)
Bits = TypeVar("Bits", int, np.ndarray, torch.Tensor)
Ints = TypeVar("Ints", np.ndarray, torch.Tensor)


def sample_seed(seed: int, *index: int) -> int:
    """A 63-bit seed for stream `index` (one or more ints) of a run seeded with `seed` (for
    torch.Generator)."""
    state = np.random.SeedSequence([seed, *index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _mul32(x: Bits, c: int) -> Bits:
    """(x * c) mod 2^32 for x in [0, 2^32) and c in [0, 2^32), arrays in place: a uint32 array
    wraps by itself; otherwise c is taken as c - 2^32 (the same residue) when c >= 2^31, so no
    int64 product overflows, and the product is masked."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint32:
        x *= np.uint32(c)
        return x
    x *= c if c < 1 << 31 else c - (1 << 32)
    x &= MASK32
    return x


def mix32(x: Bits) -> Bits:
    """The lowbias32 integer hash (C. Wellons) of 32-bit values; arrays are hashed in place."""
    x ^= x >> 16
    x = _mul32(x, 0x7FEB352D)
    x ^= x >> 15
    x = _mul32(x, 0x846CA68B)
    x ^= x >> 16
    return x


def _draw_key(number: int) -> int:
    """The hash that makes randn call `number` of a stream a fresh block of it."""
    return mix32(number * 0x9E3779B9 & MASK32)


def _fold(value: int) -> int:
    """A 32-bit digest of an arbitrary non-negative Python int."""
    out = 0x2545F491
    while True:
        out = mix32((out ^ (value & MASK32)) & MASK32)
        value >>= 32
        if value == 0:
            return out


def _index_array(indices: Sequence[int]) -> np.ndarray:
    """Sample indices as int64, checked to lie in [0, 2^32) (so that they fit uint32); a range
    costs no Python loop."""
    if isinstance(indices, range):
        idx = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
        ends = (indices[0], indices[-1]) if len(indices) else (0, 0)
        low, high = min(ends), max(ends)
    else:
        idx = np.asarray(list(indices), dtype=np.int64)
        low, high = (int(idx.min()), int(idx.max())) if idx.size else (0, 0)
    if low < 0 or high > MASK32:
        raise ValueError("sample indices must lie in [0, 2^32)")
    return idx


def _arange(n: int, like: Ints) -> Ints:
    """0, 1, ..., n - 1 in like's library, integer type (and device)."""
    if isinstance(like, torch.Tensor):
        return torch.arange(n, dtype=like.dtype, device=like.device)
    return np.arange(n, dtype=like.dtype)


def _float64(bits: np.ndarray | torch.Tensor) -> torch.Tensor:
    """32-bit values as a float64 tensor (exact), on the device they are on."""
    if isinstance(bits, np.ndarray):
        return torch.from_numpy(bits.astype(np.float64))
    return bits.to(torch.float64)


class _Streams(Generic[Ints]):
    """The counter-based streams of a set of sample indices (uint32 or int64 numpy arrays, or
    int64 tensors): two 32-bit keys per sample, and the normals of any draws of them."""

    def __init__(self, seed: int, indices: Ints) -> None:
        key1 = mix32(indices ^ _fold(seed))
        key1 ^= 0x68E31DA4
        self.key1: Ints = mix32(key1)
        self.key2: Ints = mix32(self.key1 ^ 0xB5297A4D)

    def __len__(self) -> int:
        return int(self.key1.shape[0])

    def normals(self, per_sample: int, draws: Sequence[int]) -> torch.Tensor:
        """Standard normals of the randn calls numbered `draws`, shape (n, len(draws),
        per_sample), float64: each value hashes (sample keys, draw, element) into two uint32
        u1, u2, then sqrt(-2 log((u1 + 0.5) 2^-32)) cos(2 pi (u2 + 0.5) 2^-32)."""
        element = _mul32(_arange(len(draws) * per_sample, self.key1) % per_sample, 0x27D4EB2F)
        for k, number in enumerate(draws):  # draw after draw: (len(draws) * per_sample,)
            element[k * per_sample:(k + 1) * per_sample] ^= _draw_key(number)
        u1 = mix32(self.key1[:, None] ^ element[None, :])  # (n, len(draws) * per_sample)
        u1 ^= self.key2[:, None]
        u1 = mix32(u1)
        u2 = mix32(u1 ^ 0x165667B1)
        # in place, in this order: the same float64 values from the same integers anywhere
        r = _float64(u1).add_(0.5).mul_(_SCALE).log_().mul_(-2.0)
        c = _float64(u2).add_(0.5).mul_(2.0 * math.pi).mul_(_SCALE)
        return r.sqrt_().mul_(c.cos_()).reshape(len(self), len(draws), per_sample)


class StackedGenerator:
    """Standard normal noise with one independent stream per sample index (EDM style)."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu",
                 ) -> None:
        self.device = torch.device(device)
        idx = _index_array(indices)
        # hashed in numpy's uint32 on the CPU, in int64 tensor ops on any other device
        self._streams: _Streams[np.ndarray] | _Streams[torch.Tensor] = (
            _Streams(seed, idx.astype(np.uint32)) if self.device.type == "cpu"
            else _Streams(seed, torch.from_numpy(idx).to(self.device)))
        self._draws = 0  # number of randn calls so far: each call is a fresh block of the stream
        self._reserved: list[tuple[int, tuple[int, ...], torch.Tensor]] = []  # see reserve()

    def __len__(self) -> int:
        return len(self._streams)

    def reserve(self, shape: Sequence[int], count: int) -> None:
        """Compute the next `count` draws of `shape` in one pass (on the CPU, for small
        batches, where each array operation's fixed cost outweighs its work); later randn calls
        of that shape take them. The values are those randn would make: draw k of the stream is
        draw k however it was computed."""
        shape = tuple(int(d) for d in shape)
        per_sample = math.prod(shape)
        if (self.device.type != "cpu" or count < 2
                or len(self) * per_sample * count > RESERVE_MAX_VALUES):
            return
        first = self._draws + len(self._reserved)
        values = self._streams.normals(per_sample, range(first, first + count))
        self._reserved.extend((first + k, shape, values[:, k]) for k in range(count))

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape (len(self), *shape), by Box-Muller in float64."""
        number = self._draws
        self._draws += 1
        if self._reserved:
            ahead, kept_shape, values = self._reserved.pop(0)
            if ahead == number and kept_shape == tuple(shape):
                return values.to(dtype).reshape(len(self), *shape)
            self._reserved.clear()  # another shape was asked for: compute as usual
        values = self._streams.normals(math.prod(shape), [number])
        return values.to(dtype).reshape(len(self), *shape)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped like the batch x, one stream per row."""
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} but {len(self)} sample streams")
        return self.randn(x.shape[1:], dtype=x.dtype)


SOBOL_DIMS = 256  # Sobol coordinates per sample path: 128 draws of 2-D noise
_SOBOL_STREAM = MASK32  # stream tag of the scramble seed (sample streams use 0 .. 2^32 - 1)


@functools.lru_cache(maxsize=8)
def _scrambled_sobol(seed: int, dims: int) -> torch.quasirandom.SobolEngine:
    """The scrambled engine of a seed, made once: scrambling costs far more than drawing."""
    return torch.quasirandom.SobolEngine(dims, scramble=True,
                                         seed=sample_seed(seed, _SOBOL_STREAM))


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
        engine = copy.deepcopy(_scrambled_sobol(seed, dims))
        if idx:
            engine.fast_forward(idx[0])
        self._points = engine.draw(len(idx), dtype=torch.float64)
        self._used = 0  # coordinates consumed by earlier draws

    def reserve(self, shape: Sequence[int], count: int) -> None:
        """Nothing to compute ahead: the points are drawn at construction."""

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The next math.prod(shape) coordinates of each sample's Sobol point, as normals."""
        per_sample = math.prod(shape)
        if self._used + per_sample > self._points.shape[1]:
            return super().randn(shape, dtype)
        u = self._points[:, self._used:self._used + per_sample]
        self._used += per_sample
        z = torch.special.ndtri(u.clamp(2.0**-60, 1.0 - 2.0**-53))
        return z.to(device=self.device, dtype=dtype).reshape(len(self), *shape)
