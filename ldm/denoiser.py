"""The denoiser D(x, sigma, t) -> x0 over the VE state x = x0 + sigma * eps.

A model trained on the VP sample x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps sees
x_in = x / sqrt(sigma^2 + 1) (since alpha_bar = 1 / (sigma^2 + 1)) and predicts eps, v or x0.
In Karras et al. 2022 terms (Table 1, sigma_data = 1) the wrapper is
D(x) = c_skip x + c_out F(c_in x) with c_in = 1 / sqrt(sigma^2 + 1) and

| prediction_type | c_skip             | c_out                    |
|-----------------|--------------------|--------------------------|
| epsilon         | 1                  | -sigma                   |
| v_prediction    | 1 / (sigma^2 + 1)  | -sigma / sqrt(sigma^2+1) |
| sample          | 0                  | 1                        |

The products are formed in the order diffusers' Euler schedulers form them, so the samplers
built on this wrapper match diffusers to float32 rounding.
"""

from collections.abc import Callable

import torch

from .schedule import PREDICTION_TYPES

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Denoiser:
    """Wraps model(x_in, t) -> prediction into D(x, sigma, t) -> x0 (Karras et al. 2022, Eq. 7)."""

    def __init__(self, model: ModelFn, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        self.model = model
        self.prediction_type = prediction_type

    def __call__(self, x: torch.Tensor, sigma, t) -> torch.Tensor:
        """x0 predicted from the VE state x at noise level sigma; t goes to the model unchanged."""
        sigma = torch.as_tensor(sigma)
        out = self.model(x / ((sigma**2 + 1) ** 0.5), t)
        return self.to_x0(out, x, sigma)

    def to_x0(self, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 implied by the raw model output `out` at VE state x and level sigma."""
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        return out

    def __repr__(self) -> str:
        return f"Denoiser(prediction_type={self.prediction_type!r}, model={self.model!r})"
