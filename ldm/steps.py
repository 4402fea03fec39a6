"""Inference steps: the timesteps and noise levels of each sampler, as diffusers picks them.

`make_steps` computes what the matching diffusers scheduler's `set_timesteps` computes (each
rounds differently): the model timesteps, and the VE levels sigma between them, held in a
`Steps` together with the alpha_bar values the VP-form samplers (DDPM, DDIM, PNDM) step with.
The samplers that walk these steps are in ldm/samplers.py.
"""

import math
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
        sampler: a name in ldm.samplers.SAMPLERS (the keys of DIFFUSERS_SCHEDULERS).
        config: the training schedule and its spacing rules.
        num_steps: number of denoising steps, 1 .. config.num_train_timesteps.
        use_karras_sigmas: Karras et al. 2022 levels (Eq. 5), for samplers in KARRAS_SAMPLERS.
        device: where the timesteps go (the model's device).
    """
    if sampler not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"sampler must be one of {tuple(DIFFUSERS_SCHEDULERS)}, got {sampler!r}")
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
