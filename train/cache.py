"""A disk cache of what the frozen encoders compute: autoencoder posteriors and text contexts.

With a frozen autoencoder (always) and a frozen text encoder (unless --train-text-encoder),
every epoch after the first would encode the same images and captions again. The cache stores
their outputs once and the training step reads them back:

    latents   q(z | image) = N(mean, exp(logvar)): both are stored, not a sample, and the
              step samples z = mean + std * eps with its own generator, as the uncached step
              does, so a cached run equals the uncached run (same draws, same order)
    text      the context (B, L, D) of each caption (the empty caption of caption dropout too)

Keys. An entry's key is the SHA-256 of everything its value depends on:

    latents   cache version, the autoencoder's fingerprint (config + every weight's bytes),
              the image file's bytes (their hash), and the Transform actually applied:
              resized size, crop box and flip *as drawn* for that epoch
    text      cache version, the text encoder's fingerprint, the caption and its token ids

so a changed image, caption, crop, resolution, bucket or encoder gives a new key and is
encoded again: a stale entry is never looked up, and never silently reused. Entries written
for other encoder weights are detected when the cache opens (each kind keeps a list of the
fingerprints it has seen) and reported, since they only take disk space.

Random crops and flips. The key holds the crop and flip drawn for the epoch, so with
--random-crop / --random-flip the entries of one epoch rarely serve the next: caching pays
off with deterministic transforms (centre crop, buckets, no flip). The cache is correct either
way; `warn_if_random` says so at the start of a run.

Text. Caching contexts is valid only while the text encoder is frozen: TrainConfig refuses
cache_text with train_text_encoder.

Layout: <folder>/<kind>/<key[:2]>/<key>.safetensors, one entry per file, written to a temporary
name and renamed, so a killed run leaves no half-written entry; an unreadable entry is deleted
and encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"
KINDS = ("latents", "text")
FINGERPRINTS = "fingerprints.json"


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's config and state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256(type(module).__name__.encode())
    h.update(repr(getattr(module, "config", None)).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EncodingCache:
    """Content-addressed tensors of one kind ("latents" or "text") for one encoder."""

    def __init__(self, folder: str | os.PathLike, kind: str, encoder_fingerprint: str):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; allowed: {', '.join(KINDS)}")
        self.root = Path(folder) / kind
        self.kind, self.fingerprint = kind, encoder_fingerprint

    def open(self) -> EncodingCache:
        """Create the folder and report entries made with other encoder weights (main process)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / FINGERPRINTS
        seen = json.loads(path.read_text()) if path.is_file() else []
        others = [f for f in seen if f != self.fingerprint]
        if others:
            logger.warning(
                "cache %s: it holds entries made with %d other %s encoder weights; they are "
                "stale and not used (delete the folder to reclaim the space)",
                self.root,
                len(others),
                self.kind,
            )
        if self.fingerprint not in seen:
            tmp = path.with_name(f"{FINGERPRINTS}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps([*seen, self.fingerprint], indent=1) + "\n")
            os.replace(tmp, path)
        return self

    def key(self, *parts: str) -> str:
        """The entry key of a value that depends on `parts` (and on this encoder)."""
        h = hashlib.sha256()
        for part in (CACHE_VERSION, self.kind, self.fingerprint, *parts):
            h.update(part.encode())
            h.update(b"\0")  # a separator no part contains: ("ab", "c") != ("a", "bc")
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None (absent, or unreadable: then it is removed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            logger.warning("cache: unreadable entry %s (%s); encoding it again", path, e)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store an entry atomically (a temporary file renamed into place)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)


def warn_if_random(crop: str, random_flip: bool) -> None:
    """Random crops / flips are part of the key: say that the cache will rarely hit."""
    if crop == "random" or random_flip:
        logger.warning(
            "latent cache with --random-crop / --random-flip: each epoch draws new crops and "
            "flips, which are part of the cache key, so later epochs mostly encode again; use "
            "--center-crop (or --buckets) without --random-flip to encode each image once"
        )


# ---- the training step's side ----


@torch.no_grad()
def batch_posterior(vae, batch: dict, cache: EncodingCache | None, device: torch.device):
    """The batch's posteriors q(z | image): cached ones from the loader, the rest encoded now.

    Newly encoded entries are stored under the keys the loader computed. Returns a
    DiagonalGaussian over the whole batch, in batch order.
    """
    from autoencoder.distribution import DiagonalGaussian

    dtype = next(vae.parameters()).dtype
    if cache is None:  # in the autoencoder's own dtype, outside autocast
        return vae.encode(batch["pixels"].to(device, dtype))
    cached, parts = batch["cached"], []
    if batch["pixels"] is not None:
        new = vae.encode(batch["pixels"].to(device, dtype))
        misses = [k for k, hit in zip(batch["key"], cached) if not hit]
        for key, mean, logvar in zip(misses, new.mean, new.logvar):
            cache.put(key, {"mean": mean, "logvar": logvar})
        parts.append(torch.cat([new.mean, new.logvar], dim=1))
    if batch["moments"] is not None:
        parts.append(batch["moments"].to(device, dtype))
    moments = torch.cat(parts)
    # misses came first, hits second: put them back in batch order
    order = sorted(range(len(cached)), key=lambda i: cached[i])  # stable: misses, then hits
    moments = moments[torch.as_tensor(order, device=moments.device).argsort()]
    return DiagonalGaussian.from_moments(moments)


def cached_contexts(
    cache: EncodingCache, text_encoder, captions: list[str], encode
) -> torch.Tensor:
    """Contexts (B, L, D) of the captions: each distinct missing one encoded once, by `encode`.

    `encode(captions)` is the uncached path (train.loop.encode_captions through the text model).
    """
    batch = text_encoder.tokenize(captions, long_prompt="truncate", weighting=False)
    keys = [cache.key(c, " ".join(map(str, ids))) for c, ids in zip(captions, batch.ids.tolist())]
    found = {k: cache.get(k) for k in dict.fromkeys(keys)}
    missing = [k for k, v in found.items() if v is None]
    if missing:
        first = {k: keys.index(k) for k in missing}
        contexts = encode([captions[first[k]] for k in missing])
        for k, context in zip(missing, contexts):
            found[k] = {"context": context}
            cache.put(k, found[k])
    device = text_encoder.device
    return torch.stack([found[k]["context"].to(device) for k in keys])
