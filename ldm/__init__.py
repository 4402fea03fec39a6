"""The diffusion core: noise schedules, objective, denoisers, guidance, samplers, U-Net, attention.

Imports torch only.
"""

from ldm.denoiser import Denoiser
from ldm.guidance import classifier_free_guidance
from ldm.samplers import SAMPLERS, Steps, get_sampler, make_steps, randn
from ldm.schedule import PRESETS, ScheduleConfig, alphas_cumprod
from ldm.unet import UNET_PRESETS, UNet, UNetConfig

__all__ = [
    "PRESETS",
    "SAMPLERS",
    "UNET_PRESETS",
    "Denoiser",
    "ScheduleConfig",
    "Steps",
    "UNet",
    "UNetConfig",
    "alphas_cumprod",
    "classifier_free_guidance",
    "get_sampler",
    "make_steps",
    "randn",
]
