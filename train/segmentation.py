"""A dense-label loss for the shapes data set: the U-Net's last feature map names each pixel's
object shape and colour.

A circle and a square of the same colour differ in a few corner pixels, so the diffusion loss
barely tells them apart and a U-Net learns colour and position long before shape. The data set
knows every object's geometry (train/shapes.py writes each image's scene), so training can also
ask for it outright: a 1x1 convolution reads the feature map the U-Net's output convolution
reads (the input of `conv_norm_out`, at the latent's resolution) and predicts, per latent pixel,
a distribution over {background, each shape} and one over {background, each colour}. Targets are
the objects' exact coverage of each latent pixel (soft where an edge crosses it):

    loss = mean over samples and pixels of  CE(shape target, shape logits)
                                          + CE(colour target, colour logits)

added to the diffusion loss with a weight (`ldm train --segmentation-weight`). At low noise the
answer is in the noisy latent; at high noise it must come from the caption, which is the
lesson the U-Net learns slowly from the diffusion loss alone. Only samples with t < t_max and a
caption count (caption dropout's empty captions name nothing). The head is trained with the
U-Net and kept in the run's checkpoints; the saved pipeline does not hold it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.grounding import object_mask, read_scenes
from train.shapes import COLORS, SHAPES, SceneSpec

N_SHAPE, N_COLOUR = 1 + len(SHAPES), 1 + len(COLORS)  # background first


def label_maps(scene: SceneSpec, side: int) -> Tensor:
    """(N_SHAPE + N_COLOUR, side, side): per pixel, the share of background and of each shape,
    then of background and of each colour, from the objects' exact coverage."""
    maps = torch.zeros(N_SHAPE + N_COLOUR, side * side)
    for obj in scene.objects:
        m = object_mask(obj, side)
        maps[1 + SHAPES.index(obj.shape)] += m
        maps[N_SHAPE + 1 + list(COLORS).index(obj.color)] += m
    covered = maps[1:N_SHAPE].sum(0).clamp(max=1.0)  # scenes keep objects apart; guard anyway
    maps[0], maps[N_SHAPE] = 1.0 - covered, 1.0 - covered
    maps[1:N_SHAPE] /= maps[1:N_SHAPE].sum(0).clamp_min(1.0)
    maps[N_SHAPE + 1 :] /= maps[N_SHAPE + 1 :].sum(0).clamp_min(1.0)
    return maps.view(-1, side, side)


class Segmentation(nn.Module):
    """The head and the targets for one shapes data set folder (targets cached by file)."""

    def __init__(self, folder: str | Path, channels: int, t_max: int):
        super().__init__()
        self.head = nn.Conv2d(channels, N_SHAPE + N_COLOUR, 1)
        self.scenes = read_scenes(folder)
        self.t_max = t_max
        self._maps: dict[tuple[str, int], Tensor] = {}

    def targets(self, name: str, side: int) -> Tensor:
        key = (name, side)
        if key not in self._maps:
            self._maps[key] = label_maps(self.scenes[name][2], side)
        return self._maps[key]

    def forward(
        self, features: Tensor, files: list[str], captions: list[str], t: Tensor
    ) -> Tensor | None:
        """The loss over the samples that count (None when none does). features: (B, C, H, W)."""
        steps = t.tolist()  # one device read, not one per sample
        rows = [b for b, (name, c) in enumerate(zip(files, captions))
                if c and steps[b] < self.t_max and name in self.scenes]  # fmt: skip
        if not rows:
            return None
        side = features.shape[-1]
        if features.shape[-2] != side:
            raise ValueError(f"features: expected a square map, got {tuple(features.shape)}")
        target = torch.stack([self.targets(files[b], side) for b in rows]).to(features.device)
        logits = self.head(features[rows].float())
        loss = 0.0
        for part in (slice(0, N_SHAPE), slice(N_SHAPE, None)):
            log_p = F.log_softmax(logits[:, part], dim=1)
            loss = loss - (target[:, part] * log_p).sum(1).mean()
        return loss


@contextmanager
def record_features(unet: nn.Module):
    """Yield a list that receives the input of the U-Net's `conv_norm_out` (its last feature
    map) on each forward pass inside the block; the output is unchanged."""
    features: list[Tensor] = []
    handle = unet.conv_norm_out.register_forward_pre_hook(lambda m, args: features.append(args[0]))
    try:
        yield features
    finally:
        handle.remove()
