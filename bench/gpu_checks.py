"""The correctness half of bench/gpu.py: device results against our CPU float32 results.

Each check builds what it needs from the CPU float32 reference components (`Models`) and
reports through `run.check` / `run.add` (bench/gpu.py's Run), with its tolerance and the reason
for it stated here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from autoencoder import AUTOENCODER_PRESETS, AutoencoderKL
from ldm.attention import ATTENTION_BACKENDS, available_backends
from ldm.schedule import ScheduleConfig
from ldm.unet import UNET_PRESETS, UNet
from pipelines import TextToImagePipeline
from text_encoder import CLIP_TEXT_PRESETS, ClipBpeTokenizer, ClipTextEncoder, ClipTextModel

if TYPE_CHECKING:
    from gpu import Run, Size

PROMPT, NEGATIVE, GUIDANCE = "an astronaut riding a horse on the moon", "blurry", 7.5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOW_PRECISION = ("float16", "bfloat16")

# Tolerances on max|a - b| / max|b| against the CPU float32 result (or the stated reference).
# float32: summation order only (TF32 is off during the checks), compounded over ~100 layers;
# float16 keeps 11 significant bits, bfloat16 8, so each layer adds ~5e-4 or ~4e-3 relative.
MODEL_TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}
# Whole pipeline on [0, 1] pixels after a few steps with guidance 7.5 (which scales eps
# differences by 7.5): float32 max |Δ|; low precision mean |Δ| (two unrelated images: ~0.2).
PIXEL_TOL = {"float32": 2e-3, "float16": 2e-2, "bfloat16": 5e-2}


@dataclass
class Models:
    """The CPU float32 reference components, from which every device copy is made."""

    unet: UNet
    vae: AutoencoderKL
    clip: ClipTextModel
    tokenizer: ClipBpeTokenizer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64 (inf when a has NaN or inf)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def copy_to(module: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a config-built module on device in dtype, without a random init."""
    with torch.device("meta"):
        new = type(module)(module.config)
    state = {k: v.to(device, dtype, copy=True) for k, v in module.state_dict().items()}
    new.load_state_dict(state, assign=True)
    return new.eval().requires_grad_(False)


def make_pipeline(m: Models, device: str, dtype: torch.dtype, copy: bool = True):
    def place(module):
        return copy_to(module, device, dtype) if copy else module

    text = ClipTextEncoder(place(m.clip), m.tokenizer)
    pipe = TextToImagePipeline(place(m.unet), place(m.vae), text, ScheduleConfig(), "ddim")
    pipe.progress = False
    return pipe


def generate(pipe, size_px: int, steps: int, latents: torch.Tensor | None = None):
    """One image, (1, H, W, 3) floats in [0, 1]: the same seed and call for both libraries.

    Without `latents` the pipeline draws its noise in its own dtype (as diffusers does), so a
    float16 call and a float32 call start from different noise; pass latents to compare them.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                    guidance_scale=GUIDANCE, height=size_px, width=size_px, generator=generator,
                    latents=latents, output_type="np").images  # fmt: skip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class no_tf32:
    """Full float32 matmuls and convolutions, so float32 results differ by rounding only."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def build(size: Size) -> Models:
    """Random SD-shaped components in float32 on the CPU (seeded)."""
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS[size.unet]).eval().requires_grad_(False)
    vae = AutoencoderKL(AUTOENCODER_PRESETS[size.vae]).eval().requires_grad_(False)
    clip = ClipTextModel(CLIP_TEXT_PRESETS[size.text]).eval().requires_grad_(False)
    return Models(unet, vae, clip, ClipBpeTokenizer.offline())


def check_unet(run: Run, m: Models) -> None:
    """Device U-Net in each dtype vs the CPU float32 one; backends vs math; fused vs unfused."""
    device, s = run.device, run.size.check_height // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, s, s, generator=g)
    ctx = torch.randn(2, 77, m.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([981.0, 21.0])
    with torch.inference_mode():
        ref = m.unet(x, t, ctx)
    for name in ("float32", *LOW_PRECISION):
        unet = copy_to(m.unet, device, DTYPES[name])
        inputs = (x.to(device, DTYPES[name]), t.to(device), ctx.to(device, DTYPES[name]))
        with torch.inference_mode():
            err = rel_err(unet(*inputs), ref)
            run.check(f"U-Net {device} {name} vs CPU float32", err, MODEL_TOL[name])
            if name != "bfloat16":
                check_backends(run, unet, inputs, name, s * s)
            if name == "float32":
                unfused = unet(*inputs)
                unet.fuse_qkv()
                err = rel_err(unet(*inputs), unfused)
                run.check(f"U-Net fused QKV vs unfused, {device} {name}", err, MODEL_TOL[name])
        del unet


def check_backends(run: Run, unet: UNet, inputs, dtype: str, tokens: int) -> None:
    """Every attention backend against "math" on the same U-Net and inputs."""
    unet.set_attention_backend("math")
    ref = unet(*inputs)
    for backend in [b for b in ATTENTION_BACKENDS if b != "math"]:
        name = f"attention {backend} vs math, U-Net {run.device} {dtype}"
        if backend not in available_backends(run.device):
            why = "needs CUDA" if run.device != "cuda" else "xformers does not import"
            run.add("correctness", name, f"not run: {why}", "", "skip")
            continue
        slice_size = max(tokens // 4, 1) if backend == "sliced" else None  # really slice
        unet.set_attention_backend(backend, slice_size)
        run.check(name, rel_err(unet(*inputs), ref), MODEL_TOL[dtype])
    unet.set_attention_backend("sdpa")


def check_vae(run: Run, m: Models) -> None:
    """Device decoder in each dtype vs the CPU float32 one."""
    s = run.size.check_height // 8
    z = torch.randn(1, 4, s, s, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = m.vae.decode(z)
        for name in ("float32", *LOW_PRECISION):
            vae = copy_to(m.vae, run.device, DTYPES[name])
            err = rel_err(vae.decode(z.to(run.device, DTYPES[name])), ref)
            run.check(f"VAE decode {run.device} {name} vs CPU float32", err, MODEL_TOL[name])
            del vae


def check_pipeline(run: Run, m: Models) -> None:
    """The whole text-to-image call on the device vs on the CPU in float32, same seed."""
    px, steps = run.size.check_height, run.size.check_steps
    # the same float32 starting noise for every dtype (drawn in float16 it would differ)
    noise = torch.randn(1, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(4))
    cpu = make_pipeline(m, "cpu", torch.float32, copy=False)
    ref = torch.from_numpy(generate(cpu, px, steps, noise))
    for name in ("float32", *LOW_PRECISION):
        pipe = make_pipeline(m, run.device, DTYPES[name])
        out = torch.from_numpy(generate(pipe, px, steps, noise.to(run.device)))
        diff = (out.double() - ref.double()).abs()
        err = diff.max().item() if name == "float32" else diff.mean().item()
        err = err if torch.isfinite(out).all() else math.inf
        what = "max |Δ| pixel" if name == "float32" else "mean |Δ| pixel"
        check = f"pipeline {px}² × {steps} steps, {run.device} {name} vs CPU float32"
        run.check(check, err, PIXEL_TOL[name], what)


class PipelineWarnings(logging.Handler):
    """Counts the pipeline's warnings (its float32 re-decodes) while used as a context."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += 1

    def __enter__(self):
        logging.getLogger("pipelines.pipeline").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("pipelines.pipeline").removeHandler(self)


def check_nan_guard(run: Run) -> None:
    """A float16 decode that overflows must be redone in float32 by the pipeline."""
    fp16, name = torch.float16, f"fp16 VAE NaN guard ({run.device})"
    torch.manual_seed(0)
    m = Models(UNet(UNET_PRESETS["tiny"]), AutoencoderKL(AUTOENCODER_PRESETS["tiny"]),
               ClipTextModel(CLIP_TEXT_PRESETS["tiny"]), ClipBpeTokenizer.offline())  # fmt: skip
    w = m.vae.decoder.conv_in.weight.detach()
    w.mul_(3e4 / w.abs().max())  # still float16 numbers, but the conv's sums pass 65504
    pipe = make_pipeline(m, run.device, fp16)
    vae, call = pipe.vae, dict(num_inference_steps=2, height=64, width=64)
    with torch.inference_mode():
        z = pipe(PROMPT, output_type="latent", **call).images
        raw = vae.decode((z / vae.config.scaling_factor).to(fp16))
        with PipelineWarnings() as counter:
            images = pipe(PROMPT, output_type="pt", **call).images
    if torch.isfinite(raw).all():
        run.add("correctness", name, "setup failed: the fp16 decode did not overflow", "", "error")
        return
    finite = bool(torch.isfinite(images).all())
    ok = finite and vae.dtype == fp16 and counter.count == 1
    result = f"fp16 decode non-finite; output finite: {finite}, {counter.count} warning(s), VAE "
    result += f"back in {str(vae.dtype).removeprefix('torch.')}"
    run.add("correctness", name, result, "finite, 1 warning, float16", "ok" if ok else "FAIL")
