"""The state-dict layout (key -> shape) of the official UNetModel of openai/consistency_models
(cm/unet.py, built by cm/script_util.py create_model), reconstructed for the tests from a reading
of that code and independent of bench.nets.adm: the names are the official ones (input_blocks,
in_layers, emb_layers, out_layers, skip_connection, qkv, proj_out, ...), the attention's 1x1
convolutions are Conv1d (weights (out, in, 1)), GroupNorm has weight and bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class OfficialConfig:
    """The create_model flags of scripts/launch.sh that shape the network."""

    image_size: int = 64
    num_channels: int = 192
    num_res_blocks: int = 3
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    class_cond: bool = True


# ImageNet-64 and LSUN-256 as in scripts/launch.sh
IMAGENET64 = OfficialConfig()
LSUN256 = OfficialConfig(image_size=256, num_channels=256, num_res_blocks=2,
                         channel_mult=(1, 1, 2, 2, 4, 4), use_scale_shift_norm=False,
                         class_cond=False)


def _res_block(prefix: str, ch: int, out: int, emb: int, scale_shift: bool) -> Shapes:
    shapes = {
        f"{prefix}.in_layers.0.weight": (ch,), f"{prefix}.in_layers.0.bias": (ch,),
        f"{prefix}.in_layers.2.weight": (out, ch, 3, 3), f"{prefix}.in_layers.2.bias": (out,),
        f"{prefix}.emb_layers.1.weight": (2 * out if scale_shift else out, emb),
        f"{prefix}.emb_layers.1.bias": (2 * out if scale_shift else out,),
        f"{prefix}.out_layers.0.weight": (out,), f"{prefix}.out_layers.0.bias": (out,),
        f"{prefix}.out_layers.3.weight": (out, out, 3, 3), f"{prefix}.out_layers.3.bias": (out,),
    }
    if out != ch:
        shapes[f"{prefix}.skip_connection.weight"] = (out, ch, 1, 1)
        shapes[f"{prefix}.skip_connection.bias"] = (out,)
    return shapes


def _attention(prefix: str, ch: int) -> Shapes:
    return {
        f"{prefix}.norm.weight": (ch,), f"{prefix}.norm.bias": (ch,),
        f"{prefix}.qkv.weight": (3 * ch, ch, 1), f"{prefix}.qkv.bias": (3 * ch,),
        f"{prefix}.proj_out.weight": (ch, ch, 1), f"{prefix}.proj_out.bias": (ch,),
    }


def official_shapes(cfg: OfficialConfig) -> Shapes:
    """Every key of the official UNetModel's state dict and its shape."""
    mc = cfg.num_channels
    emb = 4 * mc
    attention_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
    ss = cfg.use_scale_shift_norm
    shapes: Shapes = {
        "time_embed.0.weight": (emb, mc), "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,),
    }
    if cfg.class_cond:
        shapes["label_emb.weight"] = (1000, emb)
    ch = cfg.channel_mult[0] * mc
    shapes["input_blocks.0.0.weight"] = (ch, 3, 3, 3)
    shapes["input_blocks.0.0.bias"] = (ch,)
    chans = [ch]
    ds = 1
    index = 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            shapes.update(_res_block(f"input_blocks.{index}.0", ch, mult * mc, emb, ss))
            ch = mult * mc
            if ds in attention_ds:
                shapes.update(_attention(f"input_blocks.{index}.1", ch))
            chans.append(ch)
            index += 1
        if level != len(cfg.channel_mult) - 1:
            if cfg.resblock_updown:
                shapes.update(_res_block(f"input_blocks.{index}.0", ch, ch, emb, ss))
            else:
                shapes[f"input_blocks.{index}.0.op.weight"] = (ch, ch, 3, 3)
                shapes[f"input_blocks.{index}.0.op.bias"] = (ch,)
            chans.append(ch)
            ds *= 2
            index += 1
    shapes.update(_res_block("middle_block.0", ch, ch, emb, ss))
    shapes.update(_attention("middle_block.1", ch))
    shapes.update(_res_block("middle_block.2", ch, ch, emb, ss))
    index = 0
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
        for i in range(cfg.num_res_blocks + 1):
            shapes.update(_res_block(f"output_blocks.{index}.0", ch + chans.pop(), mc * mult,
                                     emb, ss))
            ch = mc * mult
            layer = 1
            if ds in attention_ds:
                shapes.update(_attention(f"output_blocks.{index}.1", ch))
                layer = 2
            if level and i == cfg.num_res_blocks:
                if cfg.resblock_updown:
                    shapes.update(_res_block(f"output_blocks.{index}.{layer}", ch, ch, emb, ss))
                else:
                    shapes[f"output_blocks.{index}.{layer}.conv.weight"] = (ch, ch, 3, 3)
                    shapes[f"output_blocks.{index}.{layer}.conv.bias"] = (ch,)
                ds //= 2
            index += 1
    shapes.update({"out.0.weight": (ch,), "out.0.bias": (ch,),
                   "out.2.weight": (3, ch, 3, 3), "out.2.bias": (3,)})
    return shapes


def official_state(cfg: OfficialConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the official keys and shapes (float32, drawn from seed)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.05 for k, shape in official_shapes(cfg).items()}
