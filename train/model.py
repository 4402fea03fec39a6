"""The model `ldm train` trains: a from-scratch preset, or a pipeline to fine-tune.

A from-scratch preset (`--model preset:NAME`) pairs a U-Net preset of ldm/unet.py with a small
CLIP-architecture text encoder as wide as the U-Net's cross-attention, around an autoencoder
trained by `ldm train-vae` (--vae); its weights are seeded by the run's seed, so every process
starts from the same ones. Anything else is loaded as a pipeline (folder, file or Hub id), with
its autoencoder optionally replaced and its prediction type optionally changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines.loading import Components
from train.data import DataConfig
from train.run import load_vae_folder

if TYPE_CHECKING:
    from ldm.schedule import ScheduleConfig
    from train.loop import TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScratchPreset:
    """A model trained from scratch: a U-Net preset and a small CLIP-architecture text encoder."""

    unet: str
    text_layers: int
    text_heads: int
    text_mlp_ratio: int = 4


# The text encoder's width is the U-Net's cross_attention_dim; the autoencoder comes from --vae.
SCRATCH_PRESETS: dict[str, ScratchPreset] = {
    "tiny": ScratchPreset(unet="tiny", text_layers=2, text_heads=2),
    "small": ScratchPreset(unet="small", text_layers=4, text_heads=4),
    # the shipped default model: a 32-wide, 3-layer text encoder (its 49408-token embedding
    # is most of its 1.6M parameters)
    "shapes": ScratchPreset(unet="shapes", text_layers=3, text_heads=1),
    "shapes2": ScratchPreset(unet="shapes2", text_layers=4, text_heads=4),
    "shapes3": ScratchPreset(unet="shapes3", text_layers=4, text_heads=4),
}


def scratch_preset_name(model: str) -> str | None:
    """The from-scratch preset `model` names ("preset:tiny", or "tiny" if no such path exists)."""
    if model.startswith("preset:"):
        name = model.removeprefix("preset:")
    elif model in SCRATCH_PRESETS and not Path(model).exists():
        name = model
    else:
        return None
    if name not in SCRATCH_PRESETS:
        raise ValueError(
            f"--model preset:{name}: unknown preset; choose one of {', '.join(SCRATCH_PRESETS)}"
        )
    return name


def scratch_text_config(width: int, layers: int, heads: int, mlp_ratio: int = 4,
                        max_length: int = 77):  # fmt: skip
    """A small CLIP text transformer: OpenAI CLIP's vocabulary and quick_gelu (ClipTextConfig's
    defaults) at `width`, with `max_length` positions (CLIP's 77 by default); it gets the
    offline CLIP BPE tokenizer, which pads every prompt to that length."""
    from text_encoder import ClipTextConfig

    return ClipTextConfig(hidden_size=width, intermediate_size=width * mlp_ratio,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          projection_dim=width, max_position_embeddings=max_length)  # fmt: skip


def build_scratch(name: str, cfg: TrainConfig) -> Components:
    """Fresh U-Net and text encoder (seeded) around a trained autoencoder."""
    from ldm.schedule import ScheduleConfig
    from ldm.unet import UNET_PRESETS, UNet
    from text_encoder import ClipTextEncoder, ClipTextModel

    preset = SCRATCH_PRESETS[name]
    if preset.unet not in UNET_PRESETS:
        raise ValueError(
            f"preset {name!r} needs the U-Net preset {preset.unet!r}, which "
            f"ldm.unet.UNET_PRESETS lacks (it has {', '.join(UNET_PRESETS)})"
        )
    if cfg.vae is None:
        raise ValueError(
            f"--vae: training preset {name!r} from scratch needs an autoencoder "
            "folder; train one with `ldm train-vae`"
        )
    vae = load_vae_folder(cfg.vae)
    f, latent = vae.config.downsample_factor, vae.config.latent_channels
    width = UNET_PRESETS[preset.unet].cross_attention_dim
    unet_config = replace(
        UNET_PRESETS[preset.unet],
        in_channels=latent,
        out_channels=latent,
        sample_size=cfg.data.resolution // f,
    )
    torch.manual_seed(cfg.run.seed)  # the same initial weights in every process
    unet = UNet(unet_config)
    if cfg.text_encoder is None:
        config = scratch_text_config(width, preset.text_layers, preset.text_heads,
                                     preset.text_mlp_ratio)  # fmt: skip
        text_encoder = ClipTextEncoder(ClipTextModel(config))
    else:
        text_encoder = ClipTextEncoder(ClipTextModel.from_pretrained(cfg.text_encoder).float())
        got = text_encoder.model.config.hidden_size
        if got != width:
            raise ValueError(
                f"--text-encoder {cfg.text_encoder}: width {got}, but preset {name!r} "
                f"cross-attends to width {width}"
            )
    schedule = ScheduleConfig(prediction_type=cfg.prediction_type or "epsilon")
    if cfg.zero_terminal_snr:
        schedule = _zero_terminal_snr(schedule)
    return Components(unet, vae, text_encoder, schedule, cfg.save_sampler, source=f"preset:{name}")


def _zero_terminal_snr(schedule: ScheduleConfig) -> ScheduleConfig:
    """Lin et al. 2023: betas rescaled so alpha_bar_T = 0, sampling from t = T ("trailing").

    With SNR(T) > 0 the training images keep a trace at t = T that pure-noise sampling never
    has, so the model learns to read layout and colour from the starting noise instead of the
    prompt. At SNR 0 the noisy input holds no image, so epsilon cannot be predicted from it:
    the rescaled schedule needs v-prediction.
    """
    if schedule.prediction_type != "v_prediction":
        raise ValueError(
            "--zero-terminal-snr needs --prediction-type v_prediction: at alpha_bar_T = 0 the "
            f"input is pure noise and a {schedule.prediction_type} model cannot recover "
            "the image from it"
        )
    return replace(schedule, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def load_components(cfg: TrainConfig) -> Components:
    """The model to train: a from-scratch preset, or a pipeline to fine-tune."""
    name = scratch_preset_name(cfg.model)
    if name is not None:
        return build_scratch(name, cfg)
    if cfg.text_encoder is not None:
        raise ValueError(
            f"--text-encoder: only for training from scratch (--model preset:NAME); "
            f"{cfg.model} has its own text encoder"
        )
    from pipelines import TextToImagePipeline

    parts = TextToImagePipeline.from_pretrained(cfg.model).components()
    if cfg.vae is not None:
        parts.vae = load_vae_folder(cfg.vae)
    if cfg.prediction_type and cfg.prediction_type != parts.schedule.prediction_type:
        logger.warning(
            "fine-tuning a %s model to predict %s (--prediction-type)",
            parts.schedule.prediction_type,
            cfg.prediction_type,
        )
        parts.schedule = replace(parts.schedule, prediction_type=cfg.prediction_type)
    if cfg.zero_terminal_snr and not parts.schedule.rescale_betas_zero_snr:
        logger.warning("fine-tuning to a zero-terminal-SNR schedule (--zero-terminal-snr)")
        parts.schedule = _zero_terminal_snr(parts.schedule)
    return parts


def bucket_multiple(data: DataConfig, parts: Components) -> int:
    """The sides' multiple of the buckets: --bucket-multiple, or the model's size multiple."""
    need = parts.vae.config.downsample_factor * 2 ** (parts.unet.config.num_levels - 1)
    multiple = data.bucket_multiple or need
    if multiple % need:
        raise ValueError(
            f"--bucket-multiple {multiple} must be a multiple of the model's size multiple {need} "
            "(the autoencoder's factor × the U-Net's halvings)"
        )
    return multiple
