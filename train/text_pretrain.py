"""`ldm train-text`: pretrain a small CLIP-architecture text encoder contrastively on a captioned
image folder, to be used frozen (or as a start) by `ldm train --text-encoder`.

Why: trained only through the diffusion loss, a from-scratch text encoder learns what moves the
most pixels. A colour covers a whole object; circle against square is a few edge pixels, so its
outputs for "a red circle" and "a red square" stay close (measured on the shipped default model:
a shape swap moves the context a third as far as a colour swap) and the U-Net draws the shape it
saw most with that colour. A contrastive objective (CLIP, Radford et al. 2021) rewards every
word that tells two captions apart, whatever its area. With `hard_negatives` each caption also
competes with edited copies of itself (another shape, the two colours swapped, the relation
flipped), as in NegCLIP (Yuksekgonul et al. 2023), so exactly those words must be encoded.

The loss is the symmetric InfoNCE of CLIP over a batch, image -> text against the batch's
captions plus the hard negatives, text -> image against the batch's images, with a learnt
temperature. The image tower is a small strided CNN kept only for training; the saved folder
is a text_encoder/ folder (config.json + model.safetensors) that diffusers' layout expects.
The images are held in memory at --resolution (12 KB each at 64 px). On the 20,000-image
shapes dataset: 3,000 steps of batch 128 in 17 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.shapes import _articles  # an edit must not show itself by "a orange"

logger = logging.getLogger(__name__)

# word-level edits for the shapes dataset's captions (train/shapes.py's vocabulary)
SHAPE_WORDS = ("circle", "square", "triangle", "cross")
COLOR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
FLIPS = {"left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom",
         "bottom": "top"}  # fmt: skip
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPE_WORDS) + r")(es|s)?\b")
_COLOR_RE = re.compile(r"\b(" + "|".join(COLOR_WORDS) + r")\b")
_FLIP_RE = re.compile(r"\b(" + "|".join(FLIPS) + r")\b")


def _plural(shape: str) -> str:
    return shape + ("es" if shape == "cross" else "s")


def hard_negatives(caption: str, rng: np.random.Generator) -> list[str]:
    """Edited copies of a caption that no longer describe its image: one shape changed, the two
    colours swapped (or one colour changed), left/right (above/below, top/bottom) flipped.
    Edits that do not apply (no such word) are left out."""
    return [text for _, text in edits(caption, rng)]


def edits(caption: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """hard_negatives with the kind of each edit: "shape", "colour" or "flip"."""
    out = []
    shapes = list(_SHAPE_RE.finditer(caption))
    if shapes:
        m = shapes[rng.integers(len(shapes))]
        others = [s for s in SHAPE_WORDS if s != m.group(1)]
        other = others[rng.integers(len(others))]  # = rng.choice(others), without an array
        word = _plural(other) if m.group(2) else other
        out.append(("shape", caption[: m.start()] + word + caption[m.end() :]))
    colors = list(_COLOR_RE.finditer(caption))
    if len(colors) >= 2 and colors[0].group(1) != colors[1].group(1):
        a, b = colors[0], colors[1]
        swapped = (caption[: a.start()] + b.group(1) + caption[a.end() : b.start()] + a.group(1)
                   + caption[b.end() :])  # fmt: skip
        out.append(("colour", swapped))
    elif colors:
        m = colors[rng.integers(len(colors))]
        others = [c for c in COLOR_WORDS if c != m.group(1)]
        other = others[rng.integers(len(others))]
        out.append(("colour", caption[: m.start()] + other + caption[m.end() :]))
    if _FLIP_RE.search(caption):
        out.append(("flip", _FLIP_RE.sub(lambda m: FLIPS[m.group(1)], caption)))
    out = [(kind, _articles(text)) for kind, text in out]
    return [(kind, text) for kind, text in out if text != caption]


class ImageTower(nn.Module):
    """Strided 3x3 convolutions (side / 16) and a linear map of the whole grid, so that where
    a shape sits is kept: (B, 3, H, W) in [-1, 1] -> (B, dim)."""

    def __init__(self, dim: int, resolution: int, width: int = 16):
        super().__init__()
        if resolution % 16:
            raise ValueError(f"resolution={resolution} must be a multiple of 16")
        layers, c = [], 3
        for w in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, 2, 1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, 1, 1), nn.GroupNorm(8, w), nn.SiLU()]  # fmt: skip
            c = w
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c * (resolution // 16) ** 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x).flatten(1))


@dataclass
class PretrainConfig:
    data: str  # a captioned image folder (metadata.jsonl with file_name and text)
    output: str  # the text_encoder folder to write
    width: int = 64
    layers: int = 4
    heads: int = 4
    # positions, the length every prompt is padded to: a U-Net cross-attends to all of them,
    # so short captions train and sample faster at 32 than at CLIP's 77
    max_length: int = 77
    resolution: int = 64
    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 1e-3
    hard_negatives: bool = True
    pad_loss: float = 0.0  # weight of pad_loss (0 turns it off)
    pad_loss_batch: int = 32  # captions per step it is computed on
    seed: int = 0
    log_every: int = 100

    def __post_init__(self):
        for name in ("width", "layers", "heads", "resolution", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_length < 3:
            raise ValueError(f"max_length={self.max_length} must be >= 3 (BOS, a token, EOS)")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be a multiple of heads={self.heads}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if self.pad_loss < 0:
            raise ValueError(f"pad_loss={self.pad_loss} must be >= 0")
        if self.pad_loss_batch < 1:
            raise ValueError(f"pad_loss_batch={self.pad_loss_batch} must be >= 1")


def load_captioned(folder: str | Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """All images of a captioned folder as uint8 (N, 3, R, R), and their captions."""
    from PIL import Image

    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"data: {folder} has no metadata.jsonl (file_name, text)")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    images = np.stack([
        np.asarray(Image.open(folder / r["file_name"]).convert("RGB")
                   .resize((resolution, resolution), Image.BICUBIC))
        for r in rows
    ])  # fmt: skip
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [r["text"] for r in rows]


def build_text_encoder(cfg: PretrainConfig):
    """A fresh text encoder, as `ldm train --model preset:NAME` builds one."""
    from text_encoder import ClipTextEncoder, ClipTextModel
    from train.model import scratch_text_config

    config = scratch_text_config(cfg.width, cfg.layers, cfg.heads, max_length=cfg.max_length)
    return ClipTextEncoder(ClipTextModel(config))


def _embed_text(encoder, captions: list[str]) -> torch.Tensor:
    """Pooled (EOS) outputs. Attention is causal, so the positions after the last EOS cannot
    change them: the ids are cut there (captions of ~20 tokens, not 77)."""
    from text_encoder.clip_model import eos_positions

    model = encoder.model
    ids = encoder.tokenize(captions).ids
    ids = ids[:, : int(eos_positions(ids, model.config.eos_token_id).max()) + 1]
    return model(ids).pooler_output


def pad_loss(encoder, captions: list[str]) -> torch.Tensor:
    """Mean squared distance between the outputs at the padding positions (after the EOS) of
    each caption and those of the empty caption at the same positions.

    A U-Net cross-attends to all max_length outputs, and a causal encoder lets every padding
    position see the whole caption: left alone, the ~60 padding outputs become copies of a
    summary of the caption (the default model's U-Net puts 51-74% of its cross-attention
    there). Driving them to the empty caption's leaves the words to carry the caption. The hope
    was better colour-shape binding; on the shapes data it did not come (BENCHMARKS.md).
    """
    from text_encoder.clip_model import eos_positions

    model = encoder.model
    ids = encoder.tokenize([*captions, ""]).ids
    hidden = model(ids).last_hidden_state  # (N + 1, L, D)
    eos = eos_positions(ids[:-1], model.config.eos_token_id)
    after = torch.arange(ids.shape[1])[None, :] > eos[:, None]  # (N, L)
    diff = (hidden[:-1] - hidden[-1:]).pow(2).mean(-1)
    return (diff * after).sum() / after.sum().clamp(min=1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: img (B, D), txt (B + extra, D), row i of each a pair; the
    extra rows (hard negatives) count only as image -> text negatives."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    n = img.shape[0]
    logits = scale * img @ txt.T  # (B, B + extra)
    target = torch.arange(n)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].T, target)) / 2


@torch.no_grad()
def edit_accuracy(encoder, tower, images, captions, rng) -> dict[str, float]:
    """How often an image scores its caption above each kind of edited copy of it."""
    encoder.model.eval()
    tower.eval()
    wins: dict[str, list[bool]] = {"shape": [], "colour": [], "flip": []}
    for i in range(0, len(captions), 256):
        caps = captions[i : i + 256]
        img = F.normalize(tower(images[i : i + 256].float() / 127.5 - 1), dim=-1)
        pos = F.normalize(_embed_text(encoder, caps), dim=-1)
        for j, cap in enumerate(caps):
            edited = edits(cap, rng)
            if not edited:
                continue
            neg = F.normalize(_embed_text(encoder, [text for _, text in edited]), dim=-1)
            own = float(img[j] @ pos[j])
            for (kind, _), score in zip(edited, (neg @ img[j]).tolist()):
                wins[kind].append(own > score)
    encoder.model.train()
    tower.train()
    return {k: float(np.mean(v)) if v else math.nan for k, v in wins.items()}


def pretrain(cfg: PretrainConfig, heldout: str | None = None) -> dict:
    """Train; write the text encoder to cfg.output; return the held-out edit accuracies."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    images, captions = load_captioned(cfg.data, cfg.resolution)
    if cfg.batch_size > len(captions):  # a batch holds distinct images: each other's negatives
        raise ValueError(
            f"batch_size={cfg.batch_size} must be <= the {len(captions)} images in {cfg.data}"
        )
    encoder = build_text_encoder(cfg)
    tower = ImageTower(cfg.width, cfg.resolution)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*encoder.model.parameters(), *tower.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
    warmup = min(200, cfg.steps // 10 + 1)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    encoder.model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.from_numpy(rng.choice(len(captions), cfg.batch_size, replace=False))
        x = images[idx].float() / 127.5 - 1
        caps = [captions[i] for i in idx.tolist()]
        negs = [n for c in caps for n in hard_negatives(c, rng)] if cfg.hard_negatives else []
        txt = _embed_text(encoder, caps + negs)
        scale = log_scale.exp().clamp(max=100.0)
        loss = contrastive_loss(tower(x), txt, scale)
        pad = torch.zeros(())
        if cfg.pad_loss > 0:
            pad = pad_loss(encoder, caps[: cfg.pad_loss_batch])
            loss = loss + cfg.pad_loss * pad
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rate = (step + 1) / (time.perf_counter() - start)
            logger.info("step %d loss %.4f pad %.4f scale %.1f (%.2f steps/s)", step + 1,
                        loss.item(), pad.item(), scale.item(), rate)  # fmt: skip
    encoder.model.eval()
    out = Path(cfg.output)
    encoder.model.save_pretrained(out)
    result = {}
    if heldout is not None:
        h_images, h_captions = load_captioned(heldout, cfg.resolution)
        result = edit_accuracy(encoder, tower, h_images, h_captions, np.random.default_rng(1))
        (out / "pretrain_eval.json").write_text(json.dumps(result, indent=2) + "\n")
        logger.info("held-out edit accuracy: %s", result)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm train-text", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="captioned image folder (metadata.jsonl)")
    p.add_argument("--output", required=True, help="text_encoder folder to write")
    p.add_argument("--heldout", default=None, help="captioned folder to score edits on")
    for name, default in (("width", 64), ("layers", 4), ("heads", 4), ("resolution", 64),
                          ("max-length", 77), ("steps", 3000), ("batch-size", 128),
                          ("seed", 0)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--no-hard-negatives", action="store_true")
    p.add_argument(
        "--pad-loss",
        type=float,
        default=0.0,
        help="weight of the loss that makes the outputs after the EOS caption-free",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`ldm train-text`: parse the arguments and train; returns the exit status."""
    from train.cli import run_cli, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()

    def pretrain_from_args():
        cfg = PretrainConfig(
            data=args.data, output=args.output, width=args.width, layers=args.layers,
            heads=args.heads, max_length=args.max_length, resolution=args.resolution,
            steps=args.steps,
            batch_size=args.batch_size, learning_rate=args.learning_rate,
            hard_negatives=not args.no_hard_negatives, pad_loss=args.pad_loss, seed=args.seed,
        )  # fmt: skip
        pretrain(cfg, args.heldout)

    return run_cli("ldm train-text", pretrain_from_args)


if __name__ == "__main__":
    raise SystemExit(main())
