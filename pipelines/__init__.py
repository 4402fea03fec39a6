"""Pipelines: text->image, image->image and inpainting; model formats; the `ldm generate` command."""

from pipelines.pipeline import (
    DiffusionPipeline,
    ImageToImagePipeline,
    InpaintPipeline,
    PipelineOutput,
    TextToImagePipeline,
)

__all__ = [
    "DiffusionPipeline",
    "ImageToImagePipeline",
    "InpaintPipeline",
    "PipelineOutput",
    "TextToImagePipeline",
]
