"""Training data, batch order, checkpoints and EMA: the parts of training that need no model."""

import json
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from train.checkpoint import (
    is_complete,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.data import BatchStream, DataConfig, load_dataset, read_records, to_training_tensor
from train.ema import EMA


def write_images(folder, n, size=(24, 16), seed=0):
    """n small random RGB PNGs named 000.png ...; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        names.append(f"{i:03d}.png")
    return names


def write_jsonl(folder, rows):
    with open(folder / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


# ---- sources ----


def test_metadata_jsonl_folder(tmp_path):
    names = write_images(tmp_path, 3)
    write_jsonl(tmp_path, [{"file_name": n, "text": f"caption {i}"} for i, n in enumerate(names)])
    ds = load_dataset(DataConfig(str(tmp_path), resolution=16), seed=0)
    assert len(ds) == 3
    item = ds[(1, 0)]
    assert item["caption"] == "caption 1"
    assert item["pixels"].shape == (3, 16, 16)
    assert -1.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0


def test_metadata_csv_folder_with_a_chosen_caption_column(tmp_path):
    names = write_images(tmp_path, 2)
    lines = ["file_name,prompt,other"] + [f"{n},a photo {i},x" for i, n in enumerate(names)]
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    records = read_records(DataConfig(str(tmp_path), caption_column="prompt"))
    assert records.captions == ["a photo 0", "a photo 1"]


def test_sidecar_txt_captions(tmp_path):
    names = write_images(tmp_path / "sub", 2)
    for i, n in enumerate(names):
        (tmp_path / "sub" / n).with_suffix(".txt").write_text(f"  side {i}\n")
    records = read_records(DataConfig(str(tmp_path)))
    assert records.captions == ["side 0", "side 1"]


def test_save_to_disk_dataset_with_image_feature(tmp_path):
    import datasets

    names = write_images(tmp_path / "img", 3)
    ds = datasets.Dataset.from_dict(
        {"img": [str(tmp_path / "img" / n) for n in names], "caption": ["a", "b", "c"]}
    ).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(str(tmp_path / "saved"), image_column="img", caption_column="caption",
                     resolution=8)  # fmt: skip
    loaded = load_dataset(cfg, seed=0)
    assert [loaded[(i, 0)]["caption"] for i in range(3)] == ["a", "b", "c"]
    assert loaded[(2, 0)]["pixels"].shape == (3, 8, 8)


# ---- clear errors ----


def test_missing_caption_column_lists_the_columns(tmp_path):
    names = write_images(tmp_path, 1)
    write_jsonl(tmp_path, [{"file_name": names[0], "caption": "x", "source": "web"}])
    with pytest.raises(ValueError, match=r"--caption-column.*'text'.*file_name, caption, source"):
        read_records(DataConfig(str(tmp_path)))


def test_folder_without_images_and_without_captions(tmp_path):
    (tmp_path / "notes.md").write_text("nothing")
    with pytest.raises(ValueError, match="no images"):
        read_records(DataConfig(str(tmp_path)))
    write_images(tmp_path, 2)
    with pytest.raises(ValueError, match="no captions"):
        read_records(DataConfig(str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        read_records(DataConfig(str(tmp_path / "absent")))


def test_unreadable_images_are_skipped_and_counted_or_fatal_when_strict(tmp_path, caplog):
    names = write_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [{"file_name": n, "text": "ok"} for n in names]
    rows += [{"file_name": "broken.png", "text": "bad"}, {"file_name": "gone.jpg", "text": "bad"}]
    write_jsonl(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        ds = load_dataset(DataConfig(str(tmp_path), resolution=8), seed=0)
    assert len(ds) == 3
    assert "skipped 2 unreadable images" in caplog.text and "broken.png" in caplog.text
    with pytest.raises(ValueError, match=r"2 unreadable images \(strict mode\)"):
        load_dataset(DataConfig(str(tmp_path), resolution=8, strict=True), seed=0)


def test_no_readable_image_at_all(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("caption")
    with pytest.raises(ValueError, match="no readable images"):
        load_dataset(DataConfig(str(tmp_path), resolution=8), seed=0)


def test_bad_config_values_name_the_argument():
    with pytest.raises(ValueError, match="crop='middle'"):
        DataConfig("x", crop="middle")
    with pytest.raises(ValueError, match="resolution=30"):
        DataConfig("x", resolution=30)


# ---- image -> tensor ----


def test_center_crop_resizes_the_short_side_and_takes_the_middle():
    # columns 0, 40, ..., 440 -> clipped to uint8; 12x4 is resized (x0.5) to 6x2, whose
    # middle 2x2 holds the averages of source columns 4..7
    pixels = np.repeat(np.repeat((np.arange(12) * 20).astype(np.uint8)[None, :, None], 4, 0), 3, 2)
    out = to_training_tensor(Image.fromarray(pixels), 2, "center", False, None)
    assert out.shape == (3, 2, 2)
    values = (out[0, 0] + 1) * 127.5
    assert 70 < values[0] < 110 and 110 < values[1] < 150  # ~90 and ~130, bicubic overshoot aside
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[0], out[2])


def test_random_crop_and_flip_depend_only_on_the_key(tmp_path):
    names = write_images(tmp_path, 4, size=(40, 16))
    write_jsonl(tmp_path, [{"file_name": n, "text": "t"} for n in names])
    ds = load_dataset(DataConfig(str(tmp_path), resolution=16, crop="random", random_flip=True), 7)
    assert torch.equal(ds[(2, 5)]["pixels"], ds[(2, 5)]["pixels"])
    crops = {ds[(2, epoch)]["pixels"][0, 0, :4].sum().item() for epoch in range(8)}
    assert len(crops) > 1  # different epochs draw different crops


# ---- batch order ----


def test_batch_stream_is_resumable_and_partitions_global_batches():
    full = BatchStream(n=10, batch_size=3, seed=1)
    first = [b for _, b in zip(range(7), full)]
    resumed = BatchStream(n=10, batch_size=3, seed=1, start=4)
    assert [b for _, b in zip(range(3), resumed)] == first[4:]
    # each epoch visits every image once
    positions = [key for batch in first for key in batch][:20]
    assert sorted(i for i, e in positions if e == 0) == list(range(10))
    assert sorted(i for i, e in positions if e == 1) == list(range(10))
    # two processes: their slices of global batch j are the halves of a 6-wide batch
    r0, r1 = BatchStream(10, 3, 1, rank=0, world=2), BatchStream(10, 3, 1, rank=1, world=2)
    wide = BatchStream(10, 6, 1)
    assert r0.batch(5) + r1.batch(5) == wide.batch(5)


# ---- checkpoints ----


def _save(root, step, value=1.0, limit=None):
    tensors = {"model": {"w": torch.full((3,), value)}}
    return save_checkpoint(root, step, tensors, {"step": step, "x": [1, 2]}, limit)


def test_checkpoint_round_trip_limit_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _save(root, step, value=step, limit=2)
    assert [p.name for p in list_checkpoints(root)] == [
        "checkpoint-00000004",
        "checkpoint-00000006",
    ]
    latest = resolve_resume(tmp_path, "latest")
    tensors, state = load_checkpoint(latest)
    assert torch.equal(tensors["model"]["w"], torch.full((3,), 6.0)) and state["x"] == [1, 2]
    assert resolve_resume(tmp_path, str(root / "checkpoint-00000004")).name.endswith("04")
    assert resolve_resume(tmp_path / "nothing-here", "latest") is None


def test_latest_skips_incomplete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    newer = _save(root, 4)
    (newer / "model.safetensors").write_bytes(b"truncated")  # a size mismatch with the marker
    fake = root / "checkpoint-00000009"
    fake.mkdir()  # a folder without its marker
    (root / ".tmp-checkpoint-00000010-123").mkdir()  # a temporary left by a killed writer
    assert not is_complete(newer) and not is_complete(fake)
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-00000002"
    with pytest.raises(ValueError, match="incomplete"):
        load_checkpoint(newer)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = rng_state(generator)
    expected = (
        random.random(),
        np.random.rand(),
        torch.rand(2),
        torch.rand(2, generator=generator),
    )
    path = save_checkpoint(tmp_path, 1, {}, {"rng": [state]})
    _, loaded = load_checkpoint(path)  # weights_only=True: the states must be plain data
    random.random(), np.random.rand(), torch.rand(5), torch.rand(5, generator=generator)
    set_rng_state(loaded["rng"][0], generator)
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=generator))
    assert expected[:2] == again[:2]
    assert torch.equal(expected[2], again[2]) and torch.equal(expected[3], again[3])


# ---- EMA ----


def test_ema_follows_the_formula_and_swaps_back():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = EMA({"p": p}, decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # d_0 = min(0.9, 1/10) = 0.1 -> 0.1 * 0 + 0.9 * 1
    assert torch.allclose(ema.shadow["p"], torch.full((2,), 0.9))
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()  # d_1 = min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow["p"], torch.full((2,), d * 0.9 + (1 - d) * 2.0))
    averaged = ema.shadow["p"].clone()
    with ema.swapped():
        assert torch.equal(p.detach(), averaged)
    assert torch.equal(p.detach(), torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="decay=1.0"):
        EMA({"p": p}, decay=1.0)
