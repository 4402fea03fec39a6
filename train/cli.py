"""`ldm train`: fine-tune a text-to-image pipeline, or train one from scratch, on captioned images.

    ldm train --model runwayml/stable-diffusion-v1-5 --data ./my_images --output ./out
    ldm train --model preset:small --vae ./vae --data ./shapes --output ./model --max-steps 20000
    ldm train --model ./sd15 --data ./photos --output ./lora --lora-rank 8 --buckets \
        --cache-latents --cache-text --learning-rate 1e-4
    accelerate launch --num_processes 4 -m ldm_cli train ...     (multi-GPU, unchanged flags)

The heavy modules (accelerate, datasets, transformers) load only once the arguments parse, so
`ldm train --help` is instant. The data and run flags are shared with `ldm train-vae`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Defaults live in the config dataclasses; the CLI repeats only what its help text shows.
SCRATCH_HELP = "'preset:tiny' / 'preset:small' (or the bare name) trains from scratch"


def add_data_args(parser: argparse.ArgumentParser, captions: bool = True) -> None:
    """Where the images (and captions) come from and how they are cropped."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        help="a folder of images with metadata.jsonl / metadata.csv (file_name + "
        "caption column) or sidecar .txt captions; a save_to_disk folder; any "
        "local dataset folder; or a Hub dataset id",
    )
    g.add_argument(
        "--image-column",
        default=None,
        help="column with the images (default: 'file_name' in a folder's metadata, "
        "'image' in a datasets dataset)",
    )
    if captions:
        g.add_argument(
            "--caption-column", default="text", help="column with the captions (default: text)"
        )
    g.add_argument("--split", default="train", help="dataset split (default: train)")
    g.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="training image side: the short side is resized to it, then a square "
        "is cropped (default: 512)",
    )
    g.add_argument(
        "--no-resize",
        action="store_true",
        help="crop --resolution squares at the images' own scale instead of resizing first",
    )
    crop = g.add_mutually_exclusive_group()
    crop.add_argument(
        "--center-crop",
        dest="crop",
        action="store_const",
        const="center",
        help="crop the centre square (default)",
    )
    crop.add_argument(
        "--random-crop",
        dest="crop",
        action="store_const",
        const="random",
        help="crop a random square, drawn from the seed",
    )
    g.add_argument(
        "--random-flip",
        action="store_true",
        help="mirror half the images (off by default: flipping breaks captions that "
        "say left or right)",
    )
    g.add_argument(
        "--strict", action="store_true", help="stop on an unreadable image instead of skipping it"
    )
    g.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="data loading worker processes (default: 0, in the main process)",
    )
    parser.set_defaults(crop="center")


def add_bucket_args(parser: argparse.ArgumentParser) -> None:
    """Aspect-ratio buckets (train/buckets.py)."""
    g = parser.add_argument_group("aspect-ratio buckets")
    g.add_argument(
        "--buckets",
        action="store_true",
        help="resize each image to the nearest in aspect ratio of a set of shapes of about "
        "--resolution² pixels (trimming only the small difference in aspect ratio) instead of "
        "cropping a square; each batch comes from one bucket, every image once per epoch",
    )
    g.add_argument(
        "--bucket-multiple",
        type=int,
        default=None,
        help="bucket sides are multiples of this (default: the model's size multiple, 64 for "
        "Stable Diffusion)",
    )
    g.add_argument(
        "--bucket-max-ratio",
        type=float,
        default=2.0,
        help="the most elongated bucket, long side : short side (default: 2.0)",
    )


def add_lora_and_cache_args(parser: argparse.ArgumentParser) -> None:
    """LoRA instead of full fine-tuning (train/lora.py); the encoder cache (train/cache.py)."""
    g = parser.add_argument_group("LoRA")
    g.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="train rank-N LoRA factors of the U-Net's attention projections (and the text "
        "encoder's, with --train-text-encoder) instead of all weights; the result is "
        "pytorch_lora_weights.safetensors (default: off, full fine-tuning)",
    )
    g.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="LoRA alpha: the update is scaled by alpha / rank (default: the rank)",
    )
    g = parser.add_argument_group("encoder cache")
    g.add_argument(
        "--cache-latents",
        action="store_true",
        help="keep the autoencoder's posterior of each image (and crop) on disk: later epochs "
        "skip decoding and encoding; results are unchanged (with --random-crop / --random-flip "
        "each epoch draws new crops, which are encoded again)",
    )
    g.add_argument(
        "--cache-text",
        action="store_true",
        help="keep each caption's text-encoder output on disk (not with --train-text-encoder)",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="the cache folder, shareable between runs (default: OUTPUT/cache)",
    )


def add_run_args(parser: argparse.ArgumentParser, max_steps: int, lr: float) -> None:
    """Optimisation, precision, checkpoints and logging."""
    g = parser.add_argument_group("optimisation")
    g.add_argument(
        "--output",
        required=True,
        help="output folder: the trained model, checkpoints/, validation/, logs/",
    )
    g.add_argument(
        "--max-steps",
        type=int,
        default=max_steps,
        help=f"optimizer steps to train for (default: {max_steps})",
    )
    g.add_argument(
        "--batch-size", type=int, default=1, help="images per micro-batch and process (default: 1)"
    )
    g.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="micro-batches per optimizer step (default: 1)",
    )
    g.add_argument("--learning-rate", type=float, default=lr, help=f"AdamW LR (default: {lr})")
    g.add_argument(
        "--lr-scheduler",
        choices=("constant", "cosine", "linear"),
        default="constant",
        help="LR decay after warm-up (default: constant)",
    )
    g.add_argument(
        "--lr-warmup-steps", type=int, default=0, help="linear LR warm-up steps (default: 0)"
    )
    g.add_argument(
        "--adam-weight-decay", type=float, default=1e-2, help="AdamW weight decay (default: 0.01)"
    )
    g.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default: 1.0)"
    )
    g.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="autocast precision through accelerate (default: no)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights, data order, crops and noise (default: 0)",
    )
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="write a checkpoint every N steps (and at the end) (default: 500)",
    )
    g.add_argument(
        "--checkpoints-total-limit",
        type=int,
        default=None,
        help="keep only the newest N checkpoints (default: all)",
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="latest|PATH",
        help="continue from the newest checkpoint in --output, or from a "
        "checkpoint folder: model, optimizer, LR schedule, EMA, RNG and data "
        "position are restored exactly",
    )
    g.add_argument(
        "--report-to",
        choices=("none", "csv", "tensorboard"),
        default="none",
        help="metrics logger: logs/metrics.csv or TensorBoard (default: none)",
    )
    g.add_argument(
        "--log-every", type=int, default=10, help="log averaged metrics every N steps (default: 10)"
    )
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def data_config(args: argparse.Namespace):
    from train.data import DataConfig

    return DataConfig(
        data=args.data,
        image_column=args.image_column,
        caption_column=getattr(args, "caption_column", "text"),
        split=args.split,
        resolution=args.resolution,
        crop=args.crop,
        random_flip=args.random_flip,
        resize=not args.no_resize,
        strict=args.strict,
        num_workers=args.num_workers,
        buckets=getattr(args, "buckets", False),
        bucket_multiple=getattr(args, "bucket_multiple", None),
        bucket_max_ratio=getattr(args, "bucket_max_ratio", 2.0),
    )


def run_config(args: argparse.Namespace):
    from train.loop import RunConfig

    return RunConfig(
        output=args.output,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        adam_weight_decay=args.adam_weight_decay,
        max_grad_norm=args.max_grad_norm,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every,
        checkpoints_total_limit=args.checkpoints_total_limit,
        resume=args.resume,
        seed=args.seed,
        report_to=args.report_to,
        log_every=args.log_every,
        progress=not args.no_progress,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm train",
        description="Train the U-Net (and optionally the text encoder) of a text-to-image model "
        "on captioned images; the autoencoder stays frozen. The result is a diffusers "
        "pipeline folder (EMA weights when --ema-decay is set).",
    )
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        help=f"the pipeline to fine-tune (folder, .safetensors/.ckpt file or Hub id); "
        f"{SCRATCH_HELP}",
    )
    g.add_argument(
        "--vae",
        default=None,
        help="autoencoder folder (from `ldm train-vae`); required from scratch, "
        "replaces the pipeline's otherwise",
    )
    g.add_argument(
        "--text-encoder",
        default=None,
        help="from scratch: a CLIP text_encoder folder (from `ldm train-text`) instead of a "
        "fresh one; its width must be the preset's cross-attention width",
    )
    g.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        default=None,
        help="what the U-Net predicts (default: the model's own; epsilon from scratch)",
    )
    g.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="train the text encoder too (default: frozen)",
    )
    g.add_argument(
        "--text-encoder-learning-rate",
        type=float,
        default=None,
        help="with --train-text-encoder: the text encoder's AdamW LR, on the same schedule "
        "(default: --learning-rate)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, ~30%% slower",
    )
    g = parser.add_argument_group("objective")
    g.add_argument(
        "--snr-gamma",
        type=float,
        default=None,
        help="min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5 (default: off)",
    )
    g.add_argument(
        "--offset-noise",
        type=float,
        default=0.0,
        help="offset noise strength, e.g. 0.1 (default: 0)",
    )
    g.add_argument(
        "--zero-terminal-snr",
        action="store_true",
        help="rescale the noise schedule so the last step is pure noise (Lin et al. 2023) and "
        "sample from it ('trailing' steps); needs --prediction-type v_prediction",
    )
    g.add_argument(
        "--caption-dropout",
        type=float,
        default=0.0,
        help="probability of training on the empty caption, which classifier-free "
        "guidance needs, e.g. 0.1 (default: 0)",
    )
    g.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="keep an EMA of the weights with this decay, e.g. 0.9999; the EMA "
        "weights are saved (default: off)",
    )
    g.add_argument(
        "--grounding-weight",
        type=float,
        default=0.0,
        help="for data sets made by train.shapes: add a loss, this weighted, that makes each "
        "object's pixels attend to that object's colour and shape words (train/grounding.py; "
        "default: 0, off)",
    )
    g.add_argument(
        "--grounding-t-max",
        type=int,
        default=800,
        help="the grounding and segmentation losses count for timesteps below this (default: 800)",
    )
    g.add_argument(
        "--segmentation-weight",
        type=float,
        default=0.0,
        help="for data sets made by train.shapes: add a loss, this weighted, in which a 1x1 "
        "convolution on the U-Net's last feature map names each latent pixel's object shape "
        "and colour (train/segmentation.py; default: 0, off)",
    )
    add_data_args(parser)
    add_bucket_args(parser)
    add_lora_and_cache_args(parser)
    add_run_args(parser, max_steps=1000, lr=1e-5)
    g = parser.add_argument_group("validation")
    g.add_argument(
        "--validation-prompt",
        action="append",
        default=[],
        metavar="PROMPT",
        help="render this prompt at fixed seeds into validation/step-N.png (repeatable)",
    )
    g.add_argument(
        "--validation-every",
        type=int,
        default=500,
        help="render the validation prompts every N steps (default: 500)",
    )
    g.add_argument(
        "--validation-images",
        type=int,
        default=2,
        help="images per prompt, seeds 0..N-1 (default: 2)",
    )
    g.add_argument(
        "--validation-steps",
        type=int,
        default=25,
        help="sampler steps per validation image (default: 25)",
    )
    g.add_argument(
        "--validation-guidance",
        type=float,
        default=5.0,
        help="guidance scale of the validation images (default: 5.0)",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        default=None,
        help="upload the trained pipeline and its model card to this Hub repo (token: "
        "HF_TOKEN or the saved login)",
    )
    return parser


def setup_logging() -> None:
    """INFO on the main process (rank 0 under accelerate launch / torchrun), warnings elsewhere."""
    main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_cli(prog: str, fn) -> int:
    """Run fn(); clear errors become one line on stderr and a non-zero exit status."""
    try:
        fn()
    except FloatingPointError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`ldm train`: parse the arguments and train; returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging()

    def train_from_args():
        from train.loop import TrainConfig, train

        config = TrainConfig(
            model=args.model,
            data=data_config(args),
            run=run_config(args),
            vae=args.vae,
            text_encoder=args.text_encoder,
            prediction_type=args.prediction_type,
            snr_gamma=args.snr_gamma,
            offset_noise=args.offset_noise,
            zero_terminal_snr=args.zero_terminal_snr,
            caption_dropout=args.caption_dropout,
            ema_decay=args.ema_decay,
            train_text_encoder=args.train_text_encoder,
            text_encoder_learning_rate=args.text_encoder_learning_rate,
            gradient_checkpointing=args.gradient_checkpointing,
            validation_prompts=tuple(args.validation_prompt),
            validation_every=args.validation_every,
            validation_images=args.validation_images,
            validation_steps=args.validation_steps,
            validation_guidance=args.validation_guidance,
            push_to_hub=args.push_to_hub,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            cache_latents=args.cache_latents,
            cache_text=args.cache_text,
            cache_dir=args.cache_dir,
            grounding_weight=args.grounding_weight,
            grounding_t_max=args.grounding_t_max,
            segmentation_weight=args.segmentation_weight,
        )
        train(config)

    return run_cli("ldm train", train_from_args)


if __name__ == "__main__":
    sys.exit(main())
