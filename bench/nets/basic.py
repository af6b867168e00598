"""Raw networks F(x_in, c_noise, class_labels): the shared layers, a residual MLP for 2-D data and
a small UNet (the paper's networks, built from these layers, are in bench.nets.adm and
bench.nets.songunet; bench.nets.build makes any of them by name).

Preconditioning (c_skip, c_out, c_in, c_noise) lives in `bench.diffusion.denoiser.Denoiser`; the
networks here only map (x_in, c_noise, class_labels) to an output of x_in's shape. Initialisation
follows EDM's DDPM++ (Karras et al. 2022): Xavier-uniform weights, zero biases, and a 1e-5 weight
scale on every layer that closes a residual branch and on the output layer, so F starts near 0 and
D(x; sigma) starts near c_skip x while gradients still reach every parameter. All weights are drawn
from an explicit `torch.Generator` seeded by the `seed` argument: building a net never touches
torch's global RNG, and the only random numbers a forward pass draws are dropout's (from torch's
default generator), so a caller can replay a dropout mask with `torch.random.fork_rng` and
`torch.set_rng_state`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "NoiseEmbedding", "UNet"]

ZERO_INIT_SCALE = 1e-5  # EDM's `init_zero`: near-zero weights that close residual branches
ATTN_INIT_SCALE = math.sqrt(0.2)  # EDM's `init_attn` for the qkv projection
SKIP_SCALE = math.sqrt(0.5)  # DDPM++ residual scaling: (branch + skip) / sqrt(2)


# --- layers with generator-driven initialisation -------------------------------------------------


def xavier_uniform_(
    weight: Tensor, fan_in: int, fan_out: int, scale: float, gen: torch.Generator
) -> None:
    """Fill weight in place with Xavier-uniform values times scale, drawn from gen.

    Weights on the meta device (a net built under `torch.device("meta")` to count its
    parameters) are left alone.
    """
    if weight.is_meta:
        return
    bound = scale * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        sample = torch.rand(weight.shape, generator=gen, dtype=torch.float32)
        weight.copy_((2.0 * sample - 1.0) * bound)


class GeneratorInit(nn.Module):
    """A layer whose weights are drawn from an explicit generator by reset_parameters."""

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Redraw the weights from generator."""
        raise NotImplementedError


class Linear(GeneratorInit):
    """Affine layer with Xavier-uniform weights scaled by init_scale and a zero bias (EDM)."""

    def __init__(self, in_features: int, out_features: int, init_scale: float = 1.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.init_scale = init_scale
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Redraw the weights from generator and zero the bias."""
        xavier_uniform_(
            self.weight, self.in_features, self.out_features, self.init_scale, generator
        )
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x @ weight.T + bias."""
        return F.linear(x, self.weight, self.bias)


class Conv2d(GeneratorInit):
    """Square 'same'-padded convolution with EDM's Xavier-uniform init scaled by init_scale."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        self.stride = stride
        self.init_scale = init_scale
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Redraw the weights from generator and zero the bias."""
        area = self.kernel * self.kernel
        xavier_uniform_(
            self.weight,
            self.in_channels * area,
            self.out_channels * area,
            self.init_scale,
            generator,
        )
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Convolve x (B, C_in, H, W) to (B, C_out, H / stride, W / stride)."""
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.kernel // 2)


class Embedding(GeneratorInit):
    """Lookup table of class vectors drawn from N(0, 1), as nn.Embedding's default."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_embeddings, embedding_dim))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Redraw the table from generator (left alone on the meta device)."""
        if self.weight.is_meta:
            return
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator))

    def forward(self, labels: Tensor) -> Tensor:
        """Rows of the table for integer labels (B,)."""
        return F.embedding(labels, self.weight)


def reset_all(root: nn.Module, generator: torch.Generator) -> None:
    """Reinitialise every layer of root, in registration order, from generator."""
    for module in root.modules():
        if isinstance(module, GeneratorInit):
            module.reset_parameters(generator)
        elif isinstance(module, nn.GroupNorm | nn.LayerNorm):
            module.reset_parameters()


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with seed."""
    return torch.Generator(device="cpu").manual_seed(seed)


def num_groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of channels <= min(32, channels // 4), at least 1."""
    limit = max(1, min(32, channels // 4))
    return next(g for g in range(limit, 0, -1) if channels % g == 0)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with num_groups(channels) groups (eps 1e-6, as in DDPM++)."""
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


def check_image(x: Tensor, channels: int, resolution: int, name: str) -> None:
    """Raise ValueError unless x is a batch of (channels, resolution, resolution) images."""
    expected = (channels, resolution, resolution)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"{name} expects x of shape (B, {expected}), got {tuple(x.shape)}")


def check_inputs(
    x: Tensor, c_noise: Tensor, class_labels: Tensor | None, num_classes: int,
    time_inputs: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """Validate the shared forward inputs; return c_noise in at least float32 precision, (B,)
    for one time input or (B, time_inputs) for several, and the labels to use."""
    batch = x.shape[0]
    if c_noise.ndim == 0:
        c_noise = c_noise.expand(batch)
    if time_inputs > 1 and c_noise.ndim == 1 and c_noise.shape[0] == time_inputs:
        c_noise = c_noise.expand(batch, time_inputs)
    expected = (batch,) if time_inputs == 1 else (batch, time_inputs)
    if c_noise.shape != expected:
        raise ValueError(f"c_noise must have shape {expected}, got {tuple(c_noise.shape)}")
    c_noise = c_noise.to(torch.promote_types(c_noise.dtype, torch.float32))
    if num_classes == 0:
        return c_noise, None
    if class_labels is None:
        raise ValueError(f"this net is conditional on {num_classes} classes: pass class_labels")
    if class_labels.shape != (batch,):
        raise ValueError(
            f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}"
        )
    return c_noise, class_labels.long()


def time_features(c_noise: Tensor, features: Callable[[Tensor], Tensor]) -> Tensor:
    """features() of c_noise (B,), or of each column of c_noise (B, k) side by side: a first
    linear layer over them sums one projection per time input (MeanFlow's (t, t - r))."""
    if c_noise.ndim == 1:
        return features(c_noise)
    return torch.cat([features(column) for column in c_noise.unbind(1)], dim=1)


def pixel_norm(x: Tensor, eps: float = 1e-4) -> Tensor:
    """x / sqrt(mean over channels of x^2 + eps): unit RMS per position (dim 1)."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def adaptive_norm(normed: Tensor, params: Tensor, double_norm: bool) -> Tensor:
    """GroupNorm output scaled and shifted by the embedding's (scale, shift) halves of params:
    normed (1 + scale) + shift, or with double_norm normed pnorm(scale) + pnorm(shift), the
    pixel-normalised AdaGN of Lu & Song 2024 (sCM, section 4.1)."""
    scale, shift = params.chunk(2, dim=1)
    if double_norm:
        return torch.addcmul(pixel_norm(shift), normed, pixel_norm(scale))
    return torch.addcmul(shift, normed, scale + 1)


# --- noise and class embedding --------------------------------------------------------------------


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise (EDM PositionalEmbedding, endpoint=True), then an MLP."""

    def __init__(self, num_channels: int, emb_dim: int, max_positions: int = 10000,
                 time_inputs: int = 1) -> None:
        super().__init__()
        if num_channels < 4 or num_channels % 2:
            raise ValueError(f"num_channels must be even and >= 4, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.layer0 = Linear(num_channels * time_inputs, emb_dim)
        self.layer1 = Linear(emb_dim, emb_dim)

    def features(self, c_noise: Tensor) -> Tensor:
        """[cos(c_noise f_k), sin(c_noise f_k)] with f_k = max_positions^(-k / (K - 1))."""
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=c_noise.device) / (half - 1)
        freqs = (1.0 / self.max_positions) ** exponents
        angles = c_noise[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def forward(self, c_noise: Tensor) -> Tensor:
        """Embedding (B, emb_dim) of c_noise (B,) or (B, time_inputs)."""
        return self.layer1(F.silu(self.layer0(time_features(c_noise, self.features))))


def _even_features(channels: int) -> int:
    """Number of sinusoidal noise features for a net of this width: even and at least 4."""
    return max(4, channels + channels % 2)


def _condition(
    noise_embedding: NoiseEmbedding,
    class_embedding: Embedding | None,
    c_noise: Tensor,
    class_labels: Tensor | None,
) -> Tensor:
    """SiLU(noise embedding + class embedding): the vector every block is conditioned on."""
    emb = noise_embedding(c_noise)
    if class_embedding is not None and class_labels is not None:
        emb = emb + class_embedding(class_labels)
    return F.silu(emb)


# --- MLP for 2-D data ----------------------------------------------------------------------------


class MLPBlock(nn.Module):
    """Pre-norm residual block h + W1 dropout(SiLU(W0 SiLU(LN(h)) + A emb))."""

    def __init__(self, width: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc0 = Linear(width, width)
        self.affine = Linear(emb_dim, width)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = Linear(width, width, init_scale=ZERO_INIT_SCALE)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """One residual update of h (B, width) given the activated embedding emb (B, emb_dim)."""
        a = self.fc0(F.silu(self.norm(h))) + self.affine(emb)
        return h + self.fc1(self.dropout(F.silu(a)))


class MLP(nn.Module):
    """Residual MLP F(x, c_noise, class_labels) for (B, dim) data; unconditional ignores labels."""

    def __init__(
        self,
        dim: int,  # data dimension D (2 for the toy datasets)
        width: int = 256,  # hidden width of the residual stream
        depth: int = 4,  # number of residual blocks (two width x width layers each)
        emb_dim: int = 128,  # width of the noise(+class) embedding
        num_classes: int = 0,  # > 0: class-conditional through a learned class embedding
        dropout: float = 0.0,  # dropout probability inside each block
        seed: int = 0,  # seed of the weight initialisation
        time_inputs: int = 1,  # noise/time inputs embedded side by side (MeanFlow: 2)
    ) -> None:
        super().__init__()
        if min(dim, width, depth, emb_dim, time_inputs) < 1 or num_classes < 0:
            raise ValueError("MLP sizes must be positive and num_classes >= 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim = dim
        self.num_classes = num_classes
        self.time_inputs = time_inputs
        self.noise_embedding = NoiseEmbedding(_even_features(emb_dim), emb_dim,
                                              time_inputs=time_inputs)
        self.class_embedding = Embedding(num_classes, emb_dim) if num_classes > 0 else None
        self.input = Linear(dim, width)
        self.blocks = nn.ModuleList(MLPBlock(width, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.output = Linear(width, dim, init_scale=ZERO_INIT_SCALE)
        self.reset_parameters(seeded(seed))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Reinitialise every weight from generator."""
        reset_all(self, generator)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """F(x, c_noise, class_labels) with x (B, dim), c_noise (B,) (or (B, time_inputs)),
        labels (B,) or None."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        c_noise, class_labels = check_inputs(x, c_noise, class_labels, self.num_classes,
                                             self.time_inputs)
        emb = _condition(self.noise_embedding, self.class_embedding, c_noise, class_labels)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(self.out_norm(h)))


# --- UNet for images -----------------------------------------------------------------------------


class EmbedBlock(nn.Module):
    """A block whose forward takes (x, emb): EmbedSequential passes it the embedding."""


class ResBlock(EmbedBlock):
    """DDPM++/ADM residual block with the embedding injected by scale-shift or by addition."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float,
        scale_shift_norm: bool,
        double_norm: bool = False,
    ) -> None:
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.double_norm = double_norm
        self.norm0 = _group_norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3)
        self.affine = Linear(emb_dim, out_channels * (2 if scale_shift_norm else 1))
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_scale=ZERO_INIT_SCALE)
        self.skip = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """(branch(x, emb) + skip(x)) / sqrt(2) for x (B, C_in, H, W), emb (B, emb_dim)."""
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None]
        if self.scale_shift_norm:
            h = F.silu(adaptive_norm(self.norm1(h), params, self.double_norm))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        skip = x if self.skip is None else self.skip(x)
        return (h + skip) * SKIP_SCALE


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (B, heads, L, d), by
    F.scaled_dot_product_attention with each input made dense in d first. PyTorch's fused
    kernels (flash and memory-efficient on CUDA, flash on the CPU) take only inputs whose last
    dimension has stride 1; any other goes to the math kernel, which holds the L x L weights
    and their softmax in memory: the views of a (B, C, H, W) convolution output over H x W are
    such inputs. Copying them (3 B C H W values; none under channels-last, whose views are
    already dense in d) keeps the fused kernels: on the CPU 1.3-1.9 times faster forward and
    backward than the math kernel, the same values to float rounding."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H x W positions, residual, as in DDPM++."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide {channels} channels")
        self.num_heads = num_heads
        self.norm = _group_norm(channels)
        self.qkv = Conv2d(channels, channels * 3, 1, init_scale=ATTN_INIT_SCALE)
        self.proj = Conv2d(channels, channels, 1, init_scale=ZERO_INIT_SCALE)

    def forward(self, x: Tensor) -> Tensor:
        """(x + proj(attention(norm(x)))) / sqrt(2)."""
        batch, channels, height, width = x.shape
        head_dim = channels // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.num_heads, head_dim, height * width)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, heads, HW, head_dim)
        a = attention(q, k, v).transpose(-1, -2).reshape(batch, channels, height, width)
        return (x + self.proj(a)) * SKIP_SCALE


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """Halve H and W."""
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        """Double H and W."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.ModuleList):
    """Layers applied in order; residual blocks also receive the embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply every layer to x, passing emb to the EmbedBlocks."""
        for layer in self:
            x = layer(x, emb) if isinstance(layer, EmbedBlock) else layer(x)
        return x


class UNet(nn.Module):
    """DDPM++/ADM-style UNet F(x, c_noise, class_labels); labels ignored if unconditional."""

    def __init__(
        self,
        in_channels: int,  # image channels C (output has the same)
        resolution: int,  # image side H == W; divisible by 2^(len(channel_mult) - 1)
        model_channels: int = 64,  # base channel count
        channel_mult: tuple[int, ...] = (1, 2, 2),  # channels per level, times model_channels
        num_res_blocks: int = 2,  # residual blocks per level in the encoder (+1 in the decoder)
        attn_resolutions: tuple[int, ...] = (16,),  # self-attention here (absent ones ignored)
        dropout: float = 0.0,  # dropout probability inside the residual blocks
        num_classes: int = 0,  # > 0: class-conditional through a learned class embedding
        emb_dim: int | None = None,  # embedding width; None = 4 * model_channels
        num_heads: int = 1,  # attention heads (must divide the channels where attention is)
        scale_shift_norm: bool = True,  # inject the embedding as GroupNorm scale and shift
        seed: int = 0,  # seed of the weight initialisation
        time_inputs: int = 1,  # noise/time inputs embedded side by side (MeanFlow: 2)
        double_norm: bool = False,  # pixel-normalised scale and shift (sCM's AdaGN)
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        if levels == 0 or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be non-empty positive ints, got {channel_mult}")
        if min(in_channels, model_channels, num_res_blocks, num_heads) < 1 or num_classes < 0:
            raise ValueError("UNet sizes must be positive and num_classes >= 0")
        if resolution < 1 or resolution % (2 ** (levels - 1)):
            raise ValueError(
                f"resolution {resolution} is not divisible by 2^{levels - 1} "
                f"({levels} levels in channel_mult)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        emb_dim = 4 * model_channels if emb_dim is None else emb_dim
        self.in_channels = in_channels
        self.resolution = resolution
        self.num_classes = num_classes
        self.time_inputs = time_inputs
        self.noise_embedding = NoiseEmbedding(_even_features(model_channels), emb_dim,
                                              time_inputs=time_inputs)
        self.class_embedding = Embedding(num_classes, emb_dim) if num_classes > 0 else None

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, scale_shift_norm, double_norm)

        channels = model_channels * channel_mult[0]
        self.encoder = nn.ModuleList([EmbedSequential([Conv2d(in_channels, channels, 3)])])
        skip_channels = [channels]
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(channels, model_channels * mult)]
                channels = model_channels * mult
                if res in attn_resolutions:
                    layers.append(AttentionBlock(channels, num_heads))
                self.encoder.append(EmbedSequential(layers))
                skip_channels.append(channels)
            if level != levels - 1:
                self.encoder.append(EmbedSequential([Downsample(channels)]))
                skip_channels.append(channels)

        self.middle = EmbedSequential(
            [
                res_block(channels, channels),
                AttentionBlock(channels, num_heads),
                res_block(channels, channels),
            ]
        )

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolution >> level
            for index in range(num_res_blocks + 1):
                layers = [res_block(channels + skip_channels.pop(), model_channels * mult)]
                channels = model_channels * mult
                if res in attn_resolutions:
                    layers.append(AttentionBlock(channels, num_heads))
                if level != 0 and index == num_res_blocks:
                    layers.append(Upsample(channels))
                self.decoder.append(EmbedSequential(layers))

        self.out_norm = _group_norm(channels)
        self.out_conv = Conv2d(channels, in_channels, 3, init_scale=ZERO_INIT_SCALE)
        self.reset_parameters(seeded(seed))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Reinitialise every weight from generator."""
        reset_all(self, generator)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """F(x, c_noise, class_labels) with x (B, C, H, W), c_noise (B,) (or (B, time_inputs)),
        labels (B,) or None."""
        check_image(x, self.in_channels, self.resolution, "UNet")
        c_noise, class_labels = check_inputs(x, c_noise, class_labels, self.num_classes,
                                             self.time_inputs)
        emb = _condition(self.noise_embedding, self.class_embedding, c_noise, class_labels)
        skips = []
        h = x
        for block in self.encoder:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.decoder:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))
