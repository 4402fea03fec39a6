"""`ldm train-vae`: train the KL autoencoder that a from-scratch model (`ldm train --vae`) uses.

    ldm train-vae --data ./shapes --output ./vae --resolution 64 --max-steps 20000
    ldm train --model preset:small --vae ./vae --data ./shapes --output ./model

Captions are not needed: any folder of images, or a dataset's image column, will do.
"""

from __future__ import annotations

import argparse
import sys

from train.cli import add_data_args, add_run_args, data_config, run_cli, run_config, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm train-vae",
        description="Train a KL autoencoder (reconstruction + KL, optionally a patch "
        "discriminator after a warm-up) and save it as a diffusers AutoencoderKL "
        "folder whose scaling_factor is measured on the data.",
    )
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default="preset:small",
        help="'preset:NAME' (tiny, small, sd) to start from scratch, or an autoencoder "
        "folder to train further (default: preset:small)",
    )
    g.add_argument(
        "--pixel-loss", choices=("l1", "l2"), default="l1", help="reconstruction loss (default: l1)"
    )
    g.add_argument(
        "--kl-weight",
        type=float,
        default=1e-6,
        help="weight of the KL term (default: 1e-6, as latent diffusion's KL-f8)",
    )
    g.add_argument(
        "--disc-start",
        type=int,
        default=10_000,
        help="step at which the patch discriminator switches on (default: 10000)",
    )
    g.add_argument(
        "--disc-weight",
        type=float,
        default=0.5,
        help="weight of the adversarial loss; 0 turns the discriminator off (default: 0.5)",
    )
    g.add_argument(
        "--disc-learning-rate",
        type=float,
        default=None,
        help="discriminator LR (default: --learning-rate)",
    )
    g.add_argument(
        "--scaling-factor",
        type=float,
        default=None,
        help="latent scaling factor to save (default: measured, 1 / std of latents)",
    )
    g.add_argument(
        "--decoder-only",
        action="store_true",
        help="fine-tune only the decoder of the --model folder: the latents stay the same, so a "
        "U-Net trained on them keeps working (the scaling factor is kept)",
    )
    add_data_args(parser, captions=False)
    add_run_args(parser, max_steps=10_000, lr=4.5e-6)
    g = parser.add_argument_group("validation")
    g.add_argument(
        "--validation-every",
        type=int,
        default=500,
        help="save a reconstruction grid and log PSNR every N steps (default: 500)",
    )
    g.add_argument(
        "--validation-images",
        type=int,
        default=4,
        help="images in the reconstruction grid (default: 4)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`ldm train-vae`: parse the arguments and train; returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging()

    def train_from_args():
        from autoencoder import AutoencoderLossConfig
        from train.vae_loop import VaeTrainConfig, train_vae

        loss = AutoencoderLossConfig(
            pixel_loss=args.pixel_loss,
            kl_weight=args.kl_weight,
            disc_weight=args.disc_weight,
            disc_start=args.disc_start,
        )
        config = VaeTrainConfig(
            data=data_config(args),
            run=run_config(args),
            model=args.model,
            loss=loss,
            disc_learning_rate=args.disc_learning_rate,
            scaling_factor=args.scaling_factor,
            decoder_only=args.decoder_only,
            validation_every=args.validation_every,
            validation_images=args.validation_images,
        )
        train_vae(config)

    return run_cli("ldm train-vae", train_from_args)


if __name__ == "__main__":
    sys.exit(main())
