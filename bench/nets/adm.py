"""The ADM UNet (Dhariwal & Nichol 2021) as the consistency-models paper uses it for ImageNet-64
and LSUN-256 (Song et al. 2023, Appendix C), and the key mapping to the released checkpoints.

Written from a reading of the official PyTorch code (openai/consistency_models, cm/unet.py and
cm/script_util.py; the same UNetModel as openai/guided-diffusion):

- residual blocks GroupNorm(32) -> SiLU -> [resample] -> conv3x3, the embedding added or applied
  as GroupNorm scale and shift (`scale_shift_norm`), GroupNorm -> SiLU -> dropout -> conv3x3;
  the skip is the identity or a 1x1 convolution; branch and skip are summed (no 1/sqrt(2));
- `resblock_updown`: downsampling and upsampling are residual blocks whose branch and skip are
  average-pooled / nearest-upsampled after the first activation (else a strided 3x3 convolution
  and nearest upsampling + conv3x3);
- self-attention at the given resolutions with C / num_head_channels heads; the 1x1 qkv
  projection is laid out [q | k | v], each split into heads (the official default attention);
- the noise embedding is the sinusoidal timestep embedding of t = 1000 c_noise (the official
  code feeds the network 1000 * 0.25 ln(sigma), and our c_noise is 0.25 ln(sigma)), two linear
  layers, plus a learned class embedding when class-conditional.

The parameter names are ours; `to_official_key` and `from_official` / `export_official` convert
between them and the official state-dict layout (see OFFICIAL_NAMES).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.core.errors import BenchError, UsageError
from bench.nets.basic import (
    ZERO_INIT_SCALE,
    Conv2d,
    Downsample,
    EmbedBlock,
    Embedding,
    EmbedSequential,
    Linear,
    Upsample,
    adaptive_norm,
    attention,
    check_image,
    check_inputs,
    reset_all,
    seeded,
    time_features,
)

__all__ = [
    "ADMUNet",
    "export_official",
    "from_official",
    "official_channel_mult",
    "to_official_key",
]

TIMESTEP_SCALE = 1000.0  # official model input: 1000 * 0.25 ln(sigma) = 1000 c_noise
MAX_PERIOD = 10000.0  # official timestep_embedding's max_period
GROUPS = 32  # official normalization(): GroupNorm32(32, channels), eps 1e-5

# cm/script_util.py create_model: channel_mult by image size when none is given.
OFFICIAL_CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
}

Resample = Literal["none", "up", "down"]


def official_channel_mult(resolution: int) -> tuple[int, ...]:
    """The official per-resolution channel multipliers (64, 128 and 256 pixels)."""
    if resolution not in OFFICIAL_CHANNEL_MULT:
        raise UsageError(f"net 'adm' has no official channel_mult for {resolution}x{resolution} "
                         f"(known: {', '.join(map(str, OFFICIAL_CHANNEL_MULT))}); set "
                         f"net.channel_mult")
    return OFFICIAL_CHANNEL_MULT[resolution]


def timestep_features(t: Tensor, channels: int) -> Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = MAX_PERIOD^(-k / (channels / 2)), k < channels / 2."""
    half = channels // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    angles = t[:, None] * freqs[None, :]
    features = torch.cat([angles.cos(), angles.sin()], dim=1)
    if channels % 2:
        features = F.pad(features, (0, 1))
    return features


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-5)


def _resample(x: Tensor, how: Resample) -> Tensor:
    if how == "down":
        return F.avg_pool2d(x, 2)
    if how == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ADMResBlock(EmbedBlock):
    """Residual block; `resample` makes it an up- or downsampling block (resblock_updown)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float,
                 scale_shift_norm: bool, resample: Resample = "none",
                 double_norm: bool = False) -> None:
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.double_norm = double_norm
        self.resample: Resample = resample
        self.norm0 = _norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3)
        self.affine = Linear(emb_dim, out_channels * (2 if scale_shift_norm else 1))
        self.norm1 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_scale=ZERO_INIT_SCALE)
        self.skip = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """skip(x) + branch(x, emb); emb is the activated embedding (B, emb_dim)."""
        h = _resample(F.silu(self.norm0(x)), self.resample)
        x = _resample(x, self.resample)
        h = self.conv0(h)
        params = self.affine(emb)[:, :, None, None]
        if self.scale_shift_norm:
            h = F.silu(adaptive_norm(self.norm1(h), params, self.double_norm))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        return (x if self.skip is None else self.skip(x)) + h


class ADMAttention(nn.Module):
    """Self-attention over H x W positions, residual without rescaling; qkv as [q | k | v]."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise UsageError(f"net 'adm': {num_heads} heads do not divide {channels} channels")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.proj = Conv2d(channels, channels, 1, init_scale=ZERO_INIT_SCALE)

    def forward(self, x: Tensor) -> Tensor:
        """x + proj(attention(norm(x)))."""
        batch, channels, height, width = x.shape
        head_dim = channels // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.num_heads, head_dim, height * width)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, heads, HW, head_dim)
        a = attention(q, k, v)
        return x + self.proj(a.transpose(-1, -2).reshape(batch, channels, height, width))


class ADMUNet(nn.Module):
    """ADM UNet F(x, c_noise, class_labels); block indices follow the official UNetModel."""

    def __init__(
        self,
        in_channels: int,  # image channels C (output has the same)
        resolution: int,  # image side H == W
        model_channels: int = 192,  # base width (num_channels; multiple of 32)
        channel_mult: tuple[int, ...] = (),  # per-level widths; () = the official default
        num_res_blocks: int = 3,  # residual blocks per level (+1 in the decoder)
        attn_resolutions: tuple[int, ...] = (32, 16, 8),  # self-attention at these resolutions
        dropout: float = 0.0,  # dropout inside the residual blocks
        num_classes: int = 0,  # > 0: class-conditional (label_emb)
        num_heads: int = 1,  # attention heads when num_head_channels is 0
        num_head_channels: int = 64,  # channels per head (> 0 overrides num_heads)
        scale_shift_norm: bool = True,  # embedding as GroupNorm scale and shift
        resblock_updown: bool = True,  # residual blocks for up/downsampling
        seed: int = 0,  # seed of the weight initialisation
        time_inputs: int = 1,  # noise/time inputs embedded side by side (MeanFlow: 2)
        double_norm: bool = False,  # pixel-normalised scale and shift (sCM's AdaGN)
    ) -> None:
        super().__init__()
        mults = tuple(channel_mult) or official_channel_mult(resolution)
        levels = len(mults)
        if resolution % (2 ** (levels - 1)):
            raise UsageError(f"net 'adm': resolution {resolution} is not divisible by "
                             f"2^{levels - 1} (channel_mult {mults})")
        widths = [model_channels * m for m in mults]
        if any(w % GROUPS for w in widths):
            raise UsageError(f"net 'adm': every level's width {widths} must be a multiple of "
                             f"{GROUPS} (GroupNorm32)")
        self.in_channels = in_channels
        self.resolution = resolution
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.time_inputs = time_inputs
        emb_dim = 4 * model_channels

        def heads(channels: int) -> int:
            if num_head_channels > 0:
                if channels % num_head_channels:
                    raise UsageError(f"net 'adm': num_head_channels {num_head_channels} does "
                                     f"not divide {channels} channels")
                return channels // num_head_channels
            return num_heads

        def res_block(cin: int, cout: int, resample: Resample = "none") -> ADMResBlock:
            return ADMResBlock(cin, cout, emb_dim, dropout, scale_shift_norm, resample,
                               double_norm)

        self.noise_map0 = Linear(model_channels * time_inputs, emb_dim)
        self.noise_map1 = Linear(emb_dim, emb_dim)
        self.class_embedding = Embedding(num_classes, emb_dim) if num_classes > 0 else None

        channels = widths[0]
        self.encoder = nn.ModuleList([EmbedSequential([Conv2d(in_channels, channels, 3)])])
        skip_channels = [channels]
        for level, width in enumerate(widths):
            res = resolution >> level
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(channels, width)]
                channels = width
                if res in attn_resolutions:
                    layers.append(ADMAttention(channels, heads(channels)))
                self.encoder.append(EmbedSequential(layers))
                skip_channels.append(channels)
            if level != levels - 1:
                down = res_block(channels, channels, "down") if resblock_updown \
                    else Downsample(channels)
                self.encoder.append(EmbedSequential([down]))
                skip_channels.append(channels)

        self.middle = EmbedSequential([res_block(channels, channels),
                             ADMAttention(channels, heads(channels)),
                             res_block(channels, channels)])

        self.decoder = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            res = resolution >> level
            for index in range(num_res_blocks + 1):
                layers = [res_block(channels + skip_channels.pop(), width)]
                channels = width
                if res in attn_resolutions:
                    layers.append(ADMAttention(channels, heads(channels)))
                if level and index == num_res_blocks:
                    layers.append(res_block(channels, channels, "up") if resblock_updown
                                  else Upsample(channels))
                self.decoder.append(EmbedSequential(layers))

        self.out_norm = _norm(channels)
        self.out_conv = Conv2d(channels, in_channels, 3, init_scale=ZERO_INIT_SCALE)
        self.reset_parameters(seeded(seed))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Reinitialise every weight from generator."""
        reset_all(self, generator)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """F(x, c_noise, class_labels) with x (B, C, H, W), c_noise (B,), labels (B,) or None."""
        check_image(x, self.in_channels, self.resolution, "ADMUNet")
        c_noise, class_labels = check_inputs(x, c_noise, class_labels, self.num_classes,
                                             self.time_inputs)
        features = time_features(
            c_noise, lambda c: timestep_features(TIMESTEP_SCALE * c, self.model_channels))
        emb = self.noise_map1(F.silu(self.noise_map0(features)))
        if self.class_embedding is not None and class_labels is not None:
            emb = emb + self.class_embedding(class_labels)
        emb = F.silu(emb)  # the official blocks start their embedding layers with SiLU
        skips = []
        h = x
        for stage in self.encoder:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for stage in self.decoder:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))


# --- the official state-dict layout --------------------------------------------------------------
#
# Official key = ours with these renames (everything else, block indices included, is equal):
#   top level:  noise_map0 -> time_embed.0     noise_map1 -> time_embed.2
#               class_embedding -> label_emb   encoder -> input_blocks    middle -> middle_block
#               decoder -> output_blocks       out_norm -> out.0          out_conv -> out.2
#   in a residual block:  norm0 -> in_layers.0   conv0 -> in_layers.2   affine -> emb_layers.1
#                         norm1 -> out_layers.0  conv1 -> out_layers.3  skip -> skip_connection
#   in an attention block: norm, qkv unchanged; proj -> proj_out
#   the strided downsampling conv (resblock_updown off): conv -> op (encoder only; the
#   upsampling conv keeps its name `conv`).
# The attention's 1x1 qkv and proj are Conv1d in the official code: weights (out, in, 1) there,
# (out, in, 1, 1) here; nothing else changes shape.

OFFICIAL_NAMES: dict[str, str] = {
    "noise_map0": "time_embed.0",
    "noise_map1": "time_embed.2",
    "class_embedding": "label_emb",
    "encoder": "input_blocks",
    "middle": "middle_block",
    "decoder": "output_blocks",
    "out_norm": "out.0",
    "out_conv": "out.2",
}
OFFICIAL_BLOCK_NAMES: dict[str, str] = {
    "norm0": "in_layers.0",
    "conv0": "in_layers.2",
    "affine": "emb_layers.1",
    "norm1": "out_layers.0",
    "conv1": "out_layers.3",
    "skip": "skip_connection",
    "proj": "proj_out",
}
_CONV1D_SUFFIXES = (".qkv.weight", ".proj.weight")  # attention 1x1 convs: Conv1d officially


def to_official_key(key: str) -> str:
    """Our parameter name -> the official UNetModel's (see the table above)."""
    parts = key.split(".")
    top = parts[0]
    if top not in OFFICIAL_NAMES:
        raise KeyError(key)
    rest = parts[1:]
    block_at = {"encoder": 2, "decoder": 2, "middle": 1}.get(top)
    if block_at is not None and len(rest) > block_at + 1:
        names = dict(OFFICIAL_BLOCK_NAMES, conv="op") if top == "encoder" \
            else OFFICIAL_BLOCK_NAMES
        rest = [*rest[:block_at], names.get(rest[block_at], rest[block_at]),
                *rest[block_at + 1:]]
    return ".".join([OFFICIAL_NAMES[top], *rest])


def _is_conv1d(our_key: str) -> bool:
    return our_key.startswith(("encoder.", "middle.", "decoder.")) \
        and our_key.endswith(_CONV1D_SUFFIXES)


def export_official(net: ADMUNet) -> dict[str, Tensor]:
    """Our weights as the official UNetModel's state dict (names and shapes)."""
    out: dict[str, Tensor] = {}
    for key, value in net.state_dict().items():
        tensor = value.detach().clone()
        if _is_conv1d(key):
            tensor = tensor.reshape(tensor.shape[:-1])
        out[to_official_key(key)] = tensor
    return out


def from_official(net: ADMUNet, state: dict[str, Tensor], source: str) -> None:
    """Load an official UNetModel state dict into net (strict: every key, every shape)."""
    ours = net.state_dict()
    names = {to_official_key(k): k for k in ours}
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise BenchError(f"{source} does not match this ADM configuration: "
                         f"{', '.join(parts)}")
    converted: dict[str, Tensor] = {}
    for official, key in names.items():
        value = state[official]
        if not isinstance(value, Tensor):
            raise BenchError(f"{source}: {official} is not a tensor")
        expected = ours[key].shape
        if _is_conv1d(key) and tuple(value.shape) + (1,) == tuple(expected):
            value = value.unsqueeze(-1)
        if tuple(value.shape) != tuple(expected):
            official_shape = tuple(expected[:-1]) if _is_conv1d(key) else tuple(expected)
            raise BenchError(f"{source}: {official} has shape {tuple(value.shape)}, this ADM "
                             f"configuration expects {official_shape}")
        converted[key] = value.to(torch.float32)
    net.load_state_dict(converted, strict=True)
