"""DINOv2 features for FD_DINOv2, the Frechet distance in DINOv2 ViT-L/14 feature space that
Stein et al. 2023 ("Exposing flaws of generative model evaluation metrics", dgm-eval) propose and
EDM2 reports beside FID.

The network is timm's DINOv2 vision transformer (`vit_large_patch14_dinov2`; the S, B and g
sizes as options), built offline with random weights and then given the official weights from a
local file (`dinov2_vitl14_pretrain.pth`, as torch.hub downloads it, or a timm state dict; read
with weights_only=True or as safetensors). Images are prepared as EDM2's calculate_metrics does
it: uint8 RGB resized to 224 x 224 (bicubic, antialiased), scaled to [0, 1], normalised with the
ImageNet mean and std; the feature is the final-normed class token (1,024 numbers for ViT-L/14).
The official model keeps a 37 x 37 positional embedding and interpolates it at run time for a
16 x 16 grid (bicubic, scale (16 + 0.1) / 37, no antialiasing); the official embedding is
resampled here once, in the same way, so timm's model holds what the official one uses.

Where the weights are looked for (a non-empty eval.dinov2_weights replaces the search):
<hub>/checkpoints/<file>, <hub> = torch.hub.get_dir(), where torch.hub keeps the download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.core.errors import BenchError, unreadable_reason
from bench.metrics.extractors import (
    ExtractedBatch,
    ImageFeatureExtractor,
    file_sha256,
    load_state_dict,
)

DINOV2_TOOL = "dinov2"
INPUT_SIZE = 224  # EDM2 and dgm-eval resize to 224 x 224
PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_INTERPOLATE_OFFSET = 0.1  # the official model's interpolate_offset
_DOWNLOAD = "https://dl.fbaipublicfiles.com/dinov2"


@dataclass(frozen=True)
class DinoV2Model:
    """One DINOv2 size: timm's architecture, the official weights file and its feature size."""

    key: str  # eval.dinov2_model
    timm_name: str
    file: str
    feature_dim: int

    @property
    def url(self) -> str:
        """Where the official weights are downloaded from."""
        return f"{_DOWNLOAD}/{self.file.split('_pretrain')[0]}/{self.file}"


DINOV2_MODELS = {m.key: m for m in (
    DinoV2Model("vit-s14", "vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth", 384),
    DinoV2Model("vit-b14", "vit_base_patch14_dinov2", "dinov2_vitb14_pretrain.pth", 768),
    DinoV2Model("vit-l14", "vit_large_patch14_dinov2", "dinov2_vitl14_pretrain.pth", 1024),
    DinoV2Model("vit-g14", "vit_giant_patch14_dinov2", "dinov2_vitg14_pretrain.pth", 1536),
)}
DEFAULT_DINOV2 = "vit-l14"  # the metric's definition: ViT-L/14


def dinov2_model(key: str) -> DinoV2Model:
    """The DINOv2 size `key`; an unknown one is a one-line error."""
    if key not in DINOV2_MODELS:
        raise BenchError(f"eval.dinov2_model must be one of {', '.join(DINOV2_MODELS)}, "
                         f"got {key!r}")
    return DINOV2_MODELS[key]


def timm_module() -> ModuleType:
    """timm, or a one-line error saying how to install it."""
    try:
        import timm
    except ImportError:
        raise BenchError("fd_dinov2 needs timm (the DINOv2 network): pip install "
                         "'cmbench[dinov2]' (or pip install timm)") from None
    return timm


def locate_dinov2_weights(key: str, configured: str) -> Path:
    """The official weights file of the DINOv2 size `key`; missing is a one-line error naming
    the file and how to get it."""
    model = dinov2_model(key)
    if configured:
        path = Path(configured).expanduser()
        if path.is_file():
            return path
        raise BenchError(f"fd_dinov2 needs the DINOv2 weights {model.file}: eval.dinov2_weights = "
                         f"'{path}' does not exist; download {model.url} on a machine with "
                         f"internet and copy it there, or fix eval.dinov2_weights")
    path = Path(torch.hub.get_dir()) / "checkpoints" / model.file
    if path.is_file():
        return path
    raise BenchError(f"fd_dinov2 needs the DINOv2 weights {model.file}, not found at '{path}': "
                     f"download {model.url} on a machine with internet and copy it there, or set "
                     f"eval.dinov2_weights = \"/path/to/{model.file}\" (bench.toml or --set)")


def official_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """The official model's positional embedding (1, 1 + M^2, D) as it interpolates it at run
    time for a grid x grid patch grid: bicubic with scale (grid + 0.1) / M, no antialiasing."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise BenchError(f"a DINOv2 positional embedding of {patches.shape[1]} patches is not a "
                         "square grid")
    if side == grid:
        return pos_embed
    scale = (grid + OFFICIAL_INTERPOLATE_OFFSET) / side
    image = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).to(torch.float32)
    resized = F.interpolate(image, mode="bicubic", antialias=False, scale_factor=(scale, scale))
    if resized.shape[-2:] != (grid, grid):
        raise BenchError(f"resampling the DINOv2 positional embedding gave "
                         f"{tuple(resized.shape[-2:])}, not {grid} x {grid}")
    patches = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


def _read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as err:  # a wrong or corrupt file can raise almost anything
            raise BenchError(f"'{path}' {unreadable_reason(err)}") from None
    return load_state_dict(path)


def build_dinov2_network(key: str, state: dict[str, Tensor] | None) -> nn.Module:
    """timm's DINOv2 of size `key` for 224 x 224 inputs, with `state` (official or timm
    layout) or random weights (None: tests, and checking the architecture)."""
    timm = timm_module()
    model = dinov2_model(key)
    network: nn.Module = timm.create_model(model.timm_name, pretrained=False,
                                           img_size=INPUT_SIZE, num_classes=0)
    if state is not None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = dict(state)
        if "pos_embed" in state:
            state["pos_embed"] = official_pos_embed(state["pos_embed"], INPUT_SIZE // PATCH)
        converted = checkpoint_filter_fn(state, network)  # type: ignore[arg-type]
        try:
            network.load_state_dict(converted, strict=True)
        except RuntimeError as err:
            first = " ".join(str(err).split())[:300]
            raise BenchError(f"the weights do not fit DINOv2 {key}: {first}") from None
    return network.to(torch.float32).requires_grad_(False).eval()


class DinoV2Extractor(ImageFeatureExtractor):
    """uint8 RGB images -> DINOv2 class-token features, prepared as EDM2 prepares them."""

    def __init__(self, network: nn.Module, key: str, identity: str) -> None:
        self.network = network
        self.tool = DINOV2_TOOL
        self.mode = key
        self.identity = identity
        self.feature_dim = dinov2_model(key).feature_dim
        self.with_logits = False

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> normalised float (B, 3, 224, 224) on the network's device."""
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        x = x / 255.0
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def extract(self, images: Tensor) -> ExtractedBatch:
        """The final-normed class token of each image."""
        with torch.no_grad():
            features = self.network(self.prepare(images))
        return ExtractedBatch(features.to(torch.float32), None)

    def to(self, device: torch.device) -> None:
        """Move the network."""
        self.network.to(device)

    @property
    def device(self) -> torch.device:
        """Device of the first parameter."""
        return next(self.network.parameters()).device


def build_dinov2(key: str, weights: Path, device: torch.device) -> DinoV2Extractor:
    """The FD_DINOv2 extractor of size `key` from a local weights file, on device."""
    network = build_dinov2_network(key, _read_weights(weights))
    return DinoV2Extractor(network.to(device), key, file_sha256(weights))

