"""Pipelines: text->image, image->image and inpainting; model formats; `ldm generate`."""

from pipelines.image_to_image import ImageToImagePipeline, InpaintPipeline
from pipelines.pipeline import DiffusionPipeline, PipelineOutput, TextToImagePipeline

__all__ = [
    "DiffusionPipeline",
    "ImageToImagePipeline",
    "InpaintPipeline",
    "PipelineOutput",
    "TextToImagePipeline",
]
