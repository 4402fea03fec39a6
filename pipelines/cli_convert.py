"""`ldm convert SRC DST`: between a diffusers folder and one original-format .safetensors file.

SRC is anything `from_pretrained` reads (folder, .safetensors/.ckpt, Hub id). DST ending in
`.safetensors` gets the single original (CompVis / A1111) file; any other DST a diffusers folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def export_single_file(pipe, path: Path, dtype: torch.dtype | None = None) -> None:
    """Write the pipeline's weights as one original-format .safetensors file (atomically)."""
    from pipelines.single_file import diffusers_to_original, save_single_file

    def state(module):
        return {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
            .detach()
            .contiguous()
            .cpu()
            for k, v in module.state_dict().items()
        }

    components = {
        "unet": state(pipe.unet),
        "vae": state(pipe.vae),
        "text_encoder": state(pipe.text_encoder.model),
    }
    # OpenCLIP towers converted to transformers (SD 2.x) use plain GELU; OpenAI CLIP quick GELU
    act = getattr(pipe.text_encoder.model.config, "hidden_act", "quick_gelu")
    original = diffusers_to_original(
        components,
        pipe.unet.config.to_diffusers(),
        pipe.vae.config.to_diffusers(),
        text_encoder_format="open_clip" if act == "gelu" else "clip",
    )
    save_single_file(path, original)
    if pipe.schedule.prediction_type == "v_prediction":
        # a single file cannot say it predicts v; original tools read it from a YAML beside it
        path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm convert", description=__doc__.split("\n")[0])
    p.add_argument("src", help="diffusers folder, .safetensors/.ckpt file or Hub id")
    p.add_argument("dst", help="DST.safetensors for one original file, else a folder")
    p.add_argument(
        "--prediction-type",
        default=None,
        choices=("epsilon", "v_prediction"),
        help="what a single-file SRC's U-Net predicts (SD 2.x 768 models: v_prediction)",
    )
    p.add_argument("--half", action="store_true", help="store float16 weights (single file only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines import TextToImagePipeline

    try:
        pipe = TextToImagePipeline.from_pretrained(args.src, prediction_type=args.prediction_type)
        dst = Path(args.dst)
        if dst.suffix == ".safetensors":
            export_single_file(pipe, dst, torch.float16 if args.half else None)
        elif dst.suffix:
            raise ValueError(f"dst={args.dst!r}: use a .safetensors file or a folder name")
        else:
            pipe.save_pretrained(dst)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"ldm convert: error: {err}", file=sys.stderr)
        return 2
    print(dst)
    return 0
