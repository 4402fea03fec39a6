"""`ldm generate`: text -> PNG files that carry the parameters that made them.

Image i of a run uses seed + i and is made on its own, so any image can be re-made alone, and
`ldm generate --replay image.png` re-makes exactly the image from the parameters stored in it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

PARAMS_KEY = "ldm:parameters"  # PNG text chunk with the JSON parameters
DTYPES = ("float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm generate", description=__doc__.split("\n")[0])
    p.add_argument("prompt", nargs="?", help="what to draw")
    p.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="PNG path (default: out.png); with "
        "--count N > 1, files are named STEM-0.png ... STEM-(N-1).png",
    )
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help="diffusers folder, .safetensors/.ckpt file "
        "or Hub id (default: the embedded default model)",
    )
    p.add_argument("-n", "--negative-prompt", default=None, help="what to steer away from")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps (default: 30, or the model's own default)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: 7.5, or the model's own default)",
    )
    p.add_argument(
        "--sampler",
        default=None,
        help="ddpm, ddim, euler, euler_ancestral, heun, "
        "dpmpp_2m, pndm (default: the model's scheduler)",
    )
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigma spacing")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i")
    p.add_argument("--count", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels")
    p.add_argument("--width", type=int, default=None, help="image width in pixels")
    p.add_argument(
        "--prediction-type",
        default=None,
        choices=("epsilon", "v_prediction"),
        help="for single-file v-prediction checkpoints",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype")
    p.add_argument(
        "--replay",
        metavar="PNG",
        default=None,
        help="re-make the image stored in PNG from its embedded parameters",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def weights_hash(source: str) -> str:
    """sha256 over the weight files of a model folder or file (names and bytes)."""
    path = Path(source)
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt"))
    )
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_parameters(png: str) -> dict:
    from PIL import Image

    if not Path(png).is_file():
        raise FileNotFoundError(f"--replay: no such file {png!r}")
    with Image.open(png) as im:
        text = im.info.get(PARAMS_KEY) if hasattr(im, "info") else None
    if text is None:
        raise ValueError(
            f"--replay: {png!r} carries no {PARAMS_KEY!r} text chunk "
            "(was it made by `ldm generate`?)"
        )
    return json.loads(text)


def _a1111_text(params: dict) -> str:
    """The 'parameters' chunk in the form other Stable Diffusion tools show."""
    head = params["prompt"] + (
        f"\nNegative prompt: {params['negative_prompt']}" if params["negative_prompt"] else ""
    )
    return (
        f"{head}\nSteps: {params['steps']}, Sampler: {params['sampler']}, "
        f"CFG scale: {params['guidance']}, Seed: {params['seed']}, "
        f"Size: {params['width']}x{params['height']}, "
        f"Model hash: {params['model_hash'][:10]}, Model: {params['model']}"
    )


def save_png(image, path: Path, params: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True))
    info.add_text("parameters", _a1111_text(params))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def _settings(args) -> dict:
    if args.replay:
        params = read_parameters(args.replay)
        return {
            **params,
            "count": 1,
            "output": args.output,
            "device": args.device,
            "dtype": params.get("dtype", args.dtype),
            "quiet": args.quiet,
        }
    if not args.prompt:
        raise ValueError("prompt: give a prompt (or --replay PNG)")
    return {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "steps": args.steps,
        "guidance": args.guidance,
        "sampler": args.sampler,
        "karras": args.karras,
        "eta": args.eta,
        "seed": args.seed,
        "count": args.count,
        "height": args.height,
        "width": args.width,
        "prediction_type": args.prediction_type,
        "output": args.output,
        "device": args.device,
        "dtype": args.dtype,
        "quiet": args.quiet,
    }


def generate(s: dict) -> list[Path]:
    import torch

    from pipelines import TextToImagePipeline
    from pipelines.loading import DEFAULT_MODEL

    if s["count"] < 1:
        raise ValueError(f"--count={s['count']} must be >= 1")
    pipe = TextToImagePipeline.from_pretrained(s["model"], prediction_type=s["prediction_type"])
    pipe.to(s["device"], getattr(torch, s["dtype"]))
    pipe.progress = not s["quiet"]
    model_hash = weights_hash(pipe.source)
    if s.get("model_hash") and s["model_hash"] != model_hash:
        raise ValueError(
            f"--replay: the model's weights changed since the image was made "
            f"(hash {model_hash[:12]} != {s['model_hash'][:12]})"
        )
    defaults = pipe.call_defaults()
    steps = s["steps"] if s["steps"] is not None else defaults["num_inference_steps"]
    guidance = s["guidance"] if s["guidance"] is not None else defaults["guidance_scale"]
    sampler = s["sampler"] or pipe.sampler
    f = pipe.vae_scale_factor
    height = s["height"] or pipe.unet.config.sample_size * f
    width = s["width"] or pipe.unet.config.sample_size * f
    out = Path(s["output"])
    paths = []
    for i in range(s["count"]):
        seed = s["seed"] + i
        image = pipe(
            s["prompt"],
            negative_prompt=s["negative_prompt"],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            sampler=sampler,
            use_karras_sigmas=s["karras"],
            eta=s["eta"],
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        params = {
            "prompt": s["prompt"],
            "negative_prompt": s["negative_prompt"],
            "seed": seed,
            "sampler": sampler,
            "karras": s["karras"],
            "eta": s["eta"],
            "steps": steps,
            "guidance": guidance,
            "height": height,
            "width": width,
            "model": "default" if Path(pipe.source) == DEFAULT_MODEL else s["model"],
            "prediction_type": s["prediction_type"],
            "model_hash": model_hash,
            "dtype": s["dtype"],
        }
        if params["model"] == "default":
            params["model"] = None
        path = out if s["count"] == 1 else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
        save_png(image, path, params)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for path in generate(_settings(args)):
            print(path)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"ldm generate: error: {err}", file=sys.stderr)
        return 2
    return 0
