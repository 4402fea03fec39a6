"""Noise schedules and the training objective: pure functions of alpha_bar.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models"):

| symbol      | code             | meaning                                                   |
|-------------|------------------|-----------------------------------------------------------|
| t           | `t`              | training timestep, 0 .. T-1 (T = num_train_timesteps)     |
| beta_t      | `betas`          | variance of the one-step forward kernel q(x_t | x_{t-1})  |
| alpha_bar_t | `alphas_cumprod` | prod_{s<=t} (1 - beta_s); signal fraction of x_t          |
| x0          | `x0`             | clean data (or latent)                                    |
| eps         | `eps`            | standard Gaussian noise                                   |
| x_t         | `x_t`            | VP sample sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps    |
| v           | `v`              | velocity sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0     |
| sigma       | `sigma`          | VE noise level sqrt((1 - alpha_bar) / alpha_bar)          |
| x           | `x`              | VE sample x0 + sigma eps = x_t / sqrt(alpha_bar)          |
| SNR(t)      | `snr`            | alpha_bar / (1 - alpha_bar) = 1 / sigma^2                 |

Every table is computed with the same float32 operations, in the same order, as diffusers'
schedulers, so `alphas_cumprod` tables are bitwise equal to diffusers' for the same config.
"""

import math
from dataclasses import dataclass, fields

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
_CHOICES = {
    "beta_schedule": BETA_SCHEDULES,
    "prediction_type": PREDICTION_TYPES,
    "timestep_spacing": TIMESTEP_SPACINGS,
}


def _require(ok: bool, name: str, allowed: str, got) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {got!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Training noise schedule and its sampling conventions (diffusers scheduler_config keys)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False
    set_alpha_to_one: bool = False
    clip_sample: bool = False

    def __post_init__(self):
        for name in ("num_train_timesteps", "steps_offset"):
            value, least = getattr(self, name), 2 if name == "num_train_timesteps" else 0
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
            _require(ok, name, f"an int >= {least}", value)
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and 0 < value < 1, name, "in (0, 1)", value)
        _require(self.beta_start <= self.beta_end, "beta_start", "<= beta_end", self.beta_start)
        for name, allowed in _CHOICES.items():
            _require(getattr(self, name) in allowed, name, f"one of {allowed}", getattr(self, name))
        for name in ("rescale_betas_zero_snr", "set_alpha_to_one", "clip_sample"):
            _require(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))

    @classmethod
    def from_diffusers(cls, config: dict) -> "ScheduleConfig":
        """Read a diffusers scheduler_config.json dict; a missing key takes its class default."""
        class_name = config.get("_class_name")
        class_defaults = DIFFUSERS_DEFAULTS.get(class_name)
        if config.get("trained_betas") is not None:
            raise ValueError("trained_betas must be null: explicit beta tables are not supported")
        values = {}
        for f in fields(cls):
            if f.name in config:
                values[f.name] = config[f.name]
            elif class_defaults is None:
                raise ValueError(
                    f"scheduler config lacks {f.name!r} and its _class_name {class_name!r} is not "
                    f"one of {tuple(DIFFUSERS_DEFAULTS)}, whose defaults are known"
                )
            elif f.name in class_defaults:
                values[f.name] = class_defaults[f.name]
            # else: the class has no such key, so it does not affect that scheduler; keep ours.
        return cls(**values)

    def to_diffusers(self, class_name: str = "DDIMScheduler") -> dict:
        """A scheduler_config.json dict that diffusers' `class_name` loads to this schedule.

        Keys the class does not take (e.g. set_alpha_to_one for Euler) are left out; they do
        not change that scheduler. Zero-SNR rescaling for a class without it is refused.
        """
        class_defaults = DIFFUSERS_DEFAULTS.get(class_name)
        _require(class_defaults is not None, "class_name", f"one of {tuple(DIFFUSERS_DEFAULTS)}",
                 class_name)  # fmt: skip
        if self.rescale_betas_zero_snr and "rescale_betas_zero_snr" not in class_defaults:
            raise ValueError(f"{class_name} has no rescale_betas_zero_snr option")
        out = {"_class_name": class_name}
        out.update({k: getattr(self, k) for k in class_defaults})
        return out


def _class_defaults(**changes) -> dict:
    """Defaults most diffusers schedulers share, with one class's changes and extra keys."""
    base = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", prediction_type="epsilon", timestep_spacing="linspace",
                steps_offset=0)  # fmt: skip
    return {**base, **changes}


# The __init__ defaults of diffusers' scheduler classes for the keys ScheduleConfig models;
# a key absent from a class's dict is not an argument of that class (checked in the tests).
_SD = dict(beta_start=0.00085, beta_end=0.012)
_NO_ZSNR = dict(rescale_betas_zero_snr=False)
DIFFUSERS_DEFAULTS: dict[str, dict] = {
    "DDPMScheduler": _class_defaults(timestep_spacing="leading", **_NO_ZSNR, clip_sample=True),
    "DDIMScheduler": _class_defaults(
        timestep_spacing="leading", **_NO_ZSNR, set_alpha_to_one=True, clip_sample=True
    ),
    "PNDMScheduler": _class_defaults(timestep_spacing="leading", set_alpha_to_one=False),
    "LMSDiscreteScheduler": _class_defaults(),
    "EulerDiscreteScheduler": _class_defaults(**_NO_ZSNR),
    "EulerAncestralDiscreteScheduler": _class_defaults(**_NO_ZSNR),
    "HeunDiscreteScheduler": _class_defaults(**_SD, clip_sample=False),
    "DPMSolverMultistepScheduler": _class_defaults(**_NO_ZSNR),
    "UniPCMultistepScheduler": _class_defaults(**_NO_ZSNR),
    "DEISMultistepScheduler": _class_defaults(),
    "KDPM2DiscreteScheduler": _class_defaults(**_SD),
    "KDPM2AncestralDiscreteScheduler": _class_defaults(**_SD),
}

PRESETS: dict[str, ScheduleConfig] = {
    "sd15": ScheduleConfig(),
    "sd21": ScheduleConfig(prediction_type="v_prediction"),
    "zero_snr": ScheduleConfig(
        prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True
    ),
}


# ---------------------------------------------------------------------------------------------
# beta_t and alpha_bar_t tables


def _cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: betas from alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    # beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), clipped at 0.999 against the singularity at t=T.
    values = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(values, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so alpha_bar_T = 0."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab -= last  # terminal SNR becomes exactly zero
    sqrt_ab *= first / (first - last)  # first step keeps its old value
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def betas(cfg: ScheduleConfig) -> torch.Tensor:
    """beta_t for t = 0..T-1, float32 (T,)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":  # Ho et al. 2020, Sec. 4
        b = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        b = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    else:
        b = _cosine_betas(T)
    return rescale_zero_terminal_snr(b) if cfg.rescale_betas_zero_snr else b


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float32 (T,), bitwise equal to diffusers'."""
    return torch.cumprod(1.0 - betas(cfg), dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022, Table 1)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: n levels from sigma_max to sigma_min, even in sigma^(1/rho)."""
    _require(isinstance(n, int) and n >= 1, "n", "an int >= 1", n)
    _require(0 < sigma_min <= sigma_max, "sigma_min", f"in (0, sigma_max={sigma_max}]", sigma_min)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    # The ramp i/(n-1) is formed as numpy.linspace forms it (i * step, last exactly 1), float64.
    step = 1.0 / (n - 1) if n > 1 else 0.0
    ramp = [i * step for i in range(n - 1)] + [1.0] if n > 1 else [0.0]
    return torch.tensor([(hi + r * (lo - hi)) ** rho for r in ramp], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Forward process and the conversions between eps, v and x0 (VP form)


def _bcast(a, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) (or a scalar) shaped to broadcast against `like` (B, ...)."""
    a = torch.as_tensor(a, device=like.device, dtype=like.dtype)
    if a.ndim == 1 and like.ndim > 1:
        a = a.reshape(-1, *([1] * (like.ndim - 1)))
    return a


def _at(t, alphas_cumprod: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t for integer timesteps t (int or (B,)), shaped to broadcast against `like`."""
    ac = alphas_cumprod.to(device=like.device, dtype=like.dtype)
    t = torch.as_tensor(t, device=like.device)
    return _bcast(ac[t].flatten(), like)


def q_sample(x0: torch.Tensor, eps: torch.Tensor, t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Ho et al. 2020, Eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    ab = _at(t, alphas_cumprod, x0)
    return ab**0.5 * x0 + (1 - ab) ** 0.5 * eps


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Ho et al. 2020, Eq. 15: x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    ab = _bcast(alpha_bar, x_t)
    return (x_t - (1 - ab) ** 0.5 * eps) / ab**0.5


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Ho et al. 2020, Eq. 4 solved for eps."""
    ab = _bcast(alpha_bar, x_t)
    return (x_t - ab**0.5 * x0) / (1 - ab) ** 0.5


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Salimans & Ho 2022, Sec. 4: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0."""
    ab = _bcast(alpha_bar, x0)
    return ab**0.5 * eps - (1 - ab) ** 0.5 * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Salimans & Ho 2022, Sec. 4: x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
    ab = _bcast(alpha_bar, x_t)
    return ab**0.5 * x_t - (1 - ab) ** 0.5 * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Salimans & Ho 2022, Sec. 4: eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t."""
    ab = _bcast(alpha_bar, x_t)
    return ab**0.5 * v + (1 - ab) ** 0.5 * x_t


def prediction_to_x0(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str):
    """x0 implied by a model prediction of the given type at VP sample x_t."""
    _require(prediction_type in PREDICTION_TYPES, "prediction_type", f"one of {PREDICTION_TYPES}",
             prediction_type)  # fmt: skip
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, pred, alpha_bar)
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, pred, alpha_bar)
    return pred


def training_target(
    x0: torch.Tensor, eps: torch.Tensor, t, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the model learns to output at x_t = q_sample(x0, eps, t): eps, v or x0."""
    _require(prediction_type in PREDICTION_TYPES, "prediction_type", f"one of {PREDICTION_TYPES}",
             prediction_type)  # fmt: skip
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return v_from_x0_eps(x0, eps, _at(t, alphas_cumprod, x0))


# ---------------------------------------------------------------------------------------------
# Loss weights and noise for training


def snr(t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), float32, shaped like t."""
    t = torch.as_tensor(t)
    signal = (alphas_cumprod**0.5).to(t.device)[t].float()
    noise = ((1.0 - alphas_cumprod) ** 0.5).to(t.device)[t].float()
    return (signal / noise) ** 2


def min_snr_weight(t, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str):
    """Hang et al. 2023 (Min-SNR-gamma): per-sample MSE weight min(SNR, gamma) in x0 terms."""
    _require(gamma > 0, "gamma", "> 0", gamma)
    _require(prediction_type in PREDICTION_TYPES, "prediction_type", f"one of {PREDICTION_TYPES}",
             prediction_type)  # fmt: skip
    s = snr(t, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)  # min(SNR, gamma): the weight of the x0 loss
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":  # ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2
        return clipped / (s + 1)
    # ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2; at SNR = 0 (zero terminal SNR) the limit is 1.
    return torch.where(s > 0, clipped / s.clamp(min=torch.finfo(s.dtype).tiny), 1.0)


def offset_noise(like, strength: float, generator=None, *, device=None, dtype=None):
    """Guttenberg 2023 "Diffusion with Offset Noise": eps + strength * per-channel constant.

    `like` is a tensor (its shape, device and dtype are used) or a shape (B, C, ...). The main
    noise is drawn first, then the (B, C, 1, ..., 1) offset, as diffusers' training scripts do.
    """
    _require(strength >= 0, "strength", ">= 0", strength)
    if isinstance(like, torch.Tensor):
        shape, device, dtype = like.shape, like.device, like.dtype
    else:
        shape = tuple(like)
    _require(len(shape) >= 2, "like", "a shape (B, C, ...) or such a tensor", shape)
    draw_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    if strength:
        offset_shape = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
        offset = torch.randn(offset_shape, generator=generator, device=draw_device, dtype=dtype)
        noise = noise + strength * offset
    return noise.to(device) if device is not None else noise
