"""The paper's networks (ADM UNet, DDPM++, NCSN++): parameter counts at full size against the
published figures, forward passes at small width, and the official ADM checkpoint layout."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from bench.core.config import default_bench_files, resolve
from bench.core.errors import BenchError, UsageError
from bench.data.datasets import describe_dataset
from bench.engine.models import model_spec, net_options, new_raw_net
from bench.nets.adm import ADMUNet, export_official, from_official, official_channel_mult
from bench.nets.build import NetOptions, build_net, count_parameters
from tests.conftest import run_bench
from tests.official_layout import (
    IMAGENET64,
    LSUN256,
    OfficialConfig,
    official_shapes,
    official_state,
)

REPO = Path(__file__).resolve().parent.parent

# Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"),
# Appendix F, Table 7 ("Model capacity (Mparams)"): DDPM++ on CIFAR-10 55.73M, ADM on
# ImageNet-64 295.90M. Figures in millions rounded to two decimals, as published.
DDPM_PP_CIFAR10_M = 55.73
ADM_IMAGENET64_M = 295.90
# NCSN++: no published figure could be retrieved here to check, so it is derived from the
# published DDPM++ one and the official NCSN++ configuration's differences (EDM SongUNet with
# embedding_type="fourier", channel_mult_noise=2, encoder_type="residual"): the noise MLP's first
# layer takes 256 features instead of 128 (+128 * 512 weights) and the residual input path adds
# a 3x3 conv 3 -> 256 and a 3x3 conv 256 -> 256 (weights and biases).
NCSN_PP_EXTRA = 128 * 512 + (3 * 256 * 9 + 256) + (256 * 256 * 9 + 256)


def _preset_net(method: str, dataset: str) -> torch.nn.Module:
    """The net the paper preset of (method, dataset) builds, on the meta device (no memory)."""
    cfg = resolve(bench_files=default_bench_files(REPO),
                  flags={"method": method, "dataset": dataset}).config
    spec = model_spec(cfg, describe_dataset(dataset), "edm")
    with torch.device("meta"):
        return new_raw_net(spec, seed=0)


def test_adm_imagenet64_preset_has_the_published_parameter_count():
    net = _preset_net("cd", "imagenet64")
    count = count_parameters(net)
    assert isinstance(net, ADMUNet) and net.num_classes == 1000
    assert round(count / 1e6, 2) == ADM_IMAGENET64_M
    # and exactly the official UNetModel's layout (tests/official_layout.py, from cm/unet.py)
    assert count == sum(math.prod(s) for s in official_shapes(IMAGENET64).values())


def test_adm_lsun256_preset_matches_the_official_layout():
    # No published count for the consistency-models LSUN-256 UNet (launch.sh flags: 256
    # channels, 2 blocks, scale-shift off, unconditional): compared with the count of the
    # official UNetModel layout reconstructed from cm/unet.py for those flags.
    for dataset in ("lsun-bedroom", "lsun-cat"):
        count = count_parameters(_preset_net("ct", dataset))
        assert count == sum(math.prod(s) for s in official_shapes(LSUN256).values())
        assert count == 526_304_771


def test_ddpmpp_and_ncsnpp_cifar10_parameter_counts():
    options = NetOptions(model_channels=128, channel_mult=(2, 2, 2), num_res_blocks=4,
                         attn_resolutions=(16,))
    with torch.device("meta"):
        ddpmpp = count_parameters(build_net("ddpmpp", (3, 32, 32), 0, options))
        ncsnpp = count_parameters(_preset_net("cd", "cifar10"))
    assert round(ddpmpp / 1e6, 2) == DDPM_PP_CIFAR10_M
    assert ncsnpp == ddpmpp + NCSN_PP_EXTRA
    assert round(ncsnpp / 1e6, 2) == 56.40


@pytest.mark.parametrize("kind", ["adm", "ddpmpp", "ncsnpp"])
def test_small_paper_nets_map_to_the_input_shape_and_use_labels(kind):
    shape = (3, 32, 32)
    options = NetOptions(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(16,), num_head_channels=32, resblock_updown=True,
                         dropout=0.1)
    net = build_net(kind, shape, 10, options, seed=1).eval()
    for module in net.modules():  # full-scale closing layers, so the labels visibly matter
        if hasattr(module, "init_scale"):
            module.init_scale = 1.0
    net.reset_parameters(torch.Generator().manual_seed(2))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    c_noise = torch.tensor([-1.0, 0.5])
    out = net(x, c_noise, torch.tensor([1, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, net(x, c_noise, torch.tensor([3, 4])))
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_adm_at_64_pixels_with_the_official_channel_mult_runs_forward():
    net = ADMUNet(3, 64, model_channels=32, num_res_blocks=1, num_classes=1000,
                  num_head_channels=32)
    assert official_channel_mult(64) == (1, 2, 3, 4)
    x = torch.randn(1, 3, 64, 64)
    assert net(x, torch.zeros(1), torch.tensor([999])).shape == x.shape


def test_adm_widths_must_suit_groupnorm32_and_heads():
    with pytest.raises(UsageError, match="multiple of 32"):
        ADMUNet(3, 64, model_channels=48)
    with pytest.raises(UsageError, match="num_head_channels 64"):
        ADMUNet(3, 64, model_channels=32, num_head_channels=64)


SMALL = OfficialConfig(num_channels=32)  # the ImageNet-64 layout at width 32 (fast)


def _small_adm(**changes: object) -> ADMUNet:
    kwargs = {"model_channels": 32, "num_classes": 1000, "num_head_channels": 32, **changes}
    return ADMUNet(3, 64, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("layout,kwargs", [
    (SMALL, {}),
    (OfficialConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                    attention_resolutions=(16,), use_scale_shift_norm=False,
                    resblock_updown=False, class_cond=False),
     {"channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (16,),
      "scale_shift_norm": False, "resblock_updown": False, "num_classes": 0}),
])
def test_official_state_dict_loads_strictly_and_exports_back_identically(layout, kwargs):
    state = official_state(layout, seed=3)
    net = ADMUNet(3, layout.image_size, model_channels=32, num_head_channels=32,
                  **{"num_classes": 1000, **kwargs})
    from_official(net, state, "official.pt")  # strict: raises on any missing/unexpected key
    back = export_official(net)
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape and torch.equal(back[k], state[k])
               for k in state)


def test_official_state_dict_with_wrong_keys_or_shapes_is_a_one_line_error():
    state = official_state(SMALL)
    missing = {k: v for k, v in state.items() if not k.startswith("label_emb")}
    with pytest.raises(BenchError, match=r"1 missing keys \(first: label_emb.weight\)"):
        from_official(_small_adm(), missing, "f.pt")
    shaped = dict(state, **{"input_blocks.5.1.qkv.weight": torch.zeros(192, 64, 3)})
    with pytest.raises(BenchError, match=r"input_blocks.5.1.qkv.weight has shape \(192, 64, 3\)"
                                         r", this ADM configuration expects \(192, 64, 1\)"):
        from_official(_small_adm(), shaped, "f.pt")


def test_adm_forward_matches_a_functional_reading_of_the_official_state_dict():
    """Our ADM against a direct computation from the official keys: the timestep scaling, the
    scale-shift order, the [q | k | v] head layout and the block order all have to agree."""
    torch.manual_seed(0)
    layout = OfficialConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                            attention_resolutions=(8,))
    state = official_state(layout, seed=5)
    net = ADMUNet(3, 16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(8,), num_classes=1000, num_head_channels=32)
    from_official(net, state, "official.pt")
    x = torch.randn(2, 3, 16, 16)
    c_noise = torch.tensor([-0.7, 0.3])
    labels = torch.tensor([4, 17])
    expected = _official_forward(state, layout, x, 1000 * c_noise, labels)
    assert torch.allclose(net.eval()(x, c_noise, labels), expected, atol=1e-4)


def _official_forward(s: dict[str, torch.Tensor], cfg: OfficialConfig, x: torch.Tensor,
                      t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """UNetModel.forward of cm/unet.py written out on the state dict (eval mode)."""
    import torch.nn.functional as F

    def gn(h: torch.Tensor, p: str) -> torch.Tensor:
        return F.group_norm(h, 32, s[p + ".weight"], s[p + ".bias"], 1e-5)

    def conv(h: torch.Tensor, p: str) -> torch.Tensor:
        w = s[p + ".weight"]
        return F.conv2d(h, w, s[p + ".bias"], padding=w.shape[-1] // 2)

    def res(h: torch.Tensor, emb: torch.Tensor, p: str, updown: str = "") -> torch.Tensor:
        a = F.silu(gn(h, p + ".in_layers.0"))
        if updown == "down":
            a, h = F.avg_pool2d(a, 2), F.avg_pool2d(h, 2)
        elif updown == "up":
            a, h = F.interpolate(a, scale_factor=2.0), F.interpolate(h, scale_factor=2.0)
        a = conv(a, p + ".in_layers.2")
        e = F.linear(F.silu(emb), s[p + ".emb_layers.1.weight"], s[p + ".emb_layers.1.bias"])
        scale, shift = e[:, :, None, None].chunk(2, dim=1)
        a = F.silu(gn(a, p + ".out_layers.0") * (1 + scale) + shift)
        a = conv(a, p + ".out_layers.3")
        skip = h if p + ".skip_connection.weight" not in s else conv(h, p + ".skip_connection")
        return skip + a

    def attn(h: torch.Tensor, p: str) -> torch.Tensor:
        b, c, hh, ww = h.shape
        qkv = F.conv1d(gn(h, p + ".norm").reshape(b, c, -1), s[p + ".qkv.weight"],
                       s[p + ".qkv.bias"])
        heads = c // cfg.num_head_channels
        q, k, v = (z.reshape(b, heads, c // heads, -1) for z in qkv.chunk(3, dim=1))
        w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(c // heads), -1)
        a = torch.einsum("bhts,bhcs->bhct", w, v).reshape(b, c, -1)
        out = F.conv1d(a, s[p + ".proj_out.weight"], s[p + ".proj_out.bias"])
        return h + out.reshape(b, c, hh, ww)

    half = cfg.num_channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=1)
    emb = F.linear(F.silu(F.linear(emb, s["time_embed.0.weight"], s["time_embed.0.bias"])),
                   s["time_embed.2.weight"], s["time_embed.2.bias"])
    emb = emb + s["label_emb.weight"][y]
    h = conv(x, "input_blocks.0.0")
    hs = [h]
    blocks = sorted({int(k.split(".")[1]) for k in s if k.startswith("input_blocks.")})
    for i in blocks[1:]:
        p = f"input_blocks.{i}"
        down = i == cfg.num_res_blocks + 1  # the level change of the two-level test layout
        h = res(h, emb, p + ".0", "down" if down else "")
        if p + ".1.qkv.weight" in s:
            h = attn(h, p + ".1")
        hs.append(h)
    h = attn(res(h, emb, "middle_block.0"), "middle_block.1")
    h = res(h, emb, "middle_block.2")
    blocks = sorted({int(k.split(".")[1]) for k in s if k.startswith("output_blocks.")})
    for i in blocks:
        p = f"output_blocks.{i}"
        h = res(torch.cat([h, hs.pop()], dim=1), emb, p + ".0")
        layer = 1
        if p + ".1.qkv.weight" in s:
            h = attn(h, p + ".1")
            layer = 2
        if any(k.startswith(f"{p}.{layer}.in_layers") for k in s):
            h = res(h, emb, f"{p}.{layer}", "up")
    return conv(F.silu(gn(h, "out.0")), "out.2")


def test_net_options_of_the_imagenet64_preset_are_the_launch_flags():
    cfg = resolve(bench_files=default_bench_files(REPO),
                  flags={"method": "edm", "dataset": "imagenet64"}).config
    options = net_options(cfg.net)
    assert (cfg.net.kind, options.model_channels, options.channel_mult, options.num_res_blocks,
            options.attn_resolutions, options.num_head_channels, options.scale_shift_norm,
            options.resblock_updown, options.dropout, cfg.net.class_conditional) == \
        ("adm", 192, (1, 2, 3, 4), 3, (32, 16, 8), 64, True, True, 0.1, True)


def test_bench_import_makes_a_finished_run_whose_checkpoint_exports_back(tmp_path):
    from bench.app.tracking import Tracker
    from bench.engine.checkpoint import load_checkpoint
    from bench.engine.models import load_denoiser

    state = official_state(SMALL, seed=7)
    torch.save(state, tmp_path / "edm_imagenet64_ema.pt")
    small = ["--set", "net.model_channels=32", "--set", "net.num_head_channels=32"]
    result = run_bench(["import", "--checkpoint", "edm_imagenet64_ema.pt", "--kind", "edm",
                        "--dataset", "imagenet64", *small], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "no missing or" in result.stderr and "unexpected key" in result.stderr
    run_id = re.search(r"run id: (\w+)", result.stdout).group(1)  # type: ignore[union-attr]
    tracker = Tracker(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", tmp_path / "runs")
    record = tracker.get_run(run_id)
    assert record.status == "FINISHED"
    assert record.tags["method"] == "edm" and record.tags["dataset"] == "imagenet64"
    assert record.params["net.kind"] == "adm" and record.params["net.model_channels"] == "32"
    saved = load_checkpoint(record.local_artifact_dir / "checkpoints" / "last.pt")
    model = load_denoiser(saved, saved["eval_module"], torch.device("cpu"), "imported run")
    back = export_official(model.net)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)

    bad = dict(state)
    bad["input_blocks.0.0.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(bad, tmp_path / "bad.pt")
    result = run_bench(["import", "--checkpoint", "bad.pt", "--kind", "edm", "--dataset",
                        "imagenet64", *small], tmp_path, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "input_blocks.0.0.weight has shape (32, 3, 5, 5)" in lines[0]
    assert len(tracker.search("imagenet64", "")) == 1  # the failed import created no run


def _imagenet_folder(root: Path) -> Path:
    """Four 64x64 images as a downsampled-ImageNet batch: data uint8 (N, 12288), labels 1-based."""
    import numpy as np

    folder = root / "imagenet64"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.savez(folder / "train_data_batch_1.npz",
             data=rng.integers(0, 256, (4, 3 * 64 * 64), dtype=np.uint8),
             labels=np.array([1, 5, 1000, 7]))
    return folder


@pytest.mark.slow
def test_full_adm_runs_one_iteration_of_edm_then_cd_on_imagenet64_npz(tmp_path):
    """The must-show of the paper-scale issue: the ImageNet-64 presets build the full ADM
    (295.90M parameters), print it, and run one iteration and a 1-NFE evaluation on the CPU.

    FID needs Inception weights, which cannot be downloaded here: the run gets a random-weights
    file of torch-fidelity's architecture (as tests/test_fid.py does) through
    eval.inception_weights, so the real FID code path runs on 2 samples. CD uses
    cd.distance=l2 (the paper's CD-l2 model) because LPIPS needs the lpips package and VGG
    weights, which this machine lacks.
    """
    from tests.test_fid import torch_fidelity_shell_state

    folder = _imagenet_folder(tmp_path)
    torch.save(torch_fidelity_shell_state(0), tmp_path / "inception.pth")
    common = ["--dataset", "imagenet64", "--set", f"data.path={folder}", "--steps", "1",
              "--set", "train.batch_size=2", "--nfe", "1", "--set", "eval.num_samples=2",
              "--set", "eval.batch_size=2", "--set", "eval.inception_weights=inception.pth"]
    expected = f"{295_899_267:,} parameters"
    edm = run_bench(["run", "--method", "edm", *common], tmp_path, timeout=1800)
    assert edm.returncode == 0, edm.stderr
    assert "presets: *.imagenet64, edm.*, edm.imagenet64" in edm.stderr
    assert "net: adm - ADM UNet" in edm.stderr and "class-conditional (1000 classes)" in edm.stderr
    assert expected in edm.stderr.replace("\n", " ")
    cd = run_bench(["run", "--method", "cd", "--teacher", "auto", *common,
                    "--set", "cd.distance=l2"], tmp_path, timeout=1800)
    assert cd.returncode == 0, cd.stderr
    assert "presets: *.imagenet64, cd.imagenet64" in cd.stderr
    assert "net: adm - ADM UNet" in cd.stderr and expected in cd.stderr.replace("\n", " ")
    assert "fid" in cd.stdout and "run id: " in cd.stdout
