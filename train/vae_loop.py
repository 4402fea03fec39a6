"""Training the KL autoencoder from scratch (Rombach et al. 2022, App. G), for models made here.

One optimizer step, over `gradient_accumulation_steps` micro-batches:

    z ~ q(z | x), x_rec = D(z)                          a posterior sample, from the run's generator
    L_G = rec(x, x_rec) + kl_weight KL(q || N(0, I)) [+ lambda disc_weight (-D_patch(x_rec))]
    L_D = hinge(D_patch(x), D_patch(x_rec))             only from disc_start on

(autoencoder/losses.py holds the terms). The patch discriminator is not wrapped in DDP, since it
runs several times per step; its gradients are averaged across processes by hand.

At the end the latents' scale is measured, scaling_factor = 1 / std(z) over a few batches, so
the diffusion model sees unit-variance latents, and the folder is written in the diffusers
layout (config.json + diffusion_pytorch_model.safetensors, _class_name AutoencoderKL).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image

from autoencoder import AUTOENCODER_PRESETS, AutoencoderKL, AutoencoderLoss, AutoencoderLossConfig
from train.checkpoint import read_checkpoint, write_checkpoint
from train.data import DataConfig, load_dataset, make_loader
from train.run import (
    RunConfig,
    batches,
    check_finite,
    load_vae_folder,
    log_grid,
    make_accelerator,
    make_optimizer,
    progress_bar,
    save_grid,
    training_generator,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VaeTrainConfig:
    """`ldm train-vae`: the architecture, the loss weights, and the run."""

    data: DataConfig
    run: RunConfig
    model: str = "preset:small"  # "preset:NAME" of AUTOENCODER_PRESETS, or a vae folder to go on
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    disc_learning_rate: float | None = None  # None: the run's learning rate
    scaling_factor: float | None = None  # None: measured as 1 / std of the latents at the end
    # fine-tune only the decoder of an existing autoencoder: its latents (and any U-Net trained
    # on them) stay valid, as Stable Diffusion's ft-MSE decoder was made
    decoder_only: bool = False
    scale_batches: int = 16  # batches used to measure that std
    validation_every: int = 500
    validation_images: int = 4  # originals (top row) and reconstructions (bottom row)


def build_autoencoder(cfg: VaeTrainConfig) -> AutoencoderKL:
    """A fresh autoencoder from a preset (seeded), or an existing vae folder to train further."""
    name = cfg.model.removeprefix("preset:")
    if cfg.model.startswith("preset:") or (name in AUTOENCODER_PRESETS and not Path(name).exists()):
        if name not in AUTOENCODER_PRESETS:
            raise ValueError(
                f"--model preset:{name}: unknown autoencoder preset; choose one of "
                f"{', '.join(AUTOENCODER_PRESETS)}"
            )
        torch.manual_seed(cfg.run.seed)  # the same initial weights in every process
        config = replace(AUTOENCODER_PRESETS[name], sample_size=cfg.data.resolution)
        return AutoencoderKL(config)
    return load_vae_folder(cfg.model)


def average_gradients(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """All-reduce (mean) the gradients of a module that DDP does not wrap."""
    if accelerator.num_processes == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= accelerator.num_processes


@torch.no_grad()
def measure_scaling_factor(
    vae: AutoencoderKL, dataset, cfg: VaeTrainConfig, accelerator: Accelerator
) -> float:
    """1 / std of posterior samples over `scale_batches` batches (all processes together)."""
    loader = iter(
        make_loader(
            dataset,
            cfg.run.batch_size,
            cfg.run.seed + 1,
            accelerator.process_index,
            accelerator.num_processes,
        )
    )
    generator = torch.Generator(accelerator.device).manual_seed(cfg.run.seed)
    samples = []
    for _ in range(cfg.scale_batches):
        pixels = next(loader)["pixels"].to(accelerator.device)
        samples.append(vae.encode(pixels).sample(generator).float().flatten())
    z = accelerator.gather(torch.cat(samples))
    return float(1.0 / z.std())


@torch.no_grad()
def reconstruction_grid(vae: AutoencoderKL, pixels: torch.Tensor, path: Path):
    """Originals over reconstructions (posterior mode) as a PNG grid; returns (grid, PSNR in dB)."""
    rec = vae(pixels.to(vae.device, vae.dtype))[0].float().clamp(-1, 1).cpu()
    mse = ((rec - pixels) / 2).pow(2).mean(dim=(1, 2, 3))  # in [0, 1] units
    psnr = (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).mean().item()
    images = [_to_pil(x) for x in torch.cat([pixels, rec])]
    return save_grid(images, pixels.shape[0], path), psnr


def _to_pil(x: torch.Tensor) -> Image.Image:
    array = ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return Image.fromarray(array)


def train_vae(cfg: VaeTrainConfig) -> Path:
    """Train per `cfg`; returns the output folder, a diffusers AutoencoderKL folder."""
    from pipelines.loading import save_module

    run = cfg.run
    config = asdict(cfg)
    accelerator = make_accelerator(run, "ldm-train-vae", config)
    device, output = accelerator.device, Path(run.output)

    # ---- data, models, optimizers ----
    dataset = load_dataset(cfg.data, run.seed, captions=False)
    vae = build_autoencoder(cfg).to(device).train().requires_grad_(True)
    if cfg.decoder_only:
        if cfg.model.startswith("preset:"):
            raise ValueError(
                "--decoder-only fine-tunes an existing autoencoder: give --model a "
                "vae folder, not a preset"
            )
        vae.encoder.requires_grad_(False)
        if getattr(vae, "quant_conv", None) is not None:
            vae.quant_conv.requires_grad_(False)
    loss_fn = AutoencoderLoss(cfg.loss, vae.config.in_channels).to(device)
    disc = loss_fn.discriminator
    opt_g, sched_g = make_optimizer([p for p in vae.parameters() if p.requires_grad], run)
    disc_run = replace(run, learning_rate=cfg.disc_learning_rate or run.learning_rate)
    opt_d, sched_d = make_optimizer(list(disc.parameters()), disc_run)
    wrapped, opt_g, opt_d = accelerator.prepare(vae, opt_g, opt_d)
    last_layer = vae.decoder.conv_out.weight  # where the adaptive GAN weight is measured

    generator = training_generator(accelerator, run.seed)
    step = 0
    restored = read_checkpoint(accelerator, run.output, run.resume, generator, config)
    if restored is not None:
        tensors, state = restored
        vae.load_state_dict(tensors["vae"])
        disc.load_state_dict(tensors["discriminator"])
        for obj, key in (
            (opt_g, "optimizer"),
            (opt_d, "disc_optimizer"),
            (sched_g, "lr_scheduler"),
            (sched_d, "disc_lr_scheduler"),
        ):
            obj.load_state_dict(state[key])
        step = state["step"]

    def checkpoint(at: int) -> None:
        tensors = {"vae": vae.state_dict(), "discriminator": disc.state_dict()}
        state = {
            "optimizer": opt_g.state_dict(),
            "disc_optimizer": opt_d.state_dict(),
            "lr_scheduler": sched_g.state_dict(),
            "disc_lr_scheduler": sched_d.state_dict(),
            "config": config,
        }
        write_checkpoint(
            accelerator, run.output, at, tensors, state, generator, run.checkpoints_total_limit
        )

    shown = torch.stack(
        [dataset[(i % len(dataset), 0)]["pixels"] for i in range(cfg.validation_images)]
    )

    def validate(at: int) -> None:
        if not accelerator.is_main_process:
            return
        vae.eval()
        grid, psnr = reconstruction_grid(vae, shown, output / "validation" / f"step-{at:08d}.png")
        vae.train()
        accelerator.log({"val_psnr": psnr}, step=at)
        log_grid(accelerator, "reconstructions", grid, at)

    # ---- the loop ----
    accum = run.gradient_accumulation_steps
    loader = batches(dataset, run, accelerator, step)
    sums: dict[str, float] = {}
    logged_n, tick = 0, time.perf_counter()
    bar = progress_bar(run, accelerator, step, "training autoencoder")
    while step < run.max_steps:
        disc_on = loss_fn.disc_active(step)
        pairs = []
        # 1. the autoencoder: reconstruction + KL (+ adversarial) loss
        disc.requires_grad_(False)
        for micro in range(accum):
            pixels = next(loader)["pixels"].to(device)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(wrapped)
            with sync, accelerator.autocast():
                x_rec, posterior = wrapped(pixels, sample_posterior=True, generator=generator)
                loss, g_logs = loss_fn.generator_loss(
                    pixels, x_rec.float(), posterior, step, last_layer if disc_on else None
                )
                check_finite(accelerator.gather(loss.detach().reshape(1)).cpu(), step)
                accelerator.backward(loss / accum)
            pairs.append((pixels, x_rec.detach()))
            for k, v in g_logs.items():
                sums[k] = sums.get(k, 0.0) + accelerator.reduce(v.float(), "mean").item()
        accelerator.clip_grad_norm_(vae.parameters(), run.max_grad_norm)
        opt_g.step()
        sched_g.step()
        opt_g.zero_grad(set_to_none=True)

        # 2. the patch discriminator, on the same images and their detached reconstructions
        disc.requires_grad_(True)
        if disc_on:
            for pixels, x_rec in pairs:
                with accelerator.autocast():
                    d_loss, logs = loss_fn.discriminator_loss(pixels, x_rec.float(), step)
                accelerator.backward(d_loss / accum)
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + accelerator.reduce(v.float(), "mean").item()
            average_gradients(disc, accelerator)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            sched_d.step()  # the discriminator's schedule counts its own steps
        step += 1
        logged_n += accum
        bar.update()
        bar.set_postfix(rec=f"{g_logs['rec'].item():.4g}")

        if step % run.log_every == 0 or step == run.max_steps:
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            out = {k: v / logged_n for k, v in sums.items()}
            out |= {
                "lr": sched_g.get_last_lr()[0],
                "samples_per_second": logged_n
                * run.batch_size
                * accelerator.num_processes
                / elapsed,
            }
            accelerator.log(out, step=step)
            sums, logged_n = {}, 0
        if step % run.checkpoint_every == 0 or step == run.max_steps:
            checkpoint(step)
        if step % cfg.validation_every == 0 or step == run.max_steps:
            validate(step)
    bar.close()

    # ---- the result: the autoencoder folder, with its measured latent scale ----
    vae.eval()
    if cfg.decoder_only:  # the encoder is unchanged, and so is the latents' scale
        scale = cfg.scaling_factor or vae.config.scaling_factor
    else:
        scale = cfg.scaling_factor or measure_scaling_factor(vae, dataset, cfg, accelerator)
    if accelerator.is_main_process:
        vae.config = replace(vae.config, scaling_factor=scale)
        save_module(output, "AutoencoderKL", vae.config.to_diffusers(), vae)
        logger.info("saved the autoencoder to %s (scaling_factor %.5f)", output, scale)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output
