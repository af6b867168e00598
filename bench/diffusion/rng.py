"""Per-sample random streams: sample i depends on (seed, i) only, never on its batch.

Noise comes from a counter-based generator: every value is a hash of (seed, sample index, draw
number, element index), computed with vectorised integer ops. So a batch of any size costs a few
tensor ops (no per-sample generator objects), and the values are the same on every device.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
_SCALE = 1.0 / 4294967296.0  # 2^-32: uint32 -> (0, 1)
RESERVE_MAX_VALUES = 1 << 16  # reserve() only where fixed costs dominate (float64 values)


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


def mix32_int(x: int) -> int:
    """mix32 of one 32-bit Python int, with no tensor ops (the same values as mix32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


_U16, _U15 = np.uint32(16), np.uint32(15)
_M1, _M2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def mix32_np(x: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """mix32 on uint32 arrays, whose products wrap modulo 2^32 natively (the same values).
    With `scratch` (a uint32 array shaped like x) x is hashed in place, allocating nothing."""
    if scratch is None:
        x, scratch = x.copy(), np.empty_like(x)
    np.right_shift(x, _U16, out=scratch)
    x ^= scratch
    x *= _M1
    np.right_shift(x, _U15, out=scratch)
    x ^= scratch
    x *= _M2
    np.right_shift(x, _U16, out=scratch)
    x ^= scratch
    return x


def _draw_key(number: int) -> int:
    """The hash that makes randn call `number` of a stream a fresh block of it."""
    return mix32_int(number * 0x9E3779B9 & MASK32)


def _fold(value: int) -> int:
    """A 32-bit digest of an arbitrary non-negative Python int."""
    out = 0x2545F491
    while True:
        out = mix32_int((out ^ (value & MASK32)) & MASK32)
        value >>= 32
        if value == 0:
            return out


def _index_array(indices: Sequence[int]) -> np.ndarray:
    """Sample indices as uint32, checked to lie in [0, 2^32); a range costs no Python loop."""
    if isinstance(indices, range):
        idx = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
        ends = (indices[0], indices[-1]) if len(indices) else (0, 0)
        low, high = min(ends), max(ends)
    else:
        idx = np.asarray(list(indices), dtype=np.int64)
        low, high = (int(idx.min()), int(idx.max())) if idx.size else (0, 0)
    if low < 0 or high > MASK32:
        raise ValueError("sample indices must lie in [0, 2^32)")
    return idx.astype(np.uint32)


class StackedGenerator:
    """Standard normal noise with one independent stream per sample index (EDM style)."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu",
                 ) -> None:
        self.device = torch.device(device)
        idx = _index_array(indices)
        seed_key = np.uint32(_fold(seed))
        # the same hashes as mix32 on int64 tensors, in numpy's wrapping uint32 arithmetic: a
        # few array ops instead of dozens of tensor ops (on the CPU the noise is made there too)
        scratch = np.empty_like(idx)
        key1 = mix32_np(idx ^ seed_key, scratch)
        key1 ^= np.uint32(0x68E31DA4)
        mix32_np(key1, scratch)
        key2 = key1 ^ np.uint32(0xB5297A4D)
        self._np_keys = (key1, mix32_np(key2, scratch))
        self._keys: tuple[torch.Tensor, torch.Tensor] | None = None  # on a GPU: on the device
        if self.device.type != "cpu":
            self._keys = (torch.from_numpy(key1.astype(np.int64)).to(self.device),
                          torch.from_numpy(self._np_keys[1].astype(np.int64)).to(self.device))
        self._draws = 0  # number of randn calls so far: each call is a fresh block of the stream
        self._reserved: list[tuple[int, tuple[int, ...], torch.Tensor]] = []  # see reserve()

    def __len__(self) -> int:
        return int(self._np_keys[0].shape[0])

    def reserve(self, shape: Sequence[int], count: int) -> None:
        """Compute the next `count` draws of `shape` in one pass (on the CPU, for small
        batches, where each array operation's fixed cost outweighs its work); later randn calls
        of that shape take them. The values are those randn would make: draw k of the stream is
        draw k however it was computed."""
        shape = tuple(int(d) for d in shape)
        per_sample = math.prod(shape)
        if (self._keys is not None or count < 2
                or len(self) * per_sample * count > RESERVE_MAX_VALUES):
            return
        first = self._draws + len(self._reserved)
        draws = [_draw_key(d) for d in range(first, first + count)]
        values = self._randn_numpy(per_sample, draws)
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
        per_sample = math.prod(shape)
        draw = _draw_key(number)
        if self._keys is None:
            return self._randn_numpy(per_sample, [draw]).to(dtype).reshape(len(self), *shape)
        key1_t, key2_t = self._keys
        element = torch.arange(per_sample, dtype=torch.int64, device=self.device)
        h = mix32((element[None, :] * 0x27D4EB2F & MASK32) ^ key1_t[:, None] ^ draw)
        u1 = mix32(h ^ key2_t[:, None])
        u2 = mix32(u1 ^ 0x165667B1)
        # in place, in the same order as sqrt(-2 log((u1 + 0.5) s)) cos(2 pi (u2 + 0.5) s)
        r = u1.to(torch.float64).add_(0.5).mul_(_SCALE).log_().mul_(-2.0).sqrt_()
        c = u2.to(torch.float64).add_(0.5).mul_(2.0 * math.pi).mul_(_SCALE).cos_()
        return r.mul_(c).to(dtype).reshape(len(self), *shape)

    def _randn_numpy(self, per_sample: int, draws: list[int]) -> torch.Tensor:
        """randn on the CPU for the hashed draw numbers `draws`, shape (n, len(draws),
        per_sample): the hashes and the float64 + and x in numpy, log, sqrt and cos by torch's
        kernels as on any device: the same values, fewer dispatches."""
        key1, key2 = self._np_keys
        element = np.arange(per_sample, dtype=np.uint32) * np.uint32(0x27D4EB2F)
        block = element[None, :] ^ np.asarray(draws, dtype=np.uint32)[:, None]  # (k, per_sample)
        u1 = block.reshape(1, -1) ^ key1[:, None]  # (n, k * per_sample): 2-D broadcasts
        scratch = np.empty_like(u1)  # every hash in place: no array allocated per operation
        mix32_np(u1, scratch)  # h
        u1 ^= key2[:, None]
        mix32_np(u1, scratch)
        u2 = mix32_np(u1 ^ np.uint32(0x165667B1), scratch)
        r = u1.astype(np.float64)
        r += 0.5
        r *= _SCALE
        torch.from_numpy(r).log_()
        r *= -2.0
        torch.from_numpy(r).sqrt_()
        c = u2.astype(np.float64)
        c += 0.5
        c *= 2.0 * math.pi
        c *= _SCALE
        torch.from_numpy(c).cos_()
        r *= c
        return torch.from_numpy(r.reshape(len(key1), len(draws), per_sample))

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
