"""KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1 and App. G).

An image x in [-1, 1] of shape (B, in_channels, H, W) is encoded to a diagonal Gaussian posterior
over latents z of shape (B, latent_channels, H / f, W / f), f = 2 ** (levels - 1); the decoder maps
z back to (B, out_channels, H, W). Module and parameter names are diffusers' AutoencoderKL
state-dict keys, so a diffusers `vae/diffusion_pytorch_model.safetensors` loads with strict=True.
Multiplying z by `scaling_factor` (unit variance for the diffusion model) is the caller's job.

Layout (levels = len(block_out_channels), n = layers_per_block):
    encoder: conv_in -> down_blocks[i]: n ResnetBlocks (+ stride-2 conv except the last)
             -> mid_block: resnet, self-attention, resnet -> GroupNorm, SiLU, conv_out (2 * latent)
    quant_conv (1x1), posterior, post_quant_conv (1x1)
    decoder: conv_in -> mid_block -> up_blocks[i]: n + 1 ResnetBlocks (+ nearest x2, conv)
             -> GroupNorm, SiLU, conv_out
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distribution import DiagonalGaussian
from .tiling import tiled_map

GROUP_NORM_EPS = 1e-6  # the original VAE's GroupNorm eps (torch's default is 1e-5)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of the KL autoencoder; the defaults are the SD 1.x / 2.x VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: int | tuple[int, int] = 512  # training resolution; the default tile size
    scaling_factor: float = 0.18215  # z_diffusion = scaling_factor * (z - shift_factor)
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None  # per-channel statistics some pipelines use
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # hint for pipelines: decode in float32 when running in float16

    def __post_init__(self):
        # Accept lists (as read from JSON) but store tuples so the config stays hashable.
        for name in ("block_out_channels", "latents_mean", "latents_std", "sample_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        channels = self.block_out_channels
        if not channels or any(not isinstance(c, int) or c <= 0 for c in channels):
            raise ValueError(f"block_out_channels must be positive ints, got {channels}")
        groups = self.norm_num_groups
        if not isinstance(groups, int) or groups <= 0 or any(c % groups for c in channels):
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                f"block_out_channels={channels}"
            )
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """f: pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> AutoencoderConfig:
        """Read a diffusers AutoencoderKL config.json dict; refuse options this model lacks."""
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"config _class_name must be 'AutoencoderKL', got {class_name!r}")
        options = [k for k in config if not k.startswith("_")]  # "_" keys are metadata
        unknown = sorted(k for k in options if k not in _DIFFUSERS_DEFAULTS)
        if unknown:
            raise ValueError(
                f"config has unsupported AutoencoderKL options {unknown}; "
                f"supported: {sorted(_DIFFUSERS_DEFAULTS)}"
            )
        # A missing key means diffusers' own default, as AutoencoderKL.from_config would use.
        c = {**_DIFFUSERS_DEFAULTS, **{k: config[k] for k in options}}
        levels = len(c["block_out_channels"])
        for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            if list(c[key]) != [block] * levels:
                raise ValueError(
                    f"{key} must be {levels} x {block!r} (one per block_out_channels entry), "
                    f"got {list(c[key])}"
                )
        if c["act_fn"] not in ("silu", "swish"):
            raise ValueError(f"act_fn must be 'silu' (or its alias 'swish'), got {c['act_fn']!r}")
        ours = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in c.items() if k in ours})

    def to_diffusers(self) -> dict:
        """config.json for diffusers' AutoencoderKL.from_config with the same architecture."""
        out = {"_class_name": "AutoencoderKL"}
        for key, value in asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        levels = len(self.block_out_channels)
        out["down_block_types"] = [_DOWN_BLOCK] * levels
        out["up_block_types"] = [_UP_BLOCK] * levels
        out["act_fn"] = "silu"
        return out


_DOWN_BLOCK, _UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
_DIFFUSERS_DEFAULTS = {  # diffusers' AutoencoderKL.__init__ defaults (not the SD values)
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": (_DOWN_BLOCK,),
    "up_block_types": (_UP_BLOCK,),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


# ----------------------------------------------------------------------------- blocks


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


class ResnetBlock(nn.Module):
    """Two (GroupNorm, SiLU, 3x3 conv) layers plus a skip; a 1x1 conv skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row and column at the bottom and right."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding, as the original VAE was trained: (H, W) -> (H / 2, W / 2).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all h*w positions after a GroupNorm, with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key "to_out.0", as diffusers

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, h*w, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, h*w, C), scale C ** -0.5
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)  # a channels-last view
        # out first: the sum inherits its channels-last layout, as in diffusers, so the convs
        # that follow pick the same kernels and the results agree bitwise.
        return out + x


class MidBlock(nn.Module):
    """Resnet, optional self-attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        attn = [SpatialSelfAttention(channels, groups)] if attention else []
        self.attentions = nn.ModuleList(attn)

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """Resnets at one resolution, then (except at the last level) a downsample."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        widths = [c_in] + [c_out] * layers
        self.resnets = nn.ModuleList(
            ResnetBlock(a, b, groups) for a, b in zip(widths[:-1], widths[1:])
        )
        self.downsamplers = nn.ModuleList([Downsample(c_out)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    """Resnets at one resolution, then (except at the last level) an upsample."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        widths = [c_in] + [c_out] * layers
        self.resnets = nn.ModuleList(
            ResnetBlock(a, b, groups) for a, b in zip(widths[:-1], widths[1:])
        )
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


# ----------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    """(B, in_channels, H, W) image -> (B, 2 * latent_channels, H / f, W / f) moments."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        levels = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, i < levels - 1)
            for i in range(levels)
        )
        self.mid_block = MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) latent -> (B, out_channels, h * f, w * f) image."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups  # widest first
        levels = len(ch)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, cfg.mid_block_add_attention)
        # One more resnet per level than the encoder, as in the original VAE.
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, i < levels - 1)
            for i in range(levels)
        )
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ----------------------------------------------------------------------------- autoencoder


class AutoencoderKL(nn.Module):
    """Encoder, diagonal Gaussian posterior and decoder; optional tiling and batch slicing.

    Tiling (`enable_tiling`) cuts inputs larger than `tile_size` pixels into overlapping tiles,
    runs each on its own and blends the overlaps (see tiling.py): memory stays that of one
    tile. Results differ slightly from untiled ones because GroupNorm statistics and the
    mid-block attention see one tile, not the whole image. Slicing (`enable_slicing`) runs a
    batch one item at a time.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        c = 2 * config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(c, c, 1) if config.use_quant_conv else None
        lc = config.latent_channels
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if config.use_post_quant_conv else None
        self.use_slicing = False
        self.tile_size: int | None = None  # pixels; None: tiling off
        self.tile_overlap = 0  # pixels

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        """Parameter device."""
        return self.encoder.conv_in.weight.device

    # -- options

    def enable_slicing(self) -> None:
        """Encode and decode batches one item at a time (less peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_size: int | None = None, overlap: int | None = None) -> None:
        """Tile inputs larger than tile_size pixels (default sample_size), overlapping by overlap.

        Both are in image pixels and must be multiples of the downsampling factor f; the
        default overlap is a quarter tile (SD: 512-pixel tiles = 64 latents, 128-pixel overlap).
        """
        f = self.config.downsample_factor
        if tile_size is None:
            size = self.config.sample_size
            tile_size = size if isinstance(size, int) else min(size)
        if overlap is None:
            overlap = tile_size // 4 // f * f
        if tile_size <= 0 or tile_size % f:
            raise ValueError(f"tile_size must be a positive multiple of {f} (f), got {tile_size}")
        if overlap < 0 or overlap >= tile_size or overlap % f:
            raise ValueError(
                f"overlap must be a multiple of {f} (f) in [0, tile_size={tile_size}), "
                f"got {overlap}"
            )
        self.tile_size, self.tile_overlap = tile_size, overlap

    def disable_tiling(self) -> None:
        self.tile_size = None

    # -- encode / decode

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Posterior q(z | x) of x (B, in_channels, H, W) in [-1, 1]; H, W multiples of f."""
        self._check_input("x", x, self.config.in_channels, "in_channels")
        f = self.config.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"x height and width must be multiples of the downsampling factor {f} "
                f"(2 ** (len(block_out_channels) - 1)), got {x.shape[-2]}x{x.shape[-1]}"
            )
        moments = torch.cat([self._encode_tiled(part) for part in self._batches(x)])
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Image (B, out_channels, h*f, w*f) of an unscaled latent z (B, latent_channels, h, w)."""
        self._check_input("z", z, self.config.latent_channels, "latent_channels")
        return torch.cat([self._decode_tiled(part) for part in self._batches(z)])

    def forward(
        self,
        x: Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction of x (from a posterior sample, or its mode) and the posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _encode_tile(self, x: Tensor) -> Tensor:
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _decode_tile(self, z: Tensor) -> Tensor:
        z = z if self.post_quant_conv is None else self.post_quant_conv(z)
        return self.decoder(z)

    def _encode_tiled(self, x: Tensor) -> Tensor:
        f = self.config.downsample_factor
        if self.tile_size is None or max(x.shape[-2:]) <= self.tile_size:
            return self._encode_tile(x)
        tile, overlap = self.tile_size // f, self.tile_overlap // f
        return tiled_map(self._encode_tile, x, tile, overlap, in_scale=f, out_scale=1)

    def _decode_tiled(self, z: Tensor) -> Tensor:
        f = self.config.downsample_factor
        if self.tile_size is None or max(z.shape[-2:]) <= self.tile_size // f:
            return self._decode_tile(z)
        tile, overlap = self.tile_size // f, self.tile_overlap // f
        return tiled_map(self._decode_tile, z, tile, overlap, in_scale=1, out_scale=f)

    def _batches(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(1) if self.use_slicing and x.shape[0] > 1 else (x,)

    @staticmethod
    def _check_input(name: str, x: Tensor, channels: int, field: str) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have shape (batch, channels, height, width), got {tuple(x.shape)}"
            )
        if x.shape[1] != channels:
            raise ValueError(
                f"{name} has {x.shape[1]} channels but config.{field} is {channels}; "
                f"{name} shape is {tuple(x.shape)}"
            )


# ----------------------------------------------------------------------------- presets

AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # The SD 1.x / 2.x VAE (f=8, 4 latent channels, 83.65M parameters); SD 2.x uses sample_size 768.
    "sd": AutoencoderConfig(),
    # Tests: the SD layout (4 levels, f=8, mid attention) at toy widths, 0.32M parameters.
    "tiny": AutoencoderConfig(
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    ),
    # The embedded default model, trained from scratch on 64x64 synthetic shapes on CPU.
    # f=4 (three levels) keeps a 16x16x4 latent: small shapes still span a few latent pixels,
    # which f=8 (8x8) would blur, and 12x compression is plenty for flat-coloured shapes.
    # Compute is spent at full resolution, so the first level stays narrow (32); 64 channels
    # below suffice for flat colours and edges. 1.29M parameters: 2.6 MB in float16, a small
    # share of the 25 MB model budget. scaling_factor is a placeholder: training measures
    # 1 / std of the latents and replaces it (dataclasses.replace).
    "small": AutoencoderConfig(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=1.0,
    ),
    # What the shipped default model uses: "small" with one ResNet per level and no mid-block
    # attention (flat shapes need neither), 0.92M parameters, ~5x faster to train on CPU.
    "shapes": AutoencoderConfig(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        mid_block_add_attention=False,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=1.0,
    ),
}
