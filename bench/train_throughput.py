"""Benchmark: U-Net training samples/second, ours against a diffusers loop doing the same work.

    python bench/train_throughput.py           # print a markdown table
    python bench/train_throughput.py --write   # also replace its section of BENCHMARKS.md

One training step on each side, on the same weights, inputs and noise:
    ours:      train.loop.diffusion_loss (q_sample, U-Net, target, MSE) -> backward -> AdamW
    diffusers: DDPMScheduler.add_noise -> UNet2DConditionModel -> MSE -> backward -> AdamW
Latents and text contexts are random tensors (the frozen autoencoder and text encoder are the
same work on both sides and are left out). Steps alternate between the two loops, so load from
other processes hits both alike; the first step's losses are compared as a parity check.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.schedule import ScheduleConfig, alphas_cumprod  # noqa: E402
from ldm.unet import UNET_PRESETS, UNet, UNetConfig  # noqa: E402
from train.loop import diffusion_loss  # noqa: E402

SECTION_START = "<!-- bench/train_throughput.py: start -->"
SECTION_END = "<!-- bench/train_throughput.py: end -->"

# name -> (U-Net config, latent side, batch)
CASES = {
    "tiny": (UNET_PRESETS["tiny"], 16, 8),
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
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, ref)]
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
        "U-Net forward, MSE, backward, AdamW. Ratio: diffusers step time / ours, median over "
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


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def write_section(path: Path, text: str) -> None:
    """Replace this script's section of path (between its markers), or append it."""
    block = f"{SECTION_START}\n{text}{SECTION_END}\n"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION_START in old and SECTION_END in old:
        before, rest = old.split(SECTION_START, 1)
        new = before + block + rest.split(SECTION_END, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


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
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--benchmarks-file", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = markdown([bench_case(name, args) for name in args.cases], args)
    print(text)
    if args.write:
        write_section(args.benchmarks_file, text)
        print(f"wrote {args.benchmarks_file}")


if __name__ == "__main__":
    main()
