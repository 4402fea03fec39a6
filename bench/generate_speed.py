"""Benchmark: one image from a fresh process, `ldm generate` against diffusers on the same folder.

Each trial starts a new Python process (what a user waits for: imports, loading, sampling,
decoding, writing the PNG). Ours runs `ldm generate`; the reference loads the same folder with
diffusers' StableDiffusionPipeline, sets the matching scheduler and makes the same image. Trials
alternate between the two, and the table reports medians and the ratio; the two PNGs are compared.

    python bench/generate_speed.py [--model FOLDER] [--trials 5] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION_START = "<!-- bench/generate_speed.py: start -->"
SECTION_END = "<!-- bench/generate_speed.py: end -->"
PROMPT = "a red circle on the left"

# the reference: diffusers on the same folder, the folder's own scheduler, same seed and settings
DIFFUSERS_SCRIPT = """
import json, sys, torch
from diffusers import StableDiffusionPipeline
folder, out, steps, guidance, prompt = sys.argv[1:6]
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                               requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
image = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance),
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(out)
"""


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    p.add_argument("--benchmarks-file", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from pipelines.loading import DEFAULT_MODEL, read_generation_defaults

    folder = Path(args.model) if args.model else DEFAULT_MODEL
    defaults = read_generation_defaults(folder)
    steps = defaults.get("num_inference_steps", 30)
    guidance = defaults.get("guidance_scale", 7.5)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    tmp = Path(tempfile.mkdtemp())
    ours_png, ref_png = tmp / "ours.png", tmp / "diffusers.png"
    ours_cmd = [
        sys.executable,
        "-m",
        "ldm_cli",
        "generate",
        PROMPT,
        "-o",
        str(ours_png),
        "--steps",
        str(steps),
        "--guidance",
        str(guidance),
        "--seed",
        "0",
        "--quiet",
    ]
    if args.model:
        ours_cmd += ["-m", str(folder)]
    ref_cmd = [
        sys.executable,
        "-c",
        DIFFUSERS_SCRIPT,
        str(folder),
        str(ref_png),
        str(steps),
        str(guidance),
        PROMPT,
    ]
    times = {"ours": [], "diffusers": []}
    timed(ours_cmd, env), timed(ref_cmd, env)  # warm the file cache for both
    for _ in range(args.trials):
        times["ours"].append(timed(ours_cmd, env))
        times["diffusers"].append(timed(ref_cmd, env))
    a, b = (np.asarray(Image.open(f), dtype=np.float64) / 255 for f in (ours_png, ref_png))
    med = {k: statistics.median(v) for k, v in times.items()}
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    text = (
        "## One image from a fresh process: `ldm generate` vs diffusers (`bench/generate_speed.py`)"
        f"\n\nModel: `{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}`, "
        f"{scheduler['_class_name']}, {steps} steps, guidance {guidance}, one "
        f"{a.shape[1]}×{a.shape[0]} image; wall time of the whole process (imports, load, "
        f"sampling, decode, PNG), median of {args.trials} alternating trials on "
        f"{os.cpu_count()} CPU cores"
        + (f", OMP_NUM_THREADS={args.threads}" if args.threads else "")
        + ".\n\n"
        "| | ours: `ldm generate` | diffusers: `StableDiffusionPipeline` | diffusers / ours |\n"
        "|---|---|---|---|\n"
        f"| median seconds | {med['ours']:.2f} | {med['diffusers']:.2f} | "
        f"{med['diffusers'] / med['ours']:.2f} |\n"
        f"| all trials (s) | {', '.join(f'{t:.2f}' for t in times['ours'])} | "
        f"{', '.join(f'{t:.2f}' for t in times['diffusers'])} | |\n\n"
        f"Same image: max |ours - diffusers| = {np.abs(a - b).max():.4f} on [0, 1] pixels "
        "(uint8 PNGs).\n"
    )
    print(text)
    if args.write:
        write_section(args.benchmarks_file, text, SECTION_START, SECTION_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
