"""Image -> image and inpainting: the text->image path started from an encoded image.

Both re-run the tail of the schedule that `strength` selects (diffusers' get_timesteps) from the
image's latents noised to that level, drawing from the generator(s) in diffusers' order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.samplers import Steps, randn
from pipelines import images as imgs
from pipelines.pipeline import DiffusionPipeline, PipelineOutput, _batch_generators


def _strength_steps(steps: Steps, num_inference_steps: int, strength: float) -> Steps:
    """The tail of the schedule an image->image run starts from (diffusers' get_timesteps)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength!r} must be in [0, 1]")
    init = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - init, 0)
    if start >= num_inference_steps:
        raise ValueError(
            f"strength={strength} with num_inference_steps={num_inference_steps} "
            "leaves no step to run; raise one of them"
        )
    return steps.tail(start)


@dataclass
class _ImageCall:
    """What both image pipelines set up before sampling."""

    sampler: str
    steps: Steps
    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1], on the pipeline's device
    cond: torch.Tensor
    uncond: torch.Tensor | None
    batch: int
    generator: object


class _ImagePipeline(DiffusionPipeline):
    def _prepare(
        self,
        prompt,
        image,
        strength,
        negative_prompt,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        generator,
        sampler,
        output_type,
        use_karras_sigmas,
        clip_skip,
        height,
        width,
        mask=None,
    ) -> _ImageCall:
        self._check_common(num_inference_steps, num_images_per_prompt, guidance_scale, output_type)
        name, steps = self._steps(sampler, num_inference_steps, use_karras_sigmas)
        steps = _strength_steps(steps, num_inference_steps, strength)
        pixels = imgs.to_tensor(image, name="image", height=height, width=width)
        if mask is not None and mask.shape[2:] != pixels.shape[2:]:
            raise ValueError(
                f"mask_image: size {tuple(mask.shape[2:])} does not match the image's "
                f"{tuple(pixels.shape[2:])}"
            )
        self._check_size(pixels.shape[2], pixels.shape[3])
        cond, uncond, batch = self._start(
            prompt, negative_prompt, num_images_per_prompt, guidance_scale, clip_skip
        )
        if batch % pixels.shape[0]:
            raise ValueError(
                f"image: {pixels.shape[0]} images cannot be spread over {batch} outputs"
            )
        generator = _batch_generators(generator, batch)
        pixels = pixels.to(self.device) * 2 - 1
        return _ImageCall(name, steps, pixels, cond, uncond, batch, generator)


class ImageToImagePipeline(_ImagePipeline):
    """Image -> image: noise the encoded image to a level set by `strength`, then denoise."""

    def __call__(
        self,
        prompt,
        image,
        strength: float = 0.8,
        negative_prompt=None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator=None,
        sampler: str | None = None,
        output_type: str = "pil",
        *,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        use_karras_sigmas: bool | None = None,
        clip_skip: int | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> PipelineOutput:
        """Re-make `image` (PIL / array / tensor in [0,1]) following `prompt`; strength in
        [0, 1] is how much of the schedule is re-run (1: ignore the image's content)."""
        c = self._prepare(
            prompt,
            image,
            strength,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            generator,
            sampler,
            output_type,
            use_karras_sigmas,
            clip_skip,
            height,
            width,
        )
        pixels = c.pixels
        if isinstance(c.generator, list):  # one posterior draw per image, as diffusers does
            pixels = pixels.repeat(c.batch // pixels.shape[0], 1, 1, 1)
        init = self._encode_images(pixels, c.generator)
        init = init.repeat(c.batch // init.shape[0], 1, 1, 1)
        noise = randn(init.shape, c.generator, self.device, c.cond.dtype).float()
        x = c.steps.add_noise(init, noise, 0)
        out = self._sample(
            x,
            c.sampler,
            c.steps,
            c.cond,
            c.uncond,
            generator=c.generator,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
        )
        return PipelineOutput(self._decode(out, output_type))


class InpaintPipeline(_ImagePipeline):
    """Inpainting: re-make the white part of `mask_image`, keep the rest.

    9-channel inpainting U-Nets see the mask and the masked image's latents as extra inputs;
    ordinary 4-channel U-Nets get the known region blended back in after every step.
    """

    def __call__(
        self,
        prompt,
        image,
        mask_image,
        strength: float = 1.0,
        negative_prompt=None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator=None,
        sampler: str | None = None,
        output_type: str = "pil",
        *,
        eta: float = 0.0,
        use_karras_sigmas: bool | None = None,
        clip_skip: int | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> PipelineOutput:
        """Inpaint `image` where `mask_image` is white (>= 0.5); strength as for image->image."""
        in_ch = self.unet.config.in_channels
        if in_ch not in (4, 9):
            raise ValueError(
                f"InpaintPipeline needs a U-Net with 4 or 9 input channels, not {in_ch}"
            )
        mask = imgs.to_tensor(
            mask_image, name="mask_image", height=height, width=width, grayscale=True
        )
        c = self._prepare(
            prompt,
            image,
            strength,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            generator,
            sampler,
            output_type,
            use_karras_sigmas,
            clip_skip,
            height,
            width,
            mask=mask,
        )
        steps, batch, generator = c.steps, c.batch, c.generator
        mask = (mask >= 0.5).float().to(self.device)

        # the draw order of diffusers: image latents (if needed), noise, then masked-image latents
        image_latents = None
        if in_ch == 4 or strength < 1.0:
            image_latents = self._encode_images(c.pixels, generator)
            image_latents = image_latents.repeat(batch // image_latents.shape[0], 1, 1, 1)
        f = self.vae_scale_factor
        h, w = c.pixels.shape[2] // f, c.pixels.shape[3] // f
        noise = randn(
            (batch, self.vae.config.latent_channels, h, w), generator, self.device, c.cond.dtype
        ).float()
        if strength == 1.0:
            x = noise * steps.init_noise_sigma
        else:
            x = steps.add_noise(image_latents, noise, 0)
        latent_mask = torch.nn.functional.interpolate(mask, size=(h, w))
        latent_mask = latent_mask.repeat(batch // latent_mask.shape[0], 1, 1, 1)

        concat, callback = None, None
        if in_ch == 9:
            masked = self._encode_images(c.pixels * (mask < 0.5), generator)
            masked = masked.repeat(batch // masked.shape[0], 1, 1, 1)
            concat = torch.cat([latent_mask, masked], dim=1)
        else:
            last = len(steps.timesteps) - 1

            def callback(i, state):  # keep the known region: diffusers blends after each step
                if i < last:
                    known = steps.add_noise(image_latents, noise, i + 1)
                else:  # the clean latents, in the state's (VE) scale at the final level
                    known = image_latents * (1 + steps.sigmas[-1] ** 2) ** 0.5
                return latent_mask * state + (1 - latent_mask) * known

        out = self._sample(
            x,
            c.sampler,
            steps,
            c.cond,
            c.uncond,
            generator=generator,
            guidance_scale=guidance_scale,
            guidance_rescale=0.0,
            eta=eta,
            concat=concat,
            callback=callback,
        )
        return PipelineOutput(self._decode(out, output_type))
