"""Exponential moving average of model weights, the weights a diffusion training run ships.

    shadow <- d_n * shadow + (1 - d_n) * theta,   d_n = min(decay, (1 + n) / (10 + n))

after the n-th optimizer step (n = 0, 1, ...). The warm-up term (TensorFlow's
ExponentialMovingAverage with num_updates) lets the average follow the fast early changes
instead of remembering the random initialisation for ~1 / (1 - decay) steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """Shadow copies of named parameters, updated after each optimizer step."""

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        self.parameters = parameters
        self.decay = decay
        self.num_updates = 0
        # float32 shadows: with bf16/fp16 weights, (1 - d) * theta would vanish below their epsilon
        self.shadow = {k: p.detach().float().clone() for k, p in parameters.items()}

    def current_decay(self) -> float:
        """d_n for the next update."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- d * shadow + (1 - d) * theta for every parameter."""
        weight = 1.0 - self.current_decay()
        shadows = list(self.shadow.values())
        params = [p.detach().float() for p in self.parameters.values()]
        torch._foreach_lerp_(shadows, params, weight)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadows, keyed by parameter name (num_updates is kept apart: it is not a tensor)."""
        return dict(self.shadow)

    def load_state_dict(self, shadow: dict[str, torch.Tensor], num_updates: int) -> None:
        """Restore shadows saved by state_dict(); the names must match exactly."""
        missing, extra = self.shadow.keys() - shadow.keys(), shadow.keys() - self.shadow.keys()
        if missing or extra:
            raise ValueError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(extra)[:5]}"
            )
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.num_updates = int(num_updates)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Put the averaged weights into the model for the block, then the trained ones back."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        # In place, one parameter at a time: no second copy of the whole model is needed.
        for k, p in self.parameters.items():
            trained = p.detach().clone()
            p.copy_(self.shadow[k])
            self.shadow[k].copy_(trained)
