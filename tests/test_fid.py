"""Image metrics against torch-fidelity and clean-fid themselves: the same features give the same
numbers, our offline Inception builds give the tools' own features (random weights of the right
architecture), the reference cache is reused and keyed, and missing weights fail before training."""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from bench.core.config import RunConfig
from bench.core.errors import BenchError, UsageError
from bench.data.datasets import ImageDataset
from bench.engine.fid import prepare_fid, prepare_image_metrics, reference_key
from bench.metrics.base import frechet_distance
from bench.metrics.extractors import (
    TORCH_FIDELITY_WEIGHTS,
    ImageFeatureExtractor,
    TorchFidelityExtractor,
    _CleanFidPytorchInception,
    build_extractor,
    file_sha256,
    locate_weights,
    torch_fidelity_inception_class,
)
from bench.metrics.image import ImageMetrics
from tests.conftest import run_bench, run_id_of

TINY = "bench-test-tiny"  # torch-fidelity registry name of the small deterministic extractor
TINY_DIM = 24
TINY_CLASSES = 10


# --- helpers ------------------------------------------------------------------------------------


class TinyExtractor(FeatureExtractorBase):
    """Two seeded conv layers: 24-d features (mean and max pooled) and 10 logits, uint8 input."""

    def __init__(self, name, features_list, **kwargs):  # torch-fidelity passes its kwargs here
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(1234)
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3, generator=g) * 0.4, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(12, 8, 3, 3, generator=g) * 0.3, requires_grad=False)
        self.w3 = nn.Parameter(torch.randn(TINY_DIM, TINY_CLASSES, generator=g),
                               requires_grad=False)

    def forward(self, x):
        h = torch.tanh(F.conv2d(x.float() / 127.5 - 1.0, self.w1, stride=2))
        h = torch.tanh(F.conv2d(h, self.w2, stride=2))
        out = {"feat": torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)}
        out["logits"] = out["feat"] @ self.w3
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "feat", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)


class ArrayImages(ImageDataset):
    """An in-memory uint8 image dataset."""

    def __init__(self, name: str, pixels: Tensor) -> None:
        super().__init__(name, 0, "test images")
        self.shape = tuple(pixels.shape[1:])
        self.array = pixels.numpy()

    def _load(self):
        return self.array, None


class UInt8Images(torch.utils.data.Dataset):
    """uint8 images as torch-fidelity's Dataset input."""

    def __init__(self, pixels: Tensor) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> Tensor:
        return self.pixels[i]


class CountingExtractor(ImageFeatureExtractor):
    """Wraps an extractor and counts the images it sees."""

    def __init__(self, inner: ImageFeatureExtractor) -> None:
        self.inner = inner
        self.tool, self.mode, self.identity = inner.tool, inner.mode, inner.identity
        self.feature_dim, self.with_logits = inner.feature_dim, inner.with_logits
        self.images = 0

    def extract(self, images):
        self.images += images.shape[0]
        return self.inner.extract(images)

    def to(self, device):
        self.inner.to(device)

    @property
    def device(self):
        return self.inner.device


def tiny_extractor(mode: str = "tiny") -> TorchFidelityExtractor:
    module = TinyExtractor(TINY, ["feat", "logits"])
    return TorchFidelityExtractor(module, "feat", "logits", mode, f"tiny-{mode}", TINY_DIM)


def image_config(tmp_path: Path, **eval_values) -> RunConfig:
    cfg = RunConfig()
    cfg.device = "cpu"
    cfg.tracking.runs_dir = str(tmp_path / "runs")
    for key, value in eval_values.items():
        setattr(cfg.eval, key, value)
    return cfg


def to_float(pixels: Tensor) -> Tensor:
    return pixels.float() / 127.5 - 1.0


def random_pixels(n: int, side: int, seed: int, low: float = 0.0, high: float = 255.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = F.avg_pool2d(torch.rand(n, 3, side + 2, side + 2, generator=g), 3, stride=1)
    return (low + (high - low) * smooth).round().clamp(0, 255).to(torch.uint8)


def image_folder(folder: Path, n: int, seed: int) -> Path:
    """A folder of n random 8x8 RGB PNG images (a folder: dataset)."""
    folder.mkdir()
    for i, pixels in enumerate(random_pixels(n, 8, seed)):
        Image.fromarray(pixels.numpy().transpose(1, 2, 0)).save(folder / f"{i}.png")
    return folder


def he_random_state(shell: nn.Module, seed: int) -> dict[str, Tensor]:
    """Random weights N(0, 2 / fan_in) and identity batch norms for a module's state dict."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in shell.state_dict().items():
        if value.dtype == torch.long:
            state[key] = torch.zeros(value.shape, dtype=torch.long)
        elif key.endswith("running_var") or (key.endswith(".weight") and value.ndim == 1):
            state[key] = torch.ones(value.shape)
        elif value.ndim >= 2:
            state[key] = torch.randn(value.shape, generator=g) * math.sqrt(2.0 / value[0].numel())
        else:
            state[key] = torch.zeros(value.shape)
    return state


def torch_fidelity_shell_state(seed: int) -> dict[str, Tensor]:
    """Random weights for torch-fidelity's own FeatureExtractorInceptionV3 layout."""
    shell = torch_fidelity_inception_class()("inception-v3-compat", ["2048"])
    return he_random_state(shell, seed)


def official_torch_fidelity(state: dict[str, Tensor], layers: list[str], folder: Path,
                            ) -> nn.Module:
    """torch-fidelity's class built by its own constructor from a weights file."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    path = folder / "official-tf-inception.pth"
    torch.save(state, path)
    return tfi.FeatureExtractorInceptionV3("inception-v3-compat", layers,
                                           feature_extractor_weights_path=str(path)).eval()


def pytorch_fid_shell_state(seed: int) -> dict[str, Tensor]:
    """Random weights for clean-fid's legacy_pytorch (pytorch-fid) Inception layout."""
    return he_random_state(_CleanFidPytorchInception().net, seed)


def inception_trunk() -> nn.Sequential:
    """Inception-v3 (TF layout) up to the 2048-d pool, from torch-fidelity's blocks."""
    import torch_fidelity.feature_extractor_inceptionv3 as b

    return nn.Sequential(
        b.BasicConv2d(3, 32, kernel_size=3, stride=2), b.BasicConv2d(32, 32, kernel_size=3),
        b.BasicConv2d(32, 64, kernel_size=3, padding=1), nn.MaxPool2d(3, 2),
        b.BasicConv2d(64, 80, kernel_size=1), b.BasicConv2d(80, 192, kernel_size=3),
        nn.MaxPool2d(3, 2), b.InceptionA(192, 32), b.InceptionA(256, 64), b.InceptionA(288, 64),
        b.InceptionB(288), b.InceptionC(768, 128), b.InceptionC(768, 160),
        b.InceptionC(768, 160), b.InceptionC(768, 192), b.InceptionD(768), b.InceptionE_1(1280),
        b.InceptionE_2(2048), nn.AdaptiveAvgPool2d(1))


class TorchScriptInception(nn.Module):
    """The interface of clean-fid's inception-2015-12-05.pt (StyleGAN2-ADA's TorchScript)."""

    def __init__(self, layers: nn.Module, output: nn.Linear) -> None:
        super().__init__()
        self.layers = layers
        self.output = output

    def forward(self, img: Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> Tensor:
        batch_size, channels, height, width = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
        theta = theta.to(x.dtype).unsqueeze(0).repeat([batch_size, 1, 1])
        grid = F.affine_grid(theta, [batch_size, channels, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        features = self.layers((x - 128.0) / 128.0).reshape(-1, 2048)
        if return_features:
            return features
        if no_output_bias:
            return F.softmax(F.linear(features, self.output.weight), dim=1)
        return F.softmax(self.output(features), dim=1)


def write_random_torchscript(path: Path, seed: int) -> None:
    """A random-weights TorchScript Inception with clean-fid's interface, saved at path."""
    with torch.device("meta"):
        shell = nn.ModuleDict({"layers": inception_trunk(), "output": nn.Linear(2048, 1008)})
    state = he_random_state(shell, seed)
    with torch.device("meta"):
        layers, output = inception_trunk(), nn.Linear(2048, 1008)
    layers.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("layers.")},
                           assign=True)
    output.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("output.")},
                           assign=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layers.eval(), torch.zeros(1, 3, 75, 75), check_trace=False)
        torch.jit.script(TorchScriptInception(traced, output).eval()).save(str(path))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """Random-weights files of each tool's Inception, with the tools' own file names."""
    folder = tmp_path_factory.mktemp("inception")
    torch.save(torch_fidelity_shell_state(0), folder / TORCH_FIDELITY_WEIGHTS.file)
    torch.save(pytorch_fid_shell_state(1), folder / "pt_inception-2015-12-05-6726825d.pth")
    write_random_torchscript(folder / "inception-2015-12-05.pt", 2)
    return folder


@pytest.fixture(scope="module")
def tiny_registered() -> str:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if TINY not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY, TinyExtractor)
    return TINY


# --- Frechet distance ---------------------------------------------------------------------------


def test_frechet_distance_equals_float64_scipy_reference():
    rng = np.random.default_rng(5)
    dim = 48
    a, b = rng.standard_normal((dim, dim)), rng.standard_normal((dim, dim))
    s1, s2 = a @ a.T / dim + 0.1 * np.eye(dim), b @ b.T / dim + 0.05 * np.eye(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    root = scipy.linalg.sqrtm(s1.astype(np.float64) @ s2.astype(np.float64)).real
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                     - 2.0 * np.trace(root))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # float32 inputs are promoted, not computed in float32
    got32 = frechet_distance(mu1.astype(np.float32), s1.astype(np.float32),
                             mu2.astype(np.float32), s2.astype(np.float32))
    assert got32 == pytest.approx(expected, rel=1e-5)


# --- the same features through bench, torch-fidelity and clean-fid ------------------------------


def test_tiny_extractor_metrics_agree_with_torch_fidelity_and_clean_fid(tmp_path, tiny_registered):
    import torch_fidelity
    from cleanfid.fid import fid_from_feats

    generated = random_pixels(200, 16, seed=1, low=30, high=220)
    reference = random_pixels(300, 16, seed=2)
    cfg = image_config(tmp_path, num_samples=200, image_metrics=["fid", "is", "kid", "prc"])
    suite = prepare_image_metrics(ArrayImages("tiny-ref", reference), cfg, tmp_path / "cache",
                                  tiny_extractor())
    assert suite.names == ["fid", "is", "is_std", "kid", "kid_std", "precision", "recall",
                           "feature_images_per_second"]
    (acc,) = suite.new()
    for batch in to_float(generated).split(64):
        acc.update(batch)
    ours = acc.compute()

    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated), input2=UInt8Images(reference),
        feature_extractor=tiny_registered, isc=True, fid=True, kid=True, prc=True,
        kid_subset_size=200, cuda=False, cache=False, save_cpu_ram=True, verbose=False,
        batch_size=64)
    module = TinyExtractor(TINY, ["feat"])
    with torch.no_grad():
        gen_feats = module(generated)[0].double().numpy()
        ref_feats = module(reference)[0].double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = float(fid_from_feats(gen_feats, ref_feats))

    assert ours["fid"] > 0.01
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["fid"] == pytest.approx(clean, rel=1e-3)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-3)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-3, abs=1e-9)
    assert ours["kid"] > 1e-4
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1.0 / 200)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1.0 / 300)
    assert ours["feature_images_per_second"] > 0
    print(f"\nagreement (relative): fid/torch-fidelity "
          f"{abs(ours['fid'] / theirs['frechet_inception_distance'] - 1):.2e}, fid/clean-fid "
          f"{abs(ours['fid'] / clean - 1):.2e}, is "
          f"{abs(ours['is'] / theirs['inception_score_mean'] - 1):.2e}, kid "
          f"{abs(ours['kid'] / theirs['kernel_inception_distance_mean'] - 1):.2e}; precision "
          f"{ours['precision']:.4f}/{theirs['precision']:.4f}, recall "
          f"{ours['recall']:.4f}/{theirs['recall']:.4f}")


def test_suite_notes_record_tool_mode_count_and_split(tmp_path):
    cfg = image_config(tmp_path, num_samples=16, image_metrics=["fid"])
    suite = prepare_image_metrics(ArrayImages("notes-ref", random_pixels(20, 16, 3)), cfg,
                                  tmp_path / "cache", tiny_extractor("m1"))
    assert suite.notes["metric_tool"] == "torch-fidelity"
    assert suite.notes["metric_mode"] == "m1"
    assert suite.notes["metric_num_samples"] == "16"
    assert suite.notes["reference_split"] == "train"
    assert Path(suite.notes["reference_stats"]).is_file()
    assert Path(suite.notes["reference_stats"]).parent == tmp_path / "cache" / "refstats"


# --- the reference cache ------------------------------------------------------------------------


def test_second_prepare_reuses_the_cached_statistics(tmp_path):
    dataset = ArrayImages("cache-ref", random_pixels(40, 16, 4))
    cfg = image_config(tmp_path, num_samples=20, image_metrics=["fid", "kid"])
    first = CountingExtractor(tiny_extractor())
    suite = prepare_image_metrics(dataset, cfg, tmp_path / "cache", first)
    path = Path(suite.notes["reference_stats"])
    assert first.images == 40
    stamp = path.stat().st_mtime_ns
    with np.load(path, allow_pickle=False) as archive:
        assert {"key", "mu", "sigma", "count", "features"} <= set(archive.files)
        assert archive["features"].shape == (40, TINY_DIM)

    second = CountingExtractor(tiny_extractor())
    again = prepare_image_metrics(dataset, cfg, tmp_path / "cache", second)
    assert second.images == 0
    assert again.notes["reference_stats"] == str(path)
    assert path.stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "cache" / "refstats").iterdir())) == 1

    # precision/recall add the k-NN radii to the same file from its cached features
    cfg.eval.image_metrics = ["fid", "prc"]
    third = CountingExtractor(tiny_extractor())
    prepare_image_metrics(dataset, cfg, tmp_path / "cache", third)
    assert third.images == 0
    with np.load(path, allow_pickle=False) as archive:
        assert archive["radii"].shape == (40,)


def test_cache_key_changes_with_mode_weights_split_and_count(tmp_path):
    dataset = ArrayImages("key-ref", random_pixels(10, 16, 5))
    cfg = image_config(tmp_path)
    base = reference_key(dataset, cfg, tiny_extractor("clean"), 10)
    assert reference_key(dataset, cfg, tiny_extractor("clean"), 10) == base
    names = {base.filename(),
             reference_key(dataset, cfg, tiny_extractor("legacy_tensorflow"), 10).filename(),
             reference_key(dataset, cfg, tiny_extractor("legacy_pytorch"), 10).filename(),
             reference_key(dataset, cfg, tiny_extractor("clean"), 9).filename()}
    other = tiny_extractor("clean")
    other.identity = "other-weights"
    names.add(reference_key(dataset, cfg, other, 10).filename())
    cfg.eval.reference_split = "test"
    names.add(reference_key(dataset, cfg, tiny_extractor("clean"), 10).filename())
    assert len(names) == 6


def test_published_statistics_are_used_and_kid_needs_features(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((TINY_DIM, TINY_DIM))
    published = tmp_path / "published.npz"
    np.savez(published, mu=rng.standard_normal(TINY_DIM), sigma=a @ a.T / TINY_DIM)
    dataset = ArrayImages("published-ref", random_pixels(4, 16, 6))
    cfg = image_config(tmp_path, num_samples=30, image_metrics=["fid"])
    cfg.eval.reference_stats = str(published)  # the proposed eval.reference_stats key
    counter = CountingExtractor(tiny_extractor())
    suite = prepare_image_metrics(dataset, cfg, tmp_path / "cache", counter)
    assert counter.images == 0
    assert suite.notes["reference_split"] == "published"
    assert suite.notes["reference_stats_sha256"] == file_sha256(published)
    (acc,) = suite.new()
    acc.update(to_float(random_pixels(30, 16, 7)))
    assert math.isfinite(acc.compute()["fid"])
    cfg.eval.image_metrics = ["fid", "kid"]
    with pytest.raises(UsageError, match="reference features"):
        prepare_image_metrics(dataset, cfg, tmp_path / "cache", counter)


@pytest.mark.parametrize("layout", ["edm", "adm"])
def test_published_reference_batches_of_edm_and_adm_load_with_their_sha256(tmp_path, layout):
    """EDM's fid-refs (cifar10-32x32.npz: mu, sigma) and ADM's reference batches
    (VIRTUAL_imagenet64_labeled.npz: the images as arr_0, mu, sigma and the spatial mu_s,
    sigma_s) both serve as the reference; the file's sha256 goes into the protocol."""
    from bench.app.protocol import evaluation_protocol

    rng = np.random.default_rng(1)
    a = rng.standard_normal((TINY_DIM, TINY_DIM))
    mu, sigma = rng.standard_normal(TINY_DIM), a @ a.T / TINY_DIM
    name = "cifar10-32x32.npz" if layout == "edm" else "VIRTUAL_imagenet64_labeled.npz"
    published = tmp_path / name
    if layout == "edm":
        np.savez(published, mu=mu, sigma=sigma)
    else:
        np.savez(published, arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), mu=mu,
                 sigma=sigma, mu_s=rng.standard_normal(7), sigma_s=np.eye(7))
    cfg = image_config(tmp_path, num_samples=30, image_metrics=["fid"])
    cfg.eval.reference_stats = str(published)
    dataset = ArrayImages("published-ref", random_pixels(4, 16, 6))
    suite = prepare_image_metrics(dataset, cfg, tmp_path / "cache", tiny_extractor())
    (acc,) = suite.new()
    generated = random_pixels(30, 16, 7)
    acc.update(to_float(generated))
    features = tiny_extractor().extract(generated).features.double().numpy()
    expected = frechet_distance(features.mean(0), np.cov(features, rowvar=False), mu, sigma)
    assert acc.compute()["fid"] == pytest.approx(expected, rel=1e-9)
    protocol = evaluation_protocol(dataset, cfg, suite)
    assert protocol["reference"] == (f"published statistics {name} (sha256 "
                                     f"{file_sha256(published)})")


# --- the tools' real Inception code paths with random weights -----------------------------------


def test_torch_fidelity_inception_path_matches_torch_fidelity(tmp_path, weights_dir):
    weights = weights_dir / TORCH_FIDELITY_WEIGHTS.file
    reference = random_pixels(2, 32, 8)
    cfg = image_config(tmp_path, num_samples=2, image_metrics=["kid"],
                       inception_weights=str(weights))
    suite = prepare_fid(ArrayImages("tf-ref", reference), cfg, tmp_path / "cache")
    assert suite.notes["metric_mode"] == "inception-v3-compat"
    assert suite.notes["inception_weights"] == str(weights)
    assert suite.notes["inception_weights_sha256"] == file_sha256(weights)
    with np.load(suite.notes["reference_stats"], allow_pickle=False) as archive:
        ours = archive["features"]
    official = official_torch_fidelity(torch.load(weights, weights_only=True), ["2048"],
                                       tmp_path)
    with torch.no_grad():
        (theirs,) = official(reference[:1])
    np.testing.assert_allclose(ours[:1], theirs.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(ours[0] - ours[1]).mean() > 1e-4  # the random network tells images apart


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow", "legacy_pytorch"])
def test_clean_fid_paths_match_clean_fid(weights_dir, mode, tmp_path, monkeypatch):
    from cleanfid.resize import build_resizer

    file = ("pt_inception-2015-12-05-6726825d.pth" if mode == "legacy_pytorch"
            else "inception-2015-12-05.pt")
    image = random_pixels(1, 32, 10)
    extractor = build_extractor("clean-fid", mode, weights_dir / file, False,
                                torch.device("cpu"))
    assert (extractor.tool, extractor.mode) == ("clean-fid", mode)
    ours = extractor.extract(image).features

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resize = build_resizer(mode)
        batch = torch.from_numpy(np.asarray(resize(image[0].numpy().transpose(1, 2, 0)),
                                            dtype=np.float32).transpose(2, 0, 1).copy())[None]
        if mode == "legacy_pytorch":
            import cleanfid.inception_pytorch as cip

            # clean-fid finds its weights in the torch hub cache, as after a download
            checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
            checkpoints.mkdir(parents=True)
            (checkpoints / file).write_bytes((weights_dir / file).read_bytes())
            monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
            model = cip.InceptionV3(output_blocks=[3], resize_input=False).eval()
            with torch.no_grad():
                theirs = model(batch / 255)[0].squeeze(-1).squeeze(-1)
        else:
            from cleanfid.inception_torchscript import InceptionV3W

            model = InceptionV3W(str(weights_dir), download=False,
                                 resize_inside=mode == "legacy_tensorflow").eval()
            with torch.no_grad():
                theirs = model(batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_clean_fid_is_uses_the_torchscript_output_layer(tmp_path):
    with torch.device("meta"):
        layers = nn.Sequential(nn.AvgPool2d(13), nn.Conv2d(3, 2048, 1), nn.AdaptiveAvgPool2d(1))
        output = nn.Linear(2048, 1008)
    g = torch.Generator().manual_seed(3)
    layers.load_state_dict({"1.weight": torch.randn(2048, 3, 1, 1, generator=g) * 0.05,
                            "1.bias": torch.randn(2048, generator=g) * 0.05}, assign=True)
    output.load_state_dict({"weight": torch.randn(1008, 2048, generator=g) * 0.05,
                            "bias": torch.randn(1008, generator=g)}, assign=True)
    path = tmp_path / "inception-2015-12-05.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(TorchScriptInception(layers, output).eval()).save(str(path))
    extractor = build_extractor("clean-fid", "legacy_tensorflow", path, True, torch.device("cpu"))
    images = random_pixels(3, 16, 11)
    batch = extractor.extract(images)
    with torch.no_grad():
        probabilities = extractor.script(images.float(), no_output_bias=True)
    torch.testing.assert_close(batch.logits.softmax(dim=1), probabilities)


def test_real_torch_fidelity_weights_when_present():
    try:
        path = locate_weights("torch-fidelity", "inception-v3-compat", "")
    except BenchError as err:
        pytest.skip(f"real Inception weights absent (offline machine): {err}")
    assert file_sha256(path).startswith("6726825d")
    extractor = build_extractor("torch-fidelity", "inception-v3-compat", path, True,
                                torch.device("cpu"))
    batch = extractor.extract(random_pixels(2, 32, 12))
    assert batch.features.shape == (2, 2048) and torch.isfinite(batch.features).all()


# --- missing weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode,file", [
    ("clean", "inception-2015-12-05.pt"),
    ("legacy_pytorch", "pt_inception-2015-12-05-6726825d.pth"),
])
def test_missing_clean_fid_weights_name_the_file(tmp_path, monkeypatch, mode, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    if mode == "clean" and Path("/tmp/inception-2015-12-05.pt").is_file():
        pytest.skip("a clean-fid TorchScript Inception exists in /tmp on this machine")
    cfg = image_config(tmp_path, metric_tool="clean-fid", clean_fid_mode=mode)
    with pytest.raises(BenchError) as info:
        prepare_fid(ArrayImages("none", random_pixels(2, 8, 0)), cfg, tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message and file in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message


def test_missing_weights_fail_the_run_before_training(tmp_path):
    images = image_folder(tmp_path / "images", 4, 13)
    torch_home = tmp_path / "torch_home"
    env = {"TORCH_HOME": str(torch_home)}
    result = run_bench(["run", "--method", "edm", "--dataset", f"folder:{images}",
                        "--steps", "1"], tmp_path, timeout=300, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    assert "weights-inception-2015-12-05-6726825d.pth" in lines[0]
    assert str(torch_home / "hub" / "checkpoints") in lines[0]
    assert "eval.inception_weights" in lines[0]
    db = tmp_path / "runs" / "mlflow.db"
    if db.is_file():  # it stopped before any run was created: nothing is half-written
        with sqlite3.connect(db) as conn:
            assert list(conn.execute("SELECT status FROM runs")) == []
    assert not (tmp_path / "runs" / "cache" / "refstats").exists()


def test_accumulator_moves_the_extractor_to_the_sample_device(tmp_path):
    cfg = image_config(tmp_path, num_samples=12, image_metrics=["fid"])
    suite = prepare_image_metrics(ArrayImages("dev-ref", random_pixels(12, 16, 14)), cfg,
                                  tmp_path / "cache", tiny_extractor())
    (acc,) = suite.new()
    assert isinstance(acc, ImageMetrics)
    grey = to_float(random_pixels(12, 16, 15))[:, :1]
    acc.update(grey)
    assert acc.count == 12 and math.isfinite(acc.compute()["fid"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))


def test_train_with_evaluation_off_then_evaluate_where_the_weights_are(tmp_path):
    """A machine without the Inception weights trains with --no-eval (no weights needed, the
    run tagged evaluation = off and left out of reports); `bench eval` later, where the weights
    are, scores it into the same run with the protocol and the tags of the evaluation."""
    images = image_folder(tmp_path / "images", 6, 21)
    torch_home = tmp_path / "torch_home"
    env = {"TORCH_HOME": str(torch_home)}
    tiny = ["--set", "net.model_channels=8", "--set", "net.channel_mult=[1]", "--set",
            "net.num_res_blocks=1", "--set", "net.attn_resolutions=[]", "--set",
            "train.batch_size=4", "--set", "eval.num_samples=6", "--set", "eval.batch_size=6"]
    trained = run_bench(["run", "--method", "edm", "--dataset", f"folder:{images}", "--steps",
                         "2", "--no-eval", *tiny], tmp_path, timeout=300, env=env)
    assert trained.returncode == 0, trained.stderr
    assert "evaluation off (eval.nfe = [])" in trained.stdout
    run_id = run_id_of(trained.stdout)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    record = client.get_run(run_id)
    assert record.info.status == "FINISHED" and record.data.tags["evaluation"] == "off"
    assert "fid" not in record.data.metrics
    from bench.app.runner import evaluate_run
    from bench.app.tracking import Tracker, default_tracking_uri
    from reports.store import select_runs

    tracker = Tracker(default_tracking_uri(tmp_path / "runs"), tmp_path / "runs")
    with pytest.raises(BenchError, match="no finished runs"):  # its only run has no numbers
        select_runs(tracker)
    with pytest.raises(UsageError, match="evaluation off"):  # nothing to evaluate: no NFEs
        evaluate_run(tracker, run_id, None, lambda _: None)
    # without the weights, one line
    missing = run_bench(["eval", "--run", run_id, "--nfe", "1"], tmp_path, env=env)
    assert missing.returncode == 1 and "weights-inception" in missing.stderr, missing.stderr
    # the weights where torch-fidelity keeps them (random ones of its layout: none here)
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torch_fidelity_shell_state(0), checkpoints / TORCH_FIDELITY_WEIGHTS.file)
    done = run_bench(["eval", "--run", run_id, "--nfe", "1"], tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    record = client.get_run(run_id)
    assert record.data.tags["evaluation"] == "bench eval"
    assert math.isfinite(record.data.metrics["fid"])
    assert record.data.tags["metric_tool"] == "torch-fidelity"
    assert json.loads(record.data.tags["protocol_nfe1"])["samples"] == 6
