"""DDPM++ and NCSN++ (Song et al. 2021, score SDE) for 32x32 images, in the formulation of EDM's
SongUNet (Karras et al. 2022, training/networks.py), which covers both:

| kind     | noise embedding               | encoder                          | resampling   |
|----------|-------------------------------|----------------------------------|--------------|
| `ddpmpp` | positional, model_channels    | standard                         | [1, 1] box   |
| `ncsnpp` | random Fourier (scale 16), x2 | residual (FIR-downsampled input) | [1, 3, 3, 1] |

Both: the first convolution to model_channels, then `num_blocks` residual blocks per level at
model_channels * channel_mult, a residual down (up) block between levels, (branch + skip)/sqrt(2),
the embedding added before the second GroupNorm, one-head attention after the blocks at the
attention resolutions (and after the last decoder block of such a level), GroupNorm eps 1e-6,
and a GroupNorm -> SiLU -> conv3x3 head. The consistency-models CIFAR-10 networks are NCSN++
with channel_mult (2, 2, 2), 4 blocks, attention at 16, model_channels 128
(openai/consistency_models_cifar10, configs/cifar10_k_ve.py). Written from a reading of the
published code; initialisation as in nets.py (Xavier-uniform, zero biases, 1e-5 on closing layers).
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.core.errors import UsageError
from bench.nets.basic import (
    ATTN_INIT_SCALE,
    SKIP_SCALE,
    ZERO_INIT_SCALE,
    Conv2d,
    GeneratorInit,
    Linear,
    attention,
    check_image,
    check_inputs,
    num_groups,
    reset_all,
    seeded,
    time_features,
    xavier_uniform_,
)

__all__ = ["SongUNet", "SongVariant", "VARIANTS"]

SongVariant = Literal["ddpmpp", "ncsnpp"]
FOURIER_SCALE = 16.0  # std of the random Fourier frequencies (NCSN++; iCT uses 0.02)

# kind -> (embedding, noise channels per model channel, encoder, resampling filter)
VARIANTS: dict[str, tuple[str, int, str, tuple[int, ...]]] = {
    "ddpmpp": ("positional", 1, "standard", (1, 1)),
    "ncsnpp": ("fourier", 2, "residual", (1, 3, 3, 1)),
}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


class ResampleConv(GeneratorInit):
    """Convolution (kernel 0 = none) with optional FIR up/downsampling by 2 (EDM's Conv2d)."""

    resample_filter: Tensor | None  # buffer: the 2-D FIR filter (1, 1, k, k), None without one

    def __init__(self, in_channels: int, out_channels: int, kernel: int,
                 resample: Literal["none", "up", "down"], taps: tuple[int, ...],
                 fused: bool = False, init_scale: float = 1.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        self.resample = resample
        self.fused = fused
        self.init_scale = init_scale
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel, kernel)) \
            if kernel else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel else None
        f = torch.as_tensor(taps, dtype=torch.float32)
        self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum().square())[None, None]
                             if resample != "none" else None)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Xavier-uniform weights times init_scale, zero bias."""
        if self.weight is None or self.bias is None:
            return
        area = self.kernel * self.kernel
        xavier_uniform_(self.weight, self.in_channels * area, self.out_channels * area,
                        self.init_scale, generator)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Resample (FIR, per channel) and convolve; `fused` downsamples after the conv."""
        w, b, f = self.weight, self.bias, self.resample_filter
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if f is not None and self.fused and self.resample == "down" and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels,
                         stride=2)
        else:
            if f is not None and self.resample == "up":
                x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1),
                                       groups=self.in_channels, stride=2, padding=f_pad)
            if f is not None and self.resample == "down":
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                             stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class SongBlock(nn.Module):
    """Residual block (embedding added, not scale-shift), optional resampling and attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float,
                 taps: tuple[int, ...], resample: Literal["none", "up", "down"] = "none",
                 attention: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm0 = _norm(in_channels)
        self.conv0 = ResampleConv(in_channels, out_channels, 3, resample, taps)
        self.affine = Linear(emb_dim, out_channels)
        self.norm1 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = ResampleConv(out_channels, out_channels, 3, "none", taps,
                                  init_scale=ZERO_INIT_SCALE)
        self.skip = None
        if in_channels != out_channels or resample != "none":
            self.skip = ResampleConv(in_channels, out_channels, 1, resample, taps)
        self.attention = attention
        if attention:
            self.norm2 = _norm(out_channels)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, init_scale=ATTN_INIT_SCALE)
            self.proj = Conv2d(out_channels, out_channels, 1, init_scale=ZERO_INIT_SCALE)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """(branch + skip) / sqrt(2), then (x + attention(x)) / sqrt(2) if enabled."""
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        h = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.attention:
            batch, channels, height, width = h.shape
            # one head; channels interleaved as (c, [q, k, v]) as in EDM's UNetBlock
            q, k, v = self.qkv(self.norm2(h)).reshape(batch, channels, 3, -1).unbind(2)
            # (B, 1, HW, C): a heads dimension, which the fused kernels need as well
            a = attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                          v.transpose(1, 2)[:, None])
            a = a[:, 0].transpose(1, 2).reshape(batch, channels, height, width)
            h = (self.proj(a) + h) * SKIP_SCALE
        return h


class FourierFeatures(GeneratorInit):
    """cos/sin of 2 pi c_noise f with fixed random frequencies f ~ N(0, scale^2) (NCSN++:
    scale 16; Song & Dhariwal 2023 lower it to 0.02 to make the network less sensitive to the
    noise level)."""

    freqs: Tensor  # buffer: the frequencies (num_channels // 2,)

    def __init__(self, num_channels: int, scale: float = FOURIER_SCALE) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("freqs", torch.zeros(num_channels // 2))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Redraw the frequencies from generator."""
        if self.freqs.is_meta:
            return
        with torch.no_grad():
            self.freqs.copy_(torch.randn(self.freqs.shape, generator=generator) * self.scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        """[cos, sin] features (B, num_channels)."""
        angles = c_noise[:, None] * (2 * math.pi * self.freqs)[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def positional_features(c_noise: Tensor, channels: int) -> Tensor:
    """[cos, sin] of c_noise f_k, f_k = 10000^(-k / (channels / 2 - 1)) (DDPM++, endpoint)."""
    half = channels // 2
    freqs = (1.0 / 10000) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device)
                              / (half - 1))
    angles = c_noise[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ F(x, c_noise, class_labels)."""

    def __init__(
        self,
        variant: SongVariant,  # "ddpmpp" or "ncsnpp" (see VARIANTS)
        in_channels: int,  # image channels C
        resolution: int,  # image side H == W
        model_channels: int = 128,  # base width
        channel_mult: tuple[int, ...] = (2, 2, 2),  # per-level widths, times model_channels
        num_blocks: int = 4,  # residual blocks per level (+1 in the decoder)
        attn_resolutions: tuple[int, ...] = (16,),  # self-attention at these resolutions
        dropout: float = 0.1,  # dropout inside the residual blocks
        num_classes: int = 0,  # > 0: class-conditional (one-hot through a linear map)
        seed: int = 0,  # seed of the weight initialisation
        fourier_scale: float = FOURIER_SCALE,  # ncsnpp: std of the Fourier frequencies
        time_inputs: int = 1,  # noise/time inputs embedded side by side (MeanFlow: 2)
        # the noise embedding instead of the variant's own: "positional" or "fourier"
        embedding: Literal["positional", "fourier"] | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise UsageError(f"unknown SongUNet variant {variant!r}")
        own_embedding, noise_mult, encoder_type, taps = VARIANTS[variant]
        embedding = embedding or cast(Literal["positional", "fourier"], own_embedding)
        levels = len(channel_mult)
        if resolution % (2 ** (levels - 1)):
            raise UsageError(f"net '{variant}': resolution {resolution} is not divisible by "
                             f"2^{levels - 1} (channel_mult {channel_mult})")
        self.in_channels = in_channels
        self.resolution = resolution
        self.num_classes = num_classes
        self.embedding = embedding
        self.time_inputs = time_inputs
        self.noise_channels = model_channels * noise_mult
        emb_dim = 4 * model_channels

        def block(cin: int, cout: int, resample: Literal["none", "up", "down"] = "none",
                  attention: bool = False) -> SongBlock:
            return SongBlock(cin, cout, emb_dim, dropout, taps, resample, attention)

        self.fourier = (FourierFeatures(self.noise_channels, fourier_scale)
                        if embedding == "fourier" else None)
        features = self.noise_channels * time_inputs
        self.map_label = Linear(num_classes, features) if num_classes else None
        self.map_layer0 = Linear(features, emb_dim)
        self.map_layer1 = Linear(emb_dim, emb_dim)

        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, "down")
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = ResampleConv(
                        caux, cout, 3, "down", taps, fused=True)
                    caux = cout
            for index in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{index}"] = block(cin, cout,
                                                              attention=res in attn_resolutions)
        skips: list[int] = []  # widths of the encoder outputs the decoder concatenates
        for name, m in self.enc.items():
            if "aux" not in name:
                assert isinstance(m, (Conv2d, SongBlock))
                skips.append(m.out_channels)

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, "up")
            for index in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = index == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{index}"] = block(cin, cout, attention=attention)
        self.out_norm = _norm(cout)
        self.out_conv = Conv2d(cout, in_channels, 3, init_scale=ZERO_INIT_SCALE)
        self.reset_parameters(seeded(seed))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Reinitialise every weight (and the Fourier frequencies) from generator."""
        reset_all(self, generator)

    def noise_features(self, c_noise: Tensor) -> Tensor:
        """[sin, cos] features (B, noise_channels) of c_noise (B,)."""
        features = self.fourier(c_noise) if self.fourier is not None \
            else positional_features(c_noise, self.noise_channels)
        return features.reshape(c_noise.shape[0], 2, -1).flip(1).reshape(features.shape)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """F(x, c_noise, class_labels) with x (B, C, H, W), c_noise (B,) (or (B, time_inputs)),
        labels (B,) or None."""
        check_image(x, self.in_channels, self.resolution, "SongUNet")
        c_noise, class_labels = check_inputs(x, c_noise, class_labels, self.num_classes,
                                             self.time_inputs)
        emb = time_features(c_noise, self.noise_features)
        if self.map_label is not None and class_labels is not None:
            one_hot = F.one_hot(class_labels, self.num_classes).to(emb.dtype)
            emb = emb + self.map_label(one_hot * math.sqrt(self.num_classes))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips: list[Tensor] = []
        aux = x
        h = x
        for name, module in self.enc.items():
            if "aux_residual" in name:
                h = skips[-1] = aux = (h + module(aux)) * SKIP_SCALE
            elif isinstance(module, SongBlock):
                h = module(h, emb)
                skips.append(h)
            else:
                h = module(h)
                skips.append(h)
        for module in self.dec.values():
            if h.shape[1] != module.in_channels:
                h = torch.cat([h, skips.pop()], dim=1)
            h = module(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))
