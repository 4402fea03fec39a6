"""The run shared by `ldm train` and `ldm train-vae`: its config, accelerator and trackers.

RunConfig holds what any training run needs (optimisation, precision, checkpointing, logging);
the helpers below turn it into an Accelerator with its trackers (CSV or TensorBoard), AdamW with
a warm-up-then-decay LR schedule, the per-process training generator, the data iterator and the
progress bar of a (resumed) run, and the validation image grids. Writing and restoring
checkpoints is train/checkpoint.py; the loops themselves are train/loop.py (the U-Net) and
train/vae_loop.py (the autoencoder).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration
from PIL import Image
from tqdm.auto import tqdm

from train.data import make_loader

LR_SCHEDULERS = ("constant", "cosine", "linear")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("none", "csv", "tensorboard")


@dataclass(frozen=True)
class RunConfig:
    """Optimisation, precision, checkpointing and logging of one training run."""

    output: str
    max_steps: int = 1000
    batch_size: int = 1  # per process and micro-batch
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = None
    resume: str | None = None  # "latest" or a checkpoint folder
    seed: int = 0
    report_to: str = "none"
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        for name, allowed in (
            ("lr_scheduler", LR_SCHEDULERS),
            ("report_to", REPORT_TO),
            ("mixed_precision", MIXED_PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        for name in (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "checkpoint_every",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit={self.checkpoints_total_limit} must be >= 1")
        if self.lr_warmup_steps < 0 or self.learning_rate <= 0:
            raise ValueError("lr_warmup_steps must be >= 0 and learning_rate > 0")


class CSVTracker(GeneralTracker):
    """An accelerate tracker writing logs/metrics.csv rows (step, name, value)."""

    name = "csv"
    requires_logging_directory = True

    def __init__(self, logging_dir: Path):
        super().__init__()
        self.folder = Path(logging_dir)

    @property
    def tracker(self) -> Path:
        return self.folder / "metrics.csv"

    def store_init_configuration(self, values: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.json").write_text(json.dumps(values, indent=2, default=str) + "\n")

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        new = not self.tracker.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.tracker, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "name", "value"])
            writer.writerows([step, k, float(v)] for k, v in values.items())


def make_accelerator(run: RunConfig, project: str, config: dict) -> Accelerator:
    """The Accelerator for a run: precision, trackers (with the run's config), output folders."""
    if run.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    log_with: list = []
    logs = Path(run.output) / "logs"
    if run.report_to == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise ValueError(
                "--report-to tensorboard: the tensorboard package is not installed "
                "(pip install tensorboard), or use --report-to csv"
            )
        log_with.append("tensorboard")
    elif run.report_to == "csv":
        log_with.append(CSVTracker(logs))
    # Several processes and no GPU (torchrun, or `accelerate launch --multi_gpu` on CPUs): ask
    # accelerate for CPU training explicitly, or every process would run alone and all of
    # them would write the same files.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=run.mixed_precision,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=run.output, logging_dir=str(logs)),
    )
    flat = {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in _flatten(config).items()
    }
    accelerator.init_trackers(project, config=flat)
    return accelerator


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def lr_lambda(kind: str, warmup: int, total: int):
    """LR multiplier per optimizer step: linear warm-up, then constant, cosine or linear decay."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def training_layout(unet: torch.nn.Module, device) -> torch.nn.Module:
    """The U-Net on `device` in channels_last (NHWC) memory, as `ldm train` trains it: the layout
    tensor-core convolutions use, and quicker with oneDNN on CPU too (a shapes2 step ~5%, and
    more with fewer attention FLOPs); state dicts are saved contiguous all the same."""
    return unet.to(device, memory_format=torch.channels_last)


def make_optimizer(params: list, run: RunConfig):
    """AdamW and its LR schedule (a LambdaLR stepped once per optimizer step). `params`: tensors,
    or param groups (dicts; a group's own "lr" follows the same schedule, as a factor)."""
    # The fused kernel updates every tensor in one pass (one thread-pool dispatch on CPU, one
    # launch on CUDA): the same AdamW, ~5-9% of a small U-Net's CPU training step saved.
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in tensors)
    optimizer = torch.optim.AdamW(
        params,
        lr=run.learning_rate,
        betas=(run.adam_beta1, run.adam_beta2),
        weight_decay=run.adam_weight_decay,
        eps=run.adam_epsilon,
        fused=fused or None,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(run.lr_scheduler, run.lr_warmup_steps, run.max_steps)
    )
    return optimizer, schedule


def training_generator(accelerator: Accelerator, seed: int) -> torch.Generator:
    """This process's generator for noise, timesteps and dropout: distinct per process."""
    state = np.random.SeedSequence([seed, accelerator.process_index]).generate_state(1)[0]
    return torch.Generator(accelerator.device).manual_seed(int(state))


def check_finite(values: torch.Tensor, step: int, what: str = "loss") -> None:
    """Stop the run on a NaN / inf loss (values are gathered, so every process stops)."""
    if not torch.isfinite(values).all():
        raise FloatingPointError(
            f"the {what} became {values[~torch.isfinite(values)][0].item()} at step {step + 1}; "
            "stopping. The last checkpoint written (if any) is intact; resume from it with a lower "
            "--learning-rate, --mixed-precision bf16 or no, or a smaller --max-grad-norm"
        )


def batches(dataset, run: RunConfig, accelerator: Accelerator, step: int) -> Iterator[dict]:
    """This process's micro-batches from optimizer step `step` on (a resumed run goes on)."""
    start = step * run.gradient_accumulation_steps
    return iter(
        make_loader(
            dataset,
            run.batch_size,
            run.seed,
            accelerator.process_index,
            accelerator.num_processes,
            start=start,
        )
    )


def progress_bar(run: RunConfig, accelerator: Accelerator, step: int, desc: str) -> tqdm:
    """The run's progress bar from `step` on, shown by the local main process (if asked)."""
    return tqdm(
        total=run.max_steps,
        initial=step,
        desc=desc,
        dynamic_ncols=True,
        disable=not (run.progress and accelerator.is_local_main_process),
    )


def save_grid(images: list[Image.Image], columns: int, path: Path) -> Image.Image:
    """Paste images (all one size) into a grid, row by row, and save it as PNG."""
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def log_grid(accelerator: Accelerator, name: str, grid: Image.Image, step: int) -> None:
    """Send an image to the trackers that take images (TensorBoard); the PNG is on disk anyway."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(grid)[None]}, step, dataformats="NHWC")


def load_vae_folder(path: str):
    """An autoencoder from a vae folder or a pipeline folder holding vae/."""
    from pipelines.loading import load_vae

    folder = Path(path).expanduser()
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--vae: {folder} is not an autoencoder folder (no config.json); "
            "train one with `ldm train-vae`"
        )
    return load_vae(folder)
