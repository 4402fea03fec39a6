"""Contrastive text-encoder pretraining (`ldm train-text`): the edits, the loss, bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.text_pretrain import PretrainConfig, contrastive_loss, edits, hard_negatives


def test_edits_change_one_attribute_and_keep_the_grammar():
    rng = np.random.default_rng(0)
    caption = "there is a red circle to the right of a small orange triangle"
    got = dict(edits(caption, rng))
    assert set(got) == {"shape", "colour", "flip"}
    # one shape word replaced by another shape, the rest unchanged
    before, after = caption.split(), got["shape"].split()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1
    assert changed[0][0] in ("circle", "triangle") and changed[0][1] in (
        "circle", "square", "triangle", "cross")  # fmt: skip
    # the two colours swapped, with the articles they need
    assert got["colour"] == "there is an orange circle to the right of a small red triangle"
    assert got["flip"] == "there is a red circle to the left of a small orange triangle"
    # plurals stay plural; one colour is changed when there is only one
    for _ in range(20):
        two = dict(edits("two green crosses", rng))
        assert two["shape"].split()[-1] in ("circles", "squares", "triangles")
        assert two["colour"].split()[1] != "green" and two["colour"].endswith(" crosses")
    assert dict(edits("an image of an orange square", rng))["colour"].startswith("an image of a ")
    assert hard_negatives("a picture of nothing", rng) == []


def test_contrastive_loss_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(9, 8, generator=g)  # 4 negatives
    scale = torch.tensor(7.0)
    a, b = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale * a @ b.T
    i2t = -torch.stack([logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(5)]).mean()
    sq = logits[:, :5]
    t2i = -torch.stack([sq[i, i] - torch.logsumexp(sq[:, i], 0) for i in range(5)]).mean()
    torch.testing.assert_close(contrastive_loss(img, txt, scale), (i2t + t2i) / 2)
    # pairs far apart from everything else: ~0; identical embeddings everywhere: log of counts
    eye = torch.eye(5, 8)
    assert contrastive_loss(eye, eye, torch.tensor(100.0)) < 1e-6
    same = torch.ones(5, 8)
    expected = (math.log(9) + math.log(5)) / 2
    assert abs(contrastive_loss(same, torch.ones(9, 8), scale).item() - expected) < 1e-5


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="width=60 must be a multiple of heads=8"):
        PretrainConfig("d", "o", width=60, heads=8)
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        PretrainConfig("d", "o", steps=0)
    with pytest.raises(ValueError, match="learning_rate"):
        PretrainConfig("d", "o", learning_rate=0)
    with pytest.raises(ValueError, match="max_length=2 must be >= 3"):
        PretrainConfig("d", "o", max_length=2)


def test_max_length_sets_the_positions_and_the_padded_length(tmp_path):
    from text_encoder import ClipTextEncoder, ClipTextModel
    from train.shapes import make_dataset
    from train.text_pretrain import main

    make_dataset(tmp_path / "d", 16, seed=0, size=32)
    argv = ["--data", str(tmp_path / "d"), "--output", str(tmp_path / "o"), "--width", "16",
            "--layers", "1", "--heads", "2", "--resolution", "32", "--steps", "2",
            "--batch-size", "8", "--max-length", "24"]  # fmt: skip
    assert main(argv) == 0
    model = ClipTextModel.from_pretrained(tmp_path / "o")
    assert model.config.max_position_embeddings == 24
    encoder = ClipTextEncoder(model)  # the offline tokenizer pads to the model's positions
    with torch.no_grad():
        assert encoder.encode(["a red circle", ""]).context.shape == (2, 24, 16)


def test_missing_metadata_names_the_folder(tmp_path):
    from train.text_pretrain import load_captioned

    with pytest.raises(FileNotFoundError, match="no metadata.jsonl"):
        load_captioned(tmp_path, 32)


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    from train.text_pretrain import main

    assert main(["--data", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "ldm train-text: error: data:" in capsys.readouterr().err
    argv = ["--data", str(tmp_path), "--output", str(tmp_path / "o"), "--width", "60"]
    argv += ["--heads", "8"]
    assert main(argv) == 2
    assert "width=60 must be a multiple of heads=8" in capsys.readouterr().err


def test_a_batch_larger_than_the_data_is_refused(tmp_path):
    from train.shapes import make_dataset
    from train.text_pretrain import pretrain

    make_dataset(tmp_path / "d", 8, seed=0, size=32)
    cfg = PretrainConfig(str(tmp_path / "d"), str(tmp_path / "o"), resolution=32, batch_size=16)
    with pytest.raises(ValueError, match="batch_size=16 must be <= the 8 images in"):
        pretrain(cfg)


def test_pad_loss_is_the_distance_to_the_empty_captions_padding():
    from text_encoder.clip_model import eos_positions
    from train.text_pretrain import PretrainConfig as Cfg
    from train.text_pretrain import build_text_encoder, pad_loss

    torch.manual_seed(0)
    encoder = build_text_encoder(Cfg("d", "o", width=16, layers=2, heads=2))
    captions = ["a red circle", "there is a small blue square left of a green cross"]
    ids = encoder.tokenize([*captions, ""]).ids
    with torch.no_grad():
        hidden = encoder.model(ids).last_hidden_state
        got = pad_loss(encoder, captions)
    eos = eos_positions(ids, encoder.model.config.eos_token_id).tolist()
    rows = [(hidden[b, p] - hidden[2, p]).pow(2).mean() for b in range(2)
            for p in range(eos[b] + 1, ids.shape[1])]  # fmt: skip
    torch.testing.assert_close(got, torch.stack(rows).mean())
    assert got > 0  # a causal encoder's padding sees the caption
    assert pad_loss(encoder, ["", ""]) == 0  # the empty caption is its own target
    # only the padding is pulled: the words and the EOS get no gradient from it
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["out"] = out

    encoder.model.final_layer_norm.register_forward_hook(keep)
    pad_loss(encoder, captions).backward()
    g = seen["out"].grad
    for b in range(2):
        assert g[b, : eos[b] + 1].abs().max() == 0 and g[b, eos[b] + 1 :].abs().max() > 0


def test_pad_loss_training_makes_the_padding_caption_free(tmp_path):
    from text_encoder import ClipTextEncoder, ClipTextModel
    from train.shapes import make_dataset
    from train.text_pretrain import load_captioned, pad_loss, pretrain

    make_dataset(tmp_path / "d", 32, seed=0, size=32)
    captions = load_captioned(tmp_path / "d", 32)[1]
    after = {}
    for weight in (0.0, 1.0):
        cfg = PretrainConfig(str(tmp_path / "d"), str(tmp_path / f"o{weight}"), width=16,
                             layers=2, heads=2, resolution=32, steps=30, batch_size=16,
                             pad_loss=weight)  # fmt: skip
        pretrain(cfg)
        encoder = ClipTextEncoder(ClipTextModel.from_pretrained(cfg.output))
        with torch.no_grad():
            after[weight] = pad_loss(encoder, captions).item()
    assert after[1.0] < after[0.0] / 3, after  # measured: 0.066 against 0.388
    with pytest.raises(ValueError, match="pad_loss=-1"):
        PretrainConfig("d", "o", pad_loss=-1)
