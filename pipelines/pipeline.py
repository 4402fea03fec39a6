"""Text->image, image->image and inpainting on one shared sampling path.

Each call follows the same steps as diffusers' Stable Diffusion pipelines, drawing random numbers
from the generator(s) in the same order, so the same weights, seed and sampler give the same image:
encode the prompt (and the negative prompt for classifier-free guidance), draw the initial latents
(noise, or the encoded image noised to the starting level), run the sampler over a guided
denoiser, decode with the autoencoder.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.denoiser import Denoiser
from ldm.guidance import classifier_free_guidance
from ldm.samplers import Steps, get_sampler, make_steps, randn
from pipelines import images as imgs
from pipelines import loading

logger = logging.getLogger(__name__)


@dataclass
class PipelineOutput:
    """Generated images: a list of PIL images, an (N,H,W,3) array, (N,3,H,W) tensor or latents."""

    images: object


def _batch_generators(generator, batch: int):
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(
            f"generator: a list must hold one generator per image ({batch}), got {len(generator)}"
        )
    return generator


class DiffusionPipeline:
    """A U-Net, an autoencoder, a text encoder and a noise schedule; the shared sampling code."""

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        schedule,
        sampler: str = "ddim",
        use_karras_sigmas: bool = False,
        source: str = "",
    ):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.schedule, self.sampler, self.use_karras_sigmas = schedule, sampler, use_karras_sigmas
        self.source = source
        self.progress = True
        # the steps / guidance a model folder recommends (generation_defaults.json), for the CLI
        self.generation_defaults: dict = {}

    # ---- loading, saving, devices -------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id=None,
        *,
        prediction_type: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
    ):
        """Load a diffusers folder, a single .safetensors/.ckpt file, a Hub id, or (None) the
        embedded default model. `prediction_type` overrides nothing silently: it must agree with
        the folder's scheduler config, and is required knowledge for single v-prediction files."""
        c = loading.load(
            path_or_id, prediction_type=prediction_type, revision=revision, subfolder=subfolder
        )
        pipe = cls(
            c.unet, c.vae, c.text_encoder, c.schedule, c.sampler, c.use_karras_sigmas, c.source
        )
        pipe.generation_defaults = loading.read_generation_defaults(Path(c.source))
        return pipe

    @classmethod
    def from_pipeline(cls, other: DiffusionPipeline):
        """The same components behind another pipeline class (no copies)."""
        pipe = cls(
            other.unet,
            other.vae,
            other.text_encoder,
            other.schedule,
            other.sampler,
            other.use_karras_sigmas,
            other.source,
        )
        pipe.generation_defaults = dict(other.generation_defaults)
        return pipe

    def components(self) -> loading.Components:
        return loading.Components(
            self.unet,
            self.vae,
            self.text_encoder,
            self.schedule,
            self.sampler,
            self.use_karras_sigmas,
            self.source,
        )

    def save_pretrained(self, path) -> None:
        """Write the diffusers folder layout; diffusers' StableDiffusionPipeline loads it."""
        loading.save_folder(Path(path), self.components())
        if self.generation_defaults:
            loading.write_json(Path(path) / loading.GENERATION_DEFAULTS, self.generation_defaults)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Upload save_pretrained's folder and a model card to the Hub as one commit; its URL."""
        from pipelines.hub import push_to_hub

        return push_to_hub(
            self,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
        )

    def load_lora(
        self,
        source,
        scale: float = 1.0,
        *,
        adapter_name: str | None = None,
        weight_name: str | None = None,
    ) -> str:
        """Merge LoRA weights (diffusers/peft or kohya/A1111 keys) at `scale`; returns its name."""
        from pipelines.lora import load_lora

        return load_lora(self, source, scale, adapter_name=adapter_name, weight_name=weight_name)

    def unload_lora(self, adapter_name: str | None = None) -> None:
        """Remove one LoRA (or all), restoring the original weights exactly."""
        from pipelines.lora import unload_lora

        unload_lora(self, adapter_name)

    def compile(
        self,
        mode: str = "max-autotune-no-cudagraphs",
        *,
        cuda_graph: bool = False,
        cpp_wrapper: bool = False,
    ):
        """torch.compile the U-Net in place (fused QKV, channels_last); optionally replay it from
        CUDA graphs (fixed shapes only), or launch its kernels from C++ (`cpp_wrapper`)."""
        from pipelines.speed import compile_unet, cuda_graph_unet

        compile_unet(self, mode, cpp_wrapper=cpp_wrapper)
        return cuda_graph_unet(self) if cuda_graph else self

    def to(self, device=None, dtype: torch.dtype | None = None):
        """Move every component (in place) and return self."""
        self.unet.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        self.text_encoder.to(device, dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides are multiples of this: the autoencoder's factor × the U-Net's halvings."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    # ---- checks -------------------------------------------------------------------------------

    def _check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % m:
                raise ValueError(
                    f"{name}={value!r} must be a positive multiple of {m} (the "
                    f"autoencoder's factor {self.vae_scale_factor} × the U-Net's "
                    f"{m // self.vae_scale_factor})"
                )

    def call_defaults(self) -> dict:
        """The steps and guidance a call gets when the caller names none: the folder's
        generation_defaults.json where it has them, else `__call__`'s own defaults."""
        params = inspect.signature(type(self).__call__).parameters
        return {k: self.generation_defaults.get(k, params[k].default)
                for k in ("num_inference_steps", "guidance_scale")}  # fmt: skip

    @staticmethod
    def _check_common(num_inference_steps, num_images_per_prompt, guidance_scale, output_type):
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(
                f"num_images_per_prompt={num_images_per_prompt!r} must be an integer >= 1"
            )
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be >= 0")
        if output_type not in imgs.OUTPUT_TYPES:
            raise ValueError(
                f"output_type={output_type!r}; allowed: {', '.join(imgs.OUTPUT_TYPES)}"
            )

    # ---- the shared steps ---------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt,
        negative_prompt,
        num_images_per_prompt: int,
        do_cfg: bool,
        clip_skip: int | None = None,
    ):
        """(cond, uncond) contexts, repeated per image, as diffusers' encode_prompt returns them."""
        from text_encoder import encode_prompt

        with torch.inference_mode():
            return encode_prompt(
                self.text_encoder,
                prompt,
                negative_prompt,
                num_images_per_prompt,
                do_cfg,
                clip_skip=clip_skip,
            )

    def _steps(self, sampler: str | None, num_inference_steps: int, use_karras_sigmas):
        name = self.sampler if sampler is None else sampler
        get_sampler(name)  # a clear error for an unknown name before any work is done
        karras = self.use_karras_sigmas if use_karras_sigmas is None else use_karras_sigmas
        steps = make_steps(
            name, self.schedule, num_inference_steps, use_karras_sigmas=karras, device=self.device
        )
        return name, steps

    def _model_fn(self, concat: torch.Tensor | None):
        """The U-Net as a function (x_in, t, context) -> prediction, in float32 outside."""
        unet, dtype = self.unet, self.dtype
        extra: dict[int, torch.Tensor] = {}  # the concat inputs per batch size, built once

        def model(x_in, t, context):
            if concat is not None:  # inpainting / super-resolution inputs, same for both branches
                n = x_in.shape[0]
                if n not in extra:
                    extra[n] = concat.repeat(n // concat.shape[0], 1, 1, 1)
                x_in = torch.cat([x_in, extra[n]], 1)
            return unet(x_in.to(dtype), t, context.to(dtype)).float()

        return model

    def _sample(
        self,
        x: torch.Tensor,
        name: str,
        steps: Steps,
        cond,
        uncond,
        *,
        generator,
        guidance_scale: float,
        guidance_rescale: float,
        eta: float,
        concat: torch.Tensor | None = None,
        callback=None,
    ) -> torch.Tensor:
        """Run sampler `name` from state x (VE, at steps.sigmas[0]); returns latents (VP)."""
        model = classifier_free_guidance(
            self._model_fn(concat), cond, uncond, guidance_scale, rescale=guidance_rescale
        )
        denoiser = Denoiser(model, self.schedule.prediction_type)
        bar = tqdm(
            total=len(steps.timesteps), disable=not self.progress, desc="sampling", leave=False
        )

        def step_done(i, state):
            bar.update()
            return callback(i, state) if callback is not None else None

        with torch.inference_mode():
            latents = get_sampler(name)(
                denoiser, x, steps, generator=generator, eta=eta, callback=step_done
            )
        bar.close()
        return latents

    def _encode_images(self, image: torch.Tensor, generator) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, one posterior sample each, as diffusers draws it."""
        vae = self.vae
        image = image.to(self.device, next(vae.parameters()).dtype)
        with torch.inference_mode():
            if isinstance(generator, list):
                z = torch.cat(
                    [
                        vae.encode(image[i : i + 1]).sample(generator[i])
                        for i in range(image.shape[0])
                    ]
                )
            else:
                z = vae.encode(image).sample(generator)
        return (vae.config.scaling_factor * z).float()

    def _decode(self, latents: torch.Tensor, output_type: str):
        """Latents -> images, decoding again in float32 if a low-precision decode gives NaNs."""
        if output_type == "latent":
            return latents
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        with torch.inference_mode():
            images = vae.decode((latents / vae.config.scaling_factor).to(dtype))
            if dtype != torch.float32 and not torch.isfinite(images).all():
                logger.warning(
                    "the autoencoder's %s decode produced NaN/inf; decoding again in float32", dtype
                )
                vae.float()
                images = vae.decode((latents / vae.config.scaling_factor).float())
                vae.to(dtype)
        return imgs.to_output(images.float(), output_type)

    def _start(self, prompt, negative_prompt, num_images_per_prompt, guidance_scale, clip_skip):
        cond, uncond = self.encode_prompt(
            prompt, negative_prompt, num_images_per_prompt, guidance_scale > 1, clip_skip
        )
        return cond, uncond, cond.shape[0]


class TextToImagePipeline(DiffusionPipeline):
    """Text -> image (Stable Diffusion's txt2img)."""

    def __call__(
        self,
        prompt,
        negative_prompt=None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator=None,
        sampler: str | None = None,
        output_type: str = "pil",
        *,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        use_karras_sigmas: bool | None = None,
        clip_skip: int | None = None,
        latents: torch.Tensor | None = None,
    ) -> PipelineOutput:
        """Make images from `prompt`.

        Args:
            prompt: a string or a list of strings (one image batch per prompt).
            negative_prompt: what to steer away from (same length as prompt when a list).
            num_inference_steps: sampler steps (>= 1).
            guidance_scale: classifier-free guidance weight; <= 1 turns guidance off.
            height, width: image size in pixels; default: the U-Net's sample size × 8.
            num_images_per_prompt: images made for each prompt.
            generator: a torch.Generator, or one per image, for reproducible results.
            sampler: "ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m" (or
                "pndm"); None uses the model folder's scheduler.
            output_type: "pil", "np" ((N,H,W,3) floats in [0,1]), "pt" or "latent".
            eta: DDIM's η (0: deterministic).
            guidance_rescale: φ of Lin et al. 2023 (0 turns it off).
            use_karras_sigmas: Karras σ spacing; None uses the model folder's setting.
            clip_skip: use the text encoder's layer this many from the end.
            latents: initial noise (N,C,h,w) instead of drawing it from the generator.
        """
        self._check_common(num_inference_steps, num_images_per_prompt, guidance_scale, output_type)
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        self._check_size(height, width)
        name, steps = self._steps(sampler, num_inference_steps, use_karras_sigmas)
        cond, uncond, batch = self._start(
            prompt, negative_prompt, num_images_per_prompt, guidance_scale, clip_skip
        )
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = randn(shape, _batch_generators(generator, batch), self.device, cond.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        x = latents.float().to(self.device) * steps.init_noise_sigma
        out = self._sample(
            x,
            name,
            steps,
            cond,
            uncond,
            generator=generator,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
        )
        return PipelineOutput(self._decode(out, output_type))
