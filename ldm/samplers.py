"""Samplers: one stateless function per method over a denoiser D(x, sigma, t) -> x0.

The state x is the VE sample x0 + sigma * eps (k-diffusion convention); a VP sample is
x / sqrt(sigma^2 + 1). Every sampler has the signature

    fn(denoiser, x, steps, *, generator=None, eta=0.0, callback=None) -> latents

with x already at level steps.sigmas[0], and returns the final VP latents: exactly what
diffusers' loop leaves in `latents` with the matching scheduler. `make_steps` picks the
timesteps and levels as that scheduler's `set_timesteps` does (each rounds differently), and
noise is drawn with `randn` at the moments, and in the order, diffusers draws it.

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

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .schedule import (
    ScheduleConfig,
    alphas_cumprod,
    karras_sigmas,
    sigmas_from_alphas_cumprod,
)

DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",  # with skip_prk_steps=True, as Stable Diffusion 1.x configs set it
}
KARRAS_SAMPLERS = ("euler", "heun", "dpmpp_2m")  # those whose diffusers class has Karras sigmas

# alpha_bar = 0 (zero terminal SNR) is sigma = inf. DDPM and DDIM use the exact alpha_bar in
# their update, and hold the state at sigma = 2^50: float32 then cannot tell it from inf (x0
# terms vanish below rounding) while sigma^2 + 1 stays finite. diffusers' Euler and DPM-Solver
# instead replace alpha_bar_T by 2^-24, which those samplers copy (Heun too, though diffusers'
# Heun has no zero-SNR option). PNDM refuses zero SNR: its step divides by alpha_bar (diffusers'
# PNDMScheduler has no zero-SNR option). Keep the state in float32: 2^50 * noise overflows fp16.
_VP_ALPHA_BAR_FLOOR = 2.0**-100
_KARRAS_ALPHA_BAR_FLOOR = 2.0**-24


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


@dataclass(frozen=True, eq=False)
class Steps:
    """One sampler's inference schedule: model timesteps and the VE levels between them.

    timesteps (n,) sit on the requested device; the per-step scalars stay on the CPU, as in
    diffusers, so their arithmetic is the same float32 arithmetic on every device.
    """

    sampler: str
    timesteps: torch.Tensor  # (n,) the values diffusers passes to the model
    sigmas: torch.Tensor  # (n+1,) VE level before each step; the last is the final level
    init_noise_sigma: float  # x = noise * init_noise_sigma starts the loop (diffusers' rule)
    alphas_cumprod: torch.Tensor  # (n,) alpha_bar at each timestep (exactly 0 at zero SNR)
    alphas_cumprod_prev: torch.Tensor  # (n,) alpha_bar each DDPM/DDIM/PNDM step lands on
    clip_sample: bool = False  # clamp x0 to [-1, 1] (DDPM, DDIM and Heun, as in diffusers)
    prediction_type: str = "epsilon"  # the model's output; PNDM extrapolates it (eps or v)
    # (n,) PNDM only: alpha_bar one stride above each timestep, where a run's second call restarts
    # its first step from (NaN above the last training timestep: never a second call's)
    alphas_cumprod_next: torch.Tensor | None = None

    def __len__(self) -> int:
        """The number of timesteps: model calls and callbacks (Heun: two calls a step)."""
        return self.timesteps.shape[0]

    def tail(self, start: int) -> "Steps":
        """Steps from index `start` on, as diffusers' img2img runs timesteps[start * order:].

        For PNDM (order 1) `start` indexes its num_steps + 1 timesteps, and the run restarts
        PNDM's warm-up at the tail's first two calls, as diffusers' fresh scheduler does.
        """
        if not 0 <= start < len(self):
            raise ValueError(f"start must be in [0, {len(self) - 1}], got {start!r}")
        first, nxt = self.sigmas[start], self.alphas_cumprod_next
        return replace(
            self,
            timesteps=self.timesteps[start:],
            sigmas=self.sigmas[start:],
            init_noise_sigma=float((first**2 + 1) ** 0.5),
            alphas_cumprod=self.alphas_cumprod[start:],
            alphas_cumprod_prev=self.alphas_cumprod_prev[start:],
            alphas_cumprod_next=None if nxt is None else nxt[start:],
        )

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """x0 noised to level sigmas[index] in the VE state space: x0 + sigma * noise."""
        return x0 + noise * self.sigmas[index].to(x0.dtype)


# ---------------------------------------------------------------------------------------------
# Timestep selection, exactly as each diffusers scheduler's set_timesteps computes it


def _arange_down(start: int, step: float) -> list[float]:
    """numpy.arange(start, 0, -step), value for value (length and linear fill as numpy forms)."""
    length = math.ceil((0 - start) / -step)
    second = start - step
    delta = second - start
    return [float(start), second][:length] + [start + i * delta for i in range(2, length)]


def _spaced(cfg: ScheduleConfig, n: int, *, round_linspace: bool) -> list[float]:
    """Descending timesteps of Lin et al. 2023, Table 2 (leading / trailing / linspace)."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":
        ratio = T // n
        top = (n - 1) * ratio + cfg.steps_offset
        if top > T - 1:  # diffusers would index alpha_bar out of range here
            raise ValueError(
                f"num_steps={n} with leading spacing and steps_offset={cfg.steps_offset} reaches "
                f"timestep {top}; num_steps must keep it <= num_train_timesteps - 1 = {T - 1}"
            )
        return [float(i * ratio + cfg.steps_offset) for i in reversed(range(n))]
    if cfg.timestep_spacing == "trailing":
        # numpy's float arange can yield an (n+1)-th value that rounds to 0, i.e. timestep -1
        # (e.g. n=61); diffusers keeps it, a meaningless step, so it is dropped here.
        return [float(round(v) - 1) for v in _arange_down(T, T / n)][:n]
    step = (T - 1) / (n - 1) if n > 1 else 0.0  # numpy.linspace(0, T-1, n): i * step, end exact
    values = [i * step for i in range(n - 1)] + [float(T - 1)] if n > 1 else [0.0]
    return [float(round(v)) if round_linspace else v for v in reversed(values)]


def _interp(timesteps: list[float], table: torch.Tensor) -> list[float]:
    """numpy.interp(timesteps, arange(T), table) in float64."""
    f = table.double().tolist()
    out = []
    for t in timesteps:
        j = min(max(math.floor(t), 0), len(f) - 1)
        exact = t <= 0 or j == len(f) - 1 or t == j
        out.append(f[j] if exact else (f[j + 1] - f[j]) * (t - j) + f[j])
    return out


def _sigma_to_t(sigmas: list[float], log_table: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of each sigma, interpolating log-sigma linearly (diffusers' rule)."""
    T = log_table.shape[0]
    log_sigma = torch.tensor(sigmas, dtype=torch.float64).clamp(min=1e-10).log()
    # index of the last table entry <= log sigma (the table increases with t)
    count = torch.searchsorted(log_table.double(), log_sigma, right=True)
    low = (count - 1).clamp(min=0, max=T - 2)
    span = (log_table[low] - log_table[low + 1]).double()  # a float32 difference, as diffusers
    w = ((log_table[low].double() - log_sigma) / span).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras_family(cfg: ScheduleConfig, n: int, karras: bool):
    """(timesteps, sigmas) of diffusers' Euler, Euler ancestral and Heun schedulers."""
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = _KARRAS_ALPHA_BAR_FLOOR
    table = sigmas_from_alphas_cumprod(ac)
    # diffusers holds these timesteps in float32 before interpolating sigma at them
    ts = torch.tensor(_spaced(cfg, n, round_linspace=False), dtype=torch.float32).tolist()
    sig = _interp(ts, table)
    if karras:
        sig = karras_sigmas(sig[-1], sig[0], n).tolist()
        ts = _sigma_to_t(sig, table.log()).tolist()
    return torch.tensor(ts, dtype=torch.float32), torch.tensor(sig + [0.0], dtype=torch.float32)


def _dpm_family(cfg: ScheduleConfig, n: int, karras: bool):
    """(timesteps, sigmas) of diffusers' DPMSolverMultistepScheduler (its own spacing rules)."""
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = _KARRAS_ALPHA_BAR_FLOOR
    table = sigmas_from_alphas_cumprod(ac)
    if cfg.timestep_spacing == "trailing":
        ts = _spaced(cfg, n, round_linspace=True)
    else:  # leading and linspace space n + 1 points and drop the last
        ts = _spaced(cfg, n + 1, round_linspace=True)[:-1]
    if karras:
        sig = karras_sigmas(table[0].item(), table[-1].item(), n).tolist()
        t = _sigma_to_t(sig, table.log())
        # diffusers rounds, except for the cosine schedule, whose float t then truncates to int
        t = t.trunc() if cfg.beta_schedule == "squaredcos_cap_v2" else t.round()
        ts = t.tolist()
    else:
        sig = [table[int(t)].item() for t in ts]
    return torch.tensor(ts, dtype=torch.float32), torch.tensor(sig + [0.0], dtype=torch.float32)


def _vp_family(sampler: str, cfg: ScheduleConfig, n: int):
    """(timesteps, sigmas, alpha_bar, alpha_bar_prev) of diffusers' DDPM and DDIM schedulers."""
    ac = alphas_cumprod(cfg)
    ts = [int(t) for t in _spaced(cfg, n, round_linspace=True)]
    if sampler == "ddpm":  # lands on the next timestep; the last step on alpha_bar = 1
        prev = [ac[t] for t in ts[1:]] + [torch.tensor(1.0)]
    else:  # DDIM always strides back by T // n, whatever the spacing
        final = torch.tensor(1.0) if cfg.set_alpha_to_one else ac[0]
        stride = cfg.num_train_timesteps // n
        prev = [ac[t - stride] if t - stride >= 0 else final for t in ts]
    ab, ab_prev = ac[ts], torch.stack(prev)
    levels = torch.cat([ab, ab_prev[-1:]]).clamp(min=_VP_ALPHA_BAR_FLOOR)
    sig = sigmas_from_alphas_cumprod(levels)  # DDPM's last level: alpha_bar = 1, sigma = 0
    return torch.tensor(ts, dtype=torch.float32), sig, ab, ab_prev


def _pndm_family(cfg: ScheduleConfig, n: int):
    """(timesteps, sigmas, alpha_bar, one stride down, one stride up) of diffusers' PNDM (PLMS)."""
    ac, T = alphas_cumprod(cfg), cfg.num_train_timesteps
    ts = [int(t) for t in _spaced(cfg, n, round_linspace=True)]
    # The second timestep runs twice: its first call corrects the first step, the second goes on.
    ts = ts[:1] + ts[1:2] + ts[1:]
    stride = T // n  # like DDIM, PNDM strides by T // n whatever the spacing
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else ac[0]
    down = torch.stack([ac[t - stride] if t - stride >= 0 else final for t in ts])
    up = torch.tensor([ac[t + stride].item() if t + stride < T else math.nan for t in ts])
    levels = torch.cat([ac[ts], down[-1:]])
    sig = sigmas_from_alphas_cumprod(levels)  # the last: set_alpha_to_one lands on sigma = 0
    return torch.tensor(ts, dtype=torch.float32), sig, ac[ts], down, up


def make_steps(
    sampler: str,
    config: ScheduleConfig,
    num_steps: int,
    *,
    use_karras_sigmas: bool = False,
    device=None,
) -> Steps:
    """The timesteps and levels the matching diffusers scheduler's set_timesteps computes.

    Args:
        sampler: a name in SAMPLERS.
        config: the training schedule and its spacing rules.
        num_steps: number of denoising steps, 1 .. config.num_train_timesteps.
        use_karras_sigmas: Karras et al. 2022 levels (Eq. 5), for samplers in KARRAS_SAMPLERS.
        device: where the timesteps go (the model's device).
    """
    get_sampler(sampler)
    if not isinstance(config, ScheduleConfig):
        raise ValueError(f"config must be a ScheduleConfig, got {type(config).__name__}")
    T = config.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
    if use_karras_sigmas and sampler not in KARRAS_SAMPLERS:
        raise ValueError(
            f"use_karras_sigmas is supported for samplers {KARRAS_SAMPLERS}, not {sampler!r}"
        )
    if sampler == "pndm" and config.rescale_betas_zero_snr:
        raise ValueError(
            "rescale_betas_zero_snr=True is not supported by sampler 'pndm': its step divides by "
            "alpha_bar, which is 0 at the last timestep (diffusers' PNDMScheduler has no such "
            "option); use one of ('ddpm', 'ddim', 'euler', 'euler_ancestral', 'dpmpp_2m')"
        )
    up = None
    if sampler in ("ddpm", "ddim"):
        ts, sig, ab, ab_prev = _vp_family(sampler, config, num_steps)
        init = (sig[0] ** 2 + 1) ** 0.5  # diffusers starts from unit-variance VP noise
    elif sampler == "pndm":
        ts, sig, ab, ab_prev, up = _pndm_family(config, num_steps)
        init = (sig[0] ** 2 + 1) ** 0.5
    else:
        if sampler == "dpmpp_2m":
            ts, sig = _dpm_family(config, num_steps, use_karras_sigmas)
            init = (sig[0] ** 2 + 1) ** 0.5
        else:
            ts, sig = _karras_family(config, num_steps, use_karras_sigmas)
            init = sig.max()  # diffusers' Euler-family rule: sigma_max, or sqrt(1 + it^2)
            init = init if config.timestep_spacing != "leading" else (init**2 + 1) ** 0.5
        ab = 1 / (sig[:-1] ** 2 + 1)
        ab_prev = 1 / (sig[1:] ** 2 + 1)
    return Steps(
        sampler=sampler,
        timesteps=ts.to(device),
        sigmas=sig,
        init_noise_sigma=float(init),
        alphas_cumprod=ab,
        alphas_cumprod_prev=ab_prev,
        clip_sample=config.clip_sample and sampler in ("ddpm", "ddim", "heun"),
        prediction_type=config.prediction_type,
        alphas_cumprod_next=up,
    )


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
