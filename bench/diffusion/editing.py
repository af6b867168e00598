"""Zero-shot editing with a consistency model (Song et al. 2023, Section 6 and Algorithm 4).

Algorithm 4 works in the coordinates of an orthonormal basis A of the data: the observation fixes
some coefficients of A y (the `known` mask) and the model generates the rest. Each step calls
x0 = f(x, t_i), overwrites the known coefficients of x0 with the observation's, and re-noises to
t_{i+1}. Since A is orthonormal, A^-1 = A^T, and every basis here is a cheap structured one:

- inpainting: the pixel basis (A = I); the mask hides pixels;
- colorisation: per pixel, an orthonormal colour basis whose first vector is the luminance
  direction (0.2989, 0.5870, 0.1140) normalised; the grey image fixes that coefficient;
- super-resolution: per F x F patch and channel, an orthonormal patch basis whose first vector is
  the constant 1/F; the low-resolution image (patch means) fixes that coefficient.

Denoising (one call of f at the observation's noise level), spherical interpolation (one call at
sigma_max on the slerp of two latents) and stroke-guided editing (SDEdit-style: noise a coarse
painting to a level S and run multistep consistency sampling from there) need no replacement.

For the 2-D Gaussian mixtures, `gmm_conditional_sample` draws exactly from the mixture's
conditional distribution of the hidden coordinates given the observed ones, so inpainting one
coordinate given the other is scored against the truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from bench.data.datasets import GaussianMixture
from bench.diffusion.rng import StackedGenerator
from bench.diffusion.samplers import Model
from bench.diffusion.schedules import karras_sigmas

LUMINANCE = (0.2989, 0.5870, 0.1140)  # ITU-R BT.601 weights of R, G, B
MASKS = ("center", "half", "random")  # inpainting masks
STROKE_LEVELS = 4  # grey levels per channel of a synthetic stroke painting

# --- orthonormal bases ------------------------------------------------------------------------


class Basis(Protocol):
    """An orthonormal change of coordinates A of one batch: decode(encode(x)) = x."""

    def encode(self, x: Tensor) -> Tensor:
        """A x: the batch's coefficients in the basis."""
        ...

    def decode(self, c: Tensor) -> Tensor:
        """A^T c: back to data space (A^-1 = A^T for an orthonormal A)."""
        ...


def orthonormal_with_first(vector: Tensor) -> Tensor:
    """An orthonormal matrix (rows) whose first row is vector / |vector|, by QR."""
    v = vector.to(torch.float64).flatten()
    v = v / v.norm()
    m = torch.eye(v.numel(), dtype=torch.float64)
    m[:, 0] = v
    q, _ = torch.linalg.qr(m)
    if float(q[:, 0] @ v) < 0:
        q = -q
    return q.T.contiguous()


def colour_matrix() -> Tensor:
    """3 x 3 orthonormal colour basis; row 0 is the unit luminance direction."""
    return orthonormal_with_first(torch.tensor(LUMINANCE))


def patch_matrix(factor: int) -> Tensor:
    """factor^2 x factor^2 orthonormal patch basis; row 0 is the constant 1 / factor, so the
    first coefficient of a patch is factor times its mean."""
    return orthonormal_with_first(torch.ones(factor * factor))


class PixelBasis:
    """A = I: inpainting hides pixels (or coordinates of 2-D points)."""

    def encode(self, x: Tensor) -> Tensor:
        """The pixels themselves."""
        return x

    def decode(self, c: Tensor) -> Tensor:
        """The pixels themselves."""
        return c


class ColourBasis:
    """Per-pixel orthonormal colour basis of (B, 3, H, W) images; coefficient 0 is luminance."""

    def __init__(self) -> None:
        self.matrix = colour_matrix()

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) colour coefficients, channel 0 the (scaled) luminance."""
        return torch.einsum("dc,bchw->bdhw", self.matrix.to(x), x)

    def decode(self, c: Tensor) -> Tensor:
        """Back to RGB."""
        return torch.einsum("dc,bdhw->bchw", self.matrix.to(c), c)


class PatchBasis:
    """Per-patch, per-channel orthonormal basis of F x F patches of (B, C, H, W) images;
    coefficients are laid out (B, C, H/F, W/F, F*F), coefficient 0 = F x patch mean."""

    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.matrix = patch_matrix(factor)

    def encode(self, x: Tensor) -> Tensor:
        """Patch coefficients (B, C, H/F, W/F, F*F)."""
        b, c, h, w = x.shape
        f = self.factor
        patches = x.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 2, 4, 3, 5)
        return patches.reshape(b, c, h // f, w // f, f * f) @ self.matrix.to(x).T

    def decode(self, coefficients: Tensor) -> Tensor:
        """Back to (B, C, H, W) pixels."""
        b, c, hf, wf, _ = coefficients.shape
        f = self.factor
        patches = (coefficients @ self.matrix.to(coefficients)).reshape(b, c, hf, wf, f, f)
        return patches.permute(0, 1, 2, 4, 3, 5).reshape(b, c, hf * f, wf * f)


@dataclass(frozen=True)
class Replacement:
    """An orthonormal basis and the coefficients an observation fixes (`known`, a boolean
    tensor broadcastable to the coefficients)."""

    basis: Basis
    known: Tensor

    def observe(self, y: Tensor, fill: Tensor) -> Tensor:
        """A^T[(A y) on the known coefficients, (A fill) elsewhere].

        fill = 0 is line 2 of Algorithm 4 (0 is the mean of centred data); bench edit passes
        the training mean, which makes the mean-fill baseline and the editor's input."""
        a_fill = self.basis.encode(fill.expand_as(y))
        return self.basis.decode(torch.where(self.known, self.basis.encode(y), a_fill))

    def replace(self, x: Tensor, y: Tensor) -> Tensor:
        """A^T[(A x) on the unknown coefficients, (A y) on the known ones]."""
        return self.basis.decode(torch.where(self.known, self.basis.encode(y),
                                             self.basis.encode(x)))


def inpaint_mask(kind: str, shape: tuple[int, ...], seed: int, indices: range) -> Tensor:
    """Known-pixel mask (B or 1, 1, H, W) for images of shape (C, H, W).

    center: the centred square of half the side is hidden; half: the bottom half is hidden;
    random: each pixel is hidden with probability 1/2, image i's mask from (seed, i) only."""
    _, h, w = shape
    if kind == "center":
        known = torch.ones(1, 1, h, w, dtype=torch.bool)
        known[..., h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = False
        return known
    if kind == "half":
        known = torch.ones(1, 1, h, w, dtype=torch.bool)
        known[..., h // 2:, :] = False
        return known
    if kind == "random":
        return StackedGenerator(seed + 1, indices).randn((1, h, w)) > 0
    raise ValueError(f"unknown mask {kind!r}; valid: {', '.join(MASKS)}")


def colour_known() -> Tensor:
    """Luminance known, the two chroma coefficients hidden: (1, 3, 1, 1)."""
    return torch.tensor([True, False, False]).reshape(1, 3, 1, 1)


def patch_known(factor: int) -> Tensor:
    """Patch mean known, the other F*F - 1 coefficients hidden: (F*F,)."""
    known = torch.zeros(factor * factor, dtype=torch.bool)
    known[0] = True
    return known


# --- Algorithm 4 and the one-call edits ------------------------------------------------------


def _level(x: Tensor, sigma: float) -> Tensor:
    return x.new_full((x.shape[0],), sigma)


def _clamped(x: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    return x if clamp is None else x.clamp(*clamp)


def edit_levels(nfe: int, sigma_min: float, sigma_start: float, rho: float) -> list[float]:
    """nfe descending levels from sigma_start, spaced evenly in sigma^(1/rho) towards sigma_min
    (sigma_min excluded): the rule of ConsistencyMethod.sample_sigmas with sigma_max replaced."""
    levels = karras_sigmas(nfe + 1, sigma_min, sigma_start, rho).flip(0)
    return [float(s) for s in levels[:nfe]]


@torch.no_grad()
def edit_consistency(
    model: Model,
    y: Tensor,
    replacement: Replacement,
    sigmas: list[float],
    rng: StackedGenerator,
    sigma_min: float,
    clamp: tuple[float, float] | None = None,
) -> Tensor:
    """Implements Algorithm 4 (zero-shot editing) of Song et al. (2023).

    y is the observation with its unknown coefficients filled (Replacement.observe); x starts
    at N(y, t_1^2 I); each f call is followed by the replacement; NFE = len(sigmas).
    """
    x = y + sigmas[0] * rng.randn_like(y)
    x0 = replacement.replace(_clamped(model(x, _level(x, sigmas[0])), clamp), y)
    for t in sigmas[1:]:
        x = x0 + (t**2 - sigma_min**2) ** 0.5 * rng.randn_like(x0)
        x0 = replacement.replace(_clamped(model(x, _level(x, t)), clamp), y)
    return x0


@torch.no_grad()
def denoise(model: Model, noisy: Tensor, sigma: float,
            clamp: tuple[float, float] | None = None) -> Tensor:
    """One consistency call at the observation's noise level: x0 = f(y + sigma z, sigma)."""
    return _clamped(model(noisy, _level(noisy, sigma)), clamp)


def slerp(z0: Tensor, z1: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation per sample: sin((1-a) w)/sin w z0 + sin(a w)/sin w z1, w the
    angle between the flattened z0 and z1 (linear when they are parallel)."""
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, torch.full_like(sin, 1 - alpha),
                     torch.sin((1 - alpha) * omega) / safe)
    w1 = torch.where(parallel, torch.full_like(sin, alpha), torch.sin(alpha * omega) / safe)
    return (w0[:, None] * a + w1[:, None] * b).reshape(z0.shape)


def lerp(z0: Tensor, z1: Tensor, alpha: float) -> Tensor:
    """Linear interpolation (its midpoints have too small a norm for Gaussian latents)."""
    return (1 - alpha) * z0 + alpha * z1


@torch.no_grad()
def interpolate(model: Model, z0: Tensor, z1: Tensor, alphas: list[float], sigma_max: float,
                clamp: tuple[float, float] | None = None, spherical: bool = True) -> Tensor:
    """f(sigma_max slerp(z0, z1, a), sigma_max) for each a: one call per batch of latents.

    Returns (B, len(alphas), *shape): row i goes from sample z0_i to sample z1_i."""
    mix = slerp if spherical else lerp
    latents = torch.stack([mix(z0, z1, a) for a in alphas], dim=1)
    flat = latents.reshape(-1, *z0.shape[1:]) * sigma_max
    return _clamped(model(flat, _level(flat, sigma_max)), clamp).reshape(latents.shape)


def stroke_painting(y: Tensor, factor: int, levels: int = STROKE_LEVELS,
                    value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """A coarse painting of y, standing in for a user's strokes: F x F patch means, each
    channel quantised to `levels` evenly spaced values of the range."""
    basis = PatchBasis(factor)
    coarse = basis.decode(basis.encode(y) * patch_known(factor).to(y.device))
    lo, hi = value_range
    step = (hi - lo) / (levels - 1)
    return lo + step * torch.round((coarse.clamp(lo, hi) - lo) / step)


@torch.no_grad()
def stroke_edit(model: Model, stroke: Tensor, sigmas: list[float], rng: StackedGenerator,
                sigma_min: float, clamp: tuple[float, float] | None = None) -> Tensor:
    """SDEdit with a consistency model (Meng et al. 2022; Song et al. 2023, Section 6): noise the
    painting to sigmas[0], then multistep consistency sampling over sigmas; NFE = len(sigmas)."""
    x = stroke + sigmas[0] * rng.randn_like(stroke)
    x0 = _clamped(model(x, _level(x, sigmas[0])), clamp)
    for t in sigmas[1:]:
        x = x0 + (t**2 - sigma_min**2) ** 0.5 * rng.randn_like(x0)
        x0 = _clamped(model(x, _level(x, t)), clamp)
    return x0


# --- scores -----------------------------------------------------------------------------------


def psnr(x: Tensor, truth: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Peak signal-to-noise ratio per image in dB: 10 log10(range^2 / MSE)."""
    mse = (x.double() - truth.double()).square().flatten(1).mean(1).clamp_min(1e-12)
    peak = (value_range[1] - value_range[0]) ** 2
    return 10.0 * torch.log10(peak / mse)


def gmm_conditional_sample(gmm: GaussianMixture, x: Tensor, known: Tensor, draws: int,
                           generator: torch.Generator) -> Tensor:
    """Exact draws from p(hidden coordinates | known coordinates of x) of an isotropic mixture.

    Component k's weight becomes w_k prod_{j known} N(x_j; m_kj, std^2) (normalised); then the
    hidden coordinates are N(m_k, std^2) of the drawn component, the known ones are copied.
    x: (N, D) points (only their known coordinates are read); known: (D,) bool.
    Returns (N, draws, D), float64.
    """
    x = x.to(torch.float64).cpu()
    known = known.cpu()
    means = gmm.means
    diff = (x[:, None, known] - means[None, :, known]) / gmm.std
    logits = gmm.weights.log()[None, :] - 0.5 * diff.square().sum(2)
    probs = torch.softmax(logits, dim=1)
    component = torch.multinomial(probs, draws, replacement=True, generator=generator)
    noise = torch.randn(x.shape[0], draws, x.shape[1], generator=generator, dtype=torch.float64)
    out = means[component] + gmm.std * noise
    return torch.where(known, x[:, None, :], out)


def gmm_conditional_moments(gmm: GaussianMixture, x: Tensor, known: Tensor,
                            ) -> tuple[Tensor, Tensor]:
    """Closed-form mean and per-coordinate variance of the exact conditional (hidden coords)."""
    x = x.to(torch.float64)
    hidden = ~known
    diff = (x[:, None, known] - gmm.means[None, :, known]) / gmm.std
    probs = torch.softmax(gmm.weights.log()[None, :] - 0.5 * diff.square().sum(2), dim=1)
    m = gmm.means[:, hidden]
    mean = probs @ m
    second = probs @ m.square()
    return mean, second - mean.square() + gmm.std**2


def per_row_w2(a: Tensor, b: Tensor) -> list[float]:
    """1-D W2 between a[i] and b[i] (equal-size sets of reals): RMS of sorted differences."""
    sa, _ = a.double().sort(dim=1)
    sb, _ = b.double().sort(dim=1)
    return [math.sqrt(float(v)) for v in (sa - sb).square().mean(1)]
