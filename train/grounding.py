"""A grounding loss for the shapes data set: each object's pixels read that object's words.

When a two-object image comes out with one object painted in the other's colour (or a mix of
the two), that object's pixels have read the other object's words, or the padding positions
that summarise the whole caption. The data set knows where every object is (train/shapes.py
writes each image's scene), so training can ask every cross-attention layer to read, over each
object's pixels, that object's own colour and shape words. Per layer, with a_k(p) the attention
of query pixel p to token k (softmax over tokens, mean over heads), m_j object j's coverage at
the layer's resolution and W_j the positions of its colour and shape words:

    own:   over object j's pixels (weighted by m_j), 1 - sum_{k in W_j} a_k(p), the attention
           that goes anywhere but the object's own words
    leak:  two objects only: over object j's pixels, the share of their attention to both
           objects' words that goes to the other object's words

    loss = mean over layers of (mean own + mean leak),

added to the diffusion loss with a weight (`ldm train --grounding-weight`). Only samples with
t < t_max count (at pure noise the model cannot know where an unplaced object will go), and only
captions that name each object once ("two red circles" has one phrase for two objects);
captions dropped by caption dropout give no terms. The leak term is TokenCompose's idea (Wang
et al. 2024) turned to the pixels' side: its word-side term (each word's attention on its
object) did not help here, the U-Net moved what it reads about the scene to the padding
(BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.attention import Attention
from train.shapes import COLORS, SHAPES, ObjectSpec, SceneSpec, coverage, spec_from_dict

Target = list[tuple[tuple[int, ...], ObjectSpec]]  # per object: its token positions, its scene


def read_scenes(folder: str | Path) -> dict[str, tuple[str, SceneSpec, SceneSpec]]:
    """file name -> (caption, caption's spec, scene) from a shapes data set's metadata.jsonl."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        raise ValueError(
            f"grounding needs a local data set folder made by train.shapes; {path} does not exist"
        )
    scenes = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "scene" not in row or "spec" not in row:
                raise ValueError(
                    f"grounding needs each row of {path} to carry its 'spec' and 'scene' (as "
                    f"train.shapes writes them); {row.get('file_name')!r} has "
                    f"{sorted(row)}"
                )
            scenes[row["file_name"]] = (
                row["text"],
                spec_from_dict(row["spec"]),
                spec_from_dict(row["scene"]),
            )
    return scenes


def word_token_ids(tokenizer) -> dict[str, int]:
    """The single token id of each colour and shape word."""
    ids = {}
    for word in (*COLORS, *SHAPES):
        found = tokenizer(word, add_special_tokens=False, verbose=False)["input_ids"]
        if len(found) != 1:
            raise ValueError(
                f"grounding needs {word!r} to be one token; the tokenizer gives {found}"
            )
        ids[word] = found[0]
    return ids


def object_targets(spec: SceneSpec, scene: SceneSpec, ids: list[int], words: dict[str, int]):
    """Per object of the caption: (its colour and shape token positions, its scene object), or
    None when the caption does not name each object once by colour and shape."""
    n = len(spec.objects)
    if n == 2 and spec.objects[0] == spec.objects[1]:
        return None  # "two red circles": one phrase for both
    colours = {words[c] for c in COLORS}
    shapes = {words[s] for s in SHAPES}
    colour_at = [p for p, i in enumerate(ids) if i in colours]
    shape_at = [p for p, i in enumerate(ids) if i in shapes]
    if len(colour_at) != n or len(shape_at) != n:
        return None
    targets, used = [], set()
    for obj, c, s in zip(spec.objects, colour_at, shape_at):  # objects in caption order
        if obj.color is None or obj.shape is None:
            return None
        if ids[c] != words[obj.color] or ids[s] != words[obj.shape]:
            return None
        match = [k for k, o in enumerate(scene.objects)
                 if (o.color, o.shape) == (obj.color, obj.shape) and k not in used]  # fmt: skip
        if not match:
            return None
        used.add(match[0])
        targets.append(((c, s), scene.objects[match[0]]))
    return targets


@lru_cache(maxsize=1 << 16)  # the same objects recur every epoch; callers only read it
def object_mask(obj: ObjectSpec, side: int) -> Tensor:
    """The object's coverage of a side x side grid over the image, flattened row-major."""
    half = obj.extent * side / 2
    cx, cy = obj.center[0] * side, obj.center[1] * side
    box = (cx - half, cy - half, cx + half, cy + half)
    return torch.from_numpy(coverage(obj.shape, box, side, side)).float().flatten()


def grounding_terms(
    probs: list[Tensor], targets: list[Target | None]
) -> tuple[Tensor, Tensor] | None:
    """(own term, leak term), each a mean over layers, for head-averaged attention `probs`
    [(B, L, Lc) per layer, L a square] and per-sample targets (None: no terms). A layer's
    probs may also hold only the samples with a target, in order (record_cross_attention's
    `rows`): (R, L, Lc), R the number of targets that are not None."""
    rows = [b for b, t in enumerate(targets) if t]
    if not rows:
        return None
    own_terms, leak_terms = [], []
    masks: dict[int, tuple[Tensor, Tensor]] = {}
    for a in probs:
        _, L, Lc = a.shape
        side = math.isqrt(L)
        if side * side != L:
            raise ValueError(f"probs: expected a square grid of queries, got {L}")
        if side not in masks:
            pixel = torch.zeros(len(rows), 2, L)  # per object: its mask
            owner = torch.zeros(len(rows), 2, Lc)  # per object: its words
            for i, b in enumerate(rows):
                for j, (tokens, obj) in enumerate(targets[b]):
                    pixel[i, j] = object_mask(obj, side)
                    owner[i, j, list(tokens)] = 1.0
            masks[side] = (pixel.to(a), owner.to(a))
        pixel, owner = masks[side]
        if a.shape[0] not in (len(rows), len(targets)):
            raise ValueError(
                f"probs: {a.shape[0]} samples, expected {len(targets)} (the batch) or "
                f"{len(rows)} (those with a target)"
            )
        if a.shape[0] != len(rows):
            a = a[rows]
        to_obj = torch.einsum("blk,bjk->bjl", a, owner)  # (R, 2, L): to object j's words
        area = pixel.sum(-1)  # (R, 2); 0 where a caption names one object
        named = area > 0
        own = ((1 - to_obj) * pixel).sum(-1) / area.clamp_min(1e-8)
        own_terms.append(own[named].mean())
        pair = named.all(-1)
        if pair.any():
            share = to_obj.flip(1) / (to_obj.sum(1, keepdim=True) + 1e-8)  # to the other's words
            leak = (share * pixel).sum(-1) / area.clamp_min(1e-8)
            leak_terms.append(leak[pair].mean())
    own = torch.stack(own_terms).mean()
    leak = torch.stack(leak_terms).mean() if leak_terms else own.new_zeros(())
    return own, leak


@contextmanager
def record_cross_attention(unet: nn.Module, rows: list[int] | None = None):
    """Yield a list that fills with each cross-attention layer's head-averaged softmax
    attention (B, L, Lc) during forward passes inside the block (the output is unchanged).
    With `rows`, only those samples' attention is computed: (len(rows), L, Lc) per layer (the
    samples that have a grounding target; the others' would be computed for nothing)."""
    probs: list[Tensor] = []

    def hook(module: Attention, args, kwargs, output):
        x = args[0]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        if context is None or rows == []:
            return
        if rows is not None:
            x, context = x[rows], context[rows]
        B, L, _ = x.shape
        q, k, _ = module._project(x, context)
        q = q.view(B, L, module.heads, -1).transpose(1, 2).float()
        k = k.view(B, context.shape[1], module.heads, -1).transpose(1, 2).float()
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs.append(scores.softmax(-1).mean(1))

    layers = [m for m in unet.modules() if isinstance(m, Attention) and not m.is_self_attention]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in layers]
    try:
        yield probs
    finally:
        for h in handles:
            h.remove()


class Grounding:
    """The grounding loss for one shapes data set folder: targets by image, cached."""

    def __init__(self, folder: str | Path, tokenizer, t_max: int):
        self.scenes = read_scenes(folder)
        self.words = word_token_ids(tokenizer)
        self.t_max = t_max
        self._targets: dict[tuple[str, str], Target | None] = {}

    def targets(self, files: list[str], captions: list[str], t: Tensor, tokenize) -> list:
        """Per sample: its Target, or None (dropped caption, t >= t_max, no one-phrase-per-object
        caption). `tokenize(captions)` gives each caption's ids as the model reads them; it is
        called only for images not seen before."""
        wanted = [bool(c) and int(t[b]) < self.t_max and name in self.scenes
                  for b, (name, c) in enumerate(zip(files, captions))]  # fmt: skip
        new = {(n, c) for n, c, w in zip(files, captions, wanted) if w} - self._targets.keys()
        if new:
            new = sorted(new)
            for (name, caption), ids in zip(new, tokenize([c for _, c in new])):
                text, spec, scene = self.scenes[name]
                found = None
                if text == caption:
                    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
                    found = object_targets(spec, scene, ids, self.words)
                self._targets[(name, caption)] = found
        return [self._targets[(n, c)] if w else None
                for n, c, w in zip(files, captions, wanted)]  # fmt: skip
