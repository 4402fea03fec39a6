"""The latent diffusion U-Net: eps_theta(x_t, t, context) (Rombach et al. 2022, Eq. 3).

Encoder levels of ResNet blocks (timestep embedding added) and spatial transformers (self-attention,
cross-attention on the text tokens, GEGLU feed-forward), a bottleneck, and a mirrored decoder that
concatenates the encoder's maps (skip connections). Parameter names are diffusers'
UNet2DConditionModel state-dict keys, and UNetConfig reads and writes its config.json.

    x (B, in_channels, H, W) -> conv_in -> down levels (H / 2^(n-1)) -> mid -> up levels -> conv_out
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.attention import Attention, check_backend
from ldm.blocks import (
    DownBlock,
    MidBlock,
    ResnetSpec,
    TimestepEmbedding,
    TransformerSpec,
    UpBlock,
)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
PerLevel = int | tuple[int, ...]
# fields that may be one value or one per level
PER_LEVEL_FIELDS = ("layers_per_block", "transformer_layers_per_block", "attention_head_dim",
                    "num_attention_heads", "only_cross_attention")  # fmt: skip


@dataclass(frozen=True)
class UNetConfig:
    """U-Net architecture; field names, meanings and defaults are diffusers' UNet2DConditionModel's.

    attention_head_dim keeps diffusers' historical meaning: it is the number of heads per level
    (head width = channels // heads) unless num_attention_heads is given, which then wins.
    """

    sample_size: int | tuple[int, int] | None = None  # latent H (= W) the model was trained at
    in_channels: int = 4  # 4 latent channels, +5 for inpainting (mask + masked latent), ...
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: PerLevel = 2
    transformer_layers_per_block: PerLevel = 1
    attention_head_dim: PerLevel = 8
    num_attention_heads: PerLevel | None = None
    only_cross_attention: bool | tuple[bool, ...] = False
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    upcast_attention: bool = False
    num_class_embeds: int | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("sample_size", "down_block_types", "up_block_types", "block_out_channels",
                     *PER_LEVEL_FIELDS):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, list):  # JSON gives lists; keep the config hashable
                object.__setattr__(self, name, tuple(value))
        _validate(self)

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    def per_level(self, name: str) -> tuple:
        """A field that may be one value or one per level, as one value per level."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * self.num_levels

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level, as diffusers reads them."""
        return self.per_level(
            "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
        )

    @classmethod
    def from_diffusers(cls, config: dict) -> UNetConfig:
        """Build from a diffusers unet/config.json dict; refuse options this U-Net lacks."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_"):  # _class_name, _diffusers_version, _name_or_path: metadata
                continue
            if key in fields:
                kwargs[key] = value
            elif key in _FIXED_OPTIONS:
                allowed = _FIXED_OPTIONS[key]
                if allowed is not _ANY and value not in allowed:
                    raise ValueError(
                        f"unsupported UNet option {key}={value!r}: this U-Net implements only "
                        f"{key} in {allowed}"
                    )
            else:
                raise ValueError(f"unknown UNet config key {key!r} (value {value!r})")
        cad = kwargs.get("cross_attention_dim")
        if isinstance(cad, (list, tuple)):
            if len(set(cad)) != 1:
                raise ValueError(
                    f"cross_attention_dim must be one width for all levels, got {list(cad)}"
                )
            kwargs["cross_attention_dim"] = cad[0]
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        """The config.json dict from which diffusers' UNet2DConditionModel builds this model."""
        out = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        # diffusers refuses num_attention_heads and reads attention_head_dim as the head count
        if self.num_attention_heads is not None:
            out["attention_head_dim"] = list(self.heads)
            out["num_attention_heads"] = None
        out.update({k: v[0] for k, v in _FIXED_OPTIONS.items() if v is not _ANY})
        return out


_ANY = object()  # options that have no effect in the architectures this U-Net builds
_FIXED_OPTIONS = {
    "act_fn": ("silu", "swish"),
    "center_input_sample": (False,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "mid_block_only_cross_attention": _ANY,  # UNetMidBlock2DCrossAttn never reads it
    "addition_embed_type_num_heads": _ANY,  # used only with addition_embed_type="text"
}


def _validate(c: UNetConfig) -> None:
    """Raise ValueError naming the field and the allowed values."""
    n = c.num_levels
    if n < 1 or any(not isinstance(ch, int) or ch < 1 for ch in c.block_out_channels):
        raise ValueError(f"block_out_channels must be positive ints, got {c.block_out_channels}")
    for name, allowed in (
        ("down_block_types", DOWN_BLOCK_TYPES),
        ("up_block_types", UP_BLOCK_TYPES),
    ):
        types = getattr(c, name)
        if len(types) != n or any(t not in allowed for t in types):
            raise ValueError(f"{name} must be {n} names from {allowed}, got {types}")
    if c.mid_block_type not in MID_BLOCK_TYPES:
        raise ValueError(
            f"mid_block_type must be one of {MID_BLOCK_TYPES}, got {c.mid_block_type!r}"
        )
    for name in PER_LEVEL_FIELDS:
        value = getattr(c, name)
        if isinstance(value, tuple) and len(value) != n:
            raise ValueError(f"{name} must be one value or {n} (one per level), got {value}")
    for name in ("layers_per_block", "transformer_layers_per_block"):
        if any(not isinstance(v, int) or v < 1 for v in c.per_level(name)):
            raise ValueError(f"{name} must be positive ints, got {getattr(c, name)!r}")
    for name in ("in_channels", "out_channels", "cross_attention_dim", "norm_num_groups"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            raise ValueError(f"{name} must be a positive int, got {getattr(c, name)!r}")
    for ch in c.block_out_channels:
        if ch % c.norm_num_groups:
            raise ValueError(
                f"norm_num_groups={c.norm_num_groups} must divide every channel count, "
                f"got block_out_channels={c.block_out_channels}"
            )
    attn_levels = {i for i, t in enumerate(c.down_block_types) if t.startswith("CrossAttn")}
    attn_levels |= {n - 1 - j for j, t in enumerate(c.up_block_types) if t.startswith("CrossAttn")}
    attn_levels |= {n - 1} if c.mid_block_type == "UNetMidBlock2DCrossAttn" else set()
    for level in sorted(attn_levels):
        ch, h = c.block_out_channels[level], c.heads[level]
        if not isinstance(h, int) or h < 1 or ch % h:
            raise ValueError(
                f"attention heads at level {level} must be a positive int dividing its {ch} "
                f"channels, got {h!r}"
            )
    if c.downsample_padding not in (0, 1):
        raise ValueError(f"downsample_padding must be 0 or 1, got {c.downsample_padding!r}")
    if c.num_class_embeds is not None and c.num_class_embeds < 1:
        raise ValueError(
            f"num_class_embeds must be None or a positive int, got {c.num_class_embeds}"
        )


UNET_PRESETS: dict[str, UNetConfig] = {
    # Stable Diffusion 1.x (860M): 8 heads per level, CLIP ViT-L/14 text tokens (768-d)
    "sd15": UNetConfig(sample_size=64, cross_attention_dim=768),
    # Stable Diffusion 2.x (768-v): 64-d heads, linear proj_in/out, OpenCLIP ViT-H tokens (1024-d)
    "sd21": UNetConfig(
        sample_size=96,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
    ),
    # 4.5M parameters: SD 1.x's layout at 1/10 width, 3 levels, 128-d text
    "small": UNetConfig(
        sample_size=16,
        block_out_channels=(32, 64, 128),
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        norm_num_groups=8,
    ),
    # the shipped default model: "small" at (32, 64, 64) with a 32-wide text context,
    # 2.2M parameters, so the whole pipeline stays under 25 MB in float32
    "shapes": UNetConfig(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    ),
    # "shapes" with cross-attention at every level and a 64-wide text context
    "shapes2": UNetConfig(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        norm_num_groups=8,
    ),
    # a few hundred thousand parameters, for tests
    "tiny": UNetConfig(
        sample_size=16,
        block_out_channels=(32, 48),
        layers_per_block=1,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    ),
}
# "shapes2" without self-attention at 16x16 (256 tokens in 8-wide heads), the costliest op of its
# training step; the 8x8 and 4x4 levels keep theirs (diffusers' only_cross_attention per level)
UNET_PRESETS["shapes3"] = dataclasses.replace(
    UNET_PRESETS["shapes2"], only_cross_attention=(True, False, False)
)


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> Tensor:  # fmt: skip
    """Sinusoidal features of (possibly fractional) t: (B,) -> (B, dim), float32.

    Frequencies max_period^(-i / (dim/2 - freq_shift)), i < dim/2 (Vaswani et al. 2017, Sec. 3.5;
    Ho et al. 2020, Sec. 4); [cos, sin] when flip_sin_to_cos, as Stable Diffusion was trained.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else
                    [torch.sin(args), torch.cos(args)], dim=-1)  # fmt: skip
    return F.pad(emb, (0, 1)) if dim % 2 else emb


@dataclass(frozen=True)
class ReceptiveField:
    """Whether the deepest (mid-block) features of a U-Net see the whole latent."""

    latent_size: tuple[int, int]
    deepest_size: tuple[int, int]  # spatial size of the mid-block features
    conv_field: int  # latent pixels (per side) one deepest feature sees through convolutions
    needed_field: int  # 2·size - 1: what a corner feature needs to reach the far corner
    self_attention: str | None  # where self-attention first mixes all positions, if anywhere
    sees_whole_latent: bool


def receptive_field(config: UNetConfig, latent_size: int | tuple[int, int]) -> ReceptiveField:
    """Receptive field of the deepest features at latent_size (the mismatched-eyes check).

    Convolutions grow the field by (k - 1)·jump, stride-2 downsamples double the jump;
    self-attention anywhere on the way down makes it global. Without either, far-apart regions
    of the image are denoised independently and do not agree (two different eyes, doubled objects).
    """
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
    field, jump, attention = 3, 1, None  # conv_in
    layers, only_cross = (
        config.per_level("layers_per_block"),
        config.per_level("only_cross_attention"),
    )
    for level, kind in enumerate(config.down_block_types):
        field += 4 * jump * layers[level]  # two 3×3 convolutions per ResNet
        if attention is None and kind.startswith("CrossAttn") and not only_cross[level]:
            attention = f"down level {level}"
        if level < config.num_levels - 1:
            field, jump = field + 2 * jump, jump * 2
    if config.mid_block_type is not None:
        if attention is None and config.mid_block_type == "UNetMidBlock2DCrossAttn":
            attention = "mid block"
        field += 4 * jump * (2 if config.mid_block_type == "UNetMidBlock2DCrossAttn" else 1)
    needed = 2 * max(h, w) - 1
    factor = 2 ** (config.num_levels - 1)
    return ReceptiveField(
        latent_size=(h, w), deepest_size=(h // factor, w // factor), conv_field=field,
        needed_field=needed, self_attention=attention,
        sees_whole_latent=attention is not None or field >= needed,
    )  # fmt: skip


def _skip_channels(config: UNetConfig) -> list[list[int]]:
    """Channels of the skips each decoder level takes, in the order it pops them (deepest first)."""
    stack = [config.block_out_channels[0]]  # conv_in's output
    layers = config.per_level("layers_per_block")
    for level, ch in enumerate(config.block_out_channels):
        stack += [ch] * (layers[level] + (level < config.num_levels - 1))
    taken = []
    for level in reversed(range(config.num_levels)):
        taken.append([stack.pop() for _ in range(layers[level] + 1)])
    return taken


class UNet(nn.Module):
    """eps_theta(x_t, t, context): the Stable Diffusion U-Net (or v / x0, as it was trained)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        chans, n = config.block_out_channels, config.num_levels
        temb_dim = 4 * chans[0]
        res = ResnetSpec(config.norm_num_groups, config.norm_eps, config.dropout)
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim)
        self.class_embedding = (
            nn.Embedding(config.num_class_embeds, temb_dim) if config.num_class_embeds else None
        )
        layers = config.per_level("layers_per_block")
        self.down_blocks = nn.ModuleList(
            DownBlock(
                chans[max(i - 1, 0)],
                chans[i],
                temb_dim,
                layers[i],
                res,
                self._spec(i, kind.startswith("CrossAttn")),
                i < n - 1,
                config.downsample_padding,
            )
            for i, kind in enumerate(config.down_block_types)
        )
        self.mid_block = None
        if config.mid_block_type is not None:
            mid_res = dataclasses.replace(res, output_scale=config.mid_block_scale_factor)
            has_attn = config.mid_block_type == "UNetMidBlock2DCrossAttn"
            self.mid_block = MidBlock(chans[-1], temb_dim, mid_res, self._spec(-1, has_attn, True))
        ups = []
        for j, (kind, skips) in enumerate(zip(config.up_block_types, _skip_channels(config))):
            i = n - 1 - j  # the level this decoder block mirrors
            c_prev = chans[min(i + 1, n - 1)]
            attn = self._spec(i, kind.startswith("CrossAttn"))
            ups.append(UpBlock(c_prev, chans[i], skips, temb_dim, res, attn, i > 0))
        self.up_blocks = nn.ModuleList(ups)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, chans[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], config.out_channels, 3, padding=1)
        if config.sample_size is not None:
            _warn_if_local(config, config.sample_size)

    def _spec(self, level: int, has_attn: bool, mid: bool = False) -> TransformerSpec | None:
        """The transformer spec of a level (None when it has no attention)."""
        if not has_attn:
            return None
        c = self.config
        return TransformerSpec(
            heads=c.heads[level], context_dim=c.cross_attention_dim,
            depth=c.per_level("transformer_layers_per_block")[level],
            linear_proj=c.use_linear_projection, upcast=c.upcast_attention,
            only_cross=False if mid else c.per_level("only_cross_attention")[level],
            groups=c.norm_num_groups,
        )  # fmt: skip

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def set_attention_backend(self, name: str, slice_size: int | None = None) -> None:
        """Use attention backend `name` (see ldm.attention.ATTENTION_BACKENDS) in every layer."""
        check_backend(name, slice_size)
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend, module.slice_size = name, slice_size

    def fuse_qkv(self) -> None:
        """Project q, k, v of every self-attention with one matmul (inference; same state_dict)."""
        for module in [m for m in self.modules() if isinstance(m, Attention)]:
            if module.is_self_attention:
                module.fuse_qkv()

    def unfuse_qkv(self) -> None:
        """Undo fuse_qkv: separate to_q / to_k / to_v layers again (for training, LoRA)."""
        for module in [m for m in self.modules() if isinstance(m, Attention)]:
            module.unfuse_qkv()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in the backward pass: less memory, about 30% more time."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def forward(
        self,
        x: Tensor,
        t: Tensor | float | int,
        context: Tensor,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """Predict eps (or v, x0) for x_t.

        Args:
            x: x_t, (B, in_channels, H, W), with any concat conditioning already appended;
                H and W divisible by 2^(levels - 1).
            t: timestep, a number, a 0-d tensor, or (B,) / (1,); fractional values allowed.
            context: text tokens, (B, L, cross_attention_dim).
            class_labels: (B,) integer labels, required iff config.num_class_embeds is set.
        Returns:
            (B, out_channels, H, W) in x's dtype.
        """
        self._check_inputs(x, context, class_labels)
        t = self._timesteps(t, x)
        ckpt = self.gradient_checkpointing
        c = self.config
        t_feat = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = self.time_embedding(t_feat.to(x.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(x.dtype)
        emb = F.silu(emb)  # every ResNet block starts with SiLU(emb): do it once here

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context, ckpt)
            skips += block_skips
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context, ckpt)
        for block in self.up_blocks:
            h = block(h, skips, emb, context, ckpt)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _timesteps(self, t: Tensor | float | int, x: Tensor) -> Tensor:
        """t as a (B,) tensor on x's device, broadcast from a number, 0-d or (1,) like diffusers."""
        B = x.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.float32, device=x.device)
        t = t.to(x.device).reshape(-1) if t.ndim == 0 else t.to(x.device)
        if t.ndim != 1 or t.shape[0] not in (1, B):
            raise ValueError(
                f"t must be a number, a 0-d tensor, or of shape (1,) or ({B},); "
                f"got shape {tuple(t.shape)}"
            )
        return t.expand(B)

    def _check_inputs(self, x: Tensor, context: Tensor, class_labels: Tensor | None) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(
                f"x must be (B, in_channels={c.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        factor = 2 ** (c.num_levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x spatial size {tuple(x.shape[2:])} must be divisible by {factor}: "
                f"{c.num_levels} levels halve it {c.num_levels - 1} times"
            )
        if context.ndim != 3 or context.shape[-1] != c.cross_attention_dim:
            raise ValueError(
                f"context must be (B, L, cross_attention_dim={c.cross_attention_dim}), "
                f"got shape {tuple(context.shape)} (width {context.shape[-1]})"
            )
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} must equal x batch {x.shape[0]}")
        if (class_labels is None) != (c.num_class_embeds is None):
            raise ValueError(
                "class_labels must be given iff config.num_class_embeds is set "
                f"(num_class_embeds={c.num_class_embeds}, "
                f"class_labels given: {class_labels is not None})"
            )


def _warn_if_local(config: UNetConfig, latent_size: int | tuple[int, int]) -> None:
    """Warn when the deepest features cannot see the whole latent (the mismatched-eyes pitfall)."""
    rf = receptive_field(config, latent_size)
    if not rf.sees_whole_latent:
        warnings.warn(
            f"UNet config: at latent size {rf.latent_size} the deepest features see "
            f"{rf.conv_field} latent pixels through convolutions, {rf.needed_field} are needed, "
            "and no level has self-attention: distant parts of the image cannot agree "
            "(mismatched eyes, doubled objects). Add a level or self-attention.",
            stacklevel=3,
        )
