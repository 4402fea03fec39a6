"""Samplers: one stateless function per method over a denoiser D(x, sigma, t) -> x0.

The state x is the VE sample x0 + sigma * eps (k-diffusion convention); a VP sample is
x / sqrt(sigma^2 + 1). Every sampler has the signature

    fn(denoiser, x, steps, *, generator=None, eta=0.0, callback=None) -> latents

with x already at level steps.sigmas[0], and returns the final VP latents: exactly what
diffusers' loop leaves in `latents` with the matching scheduler. `make_steps` (ldm/steps.py)
picks the timesteps and levels as that scheduler's `set_timesteps` does, and noise is drawn
with `randn` at the moments, and in the order, diffusers draws it.

| sampler         | method                                         | diffusers scheduler         |
|-----------------|------------------------------------------------|-----------------------------|
| ddpm            | Ho et al. 2020, Algorithm 2                    | DDPMScheduler               |
| ddim            | Song et al. 2021, Eq. 12 and 16                | DDIMScheduler               |
| euler           | Karras et al. 2022, Alg. 1 without 2nd order   | EulerDiscreteScheduler      |
| euler_ancestral | Euler step to sigma_down, noise sigma_up       | EulerAncestralDiscrete...   |
| heun            | Karras et al. 2022, Algorithm 1                | HeunDiscreteScheduler       |
| dpmpp_2m        | Lu et al. 2022 (DPM-Solver++), Algorithm 2     | DPMSolverMultistepScheduler |
| pndm            | Liu et al. 2022 (PNDM), PLMS: Eq. 12 and 9     | PNDMScheduler (skip_prk)    |

A sampler calls the model once per timestep, so len(steps) is its number of model calls and of
callbacks, except Heun's (two calls a step). PNDM's list holds num_steps + 1 timesteps.
"""

from collections.abc import Callable

import torch

from .schedule import sigmas_from_alphas_cumprod
from .steps import DIFFUSERS_SCHEDULERS as DIFFUSERS_SCHEDULERS
from .steps import KARRAS_SAMPLERS as KARRAS_SAMPLERS
from .steps import Steps
from .steps import make_steps as make_steps


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' randn_tensor draws it.

    A CPU generator draws on the CPU, then the tensor moves to `device`. A list of generators
    draws one batch item (batch size 1) from each, concatenated along the batch dimension.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    draw_device = device
    if gens[0] is not None and gens[0].device.type != device.type:
        if gens[0].device.type != "cpu":
            raise ValueError(f"generator on {gens[0].device} cannot draw a tensor for {device}")
        draw_device = torch.device("cpu")
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=draw_device, dtype=dtype).to(device)
    if len(gens) != shape[0]:
        raise ValueError(f"generator list has {len(gens)} generators for batch size {shape[0]}")
    one = (1, *shape[1:])
    draws = [torch.randn(one, generator=g, device=draw_device, dtype=dtype) for g in gens]
    return torch.cat(draws).to(device)


# ---------------------------------------------------------------------------------------------
# The samplers


DenoiserFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], torch.Tensor | None]


def _check(steps: Steps, name: str, eta: float) -> None:
    if steps.sampler != name:
        raise ValueError(
            f"steps were made for sampler {steps.sampler!r}; use make_steps({name!r}, ...)"
        )
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")


def _done(callback: StepCallback | None, i: int, x: torch.Tensor) -> torch.Tensor:
    """Hand the new state to the callback; a returned tensor replaces it (e.g. inpainting)."""
    if callback is None:
        return x
    out = callback(i, x)
    return x if out is None else out


def _vp_scale(sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(sigma^2 + 1) = 1 / sqrt(alpha_bar): the VE state over the VP sample."""
    return (sigma**2 + 1) ** 0.5


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def sample_ddpm(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    steps: Steps,
    *,
    generator=None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ho et al. 2020, Algorithm 2: ancestral steps from q(x_prev | x_t, x0) of Eq. 7."""
    _check(steps, "ddpm", eta)
    s = steps.sigmas
    for i in range(len(steps)):
        ab, ab_prev = steps.alphas_cumprod[i], steps.alphas_cumprod_prev[i]
        x0 = denoiser(x, s[i], steps.timesteps[i])
        x0 = x0.clamp(-1, 1) if steps.clip_sample else x0
        x_t = x / _vp_scale(s[i])
        alpha = ab / ab_prev  # alpha_t of this step (several training steps when strided)
        beta = 1 - alpha
        # Eq. 7: posterior mean mu_tilde(x_t, x0) and variance beta_tilde
        mean = (ab_prev**0.5 * beta) / (1 - ab) * x0 + alpha**0.5 * (1 - ab_prev) / (1 - ab) * x_t
        if steps.timesteps[i] > 0:  # diffusers adds (and draws) noise at every t > 0
            variance = torch.clamp((1 - ab_prev) / (1 - ab) * beta, min=1e-20)
            mean = mean + variance**0.5 * _noise(x, generator)
        x = _done(callback, i, mean * _vp_scale(s[i + 1]))
    return x / _vp_scale(s[-1])


def sample_ddim(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    steps: Steps,
    *,
    generator=None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Song et al. 2021, Eq. 12, with the noise sigma_t(eta) of Eq. 16 (eta=0: deterministic)."""
    _check(steps, "ddim", eta)
    s = steps.sigmas
    for i in range(len(steps)):
        ab, ab_prev = steps.alphas_cumprod[i], steps.alphas_cumprod_prev[i]
        x0 = denoiser(x, s[i], steps.timesteps[i])
        eps = (x - x0) / s[i]  # taken before clipping x0, as diffusers does
        x0 = x0.clamp(-1, 1) if steps.clip_sample else x0
        std = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5  # Eq. 16
        # Eq. 12; the clamp only guards 1 - ab_prev - std^2 < 0 by rounding (zero SNR, eta=1),
        # where diffusers returns NaN
        x_prev = ab_prev**0.5 * x0 + (1 - ab_prev - std**2).clamp(min=0) ** 0.5 * eps
        if eta > 0:
            x_prev = x_prev + std * _noise(x, generator)
        # The state is held at the next timestep's level; for trailing/linspace spacing that
        # differs from alpha_bar_prev, as in diffusers, which feeds x_prev to that timestep.
        x = _done(callback, i, x_prev * _vp_scale(s[i + 1]))
    return x / _vp_scale(s[-1])


def sample_euler(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    steps: Steps,
    *,
    generator=None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 1 without the 2nd-order correction: Euler on the PF-ODE."""
    _check(steps, "euler", eta)
    s = steps.sigmas
    for i in range(len(steps)):
        x0 = denoiser(x, s[i], steps.timesteps[i])
        d = (x - x0) / s[i]  # dx/dsigma of the probability-flow ODE (d_i of Algorithm 1)
        x = _done(callback, i, x + d * (s[i + 1] - s[i]))
    return x / _vp_scale(s[-1])


def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    steps: Steps,
    *,
    generator=None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler step down to sigma_down, then fresh noise sigma_up (k-diffusion's ancestral step)."""
    _check(steps, "euler_ancestral", eta)
    s = steps.sigmas
    for i in range(len(steps)):
        sigma, sigma_next = s[i], s[i + 1]
        # sigma_down^2 + sigma_up^2 = sigma_next^2, sigma_up as in DDPM's posterior variance
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x0 = denoiser(x, sigma, steps.timesteps[i])
        d = (x - x0) / sigma
        x = x + d * (sigma_down - sigma)
        x = x + _noise(x, generator) * sigma_up  # drawn at every step, the last one too
        x = _done(callback, i, x)
    return x / _vp_scale(s[-1])


def sample_heun(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    steps: Steps,
    *,
    generator=None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 1 (gamma = 0): Heun's method, Euler on the last step."""
    _check(steps, "heun", eta)
    s, ts, n = steps.sigmas, steps.timesteps, len(steps)
    for i in range(n):
        x0 = denoiser(x, s[i], ts[i])
        x0 = x0.clamp(-1, 1) if steps.clip_sample else x0
        d = (x - x0) / s[i]
        dt = s[i + 1] - s[i]
        if i < n - 1:  # second-order correction, evaluated at the next timestep
            x_euler = x + d * dt
            x0_next = denoiser(x_euler, s[i + 1], ts[i + 1])
            x0_next = x0_next.clamp(-1, 1) if steps.clip_sample else x0_next
            d = (d + (x_euler - x0_next) / s[i + 1]) / 2
        x = _done(callback, i, x + d * dt)
    return x / _vp_scale(s[-1])


def _half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma_vp), formed from the VP pair as diffusers forms it."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return torch.log(alpha) - torch.log(sigma * alpha)


def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    steps: Steps,
    *,
    generator=None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Lu et al. 2022 (DPM-Solver++), Algorithm 2 (2M); first order on the first and last step."""
    _check(steps, "dpmpp_2m", eta)
    s, n = steps.sigmas, len(steps)
    x0_prev = h_prev = None
    for i in range(n):
        x0 = denoiser(x, s[i], steps.timesteps[i])
        h = _half_log_snr(s[i + 1]) - _half_log_snr(s[i])
        phi = torch.exp(-h) - 1.0  # the last step (sigma = 0) has h = inf and phi = -1
        x = (s[i + 1] / s[i]) * x - phi * x0
        if x0_prev is not None and i < n - 1:
            d1 = (1.0 / (h_prev / h)) * (x0 - x0_prev)  # divided difference of x0 in lambda
            x = x - 0.5 * phi * d1
        x0_prev, h_prev = x0, h
        x = _done(callback, i, x)
    return x / _vp_scale(s[-1])


# Adams-Bashforth weights on the last k outputs, newest first: PLMS (Liu et al. 2022, Eq. 12)
# for k = 4, and the lower orders it warms up with.
_PLMS_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _pndm_output(eps: torch.Tensor, x0: torch.Tensor, sigma, prediction_type: str):
    """What PNDM extrapolates: eps, or v for a v model (diffusers combines raw model outputs)."""
    if prediction_type != "v_prediction":
        return eps
    return (eps - sigma * x0) / _vp_scale(sigma)  # v = sqrt(ab) eps - sqrt(1 - ab) x0


def _plms_combine(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The linear multistep estimate from the last (up to four) outputs, oldest first."""
    weights = _PLMS_WEIGHTS[len(outputs)]
    est = weights[0] * outputs[-1]
    for w, out in zip(weights[1:], reversed(outputs[:-1])):
        est = est + w * out
    return est


def sample_pndm(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    steps: Steps,
    *,
    generator=None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Liu et al. 2022 (PNDM), PLMS: Eq. 12's multistep eps, moved by Eq. 9's transfer.

    Eq. 9's transfer is DDIM's step with the extrapolated eps_hat; in the VE state it is the
    Euler step x + (sigma_prev - sigma) eps_hat. As diffusers runs it (skip_prk_steps), the
    first call takes that step with its own output; the second (the repeated timestep) redoes
    it from the same start with the mean of both outputs (a Heun start); then Adams-Bashforth
    of order 2, 3 and 4. One model call, and one callback, per timestep.
    """
    _check(steps, "pndm", eta)
    s, n, v_model = steps.sigmas, len(steps), steps.prediction_type == "v_prediction"
    outputs: list[torch.Tensor] = []  # the last four model outputs (eps or v), oldest first
    start = x / _vp_scale(s[0])  # the first VP sample, which the second call steps from again
    for i in range(n):
        x0 = denoiser(x, s[i], steps.timesteps[i])
        eps = (x - x0) / s[i]
        out = _pndm_output(eps, x0, s[i], steps.prediction_type)
        if i == 1:  # diffusers places the restart one stride above t_1 (t_0 for leading spacing)
            out = (out + outputs[-1]) / 2
            ab, ab_prev = steps.alphas_cumprod_next[1], steps.alphas_cumprod[1]
            x_t = start
        else:
            outputs = [*outputs[-3:], out]
            out = _plms_combine(outputs)
            ab, ab_prev = steps.alphas_cumprod[i], steps.alphas_cumprod_prev[i]
            x_t = x / _vp_scale(s[i])  # the VP sample diffusers holds
        sigma, sigma_prev = sigmas_from_alphas_cumprod(torch.stack([ab, ab_prev]))
        eps_hat = ab**0.5 * out + (1 - ab) ** 0.5 * x_t if v_model else out
        if i == 1:
            x0_hat = x_t * _vp_scale(sigma) - sigma * eps_hat
        else:  # x - sigma * eps_hat, without cancelling x against sigma * eps twice (sigma >> 1)
            x0_hat = x0 + s[i] * (eps - eps_hat)
        x_prev = x0_hat + sigma_prev * eps_hat  # Eq. 9 in the VE state
        # held at the next timestep's level, as ddim holds it (the same VP sample)
        x = _done(callback, i, x_prev * (_vp_scale(s[i + 1]) / _vp_scale(sigma_prev)))
    return x / _vp_scale(s[-1])


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "pndm": sample_pndm,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler registered under `name`."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]
