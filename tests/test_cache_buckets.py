"""The encoder cache and aspect-ratio buckets of `ldm train`, on a tiny random pipeline.

Cache: the second epoch calls neither the autoencoder nor the text encoder, the loss curve is
the uncached run's, and a changed caption or image invalidates that entry only. Buckets: images
of several aspect ratios train whole (not cropped to squares), batches are one bucket each, and
every image is seen once per epoch.
"""

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.buckets import BucketBatchStream, bucket_sizes, nearest_bucket
from train.cache import EncodingCache, warn_if_random
from train.data import DataConfig, load_dataset, make_loader, plan_transform, use_buckets


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    """A random tiny pipeline of ours: f=8 autoencoder, 2-level U-Net (size multiple 16)."""
    from autoencoder import AUTOENCODER_PRESETS, AutoencoderKL
    from ldm.schedule import ScheduleConfig
    from ldm.unet import UNET_PRESETS, UNet
    from pipelines import TextToImagePipeline
    from text_encoder import CLIP_TEXT_PRESETS, ClipTextEncoder, ClipTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(replace(AUTOENCODER_PRESETS["tiny"], sample_size=32))
    unet = UNet(replace(UNET_PRESETS["tiny"], sample_size=4))
    encoder = ClipTextEncoder(ClipTextModel(CLIP_TEXT_PRESETS["tiny"]))
    path = tmp_path_factory.mktemp("pipe")
    TextToImagePipeline(unet, vae, encoder, ScheduleConfig(), "ddim").save_pretrained(path)
    return path


def write_data(folder: Path, sizes, seed: int = 0) -> Path:
    """Random RGB images of the given (w, h) sizes, captions 'a picture number i'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a picture number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def train(pipe_dir, data, out, *extra) -> int:
    from train.cli import main

    return main(["--model", str(pipe_dir), "--data", str(data), "--output", str(out),
                 "--batch-size", "2", "--learning-rate", "1e-3", "--no-progress",
                 "--checkpoint-every", "100", *extra])  # fmt: skip


def losses(out: Path) -> list[float]:
    with open(out / "logs" / "metrics.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "loss"]


@pytest.fixture
def encoder_calls(monkeypatch) -> dict[str, list]:
    """Batch sizes of every autoencoder encode and text-model forward, and the captions encoded."""
    import train.loop as loop
    from autoencoder import AutoencoderKL
    from text_encoder import ClipTextModel

    calls = {"vae": [], "text": [], "captions": []}
    encode, forward, captions = AutoencoderKL.encode, ClipTextModel.forward, loop.encode_captions

    def counted_encode(self, x):
        calls["vae"].append(x.shape[0])
        return encode(self, x)

    def counted_forward(self, ids, *args, **kwargs):
        calls["text"].append(ids.shape[0])
        return forward(self, ids, *args, **kwargs)

    def recorded(text_encoder, model, texts):
        calls["captions"] += texts
        return captions(text_encoder, model, texts)

    monkeypatch.setattr(AutoencoderKL, "encode", counted_encode)
    monkeypatch.setattr(ClipTextModel, "forward", counted_forward)
    monkeypatch.setattr(loop, "encode_captions", recorded)
    return calls


# ---- the cache ----


def test_epoch_two_encodes_nothing_and_the_loss_curve_is_unchanged(pipe_dir, tmp_path,
                                                                    encoder_calls):  # fmt: skip
    data = write_data(tmp_path / "data", [(40, 32)] * 4)
    common = ["--resolution", "32", "--max-steps", "4", "--report-to", "csv", "--log-every", "1"]
    assert train(pipe_dir, data, tmp_path / "plain", *common) == 0
    assert encoder_calls["vae"] == [2, 2, 2, 2] and encoder_calls["text"] == [2, 2, 2, 2]
    for calls in encoder_calls.values():
        calls.clear()
    cache = ["--cache-latents", "--cache-text", "--cache-dir", str(tmp_path / "cache")]
    assert train(pipe_dir, data, tmp_path / "cached", *common, *cache) == 0
    # 4 images, batches of 2: epoch 1 is steps 1-2, epoch 2 is steps 3-4
    assert encoder_calls["vae"] == [2, 2] and encoder_calls["text"] == [2, 2]
    plain, cached = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    assert len(plain) == 4
    # Epoch 1 runs the same computation: bitwise equal. Epoch 2 reads posteriors and contexts
    # computed in epoch 1's batches instead of epoch 2's; a BLAS may block a batch of other
    # items differently, so allow float32 rounding there (measured here: bitwise equal too).
    assert cached[:2] == plain[:2]
    np.testing.assert_allclose(cached, plain, rtol=1e-6, atol=0)
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 4
    assert len(list((tmp_path / "cache" / "text").rglob("*.safetensors"))) == 4

    # a changed caption and a changed image: those entries only are encoded again
    rows = (data / "metadata.jsonl").read_text().splitlines()
    rows[1] = json.dumps({"file_name": "1.png", "text": "a new caption"})
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    write_data(tmp_path / "other", [(40, 32)], seed=5)
    (tmp_path / "other" / "0.png").replace(data / "2.png")
    for calls in encoder_calls.values():
        calls.clear()
    assert train(pipe_dir, data, tmp_path / "again", *common[:2], "--max-steps", "2", *cache) == 0
    assert encoder_calls["vae"] == [1] and encoder_calls["captions"] == ["a new caption"]


def test_cache_entries_are_checked(tmp_path, caplog):
    cache = EncodingCache(tmp_path, "latents", "weights-a").open()
    key = cache.key("image-hash", "transform")
    assert key != cache.key("image-has", "htransform")  # parts are separated, not concatenated
    assert key != EncodingCache(tmp_path, "latents", "weights-b").key("image-hash", "transform")
    cache.put(key, {"mean": torch.ones(4, 2, 2), "logvar": torch.zeros(4, 2, 2)})
    assert torch.equal(cache.get(key)["mean"], torch.ones(4, 2, 2))
    cache.path(key).write_bytes(b"truncated")  # a damaged entry is dropped and encoded again
    with caplog.at_level(logging.WARNING):
        assert cache.get(key) is None
    assert "unreadable entry" in caplog.text and not cache.path(key).exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        EncodingCache(tmp_path, "latents", "weights-b").open()  # other autoencoder weights
        warn_if_random("random", False)
    assert "stale" in caplog.text and "--center-crop" in caplog.text


def test_text_cache_is_refused_with_a_trained_text_encoder(pipe_dir, tmp_path, capsys):
    data = write_data(tmp_path / "data", [(32, 32)])
    assert train(pipe_dir, data, tmp_path / "out", "--resolution", "32", "--cache-text",
                 "--train-text-encoder") == 2  # fmt: skip
    assert "frozen" in capsys.readouterr().err


# ---- buckets ----


def test_bucket_sizes_and_nearest_bucket():
    sizes = bucket_sizes(512, 64)
    assert {(512, 512), (448, 576), (576, 448), (384, 640), (640, 384)} <= set(sizes)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512**2 for w, h in sizes)
    assert all(max(w / h, h / w) <= 2.0 for w, h in sizes)
    assert sizes[nearest_bucket((1000, 600), sizes)] == (640, 384)  # 1.67 is 5:3 exactly
    assert sizes[nearest_bucket((600, 1000), sizes)] == (384, 640)
    with pytest.raises(ValueError, match="multiple"):
        bucket_sizes(32, 64)


def test_bucket_resize_covers_the_bucket_and_trims_the_excess_evenly():
    # 90x50 (1.8:1) goes to 80x48: scaled by 0.96 to 86x48, 3 columns trimmed on each side
    plan = plan_transform((90, 50), (80, 48), "center", False, None)
    assert plan.size == (86, 48) and plan.box == (3, 0, 83, 48) and not plan.flip


def test_bucket_batches_visit_every_image_once_per_epoch_and_resume():
    buckets = [0, 0, 0, 1, 2, 2, 1, 0]
    stream = BucketBatchStream(buckets, batch_size=2, seed=3)
    assert stream.per_epoch == 2 + 1 + 1  # bucket 0: 4 images, buckets 1 and 2: 2 each
    batches = [stream.batch(j) for j in range(3 * stream.per_epoch)]
    for epoch in range(3):
        keys = [k for b in batches[epoch * 4 : (epoch + 1) * 4] for k in b]
        assert sorted(i for i, e in keys) == list(range(8)) and {e for _, e in keys} == {epoch}
    assert all(len({buckets[i] for i, _ in b}) == 1 for b in batches)
    resumed = BucketBatchStream(buckets, batch_size=2, seed=3, start=5)
    assert [b for _, b in zip(range(4), resumed)] == batches[5:9]
    # two processes take halves of the same global batches; a short one is topped up
    wide = BucketBatchStream([0, 0, 0, 1], batch_size=2, seed=0)
    halves = [BucketBatchStream([0, 0, 0, 1], 1, 0, rank=r, world=2) for r in (0, 1)]
    for j in range(wide.per_epoch):
        merged = halves[0].batch(j) + halves[1].batch(j)
        assert set(merged) == set(wide.batch(j)) and len(merged) == 2


def test_images_of_several_shapes_train_whole_in_their_buckets(pipe_dir, tmp_path, monkeypatch,
                                                                encoder_calls):  # fmt: skip
    import train.loop as loop

    sizes = [(100, 60), (60, 100), (70, 70), (100, 60), (60, 100), (70, 70)]
    data = write_data(tmp_path / "data", sizes)
    dataset = load_dataset(DataConfig(str(data), resolution=64, buckets=True), seed=0)
    plan = use_buckets(dataset, 16)
    targets = {(100, 60): (80, 48), (60, 100): (48, 80), (70, 70): (64, 64)}
    assert [plan.target(i) for i in range(6)] == [targets[s] for s in sizes]
    seen = []
    for _, batch in zip(range(6), make_loader(dataset, batch_size=2, seed=0)):
        seen.append(batch["caption"])
        assert batch["pixels"].shape[0] == 2
        ((w, h),) = {targets[sizes[int(c.split()[-1])]] for c in batch["caption"]}
        assert batch["pixels"].shape[1:] == (3, h, w)
        for caption, pixels in zip(batch["caption"], batch["pixels"]):
            i = int(caption.split()[-1])  # the whole image, resized: nothing cropped
            whole = Image.open(data / f"{i}.png").resize((w, h), Image.Resampling.BICUBIC)
            assert torch.equal(((pixels + 1) * 127.5).round().byte().permute(1, 2, 0),
                               torch.from_numpy(np.array(whole)))  # fmt: skip
    for epoch in (seen[:3], seen[3:]):
        assert sorted(c for b in epoch for c in b) == sorted(
            f"a picture number {i}" for i in range(6)
        )

    shapes = []
    loss = loop.diffusion_loss

    def recorded(unet, x0, *args):
        shapes.append(tuple(x0.shape))
        return loss(unet, x0, *args)

    monkeypatch.setattr(loop, "diffusion_loss", recorded)
    assert train(pipe_dir, data, tmp_path / "out", "--resolution", "64", "--buckets",
                 "--max-steps", "6", "--cache-latents") == 0  # fmt: skip
    # latents are 1/8 of the pixels; each batch one bucket; the 2nd epoch came from the cache
    assert sorted(shapes) == sorted([(2, 4, 6, 10), (2, 4, 10, 6), (2, 4, 8, 8)] * 2)
    assert encoder_calls["vae"] == [2, 2, 2]
