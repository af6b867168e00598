"""Inception-v3 feature extractors exactly as torch-fidelity and clean-fid run them, built offline
from local weight files with no unpickling.

Where the weights are looked for (a non-empty eval.inception_weights replaces the search):

  torch-fidelity:       weights-inception-2015-12-05-6726825d.pth in <hub>/checkpoints
  clean-fid clean and legacy_tensorflow:
                        inception-2015-12-05.pt (TorchScript) in /tmp, then <hub>/checkpoints
  clean-fid legacy_pytorch:
                        pt_inception-2015-12-05-6726825d.pth in <hub>/checkpoints

<hub> is torch.hub.get_dir(), i.e. $TORCH_HOME/hub (default ~/.cache/torch/hub): torch-fidelity
and clean-fid's legacy_pytorch mode cache their downloads in <hub>/checkpoints; clean-fid keeps
its TorchScript file in /tmp ("./" on Windows).

State dicts are read with torch.load(weights_only=True) into a module built here (the tools' own
loaders unpickle arbitrary objects). clean-fid ships its Inception only as TorchScript: that file
is read with torch.jit.load, which deserialises a TorchScript graph and its tensors through
TorchScript's own restricted loader, not Python's pickle of arbitrary objects.
"""

from __future__ import annotations

import hashlib
import platform
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.core.errors import BenchError, unreadable_reason

TORCH_FIDELITY = "torch-fidelity"
CLEAN_FID = "clean-fid"
TORCH_FIDELITY_MODE = "inception-v3-compat"  # torch-fidelity's one Inception path
CLEAN_FID_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
INCEPTION_SIZE = 299  # input side of Inception-v3
FEATURE_DIM = 2048  # pool3 features


@dataclass(frozen=True)
class WeightsSource:
    """The weights file a tool needs for a mode, where it downloads it from and in what format."""

    tool: str
    mode: str
    file: str  # file name the tool itself uses
    url: str  # where the tool downloads it from
    torchscript: bool  # a TorchScript archive (else a plain state dict)


TORCH_FIDELITY_WEIGHTS = WeightsSource(
    TORCH_FIDELITY, TORCH_FIDELITY_MODE, "weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth", False)
CLEAN_FID_TORCHSCRIPT_FILE = "inception-2015-12-05.pt"
CLEAN_FID_TORCHSCRIPT_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
                             "metrics/inception-2015-12-05.pt")
CLEAN_FID_PYTORCH_WEIGHTS = WeightsSource(
    CLEAN_FID, "legacy_pytorch", "pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth", False)


def metric_mode(tool: str, clean_fid_mode: str) -> str:
    """The mode a tool runs: clean-fid's configured mode, or torch-fidelity's one path."""
    return clean_fid_mode if tool == CLEAN_FID else TORCH_FIDELITY_MODE


def weights_source(tool: str, mode: str) -> WeightsSource:
    """The weights file of (tool, mode)."""
    if tool == TORCH_FIDELITY:
        return TORCH_FIDELITY_WEIGHTS
    if tool != CLEAN_FID or mode not in CLEAN_FID_MODES:
        raise BenchError(f"unknown image-metric tool/mode {tool}/{mode}; valid: torch-fidelity, "
                         f"clean-fid with {', '.join(CLEAN_FID_MODES)}")
    if mode == "legacy_pytorch":
        return CLEAN_FID_PYTORCH_WEIGHTS
    return WeightsSource(CLEAN_FID, mode, CLEAN_FID_TORCHSCRIPT_FILE, CLEAN_FID_TORCHSCRIPT_URL,
                         True)


def default_weight_paths(source: WeightsSource) -> list[Path]:
    """Where the tool itself keeps the file, in search order; the first is where to put it."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints" / source.file
    if source.torchscript:
        clean_fid_folder = Path("./") if platform.system() == "Windows" else Path("/tmp")
        return [clean_fid_folder / source.file, checkpoints]
    return [checkpoints]


def locate_weights(tool: str, mode: str, configured: str) -> Path:
    """The weights file for (tool, mode); missing is a one-line BenchError saying how to get it."""
    source = weights_source(tool, mode)
    if configured:
        path = Path(configured).expanduser()
        if path.is_file():
            return path
        raise BenchError(
            f"{tool} ({mode}) needs the Inception-v3 weights {source.file}: eval.inception_weights "
            f"= '{path}' does not exist; download {source.url} on a machine with internet and copy "
            f"it there, or fix eval.inception_weights")
    candidates = default_weight_paths(source)
    for path in candidates:
        if path.is_file():
            return path
    where = " or ".join(f"'{p}'" for p in candidates)
    target = "there" if len(candidates) == 1 else f"to '{candidates[0]}'"
    raise BenchError(
        f"{tool} ({mode}) needs the Inception-v3 weights {source.file}, not found at {where}: "
        f"download {source.url} on a machine with internet and copy it {target}, or set "
        f"eval.inception_weights = \"/path/to/{source.file}\" (bench.toml or --set)")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """A plain tensor state dict read with weights_only=True; anything else is a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a wrong or corrupt file can raise almost anything
        raise BenchError(f"'{path}' {unreadable_reason(err)}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BenchError(f"'{path}' is not a state dict of tensors")
    return dict(state)


def _assign(module: nn.Module, state: Mapping[str, Tensor], path: Path, what: str) -> None:
    """load_state_dict(strict, assign) into a meta-built module; a mismatch is a one-line error."""
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:300]
        raise BenchError(f"'{path}' does not hold {what}: {first}") from None
    module.to(torch.float32).requires_grad_(False).eval()


def images_to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 as the tools quantise: round(127.5 (x + 1)) clamped to 0..255."""
    return torch.round(127.5 * (x.to(torch.float32) + 1.0)).clamp_(0, 255).to(torch.uint8)


@dataclass
class ExtractedBatch:
    """Features (B, D) float32 and, when asked for, bias-free class logits (B, K) float32."""

    features: Tensor
    logits: Tensor | None


class ImageFeatureExtractor(ABC):
    """uint8 RGB images (B, 3, H, W) -> features (and logits for IS), as one tool and mode do it."""

    tool: str  # "torch-fidelity" or "clean-fid" (or a test's own name)
    mode: str  # preprocessing/extractor mode
    identity: str  # SHA-256 of the weights: part of the reference-statistics cache key
    feature_dim: int
    with_logits: bool

    @abstractmethod
    def extract(self, images: Tensor) -> ExtractedBatch:
        """Features of a uint8 batch, computed on the extractor's device."""

    @abstractmethod
    def to(self, device: torch.device) -> None:
        """Move the network to device."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the network."""


# --- torch-fidelity -----------------------------------------------------------------------------


class TorchFidelityExtractor(ImageFeatureExtractor):
    """Any torch-fidelity FeatureExtractorBase (its Inception or a registered one) used as is."""

    def __init__(self, module: nn.Module, feature_layer: str, logits_layer: str | None,
                 mode: str, identity: str, feature_dim: int) -> None:
        """module was built with features_list == [feature_layer] (+ [logits_layer])."""
        self.module = module
        self.feature_layer = feature_layer
        self.logits_layer = logits_layer
        self.tool = TORCH_FIDELITY
        self.mode = mode
        self.identity = identity
        self.feature_dim = feature_dim
        self.with_logits = logits_layer is not None

    def extract(self, images: Tensor) -> ExtractedBatch:
        """Run the module on uint8 images; it resizes and normalises them itself."""
        with torch.no_grad():
            outputs = self.module(images.to(self.device))
        layers = self.module.features_list
        assert isinstance(layers, (list, tuple))  # FeatureExtractorBase checks its type
        named = dict(zip(layers, outputs, strict=True))
        logits = named[self.logits_layer] if self.logits_layer is not None else None
        return ExtractedBatch(named[self.feature_layer].to(torch.float32), logits)

    def to(self, device: torch.device) -> None:
        """Move the module."""
        self.module.to(device)

    @property
    def device(self) -> torch.device:
        """Device of the first parameter (CPU for a parameterless module)."""
        first = next(self.module.parameters(), None)
        return first.device if first is not None else torch.device("cpu")


def torch_fidelity_inception_class() -> type[nn.Module]:
    """torch-fidelity's FeatureExtractorInceptionV3 with a constructor that loads no weights."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_inceptionv3 import (
        BasicConv2d,
        FeatureExtractorInceptionV3,
        InceptionA,
        InceptionB,
        InceptionC,
        InceptionD,
        InceptionE_1,
        InceptionE_2,
    )

    class OfflineInceptionV3(FeatureExtractorInceptionV3):
        """The layers of torch-fidelity 0.4's __init__ on the meta device; forward is theirs."""

        def __init__(self, name: str, features_list: list[str]) -> None:
            """Build the layers without weights; strict loading catches any drift in the layout."""
            FeatureExtractorBase.__init__(self, name, features_list)
            self.feature_extractor_internal_dtype = torch.float32
            with torch.device("meta"):
                self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
                self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
                self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
                self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
                self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
                self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
                self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
                self.Mixed_5b = InceptionA(192, pool_features=32)
                self.Mixed_5c = InceptionA(256, pool_features=64)
                self.Mixed_5d = InceptionA(288, pool_features=64)
                self.Mixed_6a = InceptionB(288)
                self.Mixed_6b = InceptionC(768, channels_7x7=128)
                self.Mixed_6c = InceptionC(768, channels_7x7=160)
                self.Mixed_6d = InceptionC(768, channels_7x7=160)
                self.Mixed_6e = InceptionC(768, channels_7x7=192)
                self.Mixed_7a = InceptionD(768)
                self.Mixed_7b = InceptionE_1(1280)
                self.Mixed_7c = InceptionE_2(2048)
                self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
                self.fc = nn.Linear(2048, 1008)

    return OfflineInceptionV3


def torch_fidelity_inception(weights: Path, with_logits: bool, device: torch.device,
                             identity: str) -> TorchFidelityExtractor:
    """torch-fidelity's Inception ("2048" features, "logits_unbiased" for IS) from a state dict."""
    layers = ["2048", "logits_unbiased"] if with_logits else ["2048"]
    module = torch_fidelity_inception_class()("inception-v3-compat", layers)
    _assign(module, load_state_dict(weights), weights, "torch-fidelity's Inception-v3 weights")
    module.to(device)
    return TorchFidelityExtractor(module, "2048", "logits_unbiased" if with_logits else None,
                                  TORCH_FIDELITY_MODE, identity, FEATURE_DIM)


# --- clean-fid ----------------------------------------------------------------------------------


def _clean_resizer() -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's own "clean" resizer: PIL bicubic on float32 channels to 299x299, clipped."""
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", (INCEPTION_SIZE, INCEPTION_SIZE))


class CleanFidTorchScriptExtractor(ImageFeatureExtractor):
    """clean-fid's InceptionV3W: "clean" resizes with PIL outside, legacy_tensorflow inside."""

    def __init__(self, script: torch.jit.ScriptModule, mode: str, with_logits: bool,
                 identity: str) -> None:
        """script is the TorchScript Inception (forward(img, return_features), .layers, .output)."""
        if with_logits and not hasattr(script, "output"):
            raise BenchError("IS with clean-fid needs the TorchScript Inception's 'output' layer, "
                             "which this file lacks; drop 'is' from eval.image_metrics")
        self.script = script
        self.tool = CLEAN_FID
        self.mode = mode
        self.identity = identity
        self.feature_dim = FEATURE_DIM
        self.with_logits = with_logits
        self._resize = _clean_resizer() if mode == "clean" else None

    def _resized(self, images: Tensor) -> Tensor:
        """Each image through clean-fid's resizer (HWC uint8 -> HWC float32 0..255), stacked."""
        arrays = images.cpu().numpy().transpose(0, 2, 3, 1)
        resize = self._resize
        if resize is None:
            raise RuntimeError("the PIL resizer is only used in clean mode")
        resized = [resize(a) for a in arrays]
        return torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2).copy())

    def extract(self, images: Tensor) -> ExtractedBatch:
        """InceptionV3W.forward: features (B, 2048); logits = features @ output.weight^T."""
        batch = images.shape[0]
        with torch.no_grad():
            if self.mode == "legacy_tensorflow":
                x = images.to(self.device, torch.float32)
                features = self.script(x, return_features=True).view((batch, FEATURE_DIM))
            else:
                x = self._resized(images).to(self.device)
                features = self.script.layers.forward((x - 128) / 128).view((batch, FEATURE_DIM))
            logits = F.linear(features, self.script.output.weight) if self.with_logits else None
        return ExtractedBatch(features.to(torch.float32), logits)

    def to(self, device: torch.device) -> None:
        """Move the script module."""
        self.script.to(device)

    @property
    def device(self) -> torch.device:
        """Device of the first parameter."""
        return next(self.script.parameters()).device


def clean_fid_torchscript(weights: Path, mode: str, with_logits: bool, device: torch.device,
                          identity: str) -> CleanFidTorchScriptExtractor:
    """clean-fid's TorchScript Inception; torch.jit.load reads a TorchScript graph, not a pickle."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
            script = torch.jit.load(str(weights), map_location=device)
    except Exception as err:  # a wrong or corrupt file can raise almost anything
        first = " ".join(str(err).split())[:300]
        raise BenchError(f"cannot read '{weights}' as clean-fid's TorchScript Inception: "
                         f"{first}") from None
    script.eval()
    if not hasattr(script, "layers"):
        raise BenchError(f"'{weights}' is not clean-fid's TorchScript Inception (no 'layers')")
    return CleanFidTorchScriptExtractor(script, mode, with_logits, identity)


class _CleanFidPytorchInception(nn.Module):
    """clean-fid's InceptionV3(output_blocks=[3], resize_input=False) over its FID Inception."""

    def __init__(self) -> None:
        """torchvision's Inception-v3 with clean-fid's patched FID blocks, built on meta."""
        super().__init__()
        import torchvision
        from cleanfid.inception_pytorch import (
            FIDInceptionA,
            FIDInceptionC,
            FIDInceptionE_1,
            FIDInceptionE_2,
        )

        with torch.device("meta"):
            net = torchvision.models.inception_v3(weights=None, num_classes=1008,
                                                  aux_logits=False, init_weights=False)
            net.Mixed_5b = FIDInceptionA(192, pool_features=32)
            net.Mixed_5c = FIDInceptionA(256, pool_features=64)
            net.Mixed_5d = FIDInceptionA(288, pool_features=64)
            net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
            net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
            net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
            net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
            net.Mixed_7b = FIDInceptionE_1(1280)
            net.Mixed_7c = FIDInceptionE_2(2048)
        self.net = net
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3,
            nn.MaxPool2d(kernel_size=3, stride=2),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
            net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e,
            net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1)),
        )

    def forward(self, x: Tensor) -> Tensor:
        """clean-fid's model_fn: model(x / 255) with 2 x - 1 inside, pooled (B, 2048)."""
        x = x / 255
        x = 2 * x - 1
        return self.blocks(x).squeeze(-1).squeeze(-1)


class CleanFidPytorchExtractor(ImageFeatureExtractor):
    """clean-fid legacy_pytorch: bilinear resize to 299 (not quantised), pytorch-fid's network."""

    def __init__(self, module: _CleanFidPytorchInception, with_logits: bool,
                 identity: str) -> None:
        """module holds the weights already."""
        self.module = module
        self.tool = CLEAN_FID
        self.mode = "legacy_pytorch"
        self.identity = identity
        self.feature_dim = FEATURE_DIM
        self.with_logits = with_logits

    def extract(self, images: Tensor) -> ExtractedBatch:
        """clean-fid's PyTorch resizer (F.interpolate acts per image, so batched) then the net."""
        with torch.no_grad():
            x = images.to(self.device, torch.float32)
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                              align_corners=False).clamp(0, 255)
            features = self.module(x)
            logits = F.linear(features, self.module.net.fc.weight) if self.with_logits else None
        return ExtractedBatch(features.to(torch.float32), logits)

    def to(self, device: torch.device) -> None:
        """Move the module."""
        self.module.to(device)

    @property
    def device(self) -> torch.device:
        """Device of the first parameter."""
        return next(self.module.parameters()).device


def clean_fid_pytorch(weights: Path, with_logits: bool, device: torch.device,
                      identity: str) -> CleanFidPytorchExtractor:
    """clean-fid's legacy_pytorch Inception from pytorch-fid's state dict (weights only)."""
    module = _CleanFidPytorchInception()
    _assign(module.net, load_state_dict(weights), weights, "pytorch-fid's FID Inception weights")
    module.to(device).eval()
    return CleanFidPytorchExtractor(module, with_logits, identity)


def build_extractor(tool: str, mode: str, weights: Path, with_logits: bool,
                    device: torch.device) -> ImageFeatureExtractor:
    """The extractor of (tool, mode) from a local weights file, on device."""
    identity = file_sha256(weights)
    if tool == TORCH_FIDELITY:
        return torch_fidelity_inception(weights, with_logits, device, identity)
    if weights_source(tool, mode).torchscript:
        return clean_fid_torchscript(weights, mode, with_logits, device, identity)
    return clean_fid_pytorch(weights, with_logits, device, identity)
