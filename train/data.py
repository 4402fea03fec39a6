"""Captioned image data for training: the dataset of tensors and a resumable batch order.

The records (image references and captions, from folders or `datasets` datasets, each image
checked once) are read by train/records.py; here each becomes a training tensor.

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

import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from train.buckets import BucketBatchStream, BucketPlan, assign_buckets
from train.records import (
    BAD_IMAGE_ERRORS,
    Records,
    describe_ref,
    drop_unreadable,
    image_size,
    open_image,
    oriented_size,
    read_bytes,
    read_records,
)

logger = logging.getLogger(__name__)

CROPS = ("center", "random")


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
    """Checked records -> {"pixels": (3, h, w) in [-1, 1], "caption": str, "index": int} by
    (index, epoch), "index" the record the item came from.

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
                        f"data: cannot decode {describe_ref(self.records.images[i])}: {e}"
                    ) from e
                logger.warning(
                    "data: cannot decode %s (%s); using the next image",
                    describe_ref(self.records.images[i]),
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
                    "caption": caption, "index": i}  # fmt: skip
        data = read_bytes(ref)
        with Image.open(io.BytesIO(data)) as header:  # the header only: no decoding yet
            plan = self._plan(oriented_size(header), i, rng)
        key = self.latent_cache.key(hashlib.sha256(data).hexdigest(), plan.describe())
        cached = self.latent_cache.get(key)
        if cached is not None:
            return {"moments": torch.cat([cached["mean"], cached["logvar"]]), "caption": caption,
                    "key": key, "index": i}  # fmt: skip
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        return {"pixels": apply_transform(image, plan), "caption": caption, "key": key, "index": i}


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
