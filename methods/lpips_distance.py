"""LPIPS distance for consistency losses (Zhang et al. 2018, VGG16 backbone), in the two forms
the official codes of Song et al. 2023 compute it:

- `lpips` (CIFAR-10, openai/consistency_models_cifar10): the standard LPIPS, VGG16 with its max
  pooling, on images resized to 224 x 224;
- `lpips_avgpool` (ImageNet-64 and LSUN-256, openai/consistency_models): piq's
  `LPIPS(replace_pooling=True)`, the same network with each max pooling replaced by an average
  pooling of the same window, on images resized to 224 x 224 only when they are smaller than
  256 pixels (LSUN-256 goes in at its own size).

Both use the `lpips` package's calibrated linear heads and torchvision's ImageNet VGG16 weights;
without the weights the run stops at start with one line saying how to provide them. piq's input
normalisation of [0, 1] images with ImageNet's mean and std is the lpips package's scaling layer
of [-1, 1] images, so the two packages compute the same function up to the pooling."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from bench.core.errors import BenchError, UsageError

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights, used by lpips
RESIZE_BELOW = 256  # openai/consistency_models: images narrower than this go in at 224 x 224
RESIZE_TO = 224

Pooling = Literal["max", "avg"]
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def vgg_weights_path() -> Path:
    """Where torchvision (and so lpips) looks for the VGG16 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_network(pooling: Pooling, *, pretrained_backbone: bool = True) -> nn.Module:
    """The lpips package's VGG LPIPS, frozen, with max (standard) or average pooling (piq's
    replace_pooling). pretrained_backbone=False keeps a randomly initialised VGG16 (the same
    architecture and calibrated heads, for machines without the ImageNet weights)."""
    try:
        import lpips
    except ImportError:
        raise BenchError("distance lpips needs the lpips package: pip install lpips") from None
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=not pretrained_backbone,
                            verbose=False)
    if pooling == "avg":
        _average_pooling(model)
    return model.eval().requires_grad_(False)


def _average_pooling(module: nn.Module) -> None:
    """Replace every max pooling inside module by an average pooling of the same window."""
    for name, child in module.named_children():
        if isinstance(child, nn.MaxPool2d):
            setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                               ceil_mode=child.ceil_mode))
        else:
            _average_pooling(child)


def lpips_of(model: nn.Module) -> Distance:
    """d(x, y) = LPIPS(x, y) per sample for images in [-1, 1]; grey images are repeated over
    three channels and images smaller than 256 pixels are resized (bilinear) to 224 first."""

    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if x.shape[-1] < RESIZE_BELOW:
            size = (RESIZE_TO, RESIZE_TO)
            x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return model(x, y).flatten()

    return distance


def lpips_distance(shape: tuple[int, ...], device: torch.device, pooling: Pooling = "max",
                   ) -> Distance:
    """The LPIPS distance of a run; fails at start, in one line, when it cannot run here."""
    if len(shape) != 3:
        raise UsageError("distance lpips needs image data; use l2 or pseudo_huber for points")
    try:
        import lpips  # noqa: F401
    except ImportError:
        raise BenchError("distance lpips needs the lpips package: pip install lpips") from None
    weights = vgg_weights_path()
    if not weights.is_file():
        raise BenchError(f"distance lpips needs torchvision's VGG16 weights {VGG16_FILE}, not "
                         f"found at {weights}: copy it there from a machine with internet "
                         f"(or set TORCH_HOME), or use cd.distance/ct.distance = l2 or "
                         f"pseudo_huber")
    return lpips_of(lpips_network(pooling).to(device))
