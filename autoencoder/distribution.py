"""Diagonal Gaussian posterior q(z | x) = N(mean, diag(exp(logvar))) of the KL autoencoder.

The encoder's output ("moments", 2C channels) is split along channels into mean and logvar.
Sampling draws the noise exactly as diffusers' DiagonalGaussianDistribution does (same shape,
dtype, generator and device), so the same generator gives bitwise the same latent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Same clamp as diffusers and the original LDM code: keeps exp(logvar) finite in float16.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _randn_like(mean: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Standard normal noise of mean's shape and dtype, drawn on the generator's device."""
    if isinstance(generator, list):
        if len(generator) != mean.shape[0]:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but the batch has "
                f"{mean.shape[0]} items; pass one generator per item or a single generator"
            )
        return torch.cat([_randn_like(mean[i : i + 1], g) for i, g in enumerate(generator)])
    device = mean.device if generator is None else generator.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    return noise.to(mean.device)


class DiagonalGaussian:
    """Posterior N(mean, diag(var)) over latents of shape (B, C, h, w)."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(
                f"mean and logvar must have the same shape, got {tuple(mean.shape)} "
                f"and {tuple(logvar.shape)}"
            )
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        # Computed once, with the same ops as diffusers, so sample() matches it bitwise.
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split the encoder's (B, 2C, h, w) output into mean and logvar along channels."""
        if moments.ndim < 2 or moments.shape[1] % 2 != 0:
            raise ValueError(
                f"moments must have an even number of channels (mean, logvar) on dim 1, "
                f"got shape {tuple(moments.shape)}"
            )
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, logvar)

    @property
    def shape(self) -> torch.Size:
        """Shape of one latent sample."""
        return self.mean.shape

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """Reparameterised draw z = mean + std * eps, eps ~ N(0, I) (Kingma & Welling, Sec. 2.4)."""
        return self.mean + self.std * _randn_like(self.mean, generator)

    def mode(self) -> Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) summed over (C, h, w), one per batch item; other=None: N(0, I)."""
        if other is None:
            terms = torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar
        else:
            terms = (
                torch.pow(self.mean - other.mean, 2) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * torch.sum(terms, dim=[1, 2, 3])

    def nll(self, z: Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood -log q(z) summed over dims."""
        terms = math.log(2.0 * math.pi) + self.logvar + torch.pow(z - self.mean, 2) / self.var
        return 0.5 * torch.sum(terms, dim=list(dims))

    def to(self, *args, **kwargs) -> DiagonalGaussian:
        """Move or cast mean and logvar (as Tensor.to)."""
        return DiagonalGaussian(self.mean.to(*args, **kwargs), self.logvar.to(*args, **kwargs))

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mean.shape)}, dtype={self.mean.dtype})"
