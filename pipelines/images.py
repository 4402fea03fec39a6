"""Conversions between user images (PIL, numpy, tensors) and the pipelines' tensors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _as_list(images) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def to_tensor(
    images,
    *,
    name: str = "image",
    height: int | None = None,
    width: int | None = None,
    grayscale: bool = False,
) -> torch.Tensor:
    """PIL image(s), an (H,W,C)/(N,H,W,C) array or an (N,C,H,W) tensor in [0,1] -> (N,C,H,W).

    PIL images are resized to (width, height) with Lanczos when a size is given, as diffusers'
    image processor does; arrays and tensors must already have that size.
    """
    if isinstance(images, torch.Tensor):
        x = images if images.ndim == 4 else images[None]
        if x.shape[1] not in (1, 3):
            raise ValueError(
                f"{name}: a tensor must be (N, C, H, W) with C=1 or 3, got {tuple(x.shape)}"
            )
        x = x.float()
    else:
        arrays = []
        for im in _as_list(images):
            if isinstance(im, PIL.Image.Image):
                im = im.convert("L" if grayscale else "RGB")
                if height is not None and width is not None and im.size != (width, height):
                    im = im.resize((width, height), resample=PIL.Image.LANCZOS)
                a = np.asarray(im, dtype=np.float32) / 255.0
            elif isinstance(im, np.ndarray):
                a = im.astype(np.float32)
            else:
                raise ValueError(
                    f"{name}: expected PIL images, numpy arrays or a tensor, "
                    f"got {type(im).__name__}"
                )
            arrays.append(a[..., None] if a.ndim == 2 else a)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if grayscale and x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    return x


def to_output(images: torch.Tensor, output_type: str):
    """Decoded images in [-1, 1] -> the requested output type ('pil', 'np', 'pt')."""
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [PIL.Image.fromarray(a) for a in (array * 255).round().astype("uint8")]
