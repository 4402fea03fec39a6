"""GenEval-style scoring of generated shape images, and autoencoder reconstruction PSNR.

GenEval (Ghosh et al., 2023) scores a text-to-image model by detecting objects in its images
and checking each claim of the prompt. Our images are flat shapes on a plain background, so a
detector made of pixel rules suffices: the background is the median border colour; foreground
pixels are those nearer an object colour than the background; each 4-connected foreground blob
is an object, its colour the nearest palette entry to its core. From each pixel's coverage by
the object (its place between background and core colour) come the blob's area and centroid;
every candidate shape is drawn with that area and centroid, and the one with the highest soft
IoU names the shape and gives the object's box, hence its size and position, to sub-pixel
accuracy. Area and centroid survive blur, so soft generated images are measured fairly.

Scores are fractions of claims that hold, per attribute: colour, shape, size, position (an
object's own position or a relation between two objects), relation, count (exactly as many
objects as named), binding (a two-object prompt: exactly two objects, each with its colour-shape
pairing, the relation holding), overall (every claim of the prompt holds).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train.shapes import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    SceneSpec,
    coverage,
    parse_caption,
    read_metadata,
)

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)
_PALETTE_NAMES = list(COLORS)
MIN_CONTRAST = 30.0  # RGB distance from the background below which a pixel is background
MIN_AREA = 0.004  # blobs smaller than this fraction of the image are noise (16 px at 64x64)
# Small and large extents are 0.19 and 0.34 (+-10%); split at their geometric mean.
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])
CENTER_RADIUS = 0.125  # half-way between the centre cell and the side cells (0.25 away)
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}  # area / box
ATTRIBUTES = ("color", "shape", "size", "position")
METRICS = ("color", "shape", "size", "position", "relation", "count", "binding", "overall")


@dataclass(frozen=True)
class Detection:
    """One object found in an image; center and extent in unit coordinates."""

    color: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]
    extent: float  # side of the fitted shape's bounding box, unit coordinates
    bbox: tuple[int, int, int, int]  # the blob's pixels: (x0, y0, x1, y1), x1 and y1 exclusive
    area: int
    shape_iou: float


def _to_array(image, name: str = "images") -> np.ndarray:
    """One image as an (H, W, 3) float array in [0, 1] (float64 input stays float64)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image if image.dtype in (torch.float64, torch.uint8) else image.float()).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{name}: each image must be (H, W, 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)


def to_images(images, name: str = "images") -> list[np.ndarray]:
    """A PIL image, a list of images, or an (N, H, W, 3) array as (H, W, 3) floats in [0, 1]."""
    if isinstance(images, Image.Image):
        return [_to_array(images, name)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
        return [_to_array(images, name)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim != 4:
        raise ValueError(f"{name}: expected (N, H, W, 3) or (H, W, 3), got {tuple(images.shape)}")
    return [_to_array(im, name) for im in images]


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask (0 = background), by max propagation."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        grown = labels.copy()
        grown[1:] = np.maximum(grown[1:], labels[:-1])
        grown[:-1] = np.maximum(grown[:-1], labels[1:])
        grown[:, 1:] = np.maximum(grown[:, 1:], labels[:, :-1])
        grown[:, :-1] = np.maximum(grown[:, :-1], labels[:, 1:])
        grown *= mask
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a boolean mask by one pixel (4-neighbourhood)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _fit_box(shape: str, area: float, cx: float, cy: float) -> tuple[float, ...]:
    """The box of the shape with this area and centroid (pixel units)."""
    side = math.sqrt(area / FILL[shape])
    cy_box = cy - side / 6 if shape == "triangle" else cy  # a triangle's centroid is 2/3 down
    return (cx - side / 2, cy_box - side / 2, cx + side / 2, cy_box + side / 2)


def _classify_shape(alpha: np.ndarray) -> tuple[str, float, tuple[float, ...]]:
    """Best shape for a blob's coverage map, its soft IoU, and its fitted box (pixel units).

    Each candidate is drawn with the blob's area and centroid, which are exact from coverage
    at any alignment and survive blur, then compared by soft IoU sum(min) / sum(max).
    """
    h, w = alpha.shape
    area = float(alpha.sum())
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    on_x, on_y = xs[alpha > 0], ys[alpha > 0]
    best = (SHAPES[0], -1.0, (0.0, 0.0, 0.0, 0.0))
    for shape in SHAPES:
        box = _fit_box(shape, area, cx, cy)
        # Compare inside a window holding both the blob and the candidate.
        x0 = max(int(min(box[0], on_x.min())) - 1, 0)
        y0 = max(int(min(box[1], on_y.min())) - 1, 0)
        x1 = min(int(max(box[2], on_x.max())) + 2, w)
        y1 = min(int(max(box[3], on_y.max())) + 2, h)
        local = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
        t = coverage(shape, local, y1 - y0, x1 - x0)
        a = alpha[y0:y1, x0:x1]
        iou = float(np.minimum(a, t).sum() / np.maximum(a, t).sum())
        if iou > best[1]:
            best = (shape, iou, box)
    return best


def region(center: tuple[float, float]) -> str:
    """The named position ("center", "left", "right", "top", "bottom") of a unit-space point."""
    dx, dy = center[0] - 0.5, center[1] - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def relation_holds(relation: str, a: Detection, b: Detection) -> bool:
    """Whether `a <relation> b`, judged along the axis on which their centres differ most."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {list(RELATIONS)}, got {relation!r}")
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    horizontal = abs(dx) > abs(dy)
    holds = {
        "left_of": horizontal and dx > 0,
        "right_of": horizontal and dx < 0,
        "above": not horizontal and dy > 0,  # image y grows downwards
        "below": not horizontal and dy < 0,
    }
    return holds[relation]


def detect(image) -> list[Detection]:
    """Objects in one image (PIL, or (H, W, 3) uint8 / float in [0, 1]), left to right."""
    x = _to_array(image, "image") * 255.0
    h, w, _ = x.shape
    border = np.concatenate([x[:2], x[-2:], x[:, :2].swapaxes(0, 1), x[:, -2:].swapaxes(0, 1)])
    bg = np.median(border.reshape(-1, 3), axis=0)
    d_bg = np.linalg.norm(x - bg, axis=-1)
    d_obj = np.linalg.norm(x[:, :, None, :] - _PALETTE, axis=-1).min(axis=-1)
    # Antialiased edges blend object and background: a pixel is foreground once it is nearer
    # the object colours than the background, i.e. about half covered.
    labels = _components((d_bg > d_obj) & (d_bg > MIN_CONTRAST))
    found = []
    for label in np.unique(labels[labels > 0]):
        blob = labels == label
        if blob.sum() >= MIN_AREA * h * w:
            found.append(_describe_blob(x, bg, d_bg, labels, blob))
    return sorted(found, key=lambda d: (d.center[0], d.center[1]))


def _describe_blob(
    x: np.ndarray, bg: np.ndarray, d_bg: np.ndarray, labels: np.ndarray, blob: np.ndarray
) -> Detection:
    h, w, _ = x.shape
    # The colour comes from the blob's core (the half farthest from the background), where
    # no antialiasing blend reaches.
    strength = d_bg[blob]
    rgb = np.median(x[blob][strength >= np.median(strength)], axis=0)
    color = _PALETTE_NAMES[int(np.linalg.norm(_PALETTE - rgb, axis=-1).argmin())]
    # Coverage of each pixel by this object: its position between background and core colour.
    # The one-pixel rim catches the faint edge pixels the mask left out.
    direction = rgb - bg
    alpha = np.clip((x - bg) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    alpha *= _dilate(blob) & ((labels == 0) | blob)
    if alpha.sum() < 1.0:  # a core no brighter than its rim (only in odd generated images)
        alpha = blob.astype(np.float64)
    shape, iou, (bx0, by0, bx1, by1) = _classify_shape(alpha)
    extent = (bx1 - bx0) / w
    center = ((bx0 + bx1) / 2 / w, (by0 + by1) / 2 / h)
    size = "small" if extent < SIZE_THRESHOLD else "large"
    ys, xs = np.nonzero(blob)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Detection(color, shape, size, region(center), center, extent, bbox, int(blob.sum()), iou)


# ---------------------------------------------------------------- scoring
def _object_claims(obj, det: Detection | None) -> dict[str, bool]:
    """Each attribute the spec names for one object, and whether the matched detection has it."""
    claims = {}
    for attr in ATTRIBUTES:
        want = getattr(obj, attr)
        if want is not None:
            claims[attr] = det is not None and getattr(det, attr) == want
    return claims


def _claims(spec: SceneSpec, assigned: list[Detection | None]) -> dict[str, list[bool]]:
    claims: dict[str, list[bool]] = {m: [] for m in METRICS}
    for obj, det in zip(spec.objects, assigned):
        for attr, ok in _object_claims(obj, det).items():
            claims[attr].append(ok)
    if spec.relation is not None:
        a, b = assigned[0], assigned[1]
        ok = a is not None and b is not None and relation_holds(spec.relation, a, b)
        claims["relation"].append(ok)
        claims["position"].append(ok)  # a relation is a claim about positions too
    return claims


def _bound(spec: SceneSpec, dets: list[Detection]) -> bool:
    """Exactly two objects with the named colour-shape pairings, and the relation holding."""
    if len(dets) != 2:
        return False
    for a, b in permutations(dets):
        pairs_ok = all(
            (o.color is None or d.color == o.color) and (o.shape is None or d.shape == o.shape)
            for o, d in zip(spec.objects, (a, b))
        )
        if pairs_ok and (spec.relation is None or relation_holds(spec.relation, a, b)):
            return True
    return False


def assign(spec: SceneSpec, dets: list[Detection]) -> list[Detection | None]:
    """The detection matched to each object of `spec` (None: none left), the matching that
    satisfies the most claims."""
    n = len(spec.objects)
    best, best_total = None, -1
    for perm in permutations(range(len(dets)), min(n, len(dets))):
        assigned = [dets[i] for i in perm] + [None] * (n - len(perm))
        total = sum(sum(v) for v in _claims(spec, assigned).values())
        if total > best_total:
            best, best_total = assigned, total
    return best


def score_one(image, spec: SceneSpec) -> dict[str, list[bool]]:
    """Each claim of `spec` checked on one image, grouped by metric (empty list: no claim)."""
    n = len(spec.objects)
    if n not in (1, 2):
        raise ValueError(f"spec must name 1 or 2 objects, got {n}")
    if spec.relation is not None and (n != 2 or spec.relation not in RELATIONS):
        raise ValueError(f"spec.relation must be None or one of {list(RELATIONS)} with 2 objects")
    dets = detect(image)
    best = _claims(spec, assign(spec, dets))
    count_ok = len(dets) == n
    best["count"] = [count_ok]
    if n == 2:
        best["binding"] = [_bound(spec, dets)]
    best["overall"] = [all(all(v) for v in best.values())]
    return best


def score(images, specs: Sequence[SceneSpec]) -> dict[str, float]:
    """Accuracy per metric over images and their specs, plus n_<metric> claim counts."""
    images = to_images(images)
    if len(images) != len(specs):
        raise ValueError(f"specs: need one per image, got {len(specs)} for {len(images)} images")
    correct = dict.fromkeys(METRICS, 0)
    total = dict.fromkeys(METRICS, 0)
    for image, spec in zip(images, specs):
        for metric, oks in score_one(image, spec).items():
            correct[metric] += sum(oks)
            total[metric] += len(oks)
    result: dict[str, float] = {m: correct[m] / total[m] if total[m] else math.nan for m in METRICS}
    result |= {f"n_{m}": total[m] for m in METRICS}
    result["n_images"] = len(images)
    return result


def evaluate(
    generate: Callable[[list[str], list[int]], object],
    prompts_with_specs: Sequence[tuple[str, SceneSpec | None]],
    seeds: Sequence[int],
    batch_size: int = 16,
) -> dict[str, float]:
    """Generate one image per prompt and score it against the prompt's spec.

    Args:
        generate: generate(prompts, seeds) -> list of PIL images, or an (N, H, W, 3) float array
            in [0, 1], one image per prompt.
        prompts_with_specs: (prompt, spec) pairs; a None spec is parsed from the prompt.
        seeds: one seed per prompt.
        batch_size: prompts per generate call.
    """
    if len(seeds) != len(prompts_with_specs):
        raise ValueError(
            f"seeds: need one per prompt, got {len(seeds)} for {len(prompts_with_specs)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts, specs = [], []
    for prompt, spec in prompts_with_specs:
        spec = spec if spec is not None else parse_caption(prompt)
        if spec is None:
            raise ValueError(f"prompts_with_specs: cannot parse {prompt!r}; pass its SceneSpec")
        prompts.append(prompt)
        specs.append(spec)
    images: list[np.ndarray] = []
    for i in range(0, len(prompts), batch_size):
        batch = to_images(generate(prompts[i : i + batch_size], list(seeds[i : i + batch_size])))
        if len(batch) != len(prompts[i : i + batch_size]):
            raise ValueError(f"generate returned {len(batch)} images for {batch_size} prompts")
        images += batch
    return score(images, specs)


# ---------------------------------------------------------------- reconstruction
def psnr(a, b, data_range: float = 1.0) -> float:
    """Mean over images of 10 log10(data_range^2 / MSE); inf when every pair is identical."""
    xs, ys = to_images(a, "a"), to_images(b, "b")
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        raise ValueError("a and b must hold the same number of images of the same shapes")
    values = []
    for x, y in zip(xs, ys):
        mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
        values.append(math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse))
    return float(np.mean(values))


def load_folder(folder: str | Path, limit: int | None = None) -> tuple[np.ndarray, list[dict]]:
    """Images (N, H, W, 3) in [0, 1] and metadata rows of a make_dataset folder, in row order."""
    rows = read_metadata(folder)[:limit]
    images = [_to_array(Image.open(Path(folder) / r["file_name"])) for r in rows]
    return np.stack(images), rows


@torch.no_grad()
def reconstruction_psnr(
    encode_decode: Callable[[torch.Tensor], torch.Tensor],
    images,
    batch_size: int = 16,
    limit: int | None = None,
) -> float:
    """PSNR of encode_decode's reconstructions of images (arrays, PIL, or a dataset folder).

    encode_decode maps a float (N, 3, H, W) tensor in [-1, 1] (the autoencoder's own range) to
    its reconstruction of the same shape; the output is clamped to [-1, 1] before scoring.
    """
    if isinstance(images, (str, Path)):
        images = load_folder(images, limit)[0]
    originals = np.stack(to_images(images))[:limit]
    recon = []
    for i in range(0, len(originals), batch_size):
        x = torch.from_numpy(originals[i : i + batch_size]).permute(0, 3, 1, 2) * 2 - 1
        y = encode_decode(x)
        if tuple(y.shape) != tuple(x.shape):
            raise ValueError(f"encode_decode returned shape {tuple(y.shape)} for {tuple(x.shape)}")
        recon.append(((y.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
    return psnr(originals, np.concatenate(recon))


# ---------------------------------------------------------------- report
def format_report(result: dict[str, float]) -> str:
    """A markdown table of a score / evaluate result (and a "psnr" entry, if present)."""
    lines = ["| metric | value | claims |", "|---|---|---|"]
    for m in METRICS:
        if m in result:
            value = result[m]
            shown = "n/a" if math.isnan(value) else f"{100 * value:.1f}%"
            lines.append(f"| {m} | {shown} | {result.get(f'n_{m}', '')} |")
    if "psnr" in result:
        lines.append(f"| psnr | {result['psnr']:.2f} dB | {result.get('n_psnr', '')} |")
    if "n_images" in result:
        lines.append(f"| images | {result['n_images']} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: score a folder written by train.shapes against its stored specs."""
    parser = argparse.ArgumentParser(description="GenEval-style scores of a shapes image folder.")
    parser.add_argument("--images", type=Path, required=True, help="folder with metadata.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument(
        "--truth",
        action="store_true",
        help="score against the full scene, not the caption's claims",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    images, rows = load_folder(args.images, args.limit)
    result = score(images, [r["scene" if args.truth else "spec"] for r in rows])
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    print(format_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
