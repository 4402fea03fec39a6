"""U-Net building blocks: ResNet block, spatial transformer, resampling, and the three level kinds.

Module and parameter names are diffusers' (resnets.N.norm1, attentions.N.transformer_blocks.M.attn2,
downsamplers.0.conv, ...), so a diffusers UNet2DConditionModel state dict loads without renaming.
Activation maps are (B, C, H, W); transformer tokens are (B, H·W, C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.attention import Attention


@dataclass(frozen=True)
class ResnetSpec:
    """How the ResNet blocks of the U-Net are built."""

    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    output_scale: float = 1.0  # the residual sum is divided by this (output_scale_factor)


@dataclass(frozen=True)
class TransformerSpec:
    """How the spatial transformers of one level are built (no dropout, as in diffusers)."""

    heads: int
    context_dim: int
    depth: int = 1  # transformer blocks per spatial transformer
    linear_proj: bool = False  # proj_in/proj_out as Linear (SD 2.x) instead of 1×1 conv (SD 1.x)
    upcast: bool = False
    only_cross: bool = False  # the first attention also attends to the context (SD x4 upscaler)
    groups: int = 32


def _run(module: nn.Module, ckpt: bool, *args: Tensor) -> Tensor:
    """Call module, recomputing its activations in the backward pass when ckpt is set."""
    if ckpt and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal timestep features."""

    def __init__(self, c_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(c_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added between (Ho et al. 2020, App. B)."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, spec: ResnetSpec):
        super().__init__()
        self.output_scale = spec.output_scale
        self.norm1 = nn.GroupNorm(spec.groups, c_in, eps=spec.eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(spec.groups, c_out, eps=spec.eps)
        self.dropout = nn.Dropout(spec.dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, c_in, H, W); emb: (B, temb_dim), already through SiLU (the UNet does it once)."""
        # in-place adds on fresh conv outputs save two (B, C, H, W) buffers; autograd allows
        # them because a convolution's backward needs its input, not its output
        h = self.conv1(F.silu(self.norm1(x)))
        h.add_(self.time_emb_proj(emb)[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))
        return h if self.output_scale == 1.0 else h / self.output_scale


class GEGLU(nn.Module):
    """Linear projection to 2·inner, gated by GELU (Shazeer 2020, Eq. 5)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward of width 4·dim."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList(
            [GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim)]
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the context, then a GEGLU feed-forward."""

    def __init__(self, dim: int, spec: TransformerSpec):
        super().__init__()
        head_dim = dim // spec.heads
        self.only_cross = spec.only_cross
        self.norm1 = nn.LayerNorm(dim)
        self_ctx = spec.context_dim if spec.only_cross else None
        self.attn1 = Attention(dim, spec.heads, head_dim, self_ctx, spec.upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, spec.heads, head_dim, spec.context_dim, spec.upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, L, dim) tokens; context: (B, Lc, context_dim) text tokens."""
        x = x + self.attn1(self.norm1(x), context if self.only_cross else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, plus the input (residual)."""

    def __init__(self, channels: int, spec: TransformerSpec):
        super().__init__()
        self.linear_proj = spec.linear_proj
        self.norm = nn.GroupNorm(spec.groups, channels, eps=1e-6)
        if spec.linear_proj:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        blocks = [TransformerBlock(channels, spec) for _ in range(spec.depth)]
        self.transformer_blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, H·W, C); a view when x is channels_last
        if self.linear_proj:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2))
        return x + h  # x first: the sum takes x's memory layout, whatever h's strides are


class Downsample(nn.Module):
    """3×3 convolution with stride 2: halves H and W."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:  # pad right/bottom only, so even sizes still halve exactly
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _transformers(channels: int, n: int, spec: TransformerSpec | None) -> nn.ModuleList | None:
    if spec is None:
        return None
    return nn.ModuleList(SpatialTransformer(channels, spec) for _ in range(n))


class DownBlock(nn.Module):
    """One encoder level: `layers` × (ResNet [+ transformer]), then an optional downsample.

    Returns the features and every intermediate map, which the decoder takes as skips.
    """

    def __init__(
        self, c_in: int, c_out: int, temb_dim: int, layers: int, res: ResnetSpec,
        attn: TransformerSpec | None, downsample: bool, padding: int = 1,
    ):  # fmt: skip
        super().__init__()
        chans = [c_in] + [c_out] * (layers - 1)
        self.resnets = nn.ModuleList(ResnetBlock(c, c_out, temb_dim, res) for c in chans)
        self.attentions = _transformers(c_out, layers, attn)
        self.downsamplers = nn.ModuleList([Downsample(c_out, padding)]) if downsample else None

    def forward(
        self, x: Tensor, emb: Tensor, context: Tensor, ckpt: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = _run(resnet, ckpt, x, emb)
            if self.attentions is not None:
                x = _run(self.attentions[i], ckpt, x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottleneck: ResNet, then `layers` × (transformer, ResNet); one ResNet if attn is None."""

    def __init__(
        self, channels: int, temb_dim: int, res: ResnetSpec, attn: TransformerSpec | None,
        layers: int = 1,
    ):  # fmt: skip
        super().__init__()
        n_res = 1 if attn is None else layers + 1
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, temb_dim, res) for _ in range(n_res)
        )
        self.attentions = _transformers(channels, layers, attn)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, ckpt: bool = False) -> Tensor:
        x = _run(self.resnets[0], ckpt, x, emb)
        for attn, resnet in zip(self.attentions or [], self.resnets[1:]):
            x = _run(attn, ckpt, x, context)
            x = _run(resnet, ckpt, x, emb)
        return x


class UpBlock(nn.Module):
    """One decoder level: `layers` × (concat a skip, ResNet [+ transformer]), then maybe upsample.

    skip_channels lists the channels of the skips this level takes, in the order it takes them.
    """

    def __init__(
        self, c_prev: int, c_out: int, skip_channels: list[int], temb_dim: int,
        res: ResnetSpec, attn: TransformerSpec | None, upsample: bool,
    ):  # fmt: skip
        super().__init__()
        ins = [c_prev] + [c_out] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(
            ResnetBlock(c + s, c_out, temb_dim, res) for c, s in zip(ins, skip_channels)
        )
        self.attentions = _transformers(c_out, len(skip_channels), attn)
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if upsample else None

    def forward(
        self, x: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor, ckpt: bool = False
    ) -> Tensor:
        """Pops its skips off the end of `skips` (the encoder's maps, deepest last)."""
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)
            x = _run(resnet, ckpt, x, emb)
            if self.attentions is not None:
                x = _run(self.attentions[i], ckpt, x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x
