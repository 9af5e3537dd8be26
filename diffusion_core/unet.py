"""The DDPM U-Net (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", App. B), small.

Time ``t in [0, 1]`` is embedded as ``1000 * t`` with the Transformer sinusoidal embedding
(Vaswani et al. 2017, section 3.5) followed by a two-layer SiLU MLP. Class labels (Ho & Salimans
2022, "Classifier-Free Diffusion Guidance") use an ``nn.Embedding(num_classes + 1, emb_dim)``
whose last row is the null label; the class embedding is added to the time embedding.

Residual blocks inject the embedding by scale-shift normalisation (Dhariwal & Nichol 2021,
"Diffusion Models Beat GANs", section 3): ``h = GroupNorm(h) * (1 + scale) + shift``.
Self-attention blocks sit at the feature-map sizes listed in ``attention_resolutions`` and in the
middle of the network. Downsampling is a stride-2 convolution, upsampling nearest neighbour
followed by a 3x3 convolution. The last convolution of every residual branch, of every attention
output projection, and of the network output are zero-initialised (as in Ho et al.'s code), so a
fresh network predicts zero.

``patch_size = p > 1`` runs the U-Net on ``p x p`` patches: the input is folded into ``p * p``
times the channels at ``1/p`` of the resolution (space-to-depth, ``pixel_unshuffle``) and the
output unfolded back (``pixel_shuffle``), as the patching of DiT (Peebles & Xie 2023) and the
"simple diffusion" U-Nets (Hoogeboom et al. 2023), which move the costly full-resolution level
to a cheaper one. ``attention_resolutions`` then count feature-map pixels of the patched grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet", "timestep_embedding", "group_norm"]

_MAX_GROUPS = 8


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[sin(s w_k), cos(s w_k)]`` with ``w_k = max_period^(-k/(dim/2-1))``.

    Vaswani et al. 2017 (section 3.5), as used by Ho et al. 2020. ``timesteps`` has shape ``(B,)``
    (real-valued, e.g. ``1000 * t``); the result has shape ``(B, dim)``.
    """
    if dim < 2:
        raise ValueError(f"embedding dim must be >= 2, got {dim}")
    half = dim // 2
    exponent = (
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / max(half - 1, 1)
    )
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups ``<= 8`` that divides ``channels``."""
    groups = next(g for g in range(min(_MAX_GROUPS, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block: ``x + conv(drop(SiLU(norm(conv(SiLU(norm x))) * (1 + s) + b)))``."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, c/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (halves H and W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """A residual block optionally followed by attention (one U-Net stage)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """DDPM U-Net predicting a tensor of the input's shape from ``(x, t, labels)``.

    Args:
        in_channels: image channels (also the output channels).
        image_size: height = width of the input; must be divisible by ``2**(len(channel_mults)-1)``.
        base_channels: channels of the first level; level ``i`` has ``base_channels * mult_i``.
        channel_mults: channel multiplier per resolution level (one downsampling between levels).
        num_res_blocks: residual blocks per level on the down path (``+1`` on the up path).
        attention_resolutions: feature-map sizes (pixels) where self-attention is applied.
        dropout: dropout rate inside residual blocks.
        num_classes: real classes; ``0`` = unconditional. Index ``num_classes`` is the null label.
        num_heads: attention heads; must divide the channels of every attention block.
        patch_size: side of the square patches folded into channels before the first
            convolution (1 = none); must divide ``image_size``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 8,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4,),
        dropout: float = 0.0,
        num_classes: int = 0,
        num_heads: int = 4,
        patch_size: int = 1,
    ) -> None:
        super().__init__()
        channel_mults = tuple(int(m) for m in channel_mults)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        _validate(
            in_channels,
            image_size,
            base_channels,
            channel_mults,
            num_res_blocks,
            attention_resolutions,
            dropout,
            num_classes,
            num_heads,
            patch_size,
        )
        self._config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "base_channels": int(base_channels),
            "channel_mults": list(channel_mults),
            "num_res_blocks": int(num_res_blocks),
            "attention_resolutions": list(attention_resolutions),
            "dropout": float(dropout),
            "num_classes": int(num_classes),
            "num_heads": int(num_heads),
            "patch_size": int(patch_size),
        }
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.null_label: int | None = num_classes if num_classes > 0 else None
        self.patch_size = int(patch_size)
        patched_channels = in_channels * self.patch_size**2
        # modules are created (and drawn from the RNG) and registered in this order: it fixes
        # the state-dict keys of checkpoints and the initial weights of a seed
        spec = _BlockSpec(4 * base_channels, dropout, num_heads, attention_resolutions)
        self.time_dim = base_channels
        self.time_mlp = _time_mlp(base_channels, spec.emb_dim)
        self.label_emb = nn.Embedding(num_classes + 1, spec.emb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(patched_channels, base_channels, 3, padding=1)
        levels = (base_channels, channel_mults, num_res_blocks)
        self.down, skip_channels = _down_path(spec, *levels, image_size // self.patch_size)
        self.mid = _middle(spec, skip_channels[-1])
        lowest = image_size // self.patch_size // 2 ** (len(channel_mults) - 1)
        self.up = _up_path(spec, *levels, skip_channels, lowest)
        ch = base_channels * channel_mults[0]
        self.norm_out = group_norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, patched_channels, 3, padding=1))

    @property
    def config(self) -> dict[str, Any]:
        """Plain, JSON-able constructor arguments: ``UNet(**net.config)`` rebuilds the network."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Predict a tensor shaped like ``x`` (B, C, H, W) at continuous times ``t in [0, 1]``.

        ``t`` may be a float, a 0-d tensor or a ``(B,)`` tensor. ``labels`` (int, ``(B,)``) in
        ``[0, num_classes]``; ``None`` means the null label. Unconditional nets ignore labels.
        """
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"UNet expects input (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        emb = self.time_mlp(
            timestep_embedding(1000.0 * self._broadcast_t(t, batch, x), self.time_dim)
        )
        if self.label_emb is not None:
            emb = emb + self.label_emb(self._check_labels(labels, batch, x.device))

        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = module(h, emb) if isinstance(module, _Level) else module(h)
            skips.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for module in self.up:
            if isinstance(module, _Level):
                h = torch.cat([h, skips.pop()], dim=1)  # skip connection from the down path
                h = module(h, emb)
            else:
                h = module(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out

    @staticmethod
    def _broadcast_t(t: Tensor | float, batch: int, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
            return t.reshape(1).expand(batch)
        if t.ndim == 1 and t.shape[0] == batch:
            return t.to(torch.float32)
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")

    def _check_labels(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if labels is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.ndim == 0:
            labels = labels.reshape(1).expand(batch)
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        # the value check reads the labels on the host: free on the CPU, a synchronisation per
        # call on a GPU (and impossible inside a CUDA graph), so device labels are checked once
        # where they enter, by ``samplers.generate`` and ``training.train``
        on_host = labels.device.type == "cpu"
        if on_host and labels.numel() and (int(labels.min()) < 0
                                           or int(labels.max()) > self.num_classes):
            bad = labels[(labels < 0) | (labels > self.num_classes)][0].item()
            raise ValueError(
                f"label {bad} outside [0, {self.num_classes}] "
                f"({self.num_classes} classes, null label {self.num_classes})"
            )
        return labels.long()


def geometry_errors(
    image_size: int,
    channel_mults: Sequence[int],
    attention_resolutions: Sequence[int],
    patch_size: int = 1,
) -> list[tuple[str, str]]:
    """``(argument, problem)`` for every U-Net shape that does not fit ``image_size``: the patch
    size must divide the images, each of the ``len(channel_mults) - 1`` downsamplings must halve
    the grid exactly, and every attention resolution must be one the U-Net reaches. The one
    rule for :class:`UNet` and for the pipeline's params check."""
    if image_size % patch_size:
        return [("patch_size", f"must divide the {image_size}x{image_size} images")]
    size = image_size // patch_size
    grid = f"{size}x{size} patch grid" if patch_size > 1 else f"{size}x{size} images"
    problems = []
    if size % 2 ** (len(channel_mults) - 1):
        problems.append(("channel_mults", f"{len(channel_mults)} levels do not divide the {grid}"))
    resolutions = [size // 2**i for i in range(len(channel_mults))]
    problems += [("attention_resolutions", f"{r} is not a U-Net resolution {resolutions}")
                 for r in attention_resolutions if r not in resolutions]
    return problems


def _validate(
    in_channels: int,
    image_size: int,
    base_channels: int,
    channel_mults: tuple[int, ...],
    num_res_blocks: int,
    attention_resolutions: tuple[int, ...],
    dropout: float,
    num_classes: int,
    num_heads: int,
    patch_size: int = 1,
) -> None:
    """Raise ValueError with a one-line message for an invalid U-Net configuration."""
    for name, value, low in (
        ("in_channels", in_channels, 1),
        ("image_size", image_size, 1),
        ("base_channels", base_channels, 1),
        ("num_res_blocks", num_res_blocks, 1),
        ("num_classes", num_classes, 0),
        ("num_heads", num_heads, 1),
        ("patch_size", patch_size, 1),
    ):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not channel_mults or any(m < 1 for m in channel_mults):
        raise ValueError(f"channel_mults must be non-empty positive integers, got {channel_mults}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    problems = geometry_errors(image_size, channel_mults, attention_resolutions, patch_size)
    if problems:
        name, problem = problems[0]
        raise ValueError(f"{name}: {problem}")
    resolutions = [image_size // patch_size // 2**i for i in range(len(channel_mults))]
    attn_channels = {base_channels * channel_mults[-1]} | {
        base_channels * m
        for m, r in zip(channel_mults, resolutions, strict=True)
        if r in attention_resolutions
    }
    for ch in sorted(attn_channels):
        if ch % num_heads != 0:
            raise ValueError(f"attention channels {ch} are not divisible by num_heads {num_heads}")


# ------------------------------------------------------------------------ builders of the U-Net


@dataclass(frozen=True)
class _BlockSpec:
    """What every block of one U-Net shares: the embedding width, the dropout rate, the number
    of attention heads and the feature-map sizes that get self-attention."""

    emb_dim: int
    dropout: float
    num_heads: int
    attention_resolutions: tuple[int, ...]

    def level(self, in_ch: int, out_ch: int, res: int) -> _Level:
        """A residual block, followed by self-attention when ``res`` is an attention size."""
        block = ResBlock(in_ch, out_ch, self.emb_dim, self.dropout)
        attn = AttentionBlock(out_ch, self.num_heads) if res in self.attention_resolutions else None
        return _Level(block, attn)


def _time_mlp(time_dim: int, emb_dim: int) -> nn.Sequential:
    """The two-layer SiLU MLP on the sinusoidal embedding of ``t`` (Ho et al. 2020, App. B)."""
    return nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def _down_path(
    spec: _BlockSpec, base: int, mults: tuple[int, ...], num_res_blocks: int, res: int
) -> tuple[nn.ModuleList, list[int]]:
    """The encoder from the ``res x res`` grid: ``num_res_blocks`` levels at each resolution
    with ``base * mult`` channels, a stride-2 downsampling between resolutions. Returns the
    modules and the channels of every skip connection (the input convolution's first)."""
    down, skips, ch = nn.ModuleList(), [base], base
    for level, mult in enumerate(mults):
        for _ in range(num_res_blocks):
            down.append(spec.level(ch, base * mult, res))
            ch = base * mult
            skips.append(ch)
        if level < len(mults) - 1:
            down.append(Downsample(ch))
            skips.append(ch)
            res //= 2
    return down, skips


def _middle(spec: _BlockSpec, ch: int) -> nn.ModuleList:
    """Residual block, self-attention, residual block at the lowest resolution."""
    return nn.ModuleList([
        ResBlock(ch, ch, spec.emb_dim, spec.dropout),
        AttentionBlock(ch, spec.num_heads),
        ResBlock(ch, ch, spec.emb_dim, spec.dropout),
    ])


def _up_path(
    spec: _BlockSpec, base: int, mults: tuple[int, ...], num_res_blocks: int,
    skip_channels: list[int], res: int,
) -> nn.ModuleList:
    """The decoder from the lowest ``res x res`` grid: ``num_res_blocks + 1`` levels at each
    resolution, each taking one skip connection of the encoder (last first), and an upsampling
    between resolutions."""
    up, skips, ch = nn.ModuleList(), list(skip_channels), skip_channels[-1]
    for level, mult in reversed(list(enumerate(mults))):
        for _ in range(num_res_blocks + 1):
            up.append(spec.level(ch + skips.pop(), base * mult, res))
            ch = base * mult
        if level > 0:
            up.append(Upsample(ch))
            res *= 2
    return up
