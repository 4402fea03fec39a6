"""Captioned image data for training: folders, `datasets` datasets, and a resumable batch order.

Where the data can come from (`DataConfig.data`):

    a folder of images + metadata.jsonl / metadata.csv   the `datasets` imagefolder convention:
                                                         rows with file_name + a caption column
    a folder of images + sidecar .txt files              cat.png + cat.txt
    a folder written by Dataset.save_to_disk             read with datasets.load_from_disk
    another local folder or a Hub id                     read with datasets.load_dataset

Every image is checked once before training; unreadable ones are skipped and counted (or are
fatal with strict=True), so a bad file found at hour ten never stops a run.

Batch order. Epoch e visits the images in the permutation drawn from (seed, e); the epochs are
concatenated into one endless stream and global batch j is stream items [j*B, (j+1)*B), where
B = batch size × number of processes; process p takes its own contiguous slice. Random crops and
flips are drawn from (seed, e, index). The whole data state is therefore one number, the count
of global batches consumed, which makes mid-epoch resume exact with any number of workers.
With aspect-ratio buckets (`buckets=True`, train/buckets.py) images keep their shape and each
batch comes from one bucket; the order is still a function of (seed, e).

With a latent cache (train/cache.py) each item is keyed by the hash of its image bytes and its
Transform (sizes, crop box, flip, all drawn before decoding), and a cached item carries the
autoencoder posterior ("moments") instead of pixels, so it is never decoded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset

from train.buckets import BucketBatchStream, BucketPlan, assign_buckets

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
DATA_FILE_EXTENSIONS = (".parquet", ".arrow", ".json", ".jsonl", ".csv")
CROPS = ("center", "random")
BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


@dataclass(frozen=True)
class DataConfig:
    """Where the images and captions are and how each image becomes a training tensor."""

    data: str
    image_column: str | None = None  # None: "file_name" in a folder's metadata, else "image"
    caption_column: str = "text"
    split: str = "train"
    resolution: int = 512
    crop: str = "center"  # "center" | "random"
    random_flip: bool = False  # off by default: flipping breaks "left of" / "right of" captions
    resize: bool = True  # False: crop at the image's own scale (autoencoders learn from patches)
    strict: bool = False  # unreadable images are fatal instead of skipped
    num_workers: int = 0
    buckets: bool = False  # aspect-ratio buckets of about resolution² pixels instead of squares
    bucket_multiple: int | None = None  # bucket sides' multiple; None: the model's size multiple
    bucket_max_ratio: float = 2.0  # the most elongated bucket, long side : short side

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r}; allowed: {', '.join(CROPS)}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution={self.resolution} must be a positive multiple of 8")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0")
        if self.buckets and not self.resize:
            raise ValueError("buckets=True needs resize=True: buckets resize each image to fit")
        if self.bucket_multiple is not None and (
            self.bucket_multiple < 8 or self.bucket_multiple % 8
        ):
            raise ValueError(f"bucket_multiple={self.bucket_multiple} must be a multiple of 8")
        if self.bucket_max_ratio < 1:
            raise ValueError(f"bucket_max_ratio={self.bucket_max_ratio} must be >= 1")


@dataclass
class Records:
    """Image references (a path, or a datasets {"bytes", "path"} dict) and their captions."""

    images: Sequence
    captions: list[str]
    source: str


# ---- reading folders ----


def _image_files(root: Path) -> list[Path]:
    files = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    # hidden folders (.cache, .ipynb_checkpoints) hold copies, not training images
    return sorted(p for p in files if not any(x.startswith(".") for x in p.relative_to(root).parts))


def _metadata_rows(path: Path) -> list[dict]:
    """The rows of one metadata.jsonl / metadata.csv file."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {number} is not JSON ({e.msg})") from None
    return rows


def _check_columns(columns: list[str], wanted: dict[str, str], where: str) -> None:
    for flag, column in wanted.items():
        if column not in columns:
            raise ValueError(
                f"{flag}: no column {column!r} in {where}; its columns are: "
                f"{', '.join(map(str, columns)) or '(none)'}"
            )


def _from_metadata(root: Path, files: list[Path], cfg: DataConfig, captions: bool) -> Records:
    images, texts = [], []
    image_column = cfg.image_column or "file_name"
    for path in files:
        rows = _metadata_rows(path)
        columns = list(rows[0]) if rows else []
        wanted = {"--image-column": image_column}
        if captions:
            wanted["--caption-column"] = cfg.caption_column
        _check_columns(columns, wanted, str(path))
        for row in rows:
            images.append(path.parent / str(row[image_column]))
            texts.append(_caption_text(row[cfg.caption_column], path) if captions else "")
    return Records(images, texts, str(root))


def _from_sidecars(root: Path, cfg: DataConfig, captions: bool) -> Records:
    files = _image_files(root)
    if not files:
        raise ValueError(
            f"data: no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            "a metadata.jsonl / metadata.csv, or a save_to_disk dataset)"
        )
    if not captions:
        return Records(list(files), [""] * len(files), str(root))
    with_text = [p for p in files if p.with_suffix(".txt").is_file()]
    if not with_text:
        raise ValueError(
            f"data: {root} has {len(files)} images but no captions: add a "
            "metadata.jsonl or metadata.csv (file_name + text columns) or a .txt "
            "file beside each image"
        )
    missing = sorted(set(files) - set(with_text))
    if missing:
        _report_bad(
            len(missing), "images without a .txt caption", list(map(str, missing)), cfg.strict
        )
    texts = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in with_text]
    return Records(with_text, texts, str(root))


def _caption_text(value, where) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"--caption-column: captions must be text, found a "
            f"{type(value).__name__} ({value!r:.60}) in {where}"
        )
    return value


# ---- reading `datasets` datasets ----


def _is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def _load_hf(data: str, split: str, saved: bool):
    import datasets

    if saved:
        ds = datasets.load_from_disk(data)
    else:
        ds = datasets.load_dataset(data)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(
                f"--split: {data} has no split {split!r}; its splits are: {', '.join(ds)}"
            )
        ds = ds[split]
    return ds


class Column(Sequence):
    """One column of a datasets.Dataset, read row by row: its images may not fit in memory."""

    def __init__(self, ds, name: str):
        self.ds, self.name = ds, name

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[int(i)][self.name]


def _from_hf(ds, cfg: DataConfig, captions: bool, base: Path | None) -> Records:
    import datasets

    image_column = cfg.image_column or "image"
    wanted = {"--image-column": image_column}
    if captions:
        wanted["--caption-column"] = cfg.caption_column
    _check_columns(list(ds.column_names), wanted, f"dataset {cfg.data}")
    feature = ds.features[image_column]
    if isinstance(feature, datasets.Image):
        # Undecoded bytes/paths: the images are checked and decoded by us, one at a time.
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(
            f"--image-column: column {image_column!r} of {cfg.data} holds {feature}, "
            "not images or image paths"
        )
    if isinstance(feature, datasets.Value):
        images = [base / p if base is not None else Path(p) for p in ds[image_column]]
    else:
        images = Column(ds, image_column)
    texts = (
        [_caption_text(c, cfg.data) for c in ds[cfg.caption_column]]
        if captions
        else [""] * len(images)
    )
    return Records(images, texts, cfg.data)


# ---- one entry point ----


def read_records(cfg: DataConfig, captions: bool = True) -> Records:
    """Image references and captions from any supported source (captions=False: images only)."""
    root = Path(cfg.data).expanduser()
    if root.is_dir():
        if _is_saved_dataset(root):
            return _from_hf(_load_hf(str(root), cfg.split, saved=True), cfg, captions, root)
        metadata = sorted(p for name in METADATA_FILES for p in root.rglob(name))
        if metadata:
            return _from_metadata(root, metadata, cfg, captions)
        if _image_files(root) or not any(p.suffix in DATA_FILE_EXTENSIONS for p in root.rglob("*")):
            return _from_sidecars(root, cfg, captions)
        return _from_hf(_load_hf(str(root), cfg.split, saved=False), cfg, captions, root)
    if root.exists():
        raise ValueError(f"data: {root} is a file; give a folder of images or a dataset")
    if "/" in cfg.data and not cfg.data.startswith((".", "/", "~")):
        return _from_hf(_load_hf(cfg.data, cfg.split, saved=False), cfg, captions, None)
    raise FileNotFoundError(
        f"data: {cfg.data!r} is not a folder, and not a Hub dataset id of the form 'user/name'"
    )


def open_image(ref) -> Image.Image:
    """A path or a datasets {"bytes", "path"} dict -> a decoded RGB PIL image."""
    # phone photos store their rotation in EXIF
    return ImageOps.exif_transpose(Image.open(_as_file(ref))).convert("RGB")


def read_bytes(ref) -> bytes:
    """The encoded image file behind a path or a datasets {"bytes", "path"} dict."""
    if isinstance(ref, dict) and ref.get("bytes") is not None:
        return ref["bytes"]
    path = ref["path"] if isinstance(ref, dict) else ref
    with open(path, "rb") as f:
        return f.read()


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(w, h) of an opened (not decoded) image as open_image returns it, EXIF rotation applied."""
    w, h = image.size
    # EXIF orientations 5-8 turn the image by 90 degrees: exif_transpose swaps the sides
    return (h, w) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def image_size(ref) -> tuple[int, int]:
    """(w, h) of an image as open_image returns it, read from the file's header only."""
    with Image.open(_as_file(ref)) as image:
        return oriented_size(image)


def _readable(ref) -> bool:
    try:
        with Image.open(_as_file(ref)) as image:
            image.verify()  # checks the header and, for PNG, the chunk checksums; no decode
        return True
    except BAD_IMAGE_ERRORS:
        return False


def _as_file(ref):
    if isinstance(ref, dict):
        return io.BytesIO(ref["bytes"]) if ref.get("bytes") is not None else ref["path"]
    return ref


def _describe(ref) -> str:
    return str(ref.get("path") or "<bytes>") if isinstance(ref, dict) else str(ref)


def _report_bad(count: int, what: str, examples: list[str], strict: bool) -> None:
    shown = ", ".join(examples[:5]) + (", ..." if len(examples) > 5 else "")
    if strict:
        raise ValueError(f"data: {count} {what} (strict mode): {shown}")
    logger.warning("data: skipped %d %s: %s", count, what, shown)


def drop_unreadable(records: Records, strict: bool) -> Records:
    """The records whose image opens; the others are counted and skipped (or fatal if strict)."""
    keep = [i for i, ref in enumerate(records.images) if _readable(ref)]
    bad = [
        _describe(records.images[i]) for i in sorted(set(range(len(records.images))) - set(keep))
    ]
    if bad:
        _report_bad(len(bad), "unreadable images", bad, strict)
    if not keep:
        raise ValueError(f"data: no readable images in {records.source}")
    return Records(Subset(records.images, keep), [records.captions[i] for i in keep],
                   records.source)  # fmt: skip


# ---- images -> tensors ----


@dataclass(frozen=True)
class Transform:
    """How one image becomes a training tensor: resize to `size`, crop `box`, maybe mirror."""

    size: tuple[int, int]  # (w, h) after resizing: the image's own size when it is kept
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    flip: bool

    def describe(self) -> str:
        """A stable text form, part of the latent cache key."""
        return f"bicubic {self.size[0]}x{self.size[1]} box {self.box} flip {self.flip}"


def plan_transform(
    size: tuple[int, int],
    target: tuple[int, int],
    crop: str,
    flip: bool,
    rng: np.random.Generator | None,
    resize: bool = True,
) -> Transform:
    """Scale (w, h) to cover target (unless `resize` is off and the image already covers it),
    then choose the target-sized crop (centre or random) and the flip, drawing from rng."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h) if resize or w < tw or h < th else 1.0
    w, h = max(tw, round(w * scale)), max(th, round(h * scale))
    if crop == "random":
        left, top = int(rng.integers(0, w - tw + 1)), int(rng.integers(0, h - th + 1))
    else:
        left, top = (w - tw) // 2, (h - th) // 2
    mirror = bool(flip and rng.random() < 0.5)
    return Transform((w, h), (left, top, left + tw, top + th), mirror)


def apply_transform(image: Image.Image, transform: Transform) -> torch.Tensor:
    """Resize, crop and maybe mirror an RGB image: (3, h, w) in [-1, 1]."""
    if transform.size != image.size:
        image = image.resize(transform.size, Image.Resampling.BICUBIC)
    image = image.crop(transform.box)
    if transform.flip:
        image = ImageOps.mirror(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def to_training_tensor(
    image: Image.Image,
    resolution: int,
    crop: str,
    flip: bool,
    rng: np.random.Generator,
    resize: bool = True,
) -> torch.Tensor:
    """Resize the short side to `resolution` (unless `resize` is off and the image is at least
    that large), crop a square, maybe flip: (3, r, r) in [-1, 1]."""
    plan = plan_transform(image.size, (resolution, resolution), crop, flip, rng, resize)
    return apply_transform(image, plan)


class CaptionedImages(Dataset):
    """Checked records -> {"pixels": (3, h, w) in [-1, 1], "caption": str} by (index, epoch).

    `buckets` (a BucketPlan) gives each image its own (w, h) instead of the square; with
    `latent_cache` set, items also carry their cache "key", and a cached item carries the
    posterior "moments" (2C, h/f, w/f) instead of "pixels".
    """

    def __init__(self, records: Records, cfg: DataConfig, seed: int):
        self.records, self.cfg, self.seed = records, cfg, seed
        self.buckets: BucketPlan | None = None
        self.latent_cache = None  # a train.cache.EncodingCache of autoencoder posteriors

    def __len__(self) -> int:
        return len(self.records.images)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        # An image that passed the check but fails to decode (a truncated JPEG) is replaced by
        # the next one, so the batch keeps its size and the run stays deterministic.
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            rng = np.random.default_rng([self.seed, epoch, index])
            try:
                return self._item(i, rng)
            except BAD_IMAGE_ERRORS as e:
                if self.cfg.strict:
                    raise ValueError(
                        f"data: cannot decode {_describe(self.records.images[i])}: {e}"
                    ) from e
                logger.warning(
                    "data: cannot decode %s (%s); using the next image",
                    _describe(self.records.images[i]),
                    e,
                )
        raise ValueError(f"data: no image of {self.records.source} can be decoded")

    def target(self, i: int) -> tuple[int, int]:
        """The (w, h) of image i's training tensor."""
        r = self.cfg.resolution
        return (r, r) if self.buckets is None else self.buckets.target(i)

    def _plan(self, size: tuple[int, int], i: int, rng: np.random.Generator) -> Transform:
        c = self.cfg
        return plan_transform(size, self.target(i), c.crop, c.random_flip, rng, c.resize)

    def _item(self, i: int, rng: np.random.Generator) -> dict:
        ref, caption = self.records.images[i], self.records.captions[i]
        if self.latent_cache is None:
            image = open_image(ref)
            return {"pixels": apply_transform(image, self._plan(image.size, i, rng)),
                    "caption": caption}  # fmt: skip
        data = read_bytes(ref)
        with Image.open(io.BytesIO(data)) as header:  # the header only: no decoding yet
            plan = self._plan(oriented_size(header), i, rng)
        key = self.latent_cache.key(hashlib.sha256(data).hexdigest(), plan.describe())
        cached = self.latent_cache.get(key)
        if cached is not None:
            return {"moments": torch.cat([cached["mean"], cached["logvar"]]), "caption": caption,
                    "key": key}  # fmt: skip
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        return {"pixels": apply_transform(image, plan), "caption": caption, "key": key}


def use_buckets(dataset: CaptionedImages, multiple: int) -> BucketPlan:
    """Give every image its bucket (train/buckets.py); sides multiples of `multiple`."""
    sizes = [image_size(ref) for ref in dataset.records.images]
    c = dataset.cfg
    dataset.buckets = assign_buckets(sizes, c.resolution, multiple, c.bucket_max_ratio)
    return dataset.buckets


def load_dataset(cfg: DataConfig, seed: int, captions: bool = True) -> CaptionedImages:
    """Read, check and wrap the training images (captions=False for autoencoder training)."""
    records = drop_unreadable(read_records(cfg, captions), cfg.strict)
    logger.info("data: %d images from %s", len(records.images), records.source)
    return CaptionedImages(records, cfg, seed)


# ---- batch order ----


class BatchStream:
    """Endless (index, epoch) batches for one process, starting at global batch `start`."""

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0
    ):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The visiting order of epoch `epoch`."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._order

    def batch(self, j: int) -> list[tuple[int, int]]:
        """This process's slice of global batch j."""
        first = (j * self.world + self.rank) * self.batch_size
        keys = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.n)
            keys.append((int(self.permutation(epoch)[offset]), epoch))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        j = self.start
        while True:
            yield self.batch(j)
            j += 1


def make_loader(
    dataset: CaptionedImages,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
) -> DataLoader:
    """An endless DataLoader of this process's batches from global batch `start` on."""
    if getattr(dataset, "buckets", None) is not None:
        stream = BucketBatchStream(dataset.buckets.index, batch_size, seed, rank, world, start)
    else:
        stream = BatchStream(len(dataset), batch_size, seed, rank, world, start)
    workers = dataset.cfg.num_workers
    return DataLoader(
        dataset,
        batch_sampler=stream,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )


def collate(items: list[dict]) -> dict:
    """One batch: "pixels" stacks the items that have pixels (all, without a latent cache),
    "moments" the cached posteriors, "cached" says which item is which; lists of the rest."""
    batch = {k: [item[k] for item in items] for k in items[0] if k not in ("pixels", "moments")}
    pixels = [item["pixels"] for item in items if "pixels" in item]
    batch["pixels"] = torch.stack(pixels) if pixels else None
    moments = [item["moments"] for item in items if "moments" in item]
    batch["moments"] = torch.stack(moments) if moments else None
    batch["cached"] = ["moments" in item for item in items]
    return batch
