"""LPIPS distance for consistency losses (Zhang et al. 2018, VGG backbone), as the paper uses:
images are upsampled to 224 x 224 first. Needs the `lpips` package and torchvision's pretrained
VGG16 weights; without either the run stops at start with one line saying how to provide it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from bench.core.errors import BenchError, UsageError

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights, used by lpips


def vgg_weights_path() -> Path:
    """Where torchvision (and so lpips) looks for the VGG16 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_distance(shape: tuple[int, ...], device: torch.device,
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """d(x, y) = LPIPS(up224(x), up224(y)) per sample, for images in [-1, 1]."""
    if len(shape) != 3:
        raise UsageError("distance lpips needs image data; use l2 or pseudo_huber for points")
    try:
        import lpips
    except ImportError:
        raise BenchError("distance lpips needs the lpips package: pip install lpips") from None
    weights = vgg_weights_path()
    if not weights.is_file():
        raise BenchError(f"distance lpips needs torchvision's VGG16 weights {VGG16_FILE}, not "
                         f"found at {weights}: copy it there from a machine with internet "
                         f"(or set TORCH_HOME), or use cd.distance/ct.distance = l2 or "
                         f"pseudo_huber")
    model = lpips.LPIPS(net="vgg", pretrained=True, verbose=False).to(device).eval()
    model.requires_grad_(False)

    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        size = (224, 224)
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y = torch.nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return model(x, y).flatten()

    return distance
