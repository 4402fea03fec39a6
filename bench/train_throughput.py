"""Benchmark: training samples/second, ours against a diffusers loop doing the same work.

    python bench/train_throughput.py           # print the markdown tables
    python bench/train_throughput.py --write   # also replace their sections of BENCHMARKS.md

Table 1, the U-Net step, on the same weights, inputs and noise:
    ours:      train.loop.diffusion_loss (q_sample, U-Net, target, MSE) -> backward -> AdamW,
               the U-Net in channels_last and AdamW fused, as `ldm train` runs them
    diffusers: DDPMScheduler.add_noise -> UNet2DConditionModel -> MSE -> backward -> AdamW,
               as diffusers' train_text_to_image.py runs them (NCHW, torch's default AdamW)
Latents and text contexts are random tensors (the frozen autoencoder and text encoder are the
same work on both sides and are left out). Steps alternate between the two loops, so load from
other processes hits both alike; the first step's losses are compared as a parity check.

Table 2, the whole step from pixels and token ids (autoencoder posterior, text encoder, U-Net,
backward, AdamW), for the ways `ldm train` can run:
    diffusers full / LoRA      AutoencoderKL + CLIPTextModel + UNet2DConditionModel, the loop of
                               diffusers' train_text_to_image(_lora).py (LoRA: unet.add_adapter)
    ours full / LoRA           train.loop's functions; LoRA through train.lora.add_lora
    ours ... cached            posteriors and contexts read from train.cache.EncodingCache on disk
                               (entries written once before timing: every epoch after the first)
Every variant sees the same pixels, captions, noise and t; the first step's loss of each is
compared with diffusers full's (LoRA starts at B = 0, so it starts from the same loss).
Speed-ups are medians of per-step time ratios against ours full uncached and diffusers full.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from sections import write_section  # noqa: E402  (bench/, beside this file)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.schedule import ScheduleConfig, alphas_cumprod  # noqa: E402
from ldm.unet import UNET_PRESETS, UNet, UNetConfig  # noqa: E402
from train.loop import diffusion_loss  # noqa: E402
from train.run import RunConfig, make_optimizer, training_layout  # noqa: E402

RUN = RunConfig(output="unused", learning_rate=1e-4)  # ldm train's AdamW settings

SECTION_START = "<!-- bench/train_throughput.py: start -->"
SECTION_END = "<!-- bench/train_throughput.py: end -->"
STEP_START = "<!-- bench/train_throughput.py step: start -->"
STEP_END = "<!-- bench/train_throughput.py step: end -->"
LORA_RANK = 4

# name -> (U-Net config, latent side, batch)
CASES = {
    "tiny": (UNET_PRESETS["tiny"], 16, 8),
    "shapes2": (UNET_PRESETS["shapes2"], 16, 32),  # the default model's U-Net and batch
    "sd15 at 1/5 width": (
        dataclasses.replace(UNET_PRESETS["sd15"], block_out_channels=(64, 128, 256, 256)),
        32,
        4,
    ),
}


def _models(config: UNetConfig, device: str):
    """diffusers' U-Net with its default random init, and ours with the same weights, training."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel.from_config(config.to_diffusers())
    ours = UNet(config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device).train(), ours.to(device).train()


def _timed(fn, device: str) -> tuple[float, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss


def bench_case(name: str, args) -> dict:
    from diffusers import DDPMScheduler

    config, size, batch = CASES[name]
    batch = args.batch_size or batch
    ref, ours = _models(config, args.device)
    schedule = ScheduleConfig()
    scheduler = DDPMScheduler.from_config(schedule.to_diffusers("DDPMScheduler"))
    alpha_bar = alphas_cumprod(schedule).to(args.device)
    ours = training_layout(ours, args.device)  # ours as `ldm train` runs: NHWC, fused AdamW
    opts = [make_optimizer(list(ours.parameters()), RUN)[0],
            torch.optim.AdamW(ref.parameters(), lr=1e-4)]  # fmt: skip
    g = torch.Generator().manual_seed(1)
    shape = (batch, config.in_channels, size, size)
    autocast = (torch.autocast(args.device, dtype=getattr(torch, args.autocast))
                if args.autocast else contextlib.nullcontext())  # fmt: skip

    def draw():
        x0 = torch.randn(shape, generator=g).to(args.device)
        eps = torch.randn(shape, generator=g).to(args.device)
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=g).to(args.device)
        ctx = torch.randn(batch, 77, config.cross_attention_dim, generator=g).to(args.device)
        return x0, eps, t, ctx

    def step_ours(x0, eps, t, ctx):
        with autocast:
            loss, _ = diffusion_loss(ours, x0, eps, t, ctx, alpha_bar, "epsilon", None)
        loss.backward()
        opts[0].step()
        opts[0].zero_grad(set_to_none=True)
        return loss.item()

    def step_ref(x0, eps, t, ctx):
        with autocast:
            pred = ref(scheduler.add_noise(x0, eps, t), t, ctx).sample
            loss = F.mse_loss(pred.float(), eps.float())
        loss.backward()
        opts[1].step()
        opts[1].zero_grad(set_to_none=True)
        return loss.item()

    times_ours, times_ref, first = [], [], None
    for i in range(args.warmup + args.steps):
        inputs = draw()
        pair = [(times_ours, step_ours), (times_ref, step_ref)]
        losses = {}
        for times, fn in pair if i % 2 == 0 else pair[::-1]:  # alternate who goes first
            elapsed, losses[fn] = _timed(lambda fn=fn, x=inputs: fn(*x), args.device)
            if i >= args.warmup:
                times.append(elapsed)
        if first is None:
            first = abs(losses[step_ours] - losses[step_ref]) / abs(losses[step_ref])
    # the median of back-to-back ratios resists load from other processes better than a ratio
    # of medians taken over a minute
    ratio = statistics.median(r / o for o, r in zip(times_ours, times_ref))
    return {
        "case": name,
        "params": f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M",
        "input": f"{batch}×{config.in_channels}×{size}×{size}",
        "ours": batch / statistics.median(times_ours),
        "diffusers": batch / statistics.median(times_ref),
        "ratio": ratio,
        "loss_rel_diff": first,
    }


def markdown(rows: list[dict], args) -> str:
    precision = f"autocast {args.autocast}" if args.autocast else "float32"
    head = (
        "## U-Net training throughput: ours vs diffusers (`bench/train_throughput.py`)\n\n"
        f"{args.device}, {precision}, {torch.get_num_threads()} threads, median of {args.steps} "
        f"steps after {args.warmup} warm-up; torch {torch.__version__}, diffusers "
        f"{_diffusers_version()}, {platform.processor() or platform.machine()}. One step: noise, "
        "U-Net forward, MSE, backward, AdamW (ours: channels_last U-Net and fused AdamW, as `ldm "
        "train` runs; diffusers: as its train_text_to_image.py). Ratio: diffusers step time / "
        "ours, median over "
        "back-to-back pairs; > 1: ours is faster. Loss diff: first step's |ours - diffusers| / "
        "diffusers on the same weights and inputs.\n\n"
        "| case | params | input | ours (samples/s) | diffusers (samples/s) | ratio | loss diff |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['case']} | {r['params']} | {r['input']} | {r['ours']:.1f} | {r['diffusers']:.1f} "
        f"| {r['ratio']:.2f} | {r['loss_rel_diff']:.1e} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


# ---- table 2: the whole step, cached and LoRA ----

# name -> (autoencoder preset and widths, CLIP text preset or (width, layers, heads) of a
# from-scratch one) beside CASES' U-Net
ENCODERS = {
    "tiny": ("tiny", None, "tiny"),
    "shapes2": ("shapes", None, (64, 4, 4)),  # the default model's autoencoder and text encoder
    "sd15 at 1/5 width": ("sd", (32, 64, 128, 128), "sd15"),
}
CAPTIONS = ["a red circle above a blue square", "a small green triangle", "two yellow stars",
            "a purple square on the left"]  # fmt: skip
VARIANTS = ("diffusers full", "diffusers LoRA", "ours full", "ours full cached", "ours LoRA",
            "ours LoRA cached")  # fmt: skip


def _encoders(name: str, device: str):
    """(ours, diffusers) autoencoders and text models with the same random weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from autoencoder import AUTOENCODER_PRESETS, AutoencoderKL
    from text_encoder import CLIP_TEXT_PRESETS, ClipTextEncoder, ClipTextModel

    vae_preset, widths, text_preset = ENCODERS[name]
    vae_config = AUTOENCODER_PRESETS[vae_preset]
    if widths:
        vae_config = dataclasses.replace(vae_config, block_out_channels=widths)
    torch.manual_seed(1)
    vae = AutoencoderKL(vae_config)
    ref_vae = DiffusersAutoencoderKL.from_config(vae_config.to_diffusers())
    ref_vae.load_state_dict(vae.state_dict())
    if isinstance(text_preset, tuple):
        from train.model import scratch_text_config

        text_config = scratch_text_config(*text_preset)
    else:
        text_config = CLIP_TEXT_PRESETS[text_preset]
    text = ClipTextModel(text_config)
    ref_text = CLIPTextModel(CLIPTextConfig(**text_config.to_dict()))
    state = text.state_dict()
    if not hasattr(ref_text, "text_model"):  # transformers 5 dropped the wrapper module
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    ref_text.load_state_dict(state)
    models = (vae, ref_vae, text, ref_text)
    for m in models:
        m.to(device).eval().requires_grad_(False)
    return vae, ref_vae, ClipTextEncoder(text), ref_text


def _lora_unet(unet, ours: bool):
    """The U-Net with LoRA factors on to_q/k/v/out (ours: train.lora; diffusers: add_adapter)."""
    from peft import LoraConfig

    from train.lora import UNET_TARGETS, add_lora

    if ours:
        add_lora("unet", unet, LORA_RANK, LORA_RANK)
    else:
        unet.requires_grad_(False)
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                            target_modules=list(UNET_TARGETS))  # fmt: skip
        unet.add_adapter(config)
    return unet


def bench_step_case(name: str, args, cache_dir: Path) -> list[dict]:
    """Table 2 rows of one case: samples/s and speed-ups of each VARIANTS loop."""
    from diffusers import DDPMScheduler

    from train.cache import EncodingCache, batch_posterior, cached_contexts, fingerprint
    from train.loop import encode_captions, posterior_latents

    config, size, batch = CASES[name]
    batch = args.batch_size or batch
    dev = args.device
    vae, ref_vae, text, ref_text = _encoders(name, dev)
    unets = {}
    for variant in VARIANTS:
        ref, ours = _models(config, dev)
        unet = ref if variant.startswith("diffusers") else ours
        unets[variant] = _lora_unet(unet, ours=unet is ours) if "LoRA" in variant else unet
    opts = {}
    for v, u in unets.items():
        params = [p for p in u.parameters() if p.requires_grad]
        if v.startswith("ours"):
            training_layout(u, dev)
            opts[v] = make_optimizer(params, RUN)[0]
        else:
            opts[v] = torch.optim.AdamW(params, lr=1e-4)
    schedule = ScheduleConfig()
    scheduler = DDPMScheduler.from_config(schedule.to_diffusers("DDPMScheduler"))
    alpha_bar = alphas_cumprod(schedule).to(dev)
    f, scaling = vae.config.downsample_factor, vae.config.scaling_factor
    g = torch.Generator().manual_seed(2)
    pool = [torch.rand(batch, 3, size * f, size * f, generator=g) * 2 - 1 for _ in range(2)]
    captions = [[CAPTIONS[(i + k) % len(CAPTIONS)] for k in range(batch)] for i in range(2)]
    latents = EncodingCache(cache_dir / name, "latents", fingerprint(vae)).open()
    texts = EncodingCache(cache_dir / name, "text", fingerprint(text.model)).open()
    keys = [[latents.key(f"image {i} {k}") for k in range(batch)] for i in range(2)]
    for i, pixels in enumerate(pool):  # the first epoch: write every entry once
        posterior = vae.encode(pixels.to(dev))
        for key, mean, logvar in zip(keys[i], posterior.mean, posterior.logvar):
            latents.put(key, {"mean": mean, "logvar": logvar})
        cached_contexts(texts, text, captions[i], partial(encode_captions, text, text.model))
    autocast = (torch.autocast(dev, dtype=getattr(torch, args.autocast))
                if args.autocast else contextlib.nullcontext())  # fmt: skip

    def step(variant: str, i: int, noise_seed: int) -> float:
        gen = torch.Generator(dev).manual_seed(noise_seed)
        pixels, caps, unet = pool[i % 2], captions[i % 2], unets[variant]
        with torch.no_grad():
            if variant.startswith("diffusers"):
                ids = text.tokenize(caps, long_prompt="truncate", weighting=False).ids.to(dev)
                x0 = ref_vae.encode(pixels.to(dev)).latent_dist.sample(gen) * scaling
                context = ref_text(ids)[0]
            else:
                if variant.endswith("cached"):  # what the data loader hands over on a hit
                    entries = [latents.get(k) for k in keys[i % 2]]
                    moments = torch.stack([torch.cat([e["mean"], e["logvar"]]) for e in entries])
                    loaded = {"cached": [True] * batch, "pixels": None, "moments": moments}
                    posterior = batch_posterior(vae, loaded, latents, torch.device(dev))
                    encode = partial(encode_captions, text, text.model)
                    context = cached_contexts(texts, text, caps, encode)
                else:
                    posterior = vae.encode(pixels.to(dev))
                    context = encode_captions(text, text.model, caps)
                x0 = posterior_latents(vae, posterior, gen)
        eps = torch.randn(x0.shape, generator=gen, device=dev)
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=gen, device=dev)
        with autocast:
            if variant.startswith("diffusers"):
                pred = unet(scheduler.add_noise(x0, eps, t), t, context).sample
                loss = F.mse_loss(pred.float(), eps.float())
            else:
                loss, _ = diffusion_loss(unet, x0, eps, t, context, alpha_bar, "epsilon", None)
        loss.backward()
        opts[variant].step()
        opts[variant].zero_grad(set_to_none=True)
        return loss.item()

    times = {v: [] for v in VARIANTS}
    first = {}
    for i in range(args.warmup + args.steps):
        order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]  # rotate who is first
        for variant in order:
            elapsed, loss = _timed(lambda v=variant, i=i: step(v, i, 1000 + i), dev)
            first.setdefault(variant, loss)
            if i >= args.warmup:
                times[variant].append(elapsed)
    base, ref = times["ours full"], times["diffusers full"]
    return [
        {
            "case": name,
            "variant": v,
            "samples": batch / statistics.median(times[v]),
            "vs_ours": statistics.median(b / t for b, t in zip(base, times[v])),
            "vs_diffusers": statistics.median(r / t for r, t in zip(ref, times[v])),
            "loss_rel_diff": abs(first[v] - first["diffusers full"]) / abs(first["diffusers full"]),
        }
        for v in VARIANTS
    ]


def markdown_step(rows: list[dict], args) -> str:
    precision = f"autocast {args.autocast}" if args.autocast else "float32"
    head = (
        "## Training step with cache and LoRA: ours vs diffusers (`bench/train_throughput.py`)\n\n"
        f"{args.device}, {precision}, {torch.get_num_threads()} threads, median of {args.steps} "
        f"steps after {args.warmup} warm-up; LoRA rank {LORA_RANK} on to_q/to_k/to_v/to_out.0. "
        "One step from pixels and captions: autoencoder posterior sample, text encoder, noise, "
        "U-Net forward, MSE, backward, AdamW (ours: channels_last U-Net, fused AdamW); cached: "
        "posteriors and contexts read from the disk "
        "cache instead (every epoch after the first). Speed-up: median per-step time ratio; "
        "> 1: faster. Loss diff: first step's |loss - diffusers full's| / diffusers full's.\n\n"
        "| case | loop | samples/s | × ours full uncached | × diffusers full | loss diff |\n"
        "|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['case']} | {r['variant']} | {r['samples']:.1f} | {r['vs_ours']:.2f} "
        f"| {r['vs_diffusers']:.2f} | {r['loss_rel_diff']:.1e} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="override each case's batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["float16", "bfloat16"], default=None,
                        help="mixed precision (autocast) instead of float32")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tables", nargs="+", default=["unet", "step"], choices=["unet", "step"],
                        help="unet: U-Net steps; step: whole steps, cache, LoRA")  # fmt: skip
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--benchmarks-file", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "unet" in args.tables:
        text = markdown([bench_case(name, args) for name in args.cases], args)
        print(text)
        if args.write:
            write_section(args.benchmarks_file, text, SECTION_START, SECTION_END)
            print(f"wrote {args.benchmarks_file}")
    if "step" in args.tables:
        with tempfile.TemporaryDirectory() as cache_dir:
            rows = [r for name in args.cases for r in bench_step_case(name, args, Path(cache_dir))]
        text = markdown_step(rows, args)
        print(text)
        if args.write:
            write_section(args.benchmarks_file, text, STEP_START, STEP_END)
            print(f"wrote {args.benchmarks_file}")


if __name__ == "__main__":
    main()
