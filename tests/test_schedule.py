"""Noise schedules and the training objective: closed-form identities and diffusers parity."""

import inspect
import math

import pytest
import torch

from ldm import schedule
from ldm.schedule import (
    DIFFUSERS_DEFAULTS,
    PRESETS,
    ScheduleConfig,
    alphas_cumprod,
    betas,
    karras_sigmas,
    min_snr_weight,
    offset_noise,
    q_sample,
    snr,
    training_target,
)

diffusers = pytest.importorskip("diffusers")

SCHEDULES = [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="scaled_linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
]


def _ddpm(cfg: ScheduleConfig):
    kw = {k: v for k, v in cfg.to_diffusers("DDPMScheduler").items() if k != "_class_name"}
    return diffusers.DDPMScheduler(**kw)


# --------------------------------------------------------------------------------------------
# Tables


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: kw["beta_schedule"])
def test_alpha_bar_table_is_bitwise_diffusers(kw, zero_snr):
    cfg = ScheduleConfig(**kw, rescale_betas_zero_snr=zero_snr)
    reference = _ddpm(cfg)
    assert betas(cfg).dtype == torch.float32
    assert torch.equal(betas(cfg), reference.betas)
    assert torch.equal(alphas_cumprod(cfg), reference.alphas_cumprod)


def test_sd15_alpha_bar_regression_slice():
    ac = alphas_cumprod(PRESETS["sd15"])
    # the float32 SD 1.x table (pinned here, independent of any diffusers version) ...
    pinned = [0.9991499781608582, 0.9982960224151611, 0.27766942977905273, 0.00466009508818388]
    assert ac[[0, 1, 499, 999]].tolist() == pinned
    # ... and the float64 product it rounds: float32 cumprod error grows to ~1e-5 over 1000 terms
    b64 = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(ac.double(), torch.cumprod(1 - b64, 0), rtol=5e-5, atol=0)


def test_zero_terminal_snr_rescale():
    """Lin et al. 2023, Alg. 1: alpha_bar_T = 0 exactly, sqrt(alpha_bar_0) kept, still monotone."""
    plain = alphas_cumprod(ScheduleConfig())
    zsnr = alphas_cumprod(ScheduleConfig(rescale_betas_zero_snr=True))
    assert zsnr[-1].item() == 0.0
    assert zsnr[0].sqrt().item() == pytest.approx(plain[0].sqrt().item(), rel=1e-6)
    assert bool((zsnr[1:] < zsnr[:-1]).all())
    assert snr(torch.tensor([999]), zsnr).item() == 0.0


def test_karras_sigmas_follow_eq5_and_diffusers():
    s = karras_sigmas(0.03, 14.6, 10, rho=7.0)
    assert s[0].item() == pytest.approx(14.6, rel=1e-15)
    assert s[-1].item() == pytest.approx(0.03, rel=1e-15)
    # Eq. 5: sigma^(1/rho) is evenly spaced
    steps = (s ** (1 / 7)).diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9)
    # diffusers forms the same float64 values with numpy (its pow may differ in the last ulp)
    ref = diffusers.EulerDiscreteScheduler()._convert_to_karras(
        torch.tensor([14.6, 0.03], dtype=torch.float64), 10
    )
    assert torch.allclose(s, torch.from_numpy(ref), rtol=1e-15, atol=0)
    assert karras_sigmas(0.03, 14.6, 1).tolist() == [pytest.approx(14.6, rel=1e-15)]


# --------------------------------------------------------------------------------------------
# Forward process


def test_forward_chain_matches_closed_form():
    """Iterating q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t) t times gives Eq. 4."""
    cfg = ScheduleConfig(rescale_betas_zero_snr=True)  # ends at alpha_bar = 0: pure noise
    b = betas(cfg).double()
    ac = alphas_cumprod(cfg).double()
    n = 2**12  # draws per x0 value
    x0 = torch.tensor([-1.5, 0.0, 0.5, 2.0], dtype=torch.float64).repeat_interleave(n)
    g = torch.Generator().manual_seed(0)
    x = x0.clone()
    checkpoints = {1, 10, 100, 500, 1000}
    for t in range(1, 1001):
        x = (1 - b[t - 1]).sqrt() * x + b[t - 1].sqrt() * torch.randn(
            x.shape, generator=g, dtype=x.dtype
        )
        if t not in checkpoints:
            continue
        ab = ac[t - 1]
        mean = x.view(4, n).mean(1)
        var = x.view(4, n).var(1)
        # Tolerance: 5 Monte Carlo standard errors of the mean and of a Gaussian sample variance.
        se_mean = ((1 - ab) / n) ** 0.5
        se_var = (1 - ab) * (2 / n) ** 0.5
        assert torch.allclose(mean, ab.sqrt() * x0.view(4, n)[:, 0], rtol=0, atol=5 * se_mean)
        assert torch.allclose(var, (1 - ab).expand(4), rtol=0, atol=5 * se_var)


def test_q_sample_is_bitwise_diffusers_add_noise():
    cfg = PRESETS["sd15"]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 2, 4, 8, 8, generator=g)
    t = torch.tensor([3, 950])
    ours = q_sample(x0, eps, t, alphas_cumprod(cfg))
    assert torch.equal(ours, _ddpm(cfg).add_noise(x0, eps, t))
    single = q_sample(x0[:1], eps[:1], 3, alphas_cumprod(cfg))
    assert torch.equal(single, ours[:1])


def test_eps_v_x0_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, 4, 4, generator=g, dtype=torch.float64)
    ab = torch.rand(5, generator=g, dtype=torch.float64) * 0.98 + 0.01  # per-sample alpha_bar
    ac = ab.clone()
    t = torch.arange(5)
    x_t = q_sample(x0, eps, t, ac)
    v = schedule.v_from_x0_eps(x0, eps, ab)
    tol = dict(rtol=1e-10, atol=1e-10)  # float64: only rounding
    assert torch.allclose(schedule.x0_from_eps(x_t, eps, ab), x0, **tol)
    assert torch.allclose(schedule.eps_from_x0(x_t, x0, ab), eps, **tol)
    assert torch.allclose(schedule.x0_from_v(x_t, v, ab), x0, **tol)
    assert torch.allclose(schedule.eps_from_v(x_t, v, ab), eps, **tol)
    for kind, pred in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        assert torch.allclose(training_target(x0, eps, t, ac, kind), pred, **tol)
        assert torch.allclose(schedule.prediction_to_x0(pred, x_t, ab, kind), x0, **tol)
    # v is the rotation of (x0, eps) by the angle phi with cos(phi) = sqrt(alpha_bar)
    assert torch.allclose(v.square() + x_t.square(), x0.square() + eps.square(), **tol)


def test_v_target_is_bitwise_diffusers_velocity():
    cfg = PRESETS["sd21"]
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ours = training_target(x0, eps, t, alphas_cumprod(cfg), "v_prediction")
    assert torch.equal(ours, _ddpm(cfg).get_velocity(x0, eps, t))


# --------------------------------------------------------------------------------------------
# Loss weights and offset noise


def test_snr_is_bitwise_diffusers_compute_snr():
    from diffusers.training_utils import compute_snr

    cfg = PRESETS["sd15"]
    t = torch.tensor([0, 1, 250, 999])
    assert torch.equal(snr(t, alphas_cumprod(cfg)), compute_snr(_ddpm(cfg), t))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight(kind):
    """Hang et al. 2023: min(SNR, gamma), over SNR for eps and over SNR + 1 for v."""
    ac = alphas_cumprod(ScheduleConfig(rescale_betas_zero_snr=True))
    t = torch.arange(1000)
    s = snr(t, ac).double()
    gamma = 5.0
    w = min_snr_weight(t, ac, gamma, kind).double()
    clipped = s.clamp(max=gamma)
    if kind == "epsilon":
        expected = torch.where(s > 0, clipped / s, torch.ones_like(s))  # limit 1 at SNR = 0
    elif kind == "v_prediction":
        expected = clipped / (s + 1)
    else:
        expected = clipped
    assert bool(torch.isfinite(w).all())
    assert torch.allclose(w, expected, rtol=1e-6, atol=0)
    # capped: never above the unweighted eps / v loss, never above gamma for the x0 loss
    assert w.max().item() <= (gamma if kind == "sample" else 1.0)


def test_offset_noise_draws_like_diffusers_training():
    shape = (3, 4, 16, 16)
    g = torch.Generator().manual_seed(0)
    ours = offset_noise(shape, 0.1, g)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g)
    expected = noise + 0.1 * torch.randn(shape[:2] + (1, 1), generator=g)
    assert torch.equal(ours, expected)
    like = torch.zeros(shape, dtype=torch.float64)
    plain = offset_noise(like, 0.0, torch.Generator().manual_seed(0))
    assert plain.dtype == torch.float64
    reference = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(plain, reference)


def test_offset_noise_shifts_channel_means():
    g = torch.Generator().manual_seed(0)
    noise = offset_noise((512, 4, 8, 8), 0.5, g)
    channel_means = noise.mean(dim=(2, 3))
    # Var of a channel mean: 1/64 from the pixels + 0.25 from the offset; tolerance: 4 standard
    # errors of a sample variance over 2048 channels.
    expected = 1 / 64 + 0.25
    assert channel_means.var().item() == pytest.approx(
        expected, abs=4 * expected * (2 / 2048) ** 0.5
    )


# --------------------------------------------------------------------------------------------
# Config: validation and the diffusers scheduler_config.json format


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("beta_schedule", "cosine", "squaredcos_cap_v2"),
        ("prediction_type", "eps", "v_prediction"),
        ("timestep_spacing", "uniform", "trailing"),
        ("steps_offset", -1, ">= 0"),
        ("num_train_timesteps", 1, ">= 2"),
        ("beta_end", 1.5, "(0, 1)"),
        ("clip_sample", "no", "bool"),
    ],
)
def test_config_rejects_bad_values(field, value, allowed):
    with pytest.raises(ValueError, match=field) as err:
        ScheduleConfig(**{field: value})
    assert allowed in str(err.value)


def test_known_class_defaults_match_diffusers():
    for name, defaults in DIFFUSERS_DEFAULTS.items():
        cls = getattr(diffusers, name)
        init = inspect.unwrap(cls.__init__)
        params = inspect.signature(init).parameters
        if "num_train_timesteps" not in params:  # a dummy object: optional dependency missing
            continue
        modelled = {f for f in ScheduleConfig.__dataclass_fields__ if f in params}
        assert set(defaults) == modelled, name
        for key, value in defaults.items():
            assert params[key].default == value, (name, key)


def test_from_diffusers_reads_sd_configs():
    sd15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False,
    }  # fmt: skip
    assert ScheduleConfig.from_diffusers(sd15) == PRESETS["sd15"]
    sd21 = dict(sd15, _class_name="DDIMScheduler", prediction_type="v_prediction")
    assert ScheduleConfig.from_diffusers(sd21) == PRESETS["sd21"]
    # missing keys take the class default, as diffusers fills them
    euler = ScheduleConfig.from_diffusers({"_class_name": "EulerDiscreteScheduler"})
    assert (euler.timestep_spacing, euler.beta_schedule, euler.steps_offset) == (
        "linspace",
        "linear",
        0,
    )
    ddim = ScheduleConfig.from_diffusers({"_class_name": "DDIMScheduler"})
    assert (ddim.set_alpha_to_one, ddim.clip_sample, ddim.beta_start) == (True, True, 0.0001)


def test_from_diffusers_rejects_what_it_cannot_model():
    with pytest.raises(ValueError, match="_class_name"):
        ScheduleConfig.from_diffusers({"_class_name": "MyScheduler", "beta_start": 0.001})
    with pytest.raises(ValueError, match="trained_betas"):
        ScheduleConfig.from_diffusers(dict(PRESETS["sd15"].to_diffusers(), trained_betas=[0.1]))
    with pytest.raises(ValueError, match="beta_schedule"):
        ScheduleConfig.from_diffusers({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"})


@pytest.mark.parametrize("class_name", [
    "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler",
])  # fmt: skip
def test_to_diffusers_loads_in_diffusers(class_name):
    cfg = ScheduleConfig(
        prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0
    )
    exported = cfg.to_diffusers(class_name)
    loaded = getattr(diffusers, class_name).from_config(exported)
    for key, value in exported.items():
        if key != "_class_name":
            assert loaded.config[key] == value
    assert torch.equal(loaded.alphas_cumprod, alphas_cumprod(cfg))
    assert ScheduleConfig.from_diffusers(exported) == cfg


def test_to_diffusers_refuses_a_lossy_export():
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        PRESETS["zero_snr"].to_diffusers("HeunDiscreteScheduler")
    with pytest.raises(ValueError, match="class_name"):
        PRESETS["sd15"].to_diffusers("NoSuchScheduler")


def test_presets_are_consistent():
    assert PRESETS["zero_snr"].rescale_betas_zero_snr
    assert alphas_cumprod(PRESETS["zero_snr"])[-1].item() == 0.0
    assert math.isclose(
        alphas_cumprod(PRESETS["sd21"])[500].item(), alphas_cumprod(PRESETS["sd15"])[500].item()
    )
