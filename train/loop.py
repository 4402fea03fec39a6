"""Training the U-Net (and optionally the text encoder) of a latent diffusion model with accelerate.

One optimizer step (Ho et al. 2020, Algorithm 1, in the autoencoder's latent space as in
Rombach et al. 2022, Eq. 2), repeated over `gradient_accumulation_steps` micro-batches:

    x0  = scaling_factor * z,  z ~ q(z | image)       frozen autoencoder, a posterior sample
    eps ~ N(0, I)  (+ offset_noise * per-channel constant)
    t   ~ U{0, ..., T-1}
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    loss = mean_b  w(t_b) * ||model(x_t, t, text(caption)) - target||^2 / numel
           target = eps, v or x0 (--prediction-type); w = min-SNR-gamma weights or 1
    captions are replaced by "" with probability caption_dropout (for classifier-free guidance)

All training randomness (posterior samples, noise, t, caption dropout) comes from one
torch.Generator per process whose state is checkpointed, and the data order is a function of
(seed, position) (train/data.py), so a resumed run is bitwise the uninterrupted one on CPU.

Options on top: LoRA instead of full fine-tuning (--lora-rank, train/lora.py: only the low-rank
factors are trained, checkpointed and saved, as pytorch_lora_weights.safetensors); a disk cache
of the posteriors and text contexts (--cache-latents / --cache-text, train/cache.py: the
posterior is cached, not a sample, so the draws above are unchanged); aspect-ratio buckets
(--buckets, train/buckets.py).

The model to train (a from-scratch preset or a pipeline) comes from train/model.py; the run
machinery shared with `ldm train-vae` (RunConfig, the accelerator and its trackers, the LR
schedule) is train/run.py; writing and restoring checkpoints is train/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.schedule import alphas_cumprod, min_snr_weight, offset_noise, q_sample, training_target
from pipelines.loading import Components
from train.cache import EncodingCache, batch_posterior, cached_contexts, fingerprint, warn_if_random
from train.checkpoint import load_checkpoint, read_checkpoint, write_checkpoint
from train.data import DataConfig, load_dataset, use_buckets
from train.ema import EMA
from train.model import bucket_multiple, load_components, scratch_preset_name
from train.run import (
    RunConfig,
    batches,
    check_finite,
    log_grid,
    make_accelerator,
    make_optimizer,
    progress_bar,
    save_grid,
    training_generator,
    training_layout,
)

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_BUCKETS = 4  # the loss is also logged per quarter of the timestep range


@dataclass(frozen=True)
class TrainConfig:
    """`ldm train`: what model to train on which data, and how."""

    model: str  # a pipeline folder / file / Hub id, or "preset:NAME" to start from scratch
    data: DataConfig
    run: RunConfig
    vae: str | None = None  # an autoencoder folder (from `ldm train-vae`)
    text_encoder: str | None = None  # from scratch: a text_encoder folder (`ldm train-text`)
    prediction_type: str | None = None  # None: the model's own (epsilon from scratch)
    snr_gamma: float | None = None
    offset_noise: float = 0.0
    zero_terminal_snr: bool = False  # rescale betas to alpha_bar_T = 0 (needs v-prediction)
    caption_dropout: float = 0.0
    ema_decay: float | None = None
    train_text_encoder: bool = False
    text_encoder_learning_rate: float | None = None  # None: the run's learning_rate
    gradient_checkpointing: bool = False
    validation_prompts: tuple[str, ...] = ()
    validation_every: int = 500
    validation_images: int = 2  # per prompt, seeds 0, 1, ...
    validation_steps: int = 25
    validation_guidance: float = 5.0
    save_sampler: str = "ddim"  # the scheduler written into a from-scratch model folder
    push_to_hub: str | None = None  # a Hub repo id to upload the result to
    lora_rank: int | None = None  # train LoRA factors of this rank instead of all weights
    lora_alpha: float | None = None  # LoRA's alpha (None: the rank, a scale of 1)
    cache_latents: bool = False  # cache the autoencoder's posteriors on disk
    cache_text: bool = False  # cache the text contexts on disk (frozen text encoder only)
    cache_dir: str | None = None  # None: <output>/cache
    grounding_weight: float = 0.0  # shapes data sets only: train/grounding.py's loss, weighted
    grounding_t_max: int = 800  # the grounding and segmentation losses count for t < this
    segmentation_weight: float = 0.0  # shapes data sets only: train/segmentation.py's loss

    def __post_init__(self):
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={self.prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}"
            )
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1]")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma={self.snr_gamma} must be > 0 (or unset)")
        if self.offset_noise < 0:
            raise ValueError(f"offset_noise={self.offset_noise} must be >= 0")
        for name in ("validation_every", "validation_images", "validation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in (0, 1) (or unset)")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 1 (or unset)")
        if self.lora_alpha is not None and (self.lora_rank is None or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha={self.lora_alpha} must be > 0 and needs lora_rank")
        if self.text_encoder_learning_rate is not None and (
            not self.train_text_encoder or self.text_encoder_learning_rate <= 0
        ):
            raise ValueError(
                f"text_encoder_learning_rate={self.text_encoder_learning_rate} must be > 0 and "
                "needs train_text_encoder (--train-text-encoder)"
            )
        if self.grounding_weight < 0 or self.grounding_t_max < 1:
            raise ValueError(
                f"grounding_weight={self.grounding_weight} must be >= 0 and "
                f"grounding_t_max={self.grounding_t_max} >= 1"
            )
        if self.segmentation_weight < 0:
            raise ValueError(f"segmentation_weight={self.segmentation_weight} must be >= 0")
        if self.segmentation_weight and self.lora_rank is not None:
            raise ValueError(
                "segmentation_weight with lora_rank: the segmentation head trains in full; "
                "drop one of them"
            )
        if self.grounding_weight and self.gradient_checkpointing:
            raise ValueError(
                "grounding_weight with gradient_checkpointing: the recomputed forward would "
                "record the attention twice; drop one of them"
            )
        if self.cache_text and self.train_text_encoder:
            raise ValueError(
                "cache_text with train_text_encoder: cached contexts are valid only while the "
                "text encoder is frozen; drop --cache-text or --train-text-encoder"
            )

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None


def encode_captions(text_encoder, model: torch.nn.Module, captions: list[str]) -> torch.Tensor:
    """Context (B, L, D) through `model`: the text model itself, or its DDP wrapper when trained."""
    batch = text_encoder.tokenize(captions, long_prompt="truncate", weighting=False)
    ids = batch.ids.to(text_encoder.device)
    masked = getattr(text_encoder.model.config, "use_attention_mask", False)
    mask = batch.mask.to(ids.device).long() if masked else None
    return model(ids, attention_mask=mask).last_hidden_state


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """x0 = scaling_factor * (z - shift), z a posterior sample (the mode if generator is None)."""
    # In the autoencoder's own dtype, outside autocast: SD's encoder overflows in float16.
    return posterior_latents(vae, vae.encode(pixels.to(vae.dtype)), generator)


def posterior_latents(vae, posterior, generator: torch.Generator | None) -> torch.Tensor:
    """x0 = scaling_factor * (z - shift) of a posterior sample (the mode if generator is None)."""
    z = posterior.mode() if generator is None else posterior.sample(generator)
    shift = vae.config.shift_factor or 0.0
    # The encoder may hand back either layout, a cached posterior is contiguous: the U-Net's
    # convolutions round differently on the two, so give it one always, the channels_last it
    # trains in (train.run.training_layout).
    x0 = (z.float() - shift) * vae.config.scaling_factor
    return x0.contiguous(memory_format=torch.channels_last)


def diffusion_loss(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    alpha_bar: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted mean loss, per-sample unweighted MSE) of Ho et al. 2020, Eq. 14."""
    x_t = q_sample(x0, eps, t, alpha_bar)
    target = training_target(x0, eps, t, alpha_bar, prediction_type)
    pred = unet(x_t, t, context)
    mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weight = 1.0 if snr_gamma is None else min_snr_weight(t, alpha_bar, snr_gamma, prediction_type)
    return (weight * mse).mean(), mse.detach()


@torch.no_grad()
def fixed_noise_loss(
    parts: Components, pixels: torch.Tensor, captions: list[str], seed: int = 0, repeats: int = 4
) -> float:
    """Mean loss on pairs at seeded t and noise: comparable between two models' weights."""
    generator = torch.Generator().manual_seed(seed)
    device = parts.unet.device
    x0 = encode_latents(parts.vae, pixels.to(device), None)
    context = encode_captions(parts.text_encoder, parts.text_encoder.model, captions)
    alpha_bar = alphas_cumprod(parts.schedule).to(device)
    T, total = parts.schedule.num_train_timesteps, 0.0
    for _ in range(repeats):
        t = torch.randint(0, T, (x0.shape[0],), generator=generator).to(device)
        eps = torch.randn(x0.shape, generator=generator).to(device)
        loss, _ = diffusion_loss(
            parts.unet,
            x0,
            eps,
            t,
            context.to(parts.unet.dtype),
            alpha_bar,
            parts.schedule.prediction_type,
            None,
        )
        total += loss.item()
    return total / repeats


def render_validation(parts: Components, cfg: TrainConfig, path: Path) -> Image.Image:
    """The validation prompts (rows) at fixed seeds (columns), saved as one PNG grid."""
    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline(
        parts.unet, parts.vae, parts.text_encoder, parts.schedule, parts.sampler
    )
    pipe.progress = False
    images = []
    for prompt in cfg.validation_prompts:
        for seed in range(cfg.validation_images):
            out = pipe(
                prompt,
                num_inference_steps=cfg.validation_steps,
                guidance_scale=cfg.validation_guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="pil",
            )
            images += out.images
    return save_grid(images, cfg.validation_images, path)


def _trained(parts: Components, cfg: TrainConfig) -> dict[str, torch.nn.Module]:
    modules = {"unet": parts.unet}
    if cfg.train_text_encoder:
        modules["text_encoder"] = parts.text_encoder.model
    return modules


def _named_parameters(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The trained parameters: all of each module's, or its LoRA factors."""
    return {f"{name}.{k}": p for name, m in modules.items() for k, p in m.named_parameters()
            if p.requires_grad}  # fmt: skip


def load_trained_weights(target, checkpoint: str | os.PathLike, ema: bool = True) -> list[str]:
    """Put a checkpoint's trained weights into target's modules, in place.

    target: a pipeline (or Components) made from the model the run trained, e.g. its --model
    folder. ema: the EMA shadows (what the run's final folder holds) when the run kept them,
    else the last trained weights. Returns the names of the modules loaded ("unet", and
    "text_encoder" when the run trained it). LoRA runs are refused: their checkpoints hold
    only the factors (load the saved LoRA file instead).
    """
    folder = Path(checkpoint)
    tensors, state = load_checkpoint(folder)
    if state["config"].get("lora_rank"):
        raise ValueError(f"checkpoint {folder} is from a LoRA run: load its LoRA weights instead")
    use_ema = ema and "ema" in tensors
    modules = {"unet": target.unet, "text_encoder": target.text_encoder.model}
    loaded = []
    for name, module in modules.items():
        if use_ema:
            n = len(name) + 1
            weights = {k[n:]: v for k, v in tensors["ema"].items() if k.startswith(f"{name}.")}
        else:
            weights = tensors.get(name, {})
        if not weights:
            continue
        # the EMA holds parameters only: buffers (position ids) keep the target's values
        result = module.load_state_dict(weights, strict=False)
        params = {k for k, _ in module.named_parameters()}
        missing = sorted(set(result.missing_keys) & params)
        if missing or result.unexpected_keys:
            raise ValueError(
                f"checkpoint {folder} does not match the target's {name}: missing {missing[:5]}, "
                f"unexpected {sorted(result.unexpected_keys)[:5]}"
            )
        loaded.append(name)
    return loaded


def _param_groups(named: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> list:
    """The optimizer's parameters: one group, or the text encoder's apart with its own LR."""
    if cfg.text_encoder_learning_rate is None:
        return list(named.values())
    text = [p for k, p in named.items() if k.startswith("text_encoder.")]
    rest = [p for k, p in named.items() if not k.startswith("text_encoder.")]
    return [{"params": rest}, {"params": text, "lr": cfg.text_encoder_learning_rate}]


def _caches(cfg: TrainConfig, parts: Components, dataset) -> EncodingCache | None:
    """Open the latent cache (given to the dataset) and return the text cache, as asked."""
    folder = Path(cfg.cache_dir or Path(cfg.run.output) / "cache")
    if cfg.cache_latents:
        warn_if_random(cfg.data.crop, cfg.data.random_flip)
        dataset.latent_cache = EncodingCache(folder, "latents", fingerprint(parts.vae)).open()
    if not cfg.cache_text:
        return None
    return EncodingCache(folder, "text", fingerprint(parts.text_encoder.model)).open()


def _bucket_names(T: int) -> list[str]:
    edges = [round(i * T / LOSS_BUCKETS) for i in range(LOSS_BUCKETS + 1)]
    return [f"loss_t{lo:04d}-{hi - 1:04d}" for lo, hi in zip(edges[:-1], edges[1:])]


def write_card(cfg: TrainConfig, output: Path, size: int) -> None:
    """The model card (README.md): training settings, data size and hash, the last grid."""
    from pipelines.model_card import dataset_hash, write_model_card

    data = Path(cfg.data.data)
    dataset = {"size": size, "description": f"captioned images from {data.name or data}"}
    if data.is_dir():
        dataset["content_hash"] = dataset_hash(data)
    grids = sorted((output / "validation").glob("step-*.png"))
    samples = (
        [(str(grids[-1].relative_to(output)), " | ".join(cfg.validation_prompts))]
        if grids
        else None
    )
    training = {k: v for k, v in asdict(cfg.run).items() if k not in ("output", "resume")}
    training |= {
        k: getattr(cfg, k)
        for k in (
            "prediction_type",
            "snr_gamma",
            "offset_noise",
            "caption_dropout",
            "ema_decay",
            "train_text_encoder",
        )
    }
    if cfg.lora:
        training |= {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha or cfg.lora_rank}
    base = None if scratch_preset_name(cfg.model) else cfg.model
    write_model_card(output, base_model=base, training=training, dataset=dataset, samples=samples,
                     kind="lora" if cfg.lora else "pipeline")  # fmt: skip


def train(cfg: TrainConfig) -> Path:
    """Train per `cfg`; returns the output folder, which holds the trained pipeline."""
    run = cfg.run
    config = asdict(cfg)
    accelerator = make_accelerator(run, "ldm-train", config)
    device, output = accelerator.device, Path(run.output)

    # ---- data, model, optimizer ----
    dataset = load_dataset(cfg.data, run.seed)  # first: bad data fails before a model loads
    parts = load_components(cfg)
    if cfg.data.buckets:
        use_buckets(dataset, bucket_multiple(cfg.data, parts))
    modules = _trained(parts, cfg)
    if cfg.segmentation_weight:  # its head trains and is checkpointed with the U-Net
        from train.segmentation import Segmentation, record_features

        channels = parts.unet.conv_norm_out.num_channels
        modules["segmentation"] = Segmentation(cfg.data.data, channels, cfg.grounding_t_max)
    parts.vae.to(device).eval().requires_grad_(False)
    parts.text_encoder.model.to(device).requires_grad_(cfg.train_text_encoder)
    parts.text_encoder.model.train(cfg.train_text_encoder)
    training_layout(parts.unet, device).train().requires_grad_(True)
    text_cache = _caches(cfg, parts, dataset)
    if cfg.lora:
        from train.lora import add_lora, load_lora_state, lora_state, save_lora

        lora_alpha = cfg.lora_alpha or cfg.lora_rank
        for name, module in modules.items():  # freezes the module, adds trainable factors
            add_lora(name, module, cfg.lora_rank, lora_alpha)
    if cfg.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            parts.text_encoder.model.gradient_checkpointing_enable()
    named = _named_parameters(modules)
    optimizer, lr_schedule = make_optimizer(_param_groups(named, cfg), run)
    ema = EMA(named, cfg.ema_decay) if cfg.ema_decay else None
    prepared = accelerator.prepare(*modules.values(), optimizer)
    wrapped = dict(zip(modules, prepared[:-1]))  # DDP wrappers in multi-process runs
    optimizer = prepared[-1]
    unet = wrapped["unet"]
    text_model = wrapped.get("text_encoder", parts.text_encoder.model)

    # ---- resume ----
    generator = training_generator(accelerator, run.seed)
    step = 0
    restored = read_checkpoint(accelerator, run.output, run.resume, generator, config)
    if restored is not None:
        tensors, state = restored
        for name, module in modules.items():
            if cfg.lora:
                load_lora_state(module, tensors[name])
            else:
                module.load_state_dict(tensors[name])
        if ema is not None:
            ema.load_state_dict(tensors["ema"], state["ema_updates"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_scheduler"])
        step = state["step"]

    def checkpoint(at: int) -> None:
        tensors = {name: lora_state(m) if cfg.lora else m.state_dict()
                   for name, m in modules.items()}  # fmt: skip
        state = {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_schedule.state_dict(),
            "config": config,
            "ema_updates": ema.num_updates if ema else 0,
        }
        if ema is not None:
            tensors["ema"] = ema.state_dict()
        write_checkpoint(
            accelerator, run.output, at, tensors, state, generator, run.checkpoints_total_limit
        )

    def validate(at: int) -> None:
        if not cfg.validation_prompts or not accelerator.is_main_process:
            return
        was = [m.training for m in modules.values()]
        for m in modules.values():
            m.eval()
        with ema.swapped() if ema else contextlib.nullcontext():
            grid = render_validation(parts, cfg, output / "validation" / f"step-{at:08d}.png")
        for m, mode in zip(modules.values(), was):
            m.train(mode)
        log_grid(accelerator, "validation", grid, at)

    grounding = None
    if cfg.grounding_weight:
        from train.grounding import Grounding, grounding_terms, record_cross_attention

        grounding = Grounding(cfg.data.data, parts.text_encoder.tokenizer, cfg.grounding_t_max)

        def tokenize_ids(texts: list[str]) -> torch.Tensor:  # the ids the text encoder reads
            return parts.text_encoder.tokenize(texts, long_prompt="truncate", weighting=False).ids

    g_sums, seg_sum = torch.zeros(2), torch.zeros(())
    segmentation = wrapped.get("segmentation")

    # ---- the loop ----
    accum = run.gradient_accumulation_steps
    loader = batches(dataset, run, accelerator, step)
    alpha_bar = alphas_cumprod(parts.schedule).to(device)
    T, prediction_type = parts.schedule.num_train_timesteps, parts.schedule.prediction_type
    buckets = _bucket_names(T)
    sums, counts = torch.zeros(LOSS_BUCKETS), torch.zeros(LOSS_BUCKETS)
    logged_loss, logged_n, tick = 0.0, 0, time.perf_counter()
    from_cache = items = logged_items = 0
    bar = progress_bar(run, accelerator, step, "training")
    while step < run.max_steps:
        for micro in range(accum):
            batch = next(loader)
            posterior = batch_posterior(parts.vae, batch, dataset.latent_cache, device)
            x0 = posterior_latents(parts.vae, posterior, generator)
            B = x0.shape[0]
            from_cache += sum(batch["cached"])
            items, logged_items = items + B, logged_items + B
            eps = offset_noise(x0, cfg.offset_noise, generator)
            t = torch.randint(0, T, (B,), generator=generator, device=generator.device).to(device)
            drop = torch.rand(B, generator=generator, device=generator.device) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
            last = micro == accum - 1
            with contextlib.ExitStack() as stack:
                if not last:  # gradients are all-reduced once, on the last micro-batch
                    for module in wrapped.values():
                        stack.enter_context(accelerator.no_sync(module))
                with accelerator.autocast():
                    with torch.set_grad_enabled(cfg.train_text_encoder):
                        encode = partial(encode_captions, parts.text_encoder, text_model)
                        context = (encode(captions) if text_cache is None else
                                   cached_contexts(text_cache, parts.text_encoder, captions,
                                                   encode))  # fmt: skip
                    files = (
                        [Path(dataset.records.images[i]).name for i in batch["index"]]
                        if grounding is not None or segmentation is not None
                        else []
                    )
                    if grounding is not None:  # attention is recorded for these samples only
                        targets = grounding.targets(files, captions, t, tokenize_ids)
                        rows = [b for b, target in enumerate(targets) if target]
                    with (record_cross_attention(parts.unet, rows) if grounding
                          else contextlib.nullcontext()) as probs, \
                         (record_features(parts.unet) if segmentation is not None
                          else contextlib.nullcontext()) as features:  # fmt: skip
                        loss, mse = diffusion_loss(
                            unet, x0, eps, t, context, alpha_bar, prediction_type, cfg.snr_gamma
                        )
                    total = loss
                    if segmentation is not None:
                        seg = segmentation(features[-1], files, captions, t)
                        if seg is not None:
                            total = total + cfg.segmentation_weight * seg
                            seg_sum += seg.detach().cpu()
                    if grounding is not None:
                        terms = grounding_terms(probs, targets)
                        if terms is not None:
                            total = total + cfg.grounding_weight * (terms[0] + terms[1])
                            g_sums += torch.stack(terms).detach().cpu()
                seen = accelerator.gather(
                    torch.stack([loss.detach().expand(B), mse, t.float()], 1)
                ).cpu()
                check_finite(seen[:, :2], step)
                accelerator.backward(total / accum)
            bucket = (seen[:, 2] * LOSS_BUCKETS / T).long().clamp(max=LOSS_BUCKETS - 1)
            sums.index_add_(0, bucket, seen[:, 1])
            counts.index_add_(0, bucket, torch.ones_like(seen[:, 1]))
            logged_loss, logged_n = logged_loss + seen[:, 0].mean().item(), logged_n + 1
        grad_norm = accelerator.clip_grad_norm_(list(named.values()), run.max_grad_norm)
        if accelerator.scaler is None:  # fp16's scaler skips inf steps itself
            check_finite(torch.as_tensor(grad_norm).reshape(1).cpu(), step, "gradient norm")
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{seen[:, 0].mean().item():.4f}")

        if step % run.log_every == 0 or step == run.max_steps:
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            logs = {
                "loss": logged_loss / logged_n,
                "lr": lr_schedule.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "samples_per_second": logged_items * accelerator.num_processes / elapsed,
            }
            logs |= {name: (s / c).item() for name, s, c in zip(buckets, sums, counts) if c > 0}
            if grounding is not None:  # means over the logged micro-batches
                logs |= {"grounding_own": g_sums[0].item() / logged_n,
                         "grounding_leak": g_sums[1].item() / logged_n}  # fmt: skip
                g_sums.zero_()
            if segmentation is not None:
                logs["segmentation"] = seg_sum.item() / logged_n
                seg_sum.zero_()
            accelerator.log(logs, step=step)
            sums.zero_(), counts.zero_()
            logged_loss, logged_n, logged_items = 0.0, 0, 0
        if step % run.checkpoint_every == 0 or step == run.max_steps:
            checkpoint(step)
        if step % cfg.validation_every == 0 or step == run.max_steps:
            validate(step)
    bar.close()
    if cfg.cache_latents:
        logger.info("latent cache: %d of %d items read from the cache", from_cache, items)

    # ---- the result: a pipeline folder or LoRA weights (EMA weights when EMA is on) ----
    if accelerator.is_main_process:
        from pipelines import TextToImagePipeline

        with ema.swapped() if ema else contextlib.nullcontext():
            if cfg.lora:
                save_lora(output, modules, cfg.lora_rank, lora_alpha)
            else:
                pipe = TextToImagePipeline(
                    parts.unet, parts.vae, parts.text_encoder, parts.schedule, parts.sampler
                )
                pipe.save_pretrained(output)
        write_card(cfg, output, len(dataset))
        logger.info("saved the trained %s to %s", "LoRA" if cfg.lora else "pipeline", output)
        if cfg.push_to_hub:
            from pipelines.hub import push_folder

            logger.info("pushed to %s", push_folder(output, cfg.push_to_hub))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output
