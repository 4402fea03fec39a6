"""Aspect-ratio buckets: train on whole images of many shapes instead of centre squares.

The U-Net takes latents of any size its levels divide, so an image need not be cropped to a
square: a centre square loses the top of a portrait and the sides of a landscape, and teaches
the model that subjects are cut off at the frame. Bucketing (NovelAI's aspect-ratio bucketing,
as kohya-ss sd-scripts does it) instead

  1. lists bucket sizes (w, h): both sides multiples of `multiple` (64, or the model's size
     multiple), w * h <= resolution², one bucket per width, from resolution² / width down,
     up to `max_ratio`:1 either way;
  2. gives each image the bucket whose aspect ratio is nearest its own (in log w/h);
  3. resizes the image to cover its bucket and trims what is left over: little, as the
     bucket's aspect ratio is the nearest to the image's (more only for images more elongated
     than max_ratio); the trim is centred, or random with --random-crop (train/data.py);
  4. draws each batch from one bucket, so a batch is one tensor shape, and visits every image
     once per epoch (the batch order is a function of (seed, epoch) as in BatchStream).

A bucket's last batch of an epoch may be short. With several processes every process needs a
batch item, so a short global batch is topped up to a multiple of the process count with
repeats of its own first images (fewer than the number of processes, one such batch per
bucket and epoch); a single process never repeats an image within an epoch.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


def bucket_sizes(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """The (w, h) buckets of about resolution² pixels, sides multiples of `multiple`."""
    if multiple < 1 or resolution < multiple:
        raise ValueError(f"bucket multiple={multiple} must be >= 1 and <= resolution={resolution}")
    if max_ratio < 1:
        raise ValueError(f"bucket max_ratio={max_ratio} must be >= 1")
    area = resolution * resolution
    sizes = []
    for w in range(multiple, area // multiple + 1, multiple):
        h = area // w // multiple * multiple  # the tallest bucket of this width within the area
        if h >= multiple and max(w / h, h / w) <= max_ratio:
            sizes.append((w, h))
    if not sizes:
        raise ValueError(
            f"no bucket of {resolution}² pixels with sides multiples of {multiple} is within "
            f"max_ratio={max_ratio}; use a smaller multiple or a larger max_ratio"
        )
    return sizes


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest size's (w, h), in log w/h."""
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"image size {size} must be positive")
    target = math.log(w / h)
    ratios = [math.log(bw / bh) for bw, bh in buckets]
    return min(range(len(buckets)), key=lambda i: abs(ratios[i] - target))


@dataclass(frozen=True)
class BucketPlan:
    """The buckets (w, h) and each image's bucket index."""

    sizes: tuple[tuple[int, int], ...]
    index: tuple[int, ...]

    def target(self, image: int) -> tuple[int, int]:
        """The (w, h) image `image` is resized and trimmed to."""
        return self.sizes[self.index[image]]

    def summary(self) -> str:
        """'512x512: 40, 448x576: 12, ...' for the buckets in use, fullest first."""
        counts = Counter(self.index)
        return ", ".join(
            f"{self.sizes[b][0]}x{self.sizes[b][1]}: {n}" for b, n in counts.most_common()
        )


def assign_buckets(
    image_sizes: Sequence[tuple[int, int]], resolution: int, multiple: int, max_ratio: float = 2.0
) -> BucketPlan:
    """Each image's nearest bucket among bucket_sizes(resolution, multiple, max_ratio)."""
    sizes = bucket_sizes(resolution, multiple, max_ratio)
    plan = BucketPlan(tuple(sizes), tuple(nearest_bucket(s, sizes) for s in image_sizes))
    logger.info("data: %d aspect-ratio buckets in use: %s", len(set(plan.index)), plan.summary())
    return plan


class BucketBatchStream:
    """Endless (index, epoch) batches, each from one bucket, for process `rank` of `world`.

    Epoch e: the images in the permutation drawn from (seed, e), grouped by bucket (keeping that
    order), cut into global batches of batch_size × world, and the batches shuffled with
    (seed, e, 1). Every epoch has the same number of batches, so global batch j is batch
    j mod per_epoch of epoch j // per_epoch: the data state is one number, as in BatchStream.
    """

    def __init__(
        self,
        buckets: Sequence[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
    ):
        self.buckets = np.asarray(buckets, dtype=np.int64)
        self.batch_size, self.seed, self.rank, self.world, self.start = (
            batch_size, seed, rank, world, start
        )  # fmt: skip
        self.width = batch_size * world
        counts = np.bincount(self.buckets)
        self.per_epoch = int(sum(-(-int(c) // self.width) for c in counts if c))
        self._epoch, self._batches = -1, []

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (image indices) of epoch `epoch`, in visiting order."""
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.buckets))
            groups: dict[int, list[int]] = {}
            for i in order.tolist():
                groups.setdefault(int(self.buckets[i]), []).append(i)
            batches = [
                group[k : k + self.width]
                for _, group in sorted(groups.items())
                for k in range(0, len(group), self.width)
            ]
            shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
            self._epoch, self._batches = epoch, [batches[k] for k in shuffle.tolist()]
        return self._batches

    def batch(self, j: int) -> list[tuple[int, int]]:
        """This process's slice of global batch j."""
        epoch, k = divmod(j, self.per_epoch)
        items = self.epoch_batches(epoch)[k]
        per = -(-len(items) // self.world)  # every process takes the same number of items
        items = items + [items[m % len(items)] for m in range(per * self.world - len(items))]
        return [(i, epoch) for i in items[self.rank * per : (self.rank + 1) * per]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        j = self.start
        while True:
            yield self.batch(j)
            j += 1
