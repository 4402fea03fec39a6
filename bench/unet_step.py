"""Benchmark: one U-Net forward, ours against diffusers' UNet2DConditionModel on the same weights.

    python bench/unet_step.py                 # print a markdown table
    python bench/unet_step.py --write         # also replace this script's section of BENCHMARKS.md

Both models run side by side in one process, interleaved call by call so that load from other
processes hits both alike; the table reports the median time per call over --repeats calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from sections import write_section  # noqa: E402  (bench/, beside this file)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.unet import UNET_PRESETS, UNet, UNetConfig  # noqa: E402

SECTION_START = "<!-- bench/unet_step.py: start -->"
SECTION_END = "<!-- bench/unet_step.py: end -->"

# name -> (config, latent size, batch); SD-shaped configs at reduced width, 77 text tokens
CASES = {
    "tiny": (UNET_PRESETS["tiny"], 16, 2),
    "sd15 at 1/5 width": (
        dataclasses.replace(UNET_PRESETS["sd15"], block_out_channels=(64, 128, 256, 256)),
        32,
        2,
    ),
    "sd21 at 1/5 width": (
        dataclasses.replace(
            UNET_PRESETS["sd21"],
            block_out_channels=(64, 128, 256, 256),
            attention_head_dim=(2, 4, 8, 8),  # 32-d heads
        ),
        32,
        2,
    ),
}


def _models(config: UNetConfig, device: str, dtype: torch.dtype, channels_last: bool):
    """diffusers' U-Net with its default random init, and ours with the same weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel.from_config(config.to_diffusers()).eval()
    ours = UNet(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    for model in (ref, ours):
        model.to(device)
        if dtype != torch.float32:
            model.to(dtype)
    if channels_last:
        ref.to(memory_format=torch.channels_last)
        ours.to(memory_format=torch.channels_last)
    return ref, ours


def _time(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_case(name: str, layout: str, args) -> dict:
    config, size, batch = CASES[name]
    dtype, channels_last = getattr(torch, args.dtype), layout == "channels_last"
    ref, ours = _models(config, args.device, dtype, channels_last)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, size, size, generator=g).to(args.device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ctx = torch.randn(batch, 77, config.cross_attention_dim, generator=g).to(args.device, dtype)
    t = torch.tensor([999.0] * batch, device=args.device)
    with torch.inference_mode():
        run_ours, run_ref = (lambda: ours(x, t, ctx)), (lambda: ref(x, t, ctx).sample)
        out, expected = run_ours().float(), run_ref().float()
        for _ in range(args.warmup):
            run_ours(), run_ref()
        times_ours, times_ref = [], []
        for i in range(args.repeats):  # alternate who goes first, so drift hits both alike
            pair = [(times_ours, run_ours), (times_ref, run_ref)]
            for times, fn in pair if i % 2 == 0 else pair[::-1]:
                times.append(_time(fn, args.device))
    ms_ours, ms_ref = 1e3 * statistics.median(times_ours), 1e3 * statistics.median(times_ref)
    # the median of back-to-back ratios resists load from other processes better than a ratio
    # of medians taken over a minute
    ratio = statistics.median(r / o for o, r in zip(times_ours, times_ref))
    return {
        "case": name,
        "layout": layout,
        "params": f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M",
        "input": f"{batch}×{config.in_channels}×{size}×{size}",
        "ours": ms_ours,
        "diffusers": ms_ref,
        "ratio": ratio,
        "rel_err": ((out - expected).abs().max() / expected.abs().max()).item(),
    }


def markdown(rows: list[dict], args) -> str:
    threads = torch.get_num_threads()
    head = (
        f"## U-Net forward: ours vs diffusers (`bench/unet_step.py`)\n\n"
        f"{args.device}, {args.dtype}, "
        f"{threads} threads, median of {args.repeats} calls; torch {torch.__version__}, "
        f"diffusers {_diffusers_version()}, {platform.processor() or platform.machine()}. "
        "Ratio: diffusers time / ours, median over back-to-back pairs; > 1: ours is faster. "
        "Rel. err: max |ours - diffusers| / max |diffusers|.\n\n"
        "| case | params | input | layout | ours (ms) | diffusers (ms) | ratio | rel. err |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['case']} | {r['params']} | {r['input']} | {r['layout']} "
        f"| {r['ours']:.1f} | {r['diffusers']:.1f} "
        f"| {r['ratio']:.2f} | {r['rel_err']:.1e} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--layouts", nargs="+", default=["contiguous", "channels_last"],
        choices=["contiguous", "channels_last"], help="memory format of weights and input",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--benchmarks-file", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench_case(name, layout, args) for name in args.cases for layout in args.layouts]
    text = markdown(rows, args)
    print(text)
    if args.write:
        write_section(args.benchmarks_file, text, SECTION_START, SECTION_END)
        print(f"wrote {args.benchmarks_file}")


if __name__ == "__main__":
    main()
