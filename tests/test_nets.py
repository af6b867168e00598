"""Tests of the raw networks: shapes, conditioning, gradients, dropout replay, init, learning."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bench.core.errors import UsageError
from bench.nets.basic import MLP, Conv2d, Linear, NoiseEmbedding, UNet, num_groups
from bench.nets.build import NetOptions, build_net, count_parameters

# Small UNets so that the whole file runs in seconds on two CPU cores.
UNET_CASES = {
    "digits-8": (
        (1, 8, 8),
        NetOptions(model_channels=16, channel_mult=(1, 2), attn_resolutions=(4,)),
    ),
    "16": ((3, 16, 16), NetOptions(model_channels=16, num_res_blocks=1, attn_resolutions=(8,))),
    "32": ((3, 32, 32), NetOptions(model_channels=16, num_res_blocks=1, attn_resolutions=(16,))),
}
NUM_CLASSES = 10


def _inputs(
    shape: tuple[int, ...], batch: int, conditional: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch (x, c_noise, class_labels) drawn from a local generator."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *shape), generator=gen)
    sigma = torch.exp(torch.randn(batch, generator=gen) * 1.2 - 1.2)
    labels = torch.arange(batch) % NUM_CLASSES if conditional else None
    return x, sigma.log() / 4, labels


def _unet(case: str, num_classes: int = 0, dropout: float = 0.0) -> tuple[nn.Module, tuple]:
    """A small UNet for one of UNET_CASES, with its data shape."""
    shape, options = UNET_CASES[case]
    options = dataclasses.replace(options, dropout=dropout)
    return build_net("unet", shape, num_classes, options), shape


def _randomised(net: nn.Module, seed: int = 0) -> nn.Module:
    """net with its near-zero layers redrawn at full scale, so every input visibly matters."""
    for module in net.modules():
        if isinstance(module, Linear | Conv2d):
            module.init_scale = 1.0
    net.reset_parameters(torch.Generator().manual_seed(seed))
    return net


def _nets(conditional: bool, dropout: float = 0.0) -> list[tuple[str, nn.Module, tuple]]:
    """One MLP and every small UNet, all conditional or all unconditional."""
    num_classes = NUM_CLASSES if conditional else 0
    mlp = build_net("mlp", (2,), num_classes, NetOptions(width=64, depth=2, dropout=dropout))
    nets = [("mlp", mlp, (2,))]
    for case in UNET_CASES:
        net, shape = _unet(case, num_classes, dropout)
        nets.append((case, net, shape))
    return nets


@pytest.mark.parametrize("conditional", [False, True])
def test_output_shape_matches_input(conditional):
    for name, net, shape in _nets(conditional):
        x, c_noise, labels = _inputs(shape, 3, conditional)
        out = net(x, c_noise, labels)
        assert out.shape == x.shape, name
        assert out.dtype == torch.float32, name
        assert torch.isfinite(out).all(), name


def test_default_mlp_shape_and_scalar_c_noise():
    net = MLP(2)
    x = torch.randn(5, 2)
    out = net(x, torch.tensor(0.3))
    assert out.shape == (5, 2)
    assert torch.equal(out, net(x, torch.full((5,), 0.3)))


def test_outputs_start_near_zero():
    # Output layers start at 1e-5 scale (EDM), so D(x; sigma) starts near c_skip x.
    for name, net, shape in _nets(conditional=True):
        x, c_noise, labels = _inputs(shape, 4, True)
        assert net(x, c_noise, labels).abs().max() < 1e-3, name


def test_gradients_reach_every_parameter():
    for name, net, shape in _nets(conditional=True, dropout=0.1):
        net.train()
        x, c_noise, labels = _inputs(shape, 4, True)
        target = torch.sin(3 * x) + c_noise.reshape(-1, *[1] * len(shape))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        losses = []
        # Two Adam steps first so that the near-zero output layers no longer shrink the gradients.
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = (net(x, c_noise, labels) - target).square().mean()
            loss.backward()
            losses.append(loss.item())
            if len(losses) < 3:
                opt.step()
        for param_name, param in net.named_parameters():
            assert param.grad is not None, f"{name}: no gradient for {param_name}"
            assert torch.isfinite(param.grad).all(), f"{name}: {param_name}"
            assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {param_name}"
        assert losses[-1] < losses[0], name


def test_output_depends_on_c_noise_and_labels():
    for name, net, shape in _nets(conditional=True):
        net = _randomised(net)
        x, c_noise, labels = _inputs(shape, 4, True)
        assert labels is not None
        out = net(x, c_noise, labels)
        scale = out.abs().max()
        other_noise = net(x, c_noise + 0.5, labels)
        other_labels = net(x, c_noise, (labels + 1) % NUM_CLASSES)
        assert (out - other_noise).abs().max() > 1e-2 * scale, name
        assert (out - other_labels).abs().max() > 1e-2 * scale, name
        # Each sample depends only on its own inputs.
        assert torch.allclose(net(x[:2], c_noise[:2], labels[:2]), out[:2], rtol=1e-4, atol=1e-5), (
            name
        )


def test_unconditional_net_ignores_labels_and_conditional_net_requires_them():
    for name, net, shape in _nets(conditional=False):
        x, c_noise, _ = _inputs(shape, 2, False)
        assert torch.equal(net(x, c_noise, torch.tensor([0, 1])), net(x, c_noise)), name
    for _name, net, shape in _nets(conditional=True):
        x, c_noise, _ = _inputs(shape, 2, True)
        with pytest.raises(ValueError, match="class_labels"):
            net(x, c_noise)


def test_bad_input_shapes_raise():
    net = MLP(2)
    with pytest.raises(ValueError, match="c_noise"):
        net(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="MLP expects"):
        net(torch.zeros(4, 3), torch.zeros(4))
    unet, _ = _unet("digits-8")
    with pytest.raises(ValueError, match="UNet expects"):
        unet(torch.zeros(4, 1, 16, 16), torch.zeros(4))


def test_dropout_replays_under_restored_rng_state():
    for name, net, shape in _nets(conditional=True, dropout=0.3):
        net = _randomised(net)
        net.train()
        x, c_noise, labels = _inputs(shape, 4, True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            state = torch.get_rng_state()
            first = net(x, c_noise, labels)
            fresh = net(x, c_noise, labels)  # the RNG has moved on: a new mask
            torch.set_rng_state(state)
            replay = net(x, c_noise, labels)
        assert torch.equal(first, replay), name
        assert not torch.equal(first, fresh), name


def test_eval_mode_is_deterministic_and_draws_no_random_numbers():
    for name, net, shape in _nets(conditional=True, dropout=0.3):
        net.eval()
        x, c_noise, labels = _inputs(shape, 4, True)
        with torch.random.fork_rng(devices=[]):
            state = torch.get_rng_state()
            first = net(x, c_noise, labels)
            assert torch.equal(torch.get_rng_state(), state), name
            torch.manual_seed(99)
            second = net(x, c_noise, labels)
        assert torch.equal(first, second), name


def test_train_mode_without_dropout_draws_no_random_numbers():
    for name, net, shape in _nets(conditional=True, dropout=0.0):
        net.train()
        x, c_noise, labels = _inputs(shape, 2, True)
        with torch.random.fork_rng(devices=[]):
            state = torch.get_rng_state()
            net(x, c_noise, labels).sum().backward()
            assert torch.equal(torch.get_rng_state(), state), name


def test_bfloat16_autocast_forward_is_finite():
    for name, net, shape in _nets(conditional=True):
        net = _randomised(net)
        x, c_noise, labels = _inputs(shape, 2, True)
        reference = net(x, c_noise, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, c_noise, labels)
        assert out.shape == x.shape, name
        assert torch.isfinite(out).all(), name
        error = (out.float() - reference).abs().max()
        assert error <= 0.1 * reference.abs().max() + 1e-6, name


def test_unet_without_scale_shift_norm_and_with_heads():
    net = UNet(3, 16, model_channels=16, num_res_blocks=1, num_heads=4, scale_shift_norm=False)
    x, c_noise, _ = _inputs((3, 16, 16), 2, False)
    assert net(x, c_noise).shape == x.shape


def test_mlp_learns_a_function_of_x_and_c_noise():
    gen = torch.Generator().manual_seed(0)
    net = MLP(2, width=64, depth=2, emb_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(128, 2, generator=gen)
        c_noise = torch.rand(128, generator=gen) * 2.7 - 1.6
        target = torch.stack([torch.sin(2 * x[:, 0]) * c_noise, x[:, 0] * x[:, 1] + c_noise], 1)
        return x, c_noise, target

    x_test, c_test, target_test = batch()
    with torch.no_grad():
        initial = (net(x_test, c_test) - target_test).square().mean().item()
    for _ in range(200):
        x, c_noise, target = batch()
        loss = (net(x, c_noise) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = (net(x_test, c_test) - target_test).square().mean().item()
    assert final < 0.05 * initial, (initial, final)


@pytest.mark.parametrize(("kind", "shape"), [("mlp", (2,)), ("unet", UNET_CASES["digits-8"][0])])
def test_build_is_deterministic_in_seed_and_leaves_global_rng_alone(kind, shape):
    options = NetOptions(width=32, depth=2) if kind == "mlp" else UNET_CASES["digits-8"][1]
    state = torch.get_rng_state()
    first = build_net(kind, shape, NUM_CLASSES, options, seed=0).state_dict()
    second = build_net(kind, shape, NUM_CLASSES, options, seed=0).state_dict()
    other = build_net(kind, shape, NUM_CLASSES, options, seed=1).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_reset_parameters_reproduces_the_seeded_init():
    net = MLP(2, width=32, depth=2, seed=5)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for param in net.parameters():
            param.add_(1.0)
    net.reset_parameters(torch.Generator().manual_seed(5))
    assert all(torch.equal(initial[k], v) for k, v in net.state_dict().items())


def test_build_net_picks_sizes_from_options():
    mlp = build_net("mlp", (2,), 0, NetOptions(width=48, depth=3, emb_dim=16))
    assert isinstance(mlp, MLP)
    assert len(mlp.blocks) == 3
    assert mlp.input.out_features == 48
    unet = build_net("unet", (1, 8, 8), 0, UNET_CASES["digits-8"][1])
    assert isinstance(unet, UNet)
    assert unet.noise_embedding.layer1.out_features == 4 * 16  # default emb_dim


def test_build_net_rejects_bad_arguments():
    with pytest.raises(UsageError, match="valid: adm, ddpmpp, mlp, ncsnpp, unet"):
        build_net("transformer", (2,), 0, NetOptions())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"shape \(D,\)"):
        build_net("mlp", (1, 8, 8), 0, NetOptions())
    with pytest.raises(UsageError, match="square"):
        build_net("unet", (3, 16, 8), 0, NetOptions())
    with pytest.raises(UsageError, match="divisible"):
        build_net("unet", (3, 12, 12), 0, NetOptions(channel_mult=(1, 2, 2, 2)))
    with pytest.raises(UsageError, match="num_heads"):
        build_net("unet", (3, 16, 16), 0, NetOptions(model_channels=12, num_heads=8))


def test_net_options_validate_and_accept_lists():
    options = NetOptions(channel_mult=[1, 2], attn_resolutions=[4])  # type: ignore[arg-type]
    assert options.channel_mult == (1, 2)
    assert options.attn_resolutions == (4,)
    assert hash(options) == hash(NetOptions(channel_mult=(1, 2), attn_resolutions=(4,)))
    for bad in [
        {"width": 0},
        {"dropout": 1.0},
        {"channel_mult": (0, 2)},
        {"num_heads": 0},
        {"emb_dim": 0},
        {"num_head_channels": -1},
    ]:
        with pytest.raises(UsageError):
            NetOptions(**bad)
    # () is the official per-resolution default of adm; the small UNet has none
    with pytest.raises(UsageError, match="non-empty net.channel_mult"):
        build_net("unet", (3, 8, 8), 0, NetOptions(channel_mult=()))


def test_count_parameters():
    net = MLP(2, width=32, depth=1, emb_dim=16)
    expected = sum(p.numel() for p in net.parameters())
    assert count_parameters(net) == expected
    linear = nn.Linear(3, 4)
    assert count_parameters(nn.ModuleList([linear, linear])) == 16


@pytest.mark.parametrize("channels", [3, 8, 16, 32, 48, 50, 64, 96, 128, 256, 512])
def test_num_groups_divides_channels(channels):
    groups = num_groups(channels)
    assert channels % groups == 0
    assert 1 <= groups <= 32
    assert channels // groups >= min(4, channels)


def test_noise_embedding_features_follow_edm():
    embedding = NoiseEmbedding(num_channels=8, emb_dim=16)
    c_noise = torch.tensor([0.0, 0.7])
    features = embedding.features(c_noise)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    angles = c_noise[:, None] * freqs
    assert torch.allclose(features, torch.cat([angles.cos(), angles.sin()], 1), atol=1e-6)
    assert embedding(c_noise).shape == (2, 16)


@pytest.mark.parametrize("kind", ["unet", "adm", "ddpmpp", "ncsnpp"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_runs_in_a_fused_kernel_in_every_net(kind: str, channels_last: bool) -> None:
    """Each net's attention reaches PyTorch's fused kernel (flash on the CPU), forward and
    backward, never the math kernel that holds the L x L weights, in either memory order."""
    from torch.profiler import ProfilerActivity, profile

    options = NetOptions(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(4,), num_head_channels=16 if kind == "adm" else 0)
    net = build_net(kind, (3, 8, 8), 0, options, seed=0)
    x, c_noise, _ = _inputs((3, 8, 8), 4, False)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        net(x, c_noise).square().mean().backward()
    names = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in names
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= names


def test_fused_attention_equals_the_math_kernel_and_keeps_no_weights_for_backward() -> None:
    """attention() on the strided views a convolution's output gives (what every net passes)
    equals softmax(q k^T / sqrt(d)) v to float rounding, forward and backward, and saves for
    its backward no tensor of L x L weights (the math kernel saves B x heads x L x L)."""
    from bench.nets.basic import attention

    batch, heads, length, dim = 2, 3, 64, 16
    qkv = torch.randn(batch, 3, heads, dim, length, generator=torch.Generator().manual_seed(0),
                      requires_grad=True)

    def views() -> tuple[torch.Tensor, ...]:
        return tuple(t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, heads, L, d), strided

    q, k, v = views()
    assert q.stride(-1) != 1
    weights = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5, dim=-1)
    expected = weights @ v
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), qkv)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        got = attention(*views())
    (grad_got,) = torch.autograd.grad(got.square().sum(), qkv)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-4, atol=1e-5)
    assert saved and all(shape[-2:] != (length, length) for shape in saved), saved
