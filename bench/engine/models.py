"""Building networks from a config, and rebuilding them from a checkpoint's description."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.core.config import NetConfig, RunConfig
from bench.core.errors import BenchError, UsageError
from bench.data.datasets import Dataset
from bench.diffusion.denoiser import Denoiser, get_parameterization
from bench.nets.build import NetOptions, build_net, count_parameters

NET_TITLES = {  # how `bench run` names each net kind when it reports the network it built
    "mlp": "residual MLP",
    "unet": "UNet",
    "adm": "ADM UNet (Dhariwal & Nichol 2021)",
    "ddpmpp": "DDPM++ (Song et al. 2021)",
    "ncsnpp": "NCSN++ (Song et al. 2021)",
}


def net_kind(cfg: NetConfig, dataset: Dataset) -> str:
    """The network family: the configured one, or MLP for points and UNet for images."""
    if cfg.kind != "auto":
        return cfg.kind
    return "mlp" if dataset.kind == "points" else "unet"


def net_options(cfg: NetConfig) -> NetOptions:
    """NetConfig -> the nets module's NetOptions."""
    return NetOptions(
        width=cfg.width,
        depth=cfg.depth,
        emb_dim=cfg.emb_dim or None,
        model_channels=cfg.model_channels,
        channel_mult=tuple(cfg.channel_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=tuple(cfg.attn_resolutions),
        dropout=cfg.dropout,
        num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels,
        scale_shift_norm=cfg.scale_shift_norm,
        resblock_updown=cfg.resblock_updown,
        fourier_scale=cfg.fourier_scale,
        time_inputs=cfg.time_inputs or 1,
        double_norm=cfg.double_norm,
        noise_embedding=cfg.noise_embedding,
    )


def sigma_data_of(cfg: RunConfig, dataset: Dataset) -> float:
    """diffusion.sigma_data, or the dataset's own value when it is 0."""
    return cfg.diffusion.sigma_data or dataset.sigma_data


def model_spec(cfg: RunConfig, dataset: Dataset, precond: str) -> dict[str, Any]:
    """Everything needed to rebuild the denoiser, stored in checkpoints."""
    conditional = cfg.net.class_conditional and dataset.num_classes > 0
    times = get_parameterization(precond).times
    if cfg.net.time_inputs not in (0, times):
        raise UsageError(f"net.time_inputs = {cfg.net.time_inputs}, but the {precond!r} "
                         f"parameterisation takes {times} time input(s); leave it at 0")
    return {
        "kind": net_kind(cfg.net, dataset),
        "shape": list(dataset.shape),
        "num_classes": dataset.num_classes if conditional else 0,
        "net": {**cfg.net.model_dump(), "time_inputs": times},
        "precond": precond,
        "sigma_data": sigma_data_of(cfg, dataset),
        "sigma_min": cfg.diffusion.sigma_min,
        "dataset": dataset.name,
    }


def new_raw_net(spec: dict[str, Any], seed: int) -> nn.Module:
    """A freshly initialised raw network F from a model spec."""
    options = net_options(NetConfig.model_validate(spec["net"]))
    return build_net(spec["kind"], tuple(spec["shape"]), int(spec["num_classes"]), options,
                     seed=seed)


def net_summary(spec: dict[str, Any], model: nn.Module) -> str:
    """One line naming the network of a model spec and its parameter count."""
    kind = str(spec["kind"])
    classes = int(spec["num_classes"])
    conditioning = f", class-conditional ({classes} classes)" if classes else ""
    return (f"net: {kind} - {NET_TITLES.get(kind, kind)}{conditioning}, "
            f"{count_parameters(model):,} parameters")


def denoiser_from_spec(spec: dict[str, Any], seed: int = 0) -> Denoiser:
    """A freshly initialised denoiser from a model spec."""
    return Denoiser(new_raw_net(spec, seed), sigma_data=float(spec["sigma_data"]),
                    precond=spec["precond"], sigma_min=float(spec["sigma_min"]))


def load_denoiser(state: dict[str, Any], which: str, device: torch.device, source: str,
                  ) -> Denoiser:
    """Rebuild the denoiser stored under modules[which] of a checkpoint, frozen, in eval mode."""
    spec = state.get("model")
    modules = state.get("modules", {})
    if not isinstance(spec, dict) or which not in modules:
        raise BenchError(f"{source} holds no {which!r} model")
    model = denoiser_from_spec(spec)
    try:
        model.load_state_dict(modules[which])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BenchError(f"{source} does not match its architecture: {first}") from None
    return model.to(device).eval().requires_grad_(False)
