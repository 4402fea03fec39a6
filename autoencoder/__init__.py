"""KL autoencoder (encoder, diagonal Gaussian posterior, decoder) and its training losses."""

from .distribution import DiagonalGaussian
from .losses import AutoencoderLoss, AutoencoderLossConfig, PatchDiscriminator
from .model import AUTOENCODER_PRESETS, AutoencoderConfig, AutoencoderKL, Decoder, Encoder
from .tiling import tiled_map

__all__ = [
    "AUTOENCODER_PRESETS",
    "AutoencoderConfig",
    "AutoencoderKL",
    "AutoencoderLoss",
    "AutoencoderLossConfig",
    "DiagonalGaussian",
    "Decoder",
    "Encoder",
    "PatchDiscriminator",
    "tiled_map",
]
