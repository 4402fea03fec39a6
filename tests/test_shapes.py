"""The synthetic shapes data set: determinism, held-out split, captions, rendering."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from train.shapes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_COLOR_PAIRINGS,
    HELDOUT_PAIRS,
    SHAPES,
    ObjectSpec,
    SceneSpec,
    caption,
    coverage,
    describe,
    heldout_prompts,
    is_heldout,
    main,
    make_dataset,
    parse_caption,
    read_metadata,
    render,
    sample_scene,
    spec_from_dict,
    spec_to_dict,
)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_same_bytes(tmp_path):
    a = make_dataset(tmp_path / "a", 16, seed=5)
    b = make_dataset(tmp_path / "b", 16, seed=5)
    c = make_dataset(tmp_path / "c", 16, seed=6)
    assert len(_files(a)) == 17  # 16 images + metadata.jsonl
    assert _files(a) == _files(b)
    assert _files(a)["metadata.jsonl"] != _files(c)["metadata.jsonl"]


def test_folder_is_imagefolder_layout_and_rerenders(tmp_path):
    out = make_dataset(tmp_path / "d", 12, seed=1, size=64)
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 12
    for line, row in zip(lines, read_metadata(out)):
        raw = json.loads(line)
        assert set(raw) == {"file_name", "text", "spec", "scene"}
        img = Image.open(out / row["file_name"])
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (64, 64))
        # The stored scene is complete: re-rendering it gives the stored pixels exactly.
        assert np.array_equal(np.asarray(render(row["scene"], 64)), np.asarray(img))
        assert parse_caption(row["text"]) == row["spec"]


def test_heldout_is_exact_predicate():
    assert is_heldout(SceneSpec((ObjectSpec("purple", "circle", "small", "left"),), None, "gray"))
    assert not is_heldout(SceneSpec((ObjectSpec("red", "circle"),)))
    pairing = SceneSpec((ObjectSpec("red", "circle"), ObjectSpec("white", "square")), "left_of")
    assert is_heldout(pairing)
    # The same colours in separate one-object scenes are fine.
    assert not is_heldout(SceneSpec((ObjectSpec("white", "square"),)))


def test_heldout_combinations_never_in_train(tmp_path):
    rng = np.random.default_rng(0)
    train = [sample_scene(rng, split="train") for _ in range(3000)]
    assert not any(is_heldout(s) for s in train)
    seen = {(o.color, o.shape) for s in train for o in s.objects}
    # Every other colour-shape pair is taught, so held-out pairs are new only as pairs.
    wanted = {(c, s) for c in COLORS for s in SHAPES} - HELDOUT_PAIRS
    assert seen == wanted
    rows = read_metadata(make_dataset(tmp_path / "t", 40, seed=3, split="train"))
    assert not any(is_heldout(r["scene"]) or is_heldout(r["spec"]) for r in rows)
    rows = read_metadata(make_dataset(tmp_path / "h", 40, seed=3, split="heldout"))
    assert all(is_heldout(r["scene"]) and is_heldout(r["spec"]) for r in rows)


def test_heldout_prompts_cover_every_heldout_combination():
    prompts = heldout_prompts(400, seed=0)
    assert prompts == heldout_prompts(400, seed=0)
    assert all(is_heldout(spec) and parse_caption(text) == spec for text, spec in prompts)
    pairs = {(o.color, o.shape) for _, s in prompts for o in s.objects}
    pairings = {frozenset(o.color for o in s.objects) for _, s in prompts if len(s.objects) == 2}
    assert HELDOUT_PAIRS <= pairs
    assert HELDOUT_COLOR_PAIRINGS <= pairings


def _claims_hold(spec: SceneSpec, scene: SceneSpec) -> bool:
    """Every attribute the caption names is true of some distinct scene object."""

    def ok(o, t):
        fields = ("color", "shape", "size", "position")
        return all(getattr(o, f) in (None, getattr(t, f)) for f in fields)

    a = spec.objects
    if len(a) == 1:
        return len(scene.objects) == 1 and ok(a[0], scene.objects[0])
    s0, s1 = scene.objects
    if spec.relation is not None:  # a relation fixes the order
        return spec.relation == scene.relation and ok(a[0], s0) and ok(a[1], s1)
    return (ok(a[0], s0) and ok(a[1], s1)) or (ok(a[0], s1) and ok(a[1], s0))


def test_caption_spec_roundtrip_and_truth():
    rng = np.random.default_rng(1)
    texts = set()
    for _ in range(3000):
        scene = sample_scene(rng)
        text, spec = describe(scene, rng)
        texts.add(text)
        assert parse_caption(text) == spec, text
        assert _claims_hold(spec, scene), (text, scene)
        assert all(o.color and o.shape for o in spec.objects)  # always named
    assert len(texts) > 2000  # varied wording, not a handful of strings
    scene = sample_scene(np.random.default_rng(2))
    assert caption(scene, np.random.default_rng(3)) == describe(scene, np.random.default_rng(3))[0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A red circle.", SceneSpec((ObjectSpec("red", "circle"),))),
        (
            "a photo of a big blue square in the middle",
            SceneSpec((ObjectSpec("blue", "square", "large", "center"),)),
        ),
        (
            "a red circle to the left of a blue square",
            SceneSpec((ObjectSpec("red", "circle"), ObjectSpec("blue", "square")), "left_of"),
        ),
        (
            "Red circle on the left, blue square on the right",
            SceneSpec(
                (
                    ObjectSpec("red", "circle", None, "left"),
                    ObjectSpec("blue", "square", None, "right"),
                )
            ),
        ),
        (
            "a green triangle beneath a white cross on a grey background",
            SceneSpec(
                (ObjectSpec("green", "triangle"), ObjectSpec("white", "cross")), "below", "gray"
            ),
        ),
        ("two small yellow crosses", SceneSpec((ObjectSpec("yellow", "cross", "small"),) * 2)),
        (
            "there is a small green triangle at the top",
            SceneSpec((ObjectSpec("green", "triangle", "small", "top"),)),
        ),
        ("a dog", None),
        ("a red circle, a blue square and a green cross", None),
    ],
)
def test_parse_caption_user_prompts(text, expected):
    assert parse_caption(text) == expected


def test_spec_dict_roundtrip():
    scene = sample_scene(np.random.default_rng(4), n_objects=2)
    d = json.loads(json.dumps(spec_to_dict(scene)))
    assert spec_from_dict(d) == scene


@pytest.mark.parametrize(
    "shape, fill", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5), ("cross", 5 / 9)]
)
def test_coverage_area_matches_geometry(shape, fill):
    box = (3.3, 4.7, 43.3, 44.7)  # 40 px side, off the pixel grid
    cov = coverage(shape, box, 50, 50)
    # 4x4 samples per pixel: the boundary error is a fraction of one pixel per edge pixel.
    assert cov.sum() == pytest.approx(fill * 40 * 40, rel=0.01)
    assert cov.min() == 0.0 and cov.max() == 1.0
    assert ((cov > 0) & (cov < 1)).any()  # antialiased edges


def test_render_colours_sizes_and_no_overlap():
    rng = np.random.default_rng(5)
    for _ in range(300):
        scene = sample_scene(rng, n_objects=2)
        covs = []
        for o in scene.objects:
            x, y, half = o.center[0] * 64, o.center[1] * 64, o.extent * 64 / 2
            box = (x - half, y - half, x + half, y + half)
            covs.append(coverage(o.shape, box, 64, 64) > 0)
            assert 0 <= box[0] and 0 <= box[1] and box[2] <= 64 and box[3] <= 64
        assert not (covs[0] & covs[1]).any()
    scene = SceneSpec((ObjectSpec("red", "square", "large", "center"),), None, "gray")
    img = np.asarray(render(scene, 96))
    assert img.shape == (96, 96, 3)
    assert tuple(img[48, 48]) == COLORS["red"] and tuple(img[1, 1]) == BACKGROUNDS["gray"]


@pytest.mark.parametrize(
    "scene, match",
    [
        (SceneSpec((ObjectSpec("pink", "circle", "small", "left"),), None, "gray"), "color"),
        (SceneSpec((ObjectSpec("red", "oval", "small", "left"),), None, "gray"), "shape"),
        (SceneSpec((ObjectSpec("red", "circle", None, "left"),), None, "gray"), "size"),
        (SceneSpec((ObjectSpec("red", "circle", "small", "left"),), None, "blue"), "background"),
    ],
)
def test_render_rejects_bad_scene(scene, match):
    with pytest.raises(ValueError, match=match):
        render(scene)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        make_dataset(tmp_path / "x", 4, split="test")
    with pytest.raises(ValueError, match="n_objects"):
        sample_scene(np.random.default_rng(0), n_objects=3)
    make_dataset(tmp_path / "y", 2)
    with pytest.raises(ValueError, match="out_dir"):
        make_dataset(tmp_path / "y", 2)


def test_cli_writes_folder(tmp_path):
    main([str(tmp_path / "cli"), "--n", "5", "--seed", "2", "--size", "48", "--split", "heldout"])
    rows = read_metadata(tmp_path / "cli")
    assert len(rows) == 5 and all(is_heldout(r["scene"]) for r in rows)
    assert Image.open(tmp_path / "cli" / rows[0]["file_name"]).size == (48, 48)
