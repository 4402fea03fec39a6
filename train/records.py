"""Training records: image references and captions from folders and `datasets` datasets.

Where the data can come from (`DataConfig.data`):

    a folder of images + metadata.jsonl / metadata.csv   the `datasets` imagefolder convention:
                                                         rows with file_name + a caption column
    a folder of images + sidecar .txt files              cat.png + cat.txt
    a folder written by Dataset.save_to_disk             read with datasets.load_from_disk
    another local folder or a Hub id                     read with datasets.load_dataset

Every image is checked once before training; unreadable ones are skipped and counted (or are
fatal with strict=True), so a bad file found at hour ten never stops a run. An image reference
is a path or a datasets {"bytes", "path"} dict; the helpers at the end open either.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Subset

if TYPE_CHECKING:
    from train.data import DataConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
DATA_FILE_EXTENSIONS = (".parquet", ".arrow", ".json", ".jsonl", ".csv")
BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


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


def describe_ref(ref) -> str:
    """An image reference in messages: its path, or "<bytes>"."""
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
        describe_ref(records.images[i]) for i in sorted(set(range(len(records.images))) - set(keep))
    ]
    if bad:
        _report_bad(len(bad), "unreadable images", bad, strict)
    if not keep:
        raise ValueError(f"data: no readable images in {records.source}")
    return Records(Subset(records.images, keep), [records.captions[i] for i in keep],
                   records.source)  # fmt: skip
