"""Synthetic captioned shapes: the data set the embedded default model is trained on.

Each image is a plain muted background with one or two flat coloured shapes; each caption says
what is there in varied wording ("a red circle to the left of a blue square"). A scene is a
`SceneSpec`; the same type, with unmentioned attributes left as None, is the structured form of
a caption, so the evaluator can score a prompt without parsing free text.

Geometry is in unit coordinates (0..1 of the image side), so any image size renders the same
scene. Some colour-shape pairs and some two-object colour pairings never appear in the "train"
split; the "heldout" split and `heldout_prompts` contain only scenes with at least one of them.

The folder written by `make_dataset` follows the `datasets` imagefolder convention: PNG files and
a metadata.jsonl whose rows hold "file_name", "text", and the extra fields "spec" (what the
caption says) and "scene" (everything needed to re-render the image).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

# Saturated object colours, pairwise >= 94 apart in RGB, and muted backgrounds >= 105 from
# every object colour, so a pixel's nearest palette entry is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (250, 220, 40),
    "purple": (150, 45, 195),
    "orange": (245, 130, 15),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (200, 185, 160),
    "slate": (85, 100, 120),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.19, "large": 0.34}  # bounding-box side / image side
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
# objects[0] <relation> objects[1]; the value is where objects[0] and objects[1] sit.
RELATIONS: dict[str, tuple[str, str]] = {
    "left_of": ("left", "right"),
    "right_of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
SPLITS = ("train", "heldout")

# Held out of "train": these (colour, shape) pairs anywhere, and these colours together in a
# two-object scene. Each colour and shape still appears often in training.
HELDOUT_PAIRS = frozenset(
    {("purple", "circle"), ("orange", "square"), ("white", "triangle"), ("yellow", "cross")}
)
HELDOUT_COLOR_PAIRINGS = frozenset(
    {frozenset({"blue", "yellow"}), frozenset({"red", "white"}), frozenset({"green", "purple"})}
)

# P(the second object copies the first: "two red circles", which teaches counting); with the
# colours and shapes that coincide anyway and the train split's rejections, 30% of the train
# split's two-object scenes have one colour twice
SAME_KIND = 0.15
JITTER = 0.04  # max centre offset from the nominal grid position, unit coordinates
SIZE_JITTER = 0.1  # relative extent jitter; small and large stay far apart
SUPERSAMPLE = 4  # 4x4 point samples per pixel: antialiased edges with 17 coverage levels


@dataclass(frozen=True)
class ObjectSpec:
    """One shape; None means "not specified" (a caption may leave attributes out)."""

    color: str | None
    shape: str | None
    size: str | None = None
    position: str | None = None
    center: tuple[float, float] | None = None  # exact (x, y) centre, unit coordinates
    extent: float | None = None  # exact bounding-box side, unit coordinates


@dataclass(frozen=True)
class SceneSpec:
    """A scene or a caption's claims: objects, objects[0]-to-objects[1] relation, background."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None


def spec_to_dict(spec: SceneSpec) -> dict:
    """JSON-ready dict of a SceneSpec."""
    return asdict(spec)


def spec_from_dict(d: dict) -> SceneSpec:
    """Inverse of spec_to_dict."""
    objects = []
    for o in d["objects"]:
        center = tuple(o["center"]) if o.get("center") is not None else None
        objects.append(ObjectSpec(**{**o, "center": center}))
    return SceneSpec(tuple(objects), d.get("relation"), d.get("background"))


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")


def is_heldout(scene: SceneSpec) -> bool:
    """Whether the scene contains a combination that the train split never shows."""
    if any((o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects):
        return True
    colors = frozenset(o.color for o in scene.objects)
    return len(scene.objects) == 2 and colors in HELDOUT_COLOR_PAIRINGS


def _sample_object(rng: np.random.Generator, position: str, like: ObjectSpec | None) -> ObjectSpec:
    size = str(rng.choice(list(SIZES)))
    color = like.color if like else str(rng.choice(list(COLORS)))
    shape = like.shape if like else str(rng.choice(SHAPES))
    nx, ny = POSITIONS[position]
    dx, dy = rng.uniform(-JITTER, JITTER, size=2)
    extent = SIZES[size] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    return ObjectSpec(color, shape, size, position, (nx + dx, ny + dy), extent)


def _sample_any(rng: np.random.Generator, n_objects: int | None) -> SceneSpec:
    n = n_objects if n_objects is not None else int(rng.choice([1, 2], p=[0.45, 0.55]))
    background = str(rng.choice(list(BACKGROUNDS)))
    if n == 1:
        obj = _sample_object(rng, str(rng.choice(list(POSITIONS))), None)
        return SceneSpec((obj,), None, background)
    # Two objects always sit on opposite grid cells of one axis: at most 0.34 wide plus jitter
    # they never overlap, and the relation between them is unambiguous.
    relation = str(rng.choice(list(RELATIONS)))
    pos_a, pos_b = RELATIONS[relation]
    a = _sample_object(rng, pos_a, None)
    same_kind = rng.random() < SAME_KIND
    b = _sample_object(rng, pos_b, a if same_kind else None)
    return SceneSpec((a, b), relation, background)


def sample_scene(
    rng: np.random.Generator, n_objects: int | None = None, split: str | None = None
) -> SceneSpec:
    """A random concrete scene; "train" excludes held-out combinations, "heldout" needs one."""
    _check_split(split)
    if n_objects not in (None, 1, 2):
        raise ValueError(f"n_objects must be 1, 2 or None, got {n_objects!r}")
    for _ in range(10_000):
        scene = _sample_any(rng, n_objects)
        if split is None or is_heldout(scene) == (split == "heldout"):
            return scene
    raise RuntimeError("could not sample a scene for this split")  # pragma: no cover


def _inside(shape: str, x: np.ndarray, y: np.ndarray, box) -> np.ndarray:
    """Whether points (x, y) lie inside the shape that fills box = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    in_box = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    if shape == "square":
        return in_box
    if shape == "circle":
        return ((x - x0) / w - 0.5) ** 2 + ((y - y0) / h - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return in_box & (np.abs(x - x0 - w / 2) <= (y - y0) / h * w / 2)
    if shape == "cross":  # a plus sign, arms one third of the box wide
        u, v = (x - x0) / w, (y - y0) / h
        return in_box & (((u >= 1 / 3) & (u < 2 / 3)) | ((v >= 1 / 3) & (v < 2 / 3)))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def coverage(
    shape: str, box, height: int, width: int, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Fraction of each pixel covered by the shape in box (pixel units), an (H, W) array."""
    # Exact point-in-shape tests at supersample^2 points per pixel, averaged: the same
    # antialiasing for the renderer and for the detector's templates.
    ys = (np.arange(height * supersample) + 0.5) / supersample
    xs = (np.arange(width * supersample) + 0.5) / supersample
    inside = _inside(shape, xs[None, :], ys[:, None], box)
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


def _require(obj: ObjectSpec) -> None:
    for field in ("color", "shape", "size", "position"):
        if getattr(obj, field) is None:
            raise ValueError(f"render needs a concrete scene: object {field} is None in {obj}")
    if obj.color not in COLORS:
        raise ValueError(f"color must be one of {list(COLORS)}, got {obj.color!r}")


def render(scene: SceneSpec, size: int = 64) -> Image.Image:
    """Render a concrete scene to an RGB image of side `size`, antialiased by supersampling."""
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {scene.background!r}")
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        _require(obj)
        cx, cy = obj.center if obj.center is not None else POSITIONS[obj.position]
        half = (obj.extent if obj.extent is not None else SIZES[obj.size]) * size / 2
        box = (cx * size - half, cy * size - half, cx * size + half, cy * size + half)
        alpha = coverage(obj.shape, box, size, size)[..., None]
        img = img * (1 - alpha) + np.asarray(COLORS[obj.color], dtype=np.float64) * alpha
    return Image.fromarray(np.round(img).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- captions
_POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "center": ("in the center", "in the middle", "in the center of the image"),
}
_RELATION_PHRASES = {
    "left_of": ("to the left of", "left of", "on the left of"),
    "right_of": ("to the right of", "right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
_SINGLE = ("a {o}", "an image of a {o}", "a picture of a {o}", "there is a {o}", "{o}", "one {o}")
_SINGLE_POS = ("a {o} {p}", "there is a {o} {p}", "{p} there is a {o}", "a picture of a {o} {p}")


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _articles(text: str) -> str:
    """The article each next word needs: "a orange" -> "an orange", "an green" -> "a green"."""
    return re.sub(r"\b([Aa])n? (?=(\w))", lambda m: m[1] + ("n " if m[2] in "aeiou" else " "), text)


def _phrase(obj: ObjectSpec, with_size: bool) -> tuple[str, ObjectSpec]:
    size = obj.size if with_size else None
    words = [w for w in (size, obj.color, obj.shape) if w]
    return " ".join(words), ObjectSpec(obj.color, obj.shape, size)


def describe(scene: SceneSpec, rng: np.random.Generator) -> tuple[str, SceneSpec]:
    """A caption for a concrete scene, and the spec of exactly what that caption says."""
    objs = scene.objects
    sized = [bool(rng.random() < 0.5) for _ in objs]
    bg = scene.background if rng.random() < 0.15 else None
    if len(objs) == 1:
        text, obj = _phrase(objs[0], sized[0])
        if rng.random() < 0.6:
            obj = replace(obj, position=objs[0].position)
            pos = _pick(rng, _POSITION_PHRASES[objs[0].position])
            text = _pick(rng, _SINGLE_POS).format(o=text, p=pos)
        else:
            text = _pick(rng, _SINGLE).format(o=text)
        spec = SceneSpec((obj,), None, bg)
    else:
        text, spec = _describe_pair(scene, rng, sized)
        spec = replace(spec, background=bg)
    if bg is not None:
        text += f" on a {bg} background"
    return _articles(text), spec


def _describe_pair(scene: SceneSpec, rng, sized: list[bool]) -> tuple[str, SceneSpec]:
    a, b = scene.objects
    if (a.color, a.shape) == (b.color, b.shape) and rng.random() < 0.7:
        same_size = a.size == b.size and sized[0]
        pa, oa = _phrase(a, same_size)
        plural = pa + ("es" if pa.endswith("cross") else "s")
        return _pick(rng, ("two {o}", "there are two {o}")).format(o=plural), SceneSpec((oa, oa))
    (pa, oa), (pb, ob) = _phrase(a, sized[0]), _phrase(b, sized[1])
    kind = rng.random()
    if kind < 0.6:  # relation
        rel = _pick(rng, _RELATION_PHRASES[scene.relation])
        lead = _pick(rng, ("a {a} {r} a {b}", "there is a {a} {r} a {b}"))
        return lead.format(a=pa, r=rel, b=pb), SceneSpec((oa, ob), scene.relation)
    if kind < 0.8:  # each object's own position
        qa = _pick(rng, _POSITION_PHRASES[a.position])
        qb = _pick(rng, _POSITION_PHRASES[b.position])
        spec = SceneSpec((replace(oa, position=a.position), replace(ob, position=b.position)))
        return f"a {pa} {qa} and a {pb} {qb}", spec
    if rng.random() < 0.5:  # plain conjunction, either order
        return f"a {pa} and a {pb}", SceneSpec((oa, ob))
    return f"a {pb} and a {pa}", SceneSpec((ob, oa))


def caption(scene: SceneSpec, rng: np.random.Generator) -> str:
    """A caption for a concrete scene, in one of the project's templates."""
    return describe(scene, rng)[0]


# ---------------------------------------------------------------- parsing
_SYNONYMS = {
    "grey": "gray",
    "centre": "center",
    "middle": "center",
    "big": "large",
    "tiny": "small",
    "little": "small",
    "violet": "purple",
    "dot": "circle",
    "dots": "circles",
    "disc": "circle",
    "discs": "circles",
    "disk": "circle",
    "disks": "circles",
    "plus": "cross",
}
_SIZE_RE = "|".join(SIZES)
_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_OBJECT = re.compile(rf"\b(?:({_SIZE_RE}) )?(?:({_COLOR_RE}) )?({_SHAPE_RE})(?:es|s)?\b")
_TWO = re.compile(rf"\btwo (?:({_SIZE_RE}) )?(?:({_COLOR_RE}) )?({_SHAPE_RE})(?:es|s)\b")
_POSITION = re.compile(r"\b(?:on|at|in|near|to) the (left|right|top|bottom|center)\b")
# A relation word counts only when the second object follows it directly ("left of a square"),
# so "on the left of the image and a square" stays a position.
_RELATION = re.compile(
    r"\b(?:(left|right) of|(above|over|below|under|beneath|underneath))(?: the| a| an| one)? *$"
)
_BACKGROUND = re.compile(
    rf"\b(?:on|with|against) (?:a|an|the) ({'|'.join(BACKGROUNDS)}) background\b"
)
_RELATION_WORDS = {"left": "left_of", "right": "right_of", "above": "above", "over": "above"}


def _normalise(text: str) -> str:
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return " ".join(_SYNONYMS.get(w, w) for w in words)


def _object(m: re.Match, position: str | None = None) -> ObjectSpec:
    return ObjectSpec(m.group(2), m.group(3), m.group(1), position)


def _position(text: str) -> str | None:
    m = _POSITION.search(text)
    return m.group(1) if m else None


def parse_caption(text: str) -> SceneSpec | None:
    """The structured claims of a prompt in the project's templates, or None if not understood."""
    t = _normalise(text)
    background = None
    m = _BACKGROUND.search(t)
    if m:
        background, t = m.group(1), t[: m.start()] + t[m.end() :]
    two = _TWO.search(t)
    if two:
        rest = t[: two.start()] + " " + t[two.end() :]
        if _OBJECT.search(rest):
            return None  # three or more objects: outside the templates
        obj = _object(two)
        return SceneSpec((obj, obj), None, background)
    found = list(_OBJECT.finditer(t))
    if len(found) == 1:
        (m,) = found
        obj = _object(m, _position(t[: m.start()] + " " + t[m.end() :]))
        return SceneSpec((obj,), None, background)
    if len(found) != 2:
        return None
    a, b = found
    between, relation = t[a.end() : b.start()], None
    r = _RELATION.search(between)
    if r:
        word = r.group(1) or r.group(2)
        relation = _RELATION_WORDS.get(word, "below")
        between = between[: r.start()]
    objects = (_object(a, _position(between)), _object(b, _position(t[b.end() :])))
    return SceneSpec(objects, relation, background)


# ---------------------------------------------------------------- data set
def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One stream per image: any image can be regenerated alone, and splits never share streams.
    return np.random.default_rng([seed, SPLITS.index(split), index])


def make_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    size: int = 64,
    split: str = "train",
    progress: bool = False,
) -> Path:
    """Write n captioned images and metadata.jsonl (imagefolder layout) to out_dir.

    Args:
        out_dir: folder to create; it must be empty or absent.
        n: number of images.
        seed: the same seed, size and split give byte-identical files.
        size: image side in pixels (>= 32).
        split: "train" (no held-out combinations) or "heldout" (each image has one).
        progress: show a tqdm bar.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out_dir must be empty or absent: {out} has files")
    out.mkdir(parents=True, exist_ok=True)
    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"shapes/{split}", unit="img")
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i in indices:
            rng = _scene_rng(seed, split, i)
            scene = sample_scene(rng, split=split)
            text, spec = describe(scene, rng)
            name = f"{i:06d}.png"
            render(scene, size).save(out / name, format="PNG")
            row = {"file_name": name, "text": text}
            row |= {"spec": spec_to_dict(spec), "scene": spec_to_dict(scene)}
            f.write(json.dumps(row) + "\n")
    return out


def read_metadata(folder: str | Path) -> list[dict]:
    """The rows of a make_dataset folder's metadata.jsonl, specs as SceneSpec."""
    rows = []
    with open(Path(folder) / "metadata.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for key in ("spec", "scene"):
                if key in row:
                    row[key] = spec_from_dict(row[key])
            rows.append(row)
    return rows


def heldout_prompts(n: int, seed: int = 0) -> list[tuple[str, SceneSpec]]:
    """n (caption, spec) pairs, each naming a combination that the train split never shows."""
    rng = np.random.default_rng([seed, 1000 + SPLITS.index("heldout")])
    prompts = []
    for _ in range(n):
        prompts.append(describe(sample_scene(rng, split="heldout"), rng))
    return prompts


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m train.shapes OUT --n 20000 --seed 0 [--size 64] [--split train|heldout]."""
    parser = argparse.ArgumentParser(description="Write the synthetic captioned shapes data set.")
    parser.add_argument("out", type=Path, help="output folder (must be empty or absent)")
    parser.add_argument("--n", type=int, default=20000, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--split", choices=SPLITS, default="train")
    args = parser.parse_args(argv)
    make_dataset(args.out, args.n, args.seed, args.size, args.split, progress=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
