"""`ldm train-default`: re-train the embedded default model from scratch, evaluate it, install it.

Stages, each resumable (a stage whose result exists is skipped; an interrupted one resumes from
its newest checkpoint):
  1. data     the synthetic shapes dataset (train split; held-out combinations excluded)
  2. vae      `ldm train-vae` on 32x32 crops (preset "shapes": f=4, 4 latent channels), then a
              decoder-only L2 fine-tune on whole 64x64 images (same latents, sharper decodes:
              higher PSNR), optionally after one on crops (--decoder-steps)
  3. text     `ldm train-text`: a small CLIP-architecture text encoder pretrained contrastively
              with hard negatives (another shape, colours swapped, left/right flipped), so that
              every word that tells two captions apart is encoded, not only the ones that move
              many pixels
  4. unet     `ldm train --model preset:shapes2` from scratch on that text encoder, frozen:
              v-prediction on a zero-terminal-SNR schedule, cached latents and text contexts
  5. joint    `ldm train --train-text-encoder`: the U-Net and the text encoder trained
              together from there, on a fresh cosine schedule (--joint-steps; 0 skips it),
              --joint-cycles times (default 3; 0: none), each from the cycle before's finished
              pipeline, then one grounded cycle (--grounded-steps; 0 skips it): the same
              with train/grounding.py's loss added, each object's pixels made to read
              that object's own colour and shape words. The last U-Net stage's folder is
              finished as the shipped pipeline:
              whole-image decoder, generation defaults, the text encoder stored in float16
              (loaded back in float32) to fit 25 MB
  6. eval     GenEval-style accuracy on held-out prompts and autoencoder PSNR on held-out images
  7. samples  a captioned grid of sample images (samples.png) and the model card
  8. install  the pipeline folder copied to pipelines/default_model (with --install)
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from pathlib import Path

# Guidance 3 was measured best for the grounded model (colour and binding on five sets of
# held-out prompts, BENCHMARKS.md); the models before the grounded cycle were best at 4.
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SAMPLER = 10, 3.0, "dpmpp_2m"
STAGES = ("data", "vae", "text", "unet", "joint", "eval", "samples")
SAMPLE_PROMPTS = (
    "a red circle on the left",
    "a large blue square",
    "a small yellow triangle at the top",
    "a green cross on the right",
    "a red circle to the left of a blue square",
    "a white triangle above a black circle",
    "a purple square and an orange circle",
    "two green circles",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm train-default", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/default-model", help="working folder (resumable)")
    p.add_argument("--images", type=int, default=20000, help="training images (default 20000)")
    p.add_argument("--vae-steps", type=int, default=5000)
    p.add_argument(
        "--decoder-steps",
        type=int,
        default=0,
        help="optional decoder fine-tune on 32px crops first (default 0; the shipped had 8000)",
    )
    p.add_argument(
        "--decoder64-steps",
        type=int,
        default=1500,
        help="decoder fine-tune on whole 64px images, the size made (default 1500)",
    )
    p.add_argument("--text-steps", type=int, default=3000, help="ldm train-text steps")
    p.add_argument(
        "--text-pad-loss",
        type=float,
        default=0.0,
        help="ldm train-text --pad-loss: caption-free outputs after the EOS (default 0: off)",
    )
    p.add_argument(
        "--text-max-length",
        type=int,
        default=77,
        help="ldm train-text --max-length: positions the prompt is padded to (default 77)",
    )
    p.add_argument(
        "--unet-preset",
        choices=("shapes2", "shapes3"),
        default="shapes2",
        help="U-Net preset (shapes3: no self-attention at 16x16, faster; default shapes2)",
    )
    p.add_argument("--unet-steps", type=int, default=10000)
    p.add_argument(
        "--segmentation-weight",
        type=float,
        default=0.0,
        help="the frozen U-Net stage's segmentation-loss weight (train/segmentation.py; "
        "default 0: off)",
    )
    p.add_argument(
        "--joint-steps",
        type=int,
        default=6000,
        help="then U-Net and text encoder trained together (default 6000; 0: frozen only)",
    )
    p.add_argument("--joint-learning-rate", type=float, default=2.5e-4)
    p.add_argument(
        "--joint-cycles",
        type=int,
        default=3,
        help="joint stage repeated from its own result, a fresh schedule each time (default 3; "
        "0: only the grounded cycle, straight after the frozen stage)",
    )
    p.add_argument(
        "--grounded-steps",
        type=int,
        default=3000,
        help="a last joint cycle with the grounding loss (default 3000; 0: none)",
    )
    p.add_argument("--grounded-learning-rate", type=float, default=1e-4)
    p.add_argument(
        "--grounding-weight",
        type=float,
        default=0.05,
        help="the grounded cycle's grounding-loss weight (default 0.05)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts to score")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    p.add_argument(
        "--install",
        action="store_true",
        help="copy the result to pipelines/default_model (the shipped model)",
    )
    return p


def _resume(output: Path) -> list[str]:
    return ["--resume", "latest"] if (output / "checkpoints").is_dir() else []


def stage_data(work: Path, args) -> None:
    from train.shapes import make_dataset

    for split, n in (("train", args.images), ("heldout", 500)):
        folder = work / f"shapes-{split}"
        if not (folder / "metadata.jsonl").is_file():
            make_dataset(folder, n, seed=args.seed + (split == "heldout"), size=64, split=split)


def stage_vae(work: Path, args) -> None:
    """The autoencoder in three passes, each its own resumable `ldm train-vae` run."""
    from train.cli_vae import main as train_vae

    crops = ["--resolution", "32", "--no-resize", "--random-crop"]
    whole = ["--resolution", "64", "--no-resize"]  # the size the model makes

    def run(output: Path, model: str, steps: int, lr: str, size: list[str], extra: list[str]):
        if (output / "config.json").is_file():
            return
        argv = ["--model", model, "--output", str(output), "--max-steps", str(steps),
                "--learning-rate", lr, "--data", str(work / "shapes-train"), *size,
                "--batch-size", "16", "--lr-scheduler", "cosine", "--disc-weight", "0",
                "--checkpoints-total-limit", "2", "--report-to", "csv", "--no-progress",
                *extra, *_resume(output)]  # fmt: skip
        if train_vae(argv):
            raise SystemExit(f"ldm train-default: the autoencoder pass {output.name} failed")

    seed = args.seed
    run(work / "vae", "preset:shapes", args.vae_steps, "5e-4", crops,
        ["--lr-warmup-steps", "200", "--checkpoint-every", "500", "--seed", str(seed)])  # fmt: skip
    # decoder-only L2 fine-tunes: the same latents (the U-Net's), sharper decodes
    decoder = ["--decoder-only", "--pixel-loss", "l2", "--lr-warmup-steps", "100"]
    source, lr = work / "vae", "2e-4"
    if args.decoder_steps:  # optional first pass on crops (the shipped model had 8,000 steps)
        run(work / "vae-ft", str(source), args.decoder_steps, "2e-4", crops,
            [*decoder, "--checkpoint-every", "1000", "--seed", str(seed + 1)])  # fmt: skip
        source, lr = work / "vae-ft", "1e-4"
    # The crops never show the decoder a whole 64px image, whose 16x16 latent its mid-block
    # attention and GroupNorm see differently: held-out PSNR 27.7 dB on whole images after the
    # crop-trained autoencoder. Decoder steps on whole images close it: 1,500 of them straight
    # after it gave 36.2 dB (13 min); 8,000 on crops then 1,000 whole gave 37.2 dB (52 min).
    run(work / "vae-ft64", str(source), args.decoder64_steps, lr, whole,
        [*decoder, "--checkpoint-every", "500", "--seed", str(seed + 2)])  # fmt: skip


def stage_text(work: Path, args) -> None:
    """The text encoder, pretrained contrastively and then frozen for the U-Net. Trained only
    through the diffusion loss, a from-scratch text encoder kept "circle" and "square" close
    (a colour repaints a whole object, a shape changes a few edge pixels) and the U-Net swapped
    them; this one separates shape words as far as colour words (train/text_pretrain.py)."""
    from train.text_pretrain import main as train_text

    out = work / "text_encoder"
    if (out / "config.json").is_file():
        return
    argv = ["--data", str(work / "shapes-train"), "--heldout", str(work / "shapes-heldout"),
            "--output", str(out), "--steps", str(args.text_steps), "--seed", str(args.seed),
            "--batch-size", str(min(128, args.images)), "--pad-loss", str(args.text_pad_loss),
            "--max-length", str(args.text_max_length)]  # fmt: skip
    if train_text(argv):
        raise SystemExit("ldm train-default: the text encoder stage failed")


def _unet_output(work: Path, args) -> Path:
    """The frozen-text-encoder stage's folder: the final pipeline unless a joint stage follows."""
    return work / ("pipeline-frozen" if args.joint_steps else "pipeline")


def _common_unet_args(args) -> list[str]:
    """What both U-Net stages share: objective, data, caching, EMA, logging."""
    return [
        "--resolution",
        "64",
        # v-prediction on a zero-terminal-SNR schedule: with SD's schedule (SNR(T) = 0.005) a
        # 16x16 latent of flat shapes keeps a trace of its layout and colours at t = T, so an
        # epsilon model learnt to take them from the starting noise instead of the prompt
        "--prediction-type",
        "v_prediction",
        "--zero-terminal-snr",
        "--cache-latents",  # one encoder pass per image, not per step (~25% of a step)
        "--caption-dropout",
        "0.1",
        "--ema-decay",
        "0.999",
        "--batch-size",
        str(args.batch_size),
        "--lr-scheduler",
        "cosine",
        "--checkpoint-every",
        "500",
        "--checkpoints-total-limit",
        "2",
        "--report-to",
        "csv",
        "--no-progress",
        "--validation-every",
        "2000",
        "--validation-steps",
        "20",
        "--validation-prompt",
        "a red circle on the left",
        "--validation-prompt",
        "a blue square to the left of a yellow triangle",
    ]


def stage_unet(work: Path, args) -> None:
    from train.cli import main as train

    out = _unet_output(work, args)
    if (out / "model_index.json").is_file():
        return
    argv = [
        "--model",
        f"preset:{args.unet_preset}",
        "--vae",
        str(work / "vae"),
        "--text-encoder",  # frozen: the diffusion loss would pull shape words together again
        str(work / "text_encoder"),
        "--data",
        str(work / "shapes-train"),
        "--output",
        str(out),
        *_common_unet_args(args),
        "--cache-text",  # the frozen text encoder's contexts, once per caption
        "--max-steps",
        str(args.unet_steps),
        "--learning-rate",
        str(args.learning_rate),
        "--lr-warmup-steps",
        "500",
        "--seed",
        str(args.seed),
        *_resume(out),
    ]
    if args.segmentation_weight:
        argv += ["--segmentation-weight", str(args.segmentation_weight)]
    if train(argv):
        raise SystemExit("ldm train-default: the U-Net stage failed")
    if not args.joint_steps:
        _finish_pipeline(work, out)


def stage_joint(work: Path, args) -> None:
    """The U-Net and the text encoder trained together, from the frozen stage's pipeline.

    The frozen stage gives the text encoder's words their contrastive meaning first (trained
    through the diffusion loss from the start, shape words collapse, see stage_text); after it,
    letting the diffusion loss adjust the encoder too is what moved two-object binding, where
    more frozen steps did not. Measured on a continuation of the shipped model (200 held-out
    prompts, 3,000 steps of 6,000): binding 45.3% against 33.3% with the encoder kept frozen,
    and 75.0% against ~55% on prompts drawn like the training captions (BENCHMARKS.md).

    --joint-cycles repeats it from the cycle before's finished pipeline (text encoder rounded to
    float16 in between, as a continuation of a shipped model would be), into pipeline-joint<k>;
    --grounded-steps adds one more cycle with the grounding loss (train/grounding.py), gentler
    (--grounded-learning-rate, 100 warm-up steps). The last cycle writes pipeline. On the
    model shipped before it, the grounded cycle moved held-out colour 91.7 -> 94.5% and binding
    75.6 -> 78.5% (means over three sets of 200 prompts at guidance 4; shape 95.1 -> 93.7%;
    BENCHMARKS.md); the grounded model samples best at guidance 3 (DEFAULT_GUIDANCE)."""
    if not args.joint_steps:
        return
    frozen = start = _unet_output(work, args)
    cycles = [(args.joint_steps, args.joint_learning_rate, 200, [])] * args.joint_cycles
    if args.grounded_steps:
        grounding = ["--grounding-weight", str(args.grounding_weight)]
        cycles.append((args.grounded_steps, args.grounded_learning_rate, 100, grounding))
    for cycle, (steps, lr, warmup, extra) in enumerate(cycles, start=1):
        out = work / ("pipeline" if cycle == len(cycles) else f"pipeline-joint{cycle}")
        if not (out / "model_index.json").is_file():
            seed = args.seed + cycle  # not the frozen stage's (or the cycle before's) draws again
            _joint_cycle(work, start, out, frozen / "cache", seed, steps, lr, warmup, extra, args)
        start = out


def _joint_cycle(
    work: Path, start: Path, out: Path, cache: Path, seed: int, steps: int, lr: float,
    warmup: int, extra: list[str], args,
) -> None:  # fmt: skip
    """One joint cycle: start's U-Net and text encoder trained together into out, finished."""
    from train.cli import main as train

    argv = [
        "--model",
        str(start),
        "--train-text-encoder",
        "--data",
        str(work / "shapes-train"),
        "--output",
        str(out),
        *_common_unet_args(args),
        "--max-steps",
        str(steps),
        "--learning-rate",
        str(lr),
        "--lr-warmup-steps",
        str(warmup),
        "--seed",
        str(seed),
        "--cache-dir",  # the frozen stage's latents: same autoencoder, same images
        str(cache),
        *extra,
        *_resume(out),
    ]
    if train(argv):
        raise SystemExit("ldm train-default: the joint stage failed")
    _finish_pipeline(work, out)


def _finish_pipeline(work: Path, out: Path) -> None:
    """The last U-Net stage's folder made the shipped pipeline: whole-image decoder, sampler and
    generation defaults, text encoder stored in float16."""
    # the fine-tuned decoder shares the encoder (and so the latents) the U-Net was trained on
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(work / "vae-ft64" / name, out / "vae" / name)
    _set_generation_defaults(out)
    _store_text_encoder_in_float16(out)


def _store_text_encoder_in_float16(folder: Path) -> None:
    """Halve the text encoder's file; its config keeps "dtype": "float32", so our loader and
    transformers' both load it back in float32 (its 49408 x width token embedding is most of
    the model's bytes: 12.6 MB of float32 at width 64, against a 25 MB budget)."""
    from safetensors.torch import load_file, save_file

    path = folder / "text_encoder" / "model.safetensors"
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    if (config.get("dtype") or config.get("torch_dtype")) != "float32":
        raise ValueError(f"{path.parent}: expected a float32 text encoder config, got {config}")
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    tmp.replace(path)


def _set_generation_defaults(folder: Path) -> None:
    """The shipped sampler and the steps / guidance `ldm generate` uses for this model."""
    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(folder)
    pipe.sampler = DEFAULT_SAMPLER
    pipe.save_pretrained(folder)
    (folder / "generation_defaults.json").write_text(
        json.dumps(
            {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}, indent=2
        )
    )


def stage_eval(work: Path, args) -> dict:
    import torch

    from pipelines import TextToImagePipeline
    from train.evaluate import evaluate, format_report, reconstruction_psnr
    from train.shapes import heldout_prompts

    pipe = TextToImagePipeline.from_pretrained(work / "pipeline")
    pipe.progress = False

    def generate(prompts, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(
            prompts,
            num_inference_steps=DEFAULT_STEPS,
            guidance_scale=DEFAULT_GUIDANCE,
            generator=gens,
            output_type="np",
        ).images

    prompts = heldout_prompts(args.eval_prompts, seed=args.seed)
    result = evaluate(generate, prompts, list(range(len(prompts))))

    def encode_decode(x):
        with torch.inference_mode():
            return pipe.vae.decode(pipe.vae.encode(x).mode())

    result["psnr"] = reconstruction_psnr(encode_decode, work / "shapes-heldout")
    (work / "eval.json").write_text(json.dumps(result, indent=2, default=float))
    print(format_report(result))
    return result


def stage_samples(work: Path, args) -> Path:
    """samples.png: one image per prompt (seed 0) with its prompt underneath; the model card."""
    import torch
    from PIL import Image, ImageDraw

    from pipelines import TextToImagePipeline
    from pipelines.model_card import dataset_hash, write_model_card

    folder = work / "pipeline"
    pipe = TextToImagePipeline.from_pretrained(folder)
    pipe.progress = False
    cell, text_h, cols = 128, 28, 4
    rows = -(-len(SAMPLE_PROMPTS) // cols)
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        image = pipe(
            prompt,
            num_inference_steps=DEFAULT_STEPS,
            guidance_scale=DEFAULT_GUIDANCE,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
        lines = textwrap.wrap(prompt, 22)[:2]  # what fits under a cell in the default font
        draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines), fill="black", spacing=1)
    grid.save(folder / "samples.png")
    data = work / "shapes-train"
    write_model_card(
        folder,
        training={
            "unet_steps": args.unet_steps,
            "joint_steps": args.joint_steps,
            "joint_learning_rate": args.joint_learning_rate,
            "joint_cycles": args.joint_cycles,
            "grounded_steps": args.grounded_steps,
            "grounded_learning_rate": args.grounded_learning_rate,
            "grounding_weight": args.grounding_weight,
            "segmentation_weight": args.segmentation_weight,
            "vae_steps": args.vae_steps,
            "text_encoder_steps": args.text_steps,
            "text_encoder_pad_loss": args.text_pad_loss,
            "text_max_length": args.text_max_length,
            "unet_preset": args.unet_preset,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "recipe": "ldm train-default",
        },
        dataset={
            "size": args.images,
            "content_hash": dataset_hash(data),
            "description": "synthetic coloured shapes with compositional captions "
            "(train/shapes.py, train split)",
        },
        samples=[("samples.png", " | ".join(SAMPLE_PROMPTS))],
        license="apache-2.0",
    )
    return folder / "samples.png"


def install(work: Path) -> Path:
    from pipelines.loading import DEFAULT_MODEL

    if DEFAULT_MODEL.exists():
        shutil.rmtree(DEFAULT_MODEL)
    shutil.copytree(
        work / "pipeline",
        DEFAULT_MODEL,
        ignore=shutil.ignore_patterns("checkpoints", "logs", "cache", "validation*", "*.tmp"),
    )
    return DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.joint_cycles < 0:
        raise SystemExit(f"--joint-cycles: must be >= 0, got {args.joint_cycles}")
    if args.joint_steps and not args.joint_cycles and not args.grounded_steps:
        raise SystemExit(
            "--joint-cycles 0 leaves the joint stage only the grounded cycle, and --grounded-steps "
            "is 0; for no joint stage at all pass --joint-steps 0"
        )
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = {s.strip() for s in args.stages.split(",")}
    unknown = stages - set(STAGES)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; allowed: {', '.join(STAGES)}")
    for name, fn in (
        ("data", stage_data),
        ("vae", stage_vae),
        ("text", stage_text),
        ("unet", stage_unet),
        ("joint", stage_joint),
        ("eval", stage_eval),
        ("samples", stage_samples),
    ):
        if name in stages:
            fn(work, args)
    if args.install:
        print(install(work))
    return 0
