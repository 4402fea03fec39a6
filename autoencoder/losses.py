"""Training losses of the KL autoencoder: reconstruction, KL, and a PatchGAN with hinge loss.

The objective follows latent diffusion's autoencoder training (Rombach et al. 2022, App. G,
after Esser et al. 2021, eq. 4-5) without the LPIPS perceptual term (its weights cannot be
fetched offline):

    L_G = rec(x, x_rec) + kl_weight * KL(q(z|x) || N(0, I)) + lambda * disc_factor * (-D(x_rec))
    L_D = disc_factor * hinge(D(x), D(x_rec))

rec and KL are summed over an image and averaged over the batch, as in LDM, so kl_weight means
what it means in LDM configs (1e-6 for the KL-f8 model). lambda balances the adversarial
gradient against the reconstruction gradient at the decoder's last layer (Esser et al. eq. 7).
disc_factor is 0 before `disc_start` steps so the autoencoder first learns to reconstruct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distribution import DiagonalGaussian

PIXEL_LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """Weights and schedule of the autoencoder objective."""

    pixel_loss: str = "l1"  # "l1" | "l2"
    kl_weight: float = 1e-6
    disc_weight: float = 0.5  # multiplies the adaptive weight lambda
    disc_start: int = 10_000  # optimizer step at which the adversarial terms switch on
    disc_channels: int = 64
    disc_layers: int = 3
    adaptive_weight_max: float = 1e4

    def __post_init__(self):
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}")
        if self.kl_weight < 0 or self.disc_weight < 0:
            raise ValueError(
                f"kl_weight and disc_weight must be >= 0, got {self.kl_weight}, {self.disc_weight}"
            )
        if self.disc_layers < 1 or self.disc_channels < 1:
            raise ValueError(
                f"disc_layers and disc_channels must be >= 1, "
                f"got {self.disc_layers}, {self.disc_channels}"
            )


# ----------------------------------------------------------------------------- loss terms


def reconstruction_loss(x: Tensor, x_rec: Tensor, kind: str = "l1") -> Tensor:
    """Per-pixel |x - x_rec| (or its square) summed over an image, averaged over the batch."""
    if kind not in PIXEL_LOSSES:
        raise ValueError(f"kind must be one of {PIXEL_LOSSES}, got {kind!r}")
    if x.shape != x_rec.shape:
        raise ValueError(f"x and x_rec shapes differ: {tuple(x.shape)} vs {tuple(x_rec.shape)}")
    diff = (x - x_rec).abs() if kind == "l1" else (x - x_rec).pow(2)
    return diff.sum() / x.shape[0]


def kl_loss(posterior: DiagonalGaussian) -> Tensor:
    """KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch."""
    return posterior.kl().mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator side of the hinge GAN: -E[D(x_rec)]."""
    return -logits_fake.mean()


def adaptive_weight(rec: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float) -> Tensor:
    """lambda = |grad rec| / (|grad g| + 1e-4) at the decoder's last layer (Esser et al. eq. 7)."""
    rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------- discriminator


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm instead of pix2pix's BatchNorm: CPU training uses small batches, and real and
    # fake batches pass through separately, which skews batch statistics.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a conv net scoring overlapping patches as real or fake."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mult = [min(2**i, 8) for i in range(layers + 1)]  # width multipliers, capped at 8x
        blocks: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1  # the last block keeps the resolution
            c_in, c_out = channels * mult[i - 1], channels * mult[i]
            blocks += [
                nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False),
                _norm(c_out),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(channels * mult[layers], 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) image -> (B, 1, h, w) patch logits."""
        return self.net(x)


def _init_weights(module: nn.Module) -> None:
    # pix2pix initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- objective


class AutoencoderLoss(nn.Module):
    """Reconstruction + KL + adversarial objective; owns the discriminator."""

    def __init__(self, config: AutoencoderLossConfig, image_channels: int = 3):
        super().__init__()
        self.config = config
        self.discriminator = PatchDiscriminator(
            image_channels, config.disc_channels, config.disc_layers
        )

    def disc_active(self, step: int) -> bool:
        """Whether the adversarial terms are on at this optimizer step."""
        return self.config.disc_weight > 0 and step >= self.config.disc_start

    def generator_loss(
        self,
        x: Tensor,
        x_rec: Tensor,
        posterior: DiagonalGaussian,
        step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder loss L_G and its parts; last_layer is decoder.conv_out.weight."""
        cfg = self.config
        rec = reconstruction_loss(x, x_rec, cfg.pixel_loss)
        kl = kl_loss(posterior)
        loss = rec + cfg.kl_weight * kl
        logs = {"rec": rec.detach(), "kl": kl.detach()}
        if self.disc_active(step):
            g = hinge_g_loss(self.discriminator(x_rec))
            if last_layer is None:
                raise ValueError("last_layer (decoder.conv_out.weight) is needed once disc is on")
            lam = adaptive_weight(rec, g, last_layer, cfg.adaptive_weight_max)
            loss = loss + cfg.disc_weight * lam * g
            logs.update(g=g.detach(), disc_lambda=lam)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, x: Tensor, x_rec: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge loss L_D on real x and detached reconstructions; zero before disc_start."""
        if not self.disc_active(step):
            zero = x.new_zeros(())
            return zero, {"d_loss": zero}
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_rec.detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs
