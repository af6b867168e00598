"""Networks by name: `build_net(kind, shape, ...)` makes the residual MLP, the small UNet, the ADM
UNet or DDPM++ / NCSN++ from one set of options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from torch import nn

from bench.core.errors import UsageError, unknown_name
from bench.nets.adm import ADMUNet
from bench.nets.basic import MLP, UNet
from bench.nets.songunet import SongUNet

__all__ = ["NET_KINDS", "NetKind", "NetOptions", "build_net", "count_parameters", "has_dropout",
           "set_dropout"]

NetKind = Literal["mlp", "unet", "adm", "ddpmpp", "ncsnpp"]
NET_KINDS: tuple[str, ...] = ("mlp", "unet", "adm", "ddpmpp", "ncsnpp")


# --- construction from options -------------------------------------------------------------------


@dataclass(frozen=True)
class NetOptions:
    """Network hyperparameters shared by build_net; each field says which net reads it."""

    width: int = 256  # MLP: hidden width of the residual stream
    depth: int = 4  # MLP: number of residual blocks
    emb_dim: int | None = None  # both: embedding width; None = 128 (MLP), 4 * model_channels (UNet)
    model_channels: int = 64  # UNet: base channel count
    channel_mult: tuple[int, ...] = (1, 2, 2)  # UNet: per-level channel multipliers
    num_res_blocks: int = 2  # UNet: residual blocks per level
    attn_resolutions: tuple[int, ...] = (16,)  # UNet: resolutions with self-attention
    dropout: float = 0.0  # both: dropout probability inside the blocks
    num_heads: int = 1  # UNet: attention heads
    scale_shift_norm: bool = True  # UNet, ADM: embedding as GroupNorm scale/shift (else added)
    num_head_channels: int = 0  # ADM: channels per attention head (> 0 overrides num_heads)
    resblock_updown: bool = False  # ADM: residual blocks for up/downsampling
    fourier_scale: float = 16.0  # NCSN++: std of the random Fourier noise-embedding frequencies
    time_inputs: int = 1  # all: noise/time inputs embedded side by side (MeanFlow's (t, t - r))
    double_norm: bool = False  # UNet, ADM: pixel-normalised AdaGN scale and shift (sCM)
    # DDPM++ / NCSN++: "positional" or "fourier" instead of the variant's own embedding
    noise_embedding: str = "default"

    def __post_init__(self) -> None:
        """Accept lists for the tuple fields (as TOML gives them) and validate every field."""
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        checks = [
            (self.width >= 1, f"net width must be >= 1, got {self.width}"),
            (self.depth >= 1, f"net depth must be >= 1, got {self.depth}"),
            (
                self.emb_dim is None or self.emb_dim >= 1,
                f"net emb_dim must be >= 1, got {self.emb_dim}",
            ),
            (
                self.model_channels >= 1,
                f"net model_channels must be >= 1, got {self.model_channels}",
            ),
            (
                all(m >= 1 for m in self.channel_mult),
                f"net channel_mult must be positive ints, got {self.channel_mult}",
            ),
            (
                self.num_res_blocks >= 1,
                f"net num_res_blocks must be >= 1, got {self.num_res_blocks}",
            ),
            (0.0 <= self.dropout < 1.0, f"net dropout must be in [0, 1), got {self.dropout}"),
            (self.num_heads >= 1, f"net num_heads must be >= 1, got {self.num_heads}"),
            (self.num_head_channels >= 0,
             f"net num_head_channels must be >= 0, got {self.num_head_channels}"),
            (self.fourier_scale > 0,
             f"net fourier_scale must be > 0, got {self.fourier_scale}"),
            (self.time_inputs in (1, 2),
             f"net time_inputs must be 1 or 2, got {self.time_inputs}"),
            (self.noise_embedding in ("default", "positional", "fourier"),
             f"net noise_embedding must be default, positional or fourier, got "
             f"{self.noise_embedding}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


def build_net(
    kind: NetKind,
    shape: tuple[int, ...],
    num_classes: int,
    options: NetOptions,
    seed: int = 0,
) -> nn.Module:
    """The raw network of `kind` for samples of `shape`, initialised from `seed`."""
    if kind == "mlp":
        if len(shape) != 1:
            raise UsageError(f"net 'mlp' needs data of shape (D,), got {shape}")
        return MLP(
            shape[0],
            width=options.width,
            depth=options.depth,
            emb_dim=128 if options.emb_dim is None else options.emb_dim,
            num_classes=num_classes,
            dropout=options.dropout,
            seed=seed,
            time_inputs=options.time_inputs,
        )
    if kind == "unet":
        _require_square(kind, shape)
        if not options.channel_mult:
            raise UsageError("net 'unet' needs a non-empty net.channel_mult")
        levels = len(options.channel_mult)
        if shape[1] % (2 ** (levels - 1)):
            raise UsageError(
                f"net 'unet': resolution {shape[1]} is not divisible by 2^{levels - 1} "
                f"(channel_mult {options.channel_mult})"
            )
        attn_channels = [options.model_channels * m for m in options.channel_mult]
        if any(c % options.num_heads for c in attn_channels):
            raise UsageError(
                f"net num_heads {options.num_heads} must divide every level's channels "
                f"{attn_channels}"
            )
        return UNet(
            shape[0],
            shape[1],
            model_channels=options.model_channels,
            channel_mult=options.channel_mult,
            num_res_blocks=options.num_res_blocks,
            attn_resolutions=options.attn_resolutions,
            dropout=options.dropout,
            num_classes=num_classes,
            emb_dim=options.emb_dim,
            num_heads=options.num_heads,
            scale_shift_norm=options.scale_shift_norm,
            seed=seed,
            time_inputs=options.time_inputs,
            double_norm=options.double_norm,
        )
    if kind in ("adm", "ddpmpp", "ncsnpp"):
        return _build_paper_net(kind, shape, num_classes, options, seed)
    raise unknown_name("net", str(kind), list(NET_KINDS))


def _require_square(kind: str, shape: tuple[int, ...]) -> None:
    """Image nets take square images (C, H, H)."""
    if len(shape) != 3 or shape[1] != shape[2]:
        raise UsageError(f"net {kind!r} needs square images of shape (C, H, H), got {shape}")


def _build_paper_net(kind: str, shape: tuple[int, ...], num_classes: int, options: NetOptions,
                     seed: int) -> nn.Module:
    """The ADM UNet or DDPM++ / NCSN++ from options."""
    _require_square(kind, shape)
    if kind == "adm":
        return ADMUNet(
            shape[0],
            shape[1],
            model_channels=options.model_channels,
            channel_mult=options.channel_mult,
            num_res_blocks=options.num_res_blocks,
            attn_resolutions=options.attn_resolutions,
            dropout=options.dropout,
            num_classes=num_classes,
            num_heads=options.num_heads,
            num_head_channels=options.num_head_channels,
            scale_shift_norm=options.scale_shift_norm,
            resblock_updown=options.resblock_updown,
            seed=seed,
            time_inputs=options.time_inputs,
            double_norm=options.double_norm,
        )
    if options.double_norm:
        raise UsageError(f"net {kind!r} adds the embedding (no scale and shift): "
                         f"net.double_norm applies to unet and adm")
    return SongUNet(
        "ncsnpp" if kind == "ncsnpp" else "ddpmpp",
        shape[0],
        shape[1],
        model_channels=options.model_channels,
        channel_mult=options.channel_mult or (2, 2, 2),
        num_blocks=options.num_res_blocks,
        attn_resolutions=options.attn_resolutions,
        dropout=options.dropout,
        num_classes=num_classes,
        seed=seed,
        fourier_scale=options.fourier_scale,
        time_inputs=options.time_inputs,
        embedding=None if options.noise_embedding == "default"
        else cast(Literal["positional", "fourier"], options.noise_embedding),
    )


def set_dropout(module: nn.Module, p: float) -> None:
    """Set the probability of every dropout layer inside module to p."""
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = p


def has_dropout(module: nn.Module) -> bool:
    """Whether any dropout layer inside module drops anything."""
    return any(isinstance(layer, nn.Dropout) and layer.p > 0 for layer in module.modules())


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of module (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters())
