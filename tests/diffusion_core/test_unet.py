"""Tests of the DDPM U-Net: shapes, time/label conditioning, config round trip, validation."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from torch import nn

from diffusion_core.unet import UNet, group_norm, timestep_embedding

SMALL = dict(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_heads=2)


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (the zero-initialised convs would hide conditioning)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


@pytest.mark.parametrize(
    "config",
    [
        dict(in_channels=1, **SMALL),
        dict(
            in_channels=1,
            image_size=28,
            base_channels=8,
            channel_mults=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(7,),
            num_heads=2,
        ),
        dict(
            in_channels=3,
            image_size=32,
            base_channels=8,
            channel_mults=(1, 2, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(16, 8),
            num_classes=10,
            num_heads=4,
        ),
    ],
)
def test_output_shape_and_zero_init(config: dict) -> None:
    net = UNet(**config)
    x = torch.randn(3, config["in_channels"], config["image_size"], config["image_size"])
    out = net(x, torch.rand(3))
    assert out.shape == x.shape
    # Zero-initialised output convolution: a fresh network predicts exactly zero.
    assert torch.count_nonzero(out) == 0
    randomize(net)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0


def test_time_broadcast_and_dependence() -> None:
    torch.manual_seed(0)
    net = randomize(UNet(**SMALL)).eval()
    x = torch.randn(4, 1, 8, 8)
    ref = net(x, torch.full((4,), 0.3))
    torch.testing.assert_close(net(x, 0.3), ref)
    torch.testing.assert_close(net(x, torch.tensor(0.3)), ref)
    torch.testing.assert_close(net(x, torch.tensor([0.3])), ref)
    assert not torch.allclose(net(x, 0.7), ref)
    with pytest.raises(ValueError, match="t must"):
        net(x, torch.rand(3))


def test_samples_do_not_interact_across_the_batch() -> None:
    torch.manual_seed(1)
    net = randomize(UNet(**SMALL, num_classes=3)).eval()
    x, t, y = torch.randn(5, 1, 8, 8), torch.rand(5), torch.tensor([0, 1, 2, 3, 1])
    full = net(x, t, y)
    for i in range(5):
        torch.testing.assert_close(net(x[i : i + 1], t[i : i + 1], y[i : i + 1]), full[i : i + 1])


def test_class_conditioning_and_null_label() -> None:
    torch.manual_seed(2)
    net = randomize(UNet(**SMALL, num_classes=4)).eval()
    assert net.num_classes == 4 and net.null_label == 4
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    a = net(x, t, torch.tensor([0, 0]))
    b = net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(net(x, t, None), net(x, t, torch.tensor([4, 4])))
    for bad in ([5, 0], [-1, 0]):
        with pytest.raises(ValueError, match="label"):
            net(x, t, torch.tensor(bad))
    with pytest.raises(ValueError, match="integers"):
        net(x, t, torch.tensor([0.0, 1.0]))


def test_unconditional_net_has_no_null_label_and_ignores_labels() -> None:
    net = randomize(UNet(**SMALL)).eval()
    assert net.num_classes == 0 and net.null_label is None
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    torch.testing.assert_close(net(x, t, torch.tensor([3, 1])), net(x, t))


def test_config_round_trip_rebuilds_the_same_network() -> None:
    net = randomize(UNet(**SMALL, num_classes=2, dropout=0.1))
    config = json.loads(json.dumps(net.config))
    assert config == net.config
    clone = UNet(**config)
    clone.load_state_dict(net.state_dict())
    net.eval()
    clone.eval()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    torch.testing.assert_close(clone(x, t, torch.tensor([0, 1])), net(x, t, torch.tensor([0, 1])))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(image_size=6, channel_mults=(1, 2, 2)), "channel_mults: 3 levels do not divide the 6x6"),
        (dict(attention_resolutions=(2,)), "attention_resolutions: 2 is not a U-Net resolution"),
        (dict(base_channels=6, num_heads=5), "num_heads"),
        (dict(dropout=1.5), "dropout"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(num_classes=-1), "num_classes"),
    ],
)
def test_invalid_configs_raise(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNet(**{**SMALL, **overrides})


def test_patches_fold_pixels_into_channels() -> None:
    """``patch_size = 2`` is the U-Net of 4x the channels on the half-size grid, between
    space-to-depth and its inverse: the same weights give the same output."""
    torch.manual_seed(4)
    patched = randomize(UNet(in_channels=3, **{**SMALL, "image_size": 16}, patch_size=2)).eval()
    inner = UNet(in_channels=12, **SMALL).eval()
    inner.load_state_dict(patched.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    out = patched(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(
        out, torch.nn.functional.pixel_shuffle(inner(torch.nn.functional.pixel_unshuffle(x, 2), t), 2)
    )
    # the config keeps the patch size
    assert UNet(**patched.config).patch_size == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(patch_size=3), "patch_size: must divide the 8x8 images"),
        (dict(patch_size=4), "channel_mults: 3 levels do not divide the 2x2 patch grid"),
        (dict(patch_size=0), "patch_size must be an integer >= 1"),
    ],
)
def test_invalid_patch_sizes_raise(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNet(**{**SMALL, "channel_mults": (1, 2, 2), "attention_resolutions": (), **overrides})


def test_wrong_input_shape_raises() -> None:
    with pytest.raises(ValueError, match="expects input"):
        UNet(**SMALL)(torch.randn(2, 3, 8, 8), 0.5)


def test_timestep_embedding_matches_the_formula() -> None:
    s = torch.tensor([0.0, 1.0, 250.0])
    emb = timestep_embedding(s, 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    k = 2
    w = 10000.0 ** (-k / 3)  # dim/2 - 1 = 3
    torch.testing.assert_close(emb[2, k], torch.tensor(math.sin(250.0 * w)))
    torch.testing.assert_close(emb[2, 4 + k], torch.tensor(math.cos(250.0 * w)))


@pytest.mark.parametrize(
    ("channels", "groups"), [(8, 8), (32, 8), (12, 6), (6, 6), (3, 3), (10, 5)]
)
def test_group_norm_groups_divide_channels(channels: int, groups: int) -> None:
    assert group_norm(channels).num_groups == groups


def test_a_few_steps_fit_a_fixed_batch() -> None:
    torch.manual_seed(3)
    net = UNet(**SMALL, num_classes=2)
    x, t, y = torch.randn(8, 1, 8, 8), torch.rand(8), torch.randint(0, 2, (8,))
    target = torch.randn(8, 1, 8, 8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (net(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_parameter_names_shapes_and_initial_weights_are_those_recorded() -> None:
    """Checkpoints load by parameter name and shape, and a fixed seed gives the same initial
    weights only when the modules are created in the same order: both are pinned (recorded
    before ``UNet.__init__`` was split into builders)."""
    torch.manual_seed(0)
    net = UNet(in_channels=3, image_size=16, base_channels=8, channel_mults=(1, 2, 2),
               num_res_blocks=2, attention_resolutions=(8,), num_classes=4, num_heads=2,
               patch_size=2)
    state = net.state_dict()
    layout = repr([(k, tuple(v.shape)) for k, v in state.items()])
    assert len(state) == 245
    assert hashlib.sha256(layout.encode()).hexdigest() == (
        "0f1eb0c4ee0db7bfbb29e8740b4e29c5a2461ee958d47513ff0b590c00ff707e"
    )
    # an index-weighted sum: a swap of two tensors' creation order changes it
    weighted = sum(float(v.double().sum()) * (i + 1) for i, v in enumerate(state.values()))
    assert weighted == pytest.approx(79343.45203634785, rel=1e-12)
