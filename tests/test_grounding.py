"""train/grounding.py: the targets a shapes caption gives, the loss's two terms on attention
whose answer is known, and the recorder's attention on a real U-Net."""

import json
from dataclasses import replace

import pytest
import torch

from text_encoder import offline_clip_tokenizer
from train.grounding import (
    Grounding,
    grounding_terms,
    object_mask,
    object_targets,
    read_scenes,
    record_cross_attention,
    word_token_ids,
)
from train.shapes import ObjectSpec, SceneSpec, make_dataset, spec_from_dict


@pytest.fixture(scope="module")
def tokenizer():
    return offline_clip_tokenizer()


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]  # with the start and end tokens, as the model reads it


# Two squares filling whole cells of an 8 x 8 grid: their masks are exactly 0 / 1 there.
LEFT = ObjectSpec("red", "square", "small", "left", center=(0.25, 0.5), extent=0.25)
RIGHT = ObjectSpec("blue", "square", "small", "right", center=(0.75, 0.5), extent=0.25)
SCENE = SceneSpec((LEFT, RIGHT), "left_of", "gray")
CAPTION = "a red square to the left of a blue square"


def targets_for(tokenizer, caption=CAPTION, scene=SCENE):
    spec = SceneSpec(
        tuple(replace(o, position=None, center=None, extent=None) for o in scene.objects)
    )
    ids = ids_of(tokenizer, caption)
    return object_targets(spec, scene, ids, word_token_ids(tokenizer)), ids


def test_targets_name_each_objects_words_and_its_place(tokenizer):
    targets, ids = targets_for(tokenizer)
    words = [tokenizer.decode([i]).strip() for i in ids]
    assert [[words[p] for p in tokens] for tokens, _ in targets] == [
        ["red", "square"],
        ["blue", "square"],
    ]
    assert [obj for _, obj in targets] == [LEFT, RIGHT]
    # caption order, not scene order: "a blue square right of a red square"
    swapped = SceneSpec((RIGHT, LEFT), "right_of", "gray")
    targets, _ = targets_for(tokenizer, "a blue square to the right of a red square", swapped)
    assert [obj.color for _, obj in targets] == ["blue", "red"]
    m = object_mask(LEFT, 8).view(8, 8)
    assert m.sum() == 4 and m[3:5, 1:3].sum() == 4


def test_captions_without_one_phrase_per_object_give_no_targets(tokenizer):
    words = word_token_ids(tokenizer)
    two = SceneSpec((ObjectSpec("red", "square"), ObjectSpec("red", "square")))
    scene = SceneSpec((replace(LEFT, color="red"), replace(RIGHT, color="red")), None, "gray")
    assert object_targets(two, scene, ids_of(tokenizer, "two red squares"), words) is None
    # a caption that does not match its spec (another colour word)
    spec = SceneSpec((ObjectSpec("red", "square"), ObjectSpec("blue", "square")))
    assert (
        object_targets(spec, SCENE, ids_of(tokenizer, "a red square and a green square"), words)
        is None
    )


def uniform_and_ideal(targets, lc: int, side: int = 8):
    L = side * side
    uniform = torch.full((1, L, lc), 1.0 / lc)
    ideal = torch.zeros(1, L, lc)
    ideal[0, :, 0] = 1.0  # background pixels look at the start token
    for tokens, obj in targets:
        m = object_mask(obj, side)
        ideal[0, m > 0, 0] = 0.0
        for p in tokens:
            ideal[0, m > 0, p] = 1.0 / len(tokens)  # an object's pixels read its own words
    return uniform, ideal


def test_the_terms_vanish_on_grounded_attention_and_are_chance_on_uniform(tokenizer):
    targets, ids = targets_for(tokenizer)
    uniform, ideal = uniform_and_ideal(targets, len(ids))
    own, leak = grounding_terms([ideal], [targets])
    assert own.item() == pytest.approx(0.0, abs=1e-6) and leak.item() == pytest.approx(
        0.0, abs=1e-6
    )
    own, leak = grounding_terms([uniform], [targets])
    # an object's pixels give its 2 words 2 / Lc of their attention, and half of what they give
    # the two objects' words goes to the other object's
    assert own.item() == pytest.approx(1 - 2 / len(ids)) and leak.item() == pytest.approx(0.5)
    # a swapped grounding (each object's pixels read the other's words) is all leak
    swapped = [(tokens, obj) for (tokens, _), (_, obj) in zip(targets, targets[::-1])]
    own, leak = grounding_terms([ideal], [swapped])
    assert own.item() == pytest.approx(1.0) and leak.item() == pytest.approx(1.0)
    # one object named: no leak term; samples without targets give no terms; with none, None
    own, leak = grounding_terms([ideal], [targets[:1]])
    assert own.item() == pytest.approx(0.0, abs=1e-6) and leak.item() == 0.0
    own, _ = grounding_terms([torch.cat([uniform, ideal])], [None, targets])
    assert own.item() == pytest.approx(0.0, abs=1e-6)
    assert grounding_terms([uniform], [None]) is None
    with pytest.raises(ValueError, match="square grid"):
        grounding_terms([torch.zeros(1, 6, len(ids))], [targets])


def test_the_loss_pulls_each_objects_pixels_onto_its_words(tokenizer):
    targets, ids = targets_for(tokenizer)
    logits = torch.zeros(1, 64, len(ids), requires_grad=True)
    opt = torch.optim.SGD([logits], lr=50.0)
    first = None
    for _ in range(30):
        own, leak = grounding_terms([logits.softmax(-1)], [targets])
        first = first if first is not None else (own.item(), leak.item())
        opt.zero_grad()
        (own + leak).backward()
        opt.step()
    assert own.item() < first[0] / 2 and leak.item() < first[1] / 2


def test_the_recorder_sees_every_cross_attention_and_changes_nothing():
    from ldm.unet import UNET_PRESETS, UNet

    torch.manual_seed(0)
    unet = UNet(replace(UNET_PRESETS["tiny"], sample_size=8)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    context = torch.randn(2, 7, unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = unet(x, t, context)
        with record_cross_attention(unet) as probs:
            recorded = unet(x, t, context)
        after = unet(x, t, context)
    assert torch.equal(plain, recorded)
    n_cross = sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
    assert len(probs) == n_cross > 0 and len(after) == 2
    for a in probs:
        side = int(a.shape[1] ** 0.5)
        assert a.shape == (2, side * side, 7) and side in (8, 4, 2, 1)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, side * side))


def test_recording_only_the_targeted_samples_gives_the_same_loss_and_gradients(tokenizer):
    from ldm.unet import UNET_PRESETS, UNet

    targets, ids = targets_for(tokenizer)
    torch.manual_seed(0)
    unet = UNet(replace(UNET_PRESETS["tiny"], sample_size=8))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 900, 500])
    context = torch.randn(3, len(ids), unet.config.cross_attention_dim)
    per_sample = [targets, None, targets]  # the middle one has no target (t >= t_max, say)
    results = []
    for rows in (None, [0, 2]):
        unet.zero_grad()
        with record_cross_attention(unet, rows) as probs:
            unet(x, t, context)
        assert all(a.shape[0] == (3 if rows is None else 2) for a in probs)
        own, leak = grounding_terms(probs, per_sample)
        (own + leak).backward()
        grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
        results.append((own.detach(), leak.detach(), grads))
    (own0, leak0, g0), (own1, leak1, g1) = results
    torch.testing.assert_close(own1, own0)
    torch.testing.assert_close(leak1, leak0)
    assert g0.keys() == g1.keys() and any("attn2.to_q" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)
    # no sample with a target: nothing recorded; a wrong number of samples: a clear error
    with record_cross_attention(unet, []) as probs:
        unet(x, t, context)
    assert probs == []
    with pytest.raises(ValueError, match="expected 3 .* or 2"):
        grounding_terms([a[:1] for a in probs_full(unet, x, t, context)], per_sample)


def probs_full(unet, x, t, context):
    with torch.no_grad(), record_cross_attention(unet) as probs:
        unet(x, t, context)
    return probs


def test_a_shapes_folder_gives_targets_and_other_folders_a_clear_error(tmp_path, tokenizer):
    folder = make_dataset(tmp_path / "d", 40, seed=3, size=32)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    g = Grounding(folder, tokenizer, t_max=800)

    def ids(texts):
        return [ids_of(tokenizer, text) for text in texts]

    names, captions = [r["file_name"] for r in rows], [r["text"] for r in rows]
    found = g.targets(names, captions, torch.zeros(len(rows), dtype=torch.long), ids)
    named_once = [t for t, r in zip(found, rows) if t is not None]
    assert len(named_once) >= 30  # all but "two red circles" captions
    for t, r in zip(found, rows):
        if t is not None:
            scene = spec_from_dict(r["scene"])
            assert all(obj in scene.objects for _, obj in t)
    # dropped captions and t >= t_max give none
    late = torch.full((len(rows),), 800)
    assert g.targets(names, captions, late, ids) == [None] * len(rows)
    assert g.targets(names, [""] * len(rows), torch.zeros(len(rows)), ids) == [None] * len(rows)
    assert len(read_scenes(folder)) == 40
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="'spec' and 'scene'"):
        read_scenes(tmp_path / "plain")
    with pytest.raises(ValueError, match="made by train.shapes"):
        read_scenes(tmp_path / "nothing")
