"""Text encoders: parity with diffusers' encode_prompt and open_clip, long prompts, weighting."""

import logging
import types

import pytest
import torch

from text_encoder import (
    ClipTextEncoder,
    OpenClipTextEncoder,
    T5TextEncoder,
    TextEmbedding,
    clip_text_to_open_clip,
    encode_prompt,
    offline_clip_tokenizer,
    open_clip_to_clip_text,
    parse_prompt_weights,
)
from text_encoder.clip import LEGACY_PREFIX

PROMPTS = ["a photo of a cat", "An astronaut riding a horse, café, 4k"]
LONG = "a cat " * 50  # 100 tokens: 75 fit, 25 are dropped or chunked


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Perturb every parameter (LayerNorm gains too) so that no weight is a trivial 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def tokenizer():
    return offline_clip_tokenizer()


@pytest.fixture(scope="module")
def clip_model():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
    )  # fmt: skip
    model = CLIPTextModel(config).eval()
    randomize(model, seed=1)
    return model


@pytest.fixture(scope="module")
def encoder(clip_model, tokenizer):
    return ClipTextEncoder(clip_model, tokenizer)


@pytest.fixture(scope="module")
def diffusers_pipe(clip_model, tokenizer):
    """diffusers' StableDiffusionPipeline holding the same text encoder (text parts only)."""
    diffusers = pytest.importorskip("diffusers")
    # diffusers 0.42 reaches `text_encoder.text_model.final_layer_norm` for clip_skip, a path
    # transformers 5 removed (CLIPTextModel holds final_layer_norm itself): give it the path.
    clip_model.__dict__["text_model"] = types.SimpleNamespace(
        final_layer_norm=clip_model.final_layer_norm
    )
    return diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=clip_model, tokenizer=tokenizer, unet=None, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


# ---- parity with diffusers' StableDiffusionPipeline.encode_prompt --------------------------------


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
@pytest.mark.parametrize("negative", [None, ["blurry, ugly", "low quality"]])
def test_encode_prompt_matches_diffusers(encoder, diffusers_pipe, clip_skip, negative):
    prompts = [PROMPTS[0], LONG]  # the long one is truncated by both
    with torch.no_grad():
        theirs = diffusers_pipe.encode_prompt(
            prompts, "cpu", 2, True, negative, clip_skip=clip_skip
        )
        ours = encode_prompt(encoder, prompts, negative, 2, True, clip_skip=clip_skip)
    # Tolerance: none. The same modules run on the same ids in the same batches.
    assert ours[0].shape == (4, 77, 32)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_encode_prompt_single_string_and_no_guidance(encoder, diffusers_pipe):
    with torch.no_grad():
        theirs = diffusers_pipe.encode_prompt("a red circle", "cpu", 3, True, "a blue square")
        ours = encode_prompt(encoder, "a red circle", "a blue square", 3, True)
        theirs_cond, theirs_none = diffusers_pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        ours_cond, ours_none = encode_prompt(encoder, PROMPTS, None, 1, False)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert ours_none is None and theirs_none is None and torch.equal(ours_cond, theirs_cond)


def test_clip_skip_negative_applies_clip_skip_to_uncond(encoder):
    with torch.no_grad():
        _, uncond = encode_prompt(encoder, PROMPTS, None, 1, True, clip_skip=1)
        _, skipped = encode_prompt(encoder, PROMPTS, None, 1, True, 1, clip_skip_negative=True)
        expected = encoder.encode(["", ""], clip_skip=1).context
    assert not torch.equal(uncond, skipped) and torch.equal(skipped, expected)


# ---- the TextEmbedding interface ----------------------------------------------------------------


def test_embedding_shapes_and_pooled(encoder, clip_model, tokenizer):
    with torch.no_grad():
        out = encoder.encode(PROMPTS)
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
        reference = clip_model(ids["input_ids"])
    assert isinstance(out, TextEmbedding) and encoder.max_length == 77
    assert out.context.shape == (2, 77, 32) and out.pooled.shape == (2, 32)
    assert out.mask.dtype == torch.bool and torch.equal(out.mask, ids["attention_mask"].bool())
    assert torch.equal(out.context, reference.last_hidden_state)
    assert torch.equal(out.pooled, reference.pooler_output)


def test_clip_skip_is_an_earlier_layer_through_final_layer_norm(encoder, clip_model):
    with torch.no_grad():
        out = encoder.encode(PROMPTS, clip_skip=1)
        ids = encoder.tokenize(PROMPTS, long_prompt="truncate", weighting=False).ids
        hidden = clip_model(ids, output_hidden_states=True).hidden_states
        zero = encoder.encode(PROMPTS, clip_skip=0)
    assert torch.equal(out.context, clip_model.final_layer_norm(hidden[-2]))
    assert torch.equal(zero.context, encoder.encode(PROMPTS).context.detach())


def test_to_changes_dtype(clip_model, tokenizer):
    import copy

    encoder = ClipTextEncoder(copy.deepcopy(clip_model), tokenizer).to(dtype=torch.float64)
    with torch.no_grad():
        out = encoder.encode(PROMPTS)
    assert out.context.dtype == torch.float64 and out.pooled.dtype == torch.float64
    assert encoder.device == torch.device("cpu")


# ---- long prompts -------------------------------------------------------------------------------


def test_truncation_warns_with_the_dropped_count(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="text_encoder.base"), torch.no_grad():
        out = encoder.encode([LONG, "a dog"])
    assert out.context.shape == (2, 77, 32)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "prompt 0 has 100 tokens" in message and "dropped the last 25 tokens" in message


def test_chunked_long_prompt(encoder, caplog):
    with caplog.at_level(logging.WARNING), torch.no_grad():
        chunked = encoder.encode([LONG, "a dog"], long_prompt="chunk")
        assert not caplog.records  # chunking drops nothing, so it does not warn
        truncated = encoder.encode([LONG, "a dog"])
        rest = encoder.encode(["cat " + "a cat " * 12])  # tokens 76..100 of LONG
        empty = encoder.encode([""])
    assert chunked.context.shape == (2, 154, 32) and chunked.mask.shape == (2, 154)
    assert chunked.mask.sum(dim=1).tolist() == [77 + 27, 4 + 2]
    # Each chunk is encoded on its own: chunk 1 is the truncated prompt, chunk 2 the rest,
    # and the short prompt gets an empty chunk. Bitwise: the same ids in the same batch shapes.
    assert torch.equal(chunked.context[:, :77], truncated.context)
    assert torch.equal(chunked.context[0, 77:], rest.context[0])
    assert torch.equal(chunked.context[1, 77:], empty.context[0])
    assert torch.equal(chunked.pooled, truncated.pooled)
    # Regression slice (seeded tiny model); 1e-4 allows BLAS summation-order differences.
    expected = torch.tensor(
        [
            [0.107683, 0.532991, -0.068842],
            [0.439998, 0.370364, 0.309336],
            [-0.244992, 1.475512, 0.151327],
        ]
    )
    torch.testing.assert_close(chunked.context[0, 77:80, :3], expected, atol=1e-4, rtol=0)


def test_encode_prompt_pads_chunks_to_the_same_length(encoder):
    with torch.no_grad():
        cond, uncond = encode_prompt(encoder, [LONG], "blurry", 2, True, long_prompt="chunk")
        negative = encoder.encode(["blurry"]).context
        empty = encoder.encode([""]).context
    assert cond.shape == uncond.shape == (2, 154, 32)
    assert torch.equal(uncond[1, :77], negative[0]) and torch.equal(uncond[1, 77:], empty[0])


# ---- prompt weighting ---------------------------------------------------------------------------

WEIGHT_CASES = [
    ("a red cat", [("a red cat", 1.0)]),
    ("a (red:1.3) cat", [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]),
    ("(red)", [("red", 1.1)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    ("[red]", [("red", 1 / 1.1)]),
    ("(a [b] c:1.5)", [("a ", 1.5), ("b", 1.5 / 1.1), (" c", 1.5)]),
    (r"\(not weighted\) \[x\] a\\b", [(r"(not weighted) [x] a\b", 1.0)]),
    ("smile :) ok", [("smile :) ok", 1.0)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("a (red cat", [("a ", 1.0), ("red cat", 1.1)]),
    ("(red:0.5)(blue: 2 )", [("red", 0.5), ("blue", 2.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", WEIGHT_CASES)
def test_parse_prompt_weights(prompt, expected):
    parsed = parse_prompt_weights(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_weighting_scales_exactly_the_weighted_rows(encoder):
    with torch.no_grad():
        plain = encoder.encode(["a red cat on a mat"])
        weighted = encoder.encode(["a (red cat:1.5) on a [mat]"], weighting=True)
        unchanged = encoder.encode(["a red cat on a mat"], weighting=True)
    # Tokens: BOS a red cat on a mat EOS -> rows 2, 3 (x1.5) and 6 (x1/1.1) are weighted.
    scale = torch.ones(77)
    scale[2:4], scale[6] = 1.5, 1 / 1.1
    assert torch.equal(weighted.context[0], plain.context[0] * scale[:, None])
    rows = scale == 1
    assert torch.equal(weighted.context[0, rows], plain.context[0, rows])
    assert torch.equal(unchanged.context, plain.context)
    assert torch.equal(weighted.pooled, plain.pooled)  # pooled is never weighted


def test_weighting_restore_mean(encoder):
    with torch.no_grad():
        plain = encoder.encode([LONG], long_prompt="chunk")
        weighted = encoder.encode(
            ["(" + LONG + ":1.4)"], long_prompt="chunk", weighting=True, restore_mean=True
        )
    for chunk in (slice(0, 77), slice(77, 154)):
        # float32 means of 77 x 32 values: 1e-5 is a few ulps of their sum.
        torch.testing.assert_close(
            weighted.context[0, chunk].mean(), plain.context[0, chunk].mean(), atol=1e-5, rtol=0
        )
    assert not torch.allclose(weighted.context, plain.context)


# ---- clear errors -------------------------------------------------------------------------------


def test_errors(encoder, tmp_path):
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a str"):
        encoder.encode(["ok", 3])
    with pytest.raises(ValueError, match="prompts must be a list"):
        encoder.encode("a cat")
    with pytest.raises(ValueError, match="prompt must be a list of str"):
        encode_prompt(encoder, 3, None, 1, True)
    with pytest.raises(ValueError, match="negative_prompt has 1 prompts but prompt has 2"):
        encode_prompt(encoder, PROMPTS, ["x"], 1, True)
    with pytest.raises(ValueError, match="long_prompt must be one of"):
        encoder.encode(PROMPTS, long_prompt="split")
    with pytest.raises(ValueError, match=r"clip_skip must be in \[0, 2\]"):
        encoder.encode(PROMPTS, clip_skip=3)
    with pytest.raises(ValueError, match="clip_skip must be None or an int"):
        encoder.encode(PROMPTS, clip_skip=True)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        encode_prompt(encoder, PROMPTS, None, 0, True)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        ClipTextEncoder.from_pretrained(tmp_path / "missing")


# ---- diffusers folder layout --------------------------------------------------------------------


def test_save_and_load_diffusers_layout(encoder, tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    encoder.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "text_encoder" / "model.safetensors").keys()
    assert keys and all(k.startswith(LEGACY_PREFIX) for k in keys)  # the diffusers-folder keys
    assert (tmp_path / "tokenizer" / "vocab.json").is_file()
    loaded = ClipTextEncoder.from_pretrained(tmp_path)
    # What diffusers does: transformers' from_pretrained on the two subfolders.
    model = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    with torch.no_grad():
        expected = encoder.encode(PROMPTS).context
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
        assert torch.equal(loaded.encode(PROMPTS).context, expected)
        assert torch.equal(model(ids["input_ids"]).last_hidden_state, expected)


def test_folder_without_tokenizer_uses_the_offline_one(encoder, tmp_path):
    encoder.model.save_pretrained(tmp_path / "text_encoder")
    loaded = ClipTextEncoder.from_pretrained(tmp_path)
    assert loaded.tokenizer("a photo of a cat")["input_ids"][:3] == [49406, 320, 1125]
    with torch.no_grad():
        assert torch.equal(loaded.encode(PROMPTS).context, encoder.encode(PROMPTS).context)


# ---- OpenCLIP (SD 2.x) --------------------------------------------------------------------------

OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3},
}


@pytest.fixture(scope="module")
def open_clip_encoder():
    pytest.importorskip("open_clip")
    torch.manual_seed(0)
    encoder = OpenClipTextEncoder.from_config(OPEN_CLIP_CONFIG)
    randomize(encoder.model, seed=2, std=0.2)
    return encoder


def converted(tower_state, **options):
    from transformers import CLIPTextConfig, CLIPTextModel

    state, config = open_clip_to_clip_text(tower_state, num_attention_heads=4, **options)
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    model.load_state_dict(state, strict=True)
    return model


def test_open_clip_tokens_equal_open_clip_tokenize(open_clip_encoder):
    import open_clip

    prompts = [*PROMPTS, "Hello, World! (x)"]
    ours = open_clip_encoder.tokenize(prompts, long_prompt="truncate", weighting=False).ids
    assert torch.equal(ours, open_clip.tokenize(prompts))


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_open_clip_equals_converted_clip_text_model(open_clip_encoder, clip_skip):
    """SD 2.x: the full tower minus its last block == the converted 23-of-24-layer model."""
    model = converted(open_clip_encoder.model.state_dict())
    assert model.config.num_hidden_layers == 2  # diffusers' convention: the last block dropped
    ours = ClipTextEncoder(model, offline_clip_tokenizer(pad_token="!"))
    with torch.no_grad():
        a = open_clip_encoder.encode(PROMPTS, clip_skip=clip_skip)
        b = ours.encode(PROMPTS, clip_skip=clip_skip)
    # float32 rounding: nn.MultiheadAttention vs transformers' SDPA attention.
    torch.testing.assert_close(a.context, b.context, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-5)
    assert a.context.abs().max() > 0.1  # not a degenerate comparison


def test_open_clip_encoder_follows_open_clip(open_clip_encoder):
    """Our block loop equals open_clip's own forward_intermediates (penultimate, ln_final)."""
    import open_clip

    ids = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        theirs = open_clip_encoder.model.forward_intermediates(
            ids, indices=[1], normalize_intermediates=True, intermediates_only=True,
            output_fmt="NLC",
        )["text_intermediates"][0]  # fmt: skip
        ours = open_clip_encoder.encode(PROMPTS).context
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # same modules, same order


def test_full_conversion_reproduces_open_clip_text_features(open_clip_encoder):
    import open_clip

    tower = open_clip_encoder.model
    model = converted(tower.state_dict(), drop_last_layer=False)
    ids = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        theirs = tower(ids)  # open_clip: ln_final(all blocks) at EOT, @ text_projection
        ours = model(ids).pooler_output @ tower.text_projection
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # float32 attention rounding


def test_conversion_round_trip(open_clip_encoder):
    original = open_clip_encoder.model.state_dict()
    full, config = open_clip_to_clip_text(original, drop_last_layer=False, num_attention_heads=4)
    assert config["num_hidden_layers"] == 3 and config["projection_dim"] == 16
    assert config["intermediate_size"] == 128 and config["hidden_act"] == "gelu"
    back = clip_text_to_open_clip(full)
    expected = {k: v for k, v in original.items() if k != "text_projection"}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    legacy = {LEGACY_PREFIX + k: v for k, v in full.items()}  # transformers 4.x key layout
    assert all(torch.equal(v, back[k]) for k, v in clip_text_to_open_clip(legacy).items())
    dropped, _ = open_clip_to_clip_text(original, num_attention_heads=4)
    assert clip_text_to_open_clip(dropped).keys() == {
        k for k in expected if not k.startswith("transformer.resblocks.2.")
    }


def test_open_clip_checkpoint_loading(open_clip_encoder, tmp_path):
    from safetensors.torch import save_file

    state = {
        f"cond_stage_model.model.{k}": v for k, v in open_clip_encoder.model.state_dict().items()
    }
    save_file(state, tmp_path / "sd2.safetensors")  # an SD 2.x-style file (text part only)
    torch.save(open_clip_encoder.model.state_dict(), tmp_path / "open_clip.pt")
    with torch.no_grad():
        expected = open_clip_encoder.encode(PROMPTS).context
        for name in ("sd2.safetensors", "open_clip.pt"):
            loaded = OpenClipTextEncoder.from_config(OPEN_CLIP_CONFIG, tmp_path / name)
            assert torch.equal(loaded.encode(PROMPTS).context, expected), name
    with pytest.raises(FileNotFoundError):
        OpenClipTextEncoder.from_config(OPEN_CLIP_CONFIG, tmp_path / "missing.pt")


def test_open_clip_conversion_errors(open_clip_encoder):
    state = dict(open_clip_encoder.model.state_dict())
    with pytest.raises(ValueError, match="token_embedding.weight"):
        open_clip_to_clip_text({f"cond_stage_model.model.{k}": v for k, v in state.items()})
    with pytest.raises(ValueError, match="no CLIPTextModel equivalent"):
        layer_scale = {**state, "transformer.resblocks.0.ls_1.gamma": torch.ones(32)}
        open_clip_to_clip_text(layer_scale, num_attention_heads=4)
    with pytest.raises(ValueError, match="must divide"):
        open_clip_to_clip_text(state, num_attention_heads=5)
    with pytest.raises(ValueError, match="not an open_clip model name"):
        OpenClipTextEncoder.from_config("no-such-model")


# ---- T5 -----------------------------------------------------------------------------------------

T5_WORDS = ["a", "cat", "red", "dog", "photo", "of", "big", "blue", "the", "on"]


@pytest.fixture(scope="module")
def t5_encoder():
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0 - 0.1 * i) for i, w in enumerate(T5_WORDS)]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2
    )
    return T5TextEncoder(T5EncoderModel(config).eval(), tokenizer, max_length=8)


def test_t5_matches_the_tokenizer_and_model(t5_encoder):
    prompts = ["a red cat", "the big blue dog on a photo of a cat"]  # the second is truncated
    ids = t5_encoder.tokenizer(
        prompts, padding="max_length", max_length=8, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = t5_encoder.encode(prompts)
        reference = t5_encoder.model(**ids).last_hidden_state
    batch = t5_encoder.tokenize(prompts, long_prompt="truncate", weighting=False)
    assert torch.equal(batch.ids, ids["input_ids"])
    assert torch.equal(out.mask, ids["attention_mask"].bool())
    assert out.pooled is None and out.context.shape == (2, 8, 16)
    assert torch.equal(out.context, reference)


def test_t5_chunks_of_max_length_minus_one(t5_encoder):
    prompts = ["a red cat " * 4]  # 12 tokens -> chunks of 7, 5
    with torch.no_grad():
        out = t5_encoder.encode(prompts, long_prompt="chunk")
    batch = t5_encoder.tokenize(prompts, long_prompt="chunk", weighting=False)
    assert out.context.shape == (1, 16, 16) and batch.mask.sum().item() == 7 + 1 + 5 + 1
    assert batch.ids[0, 7].item() == t5_encoder.eos_id


def test_t5_folder_round_trip_and_errors(t5_encoder, tmp_path):
    t5_encoder.save_pretrained(tmp_path, "text_encoder_3", "tokenizer_3")
    loaded = T5TextEncoder.from_pretrained(tmp_path, "text_encoder_3", "tokenizer_3", max_length=8)
    with torch.no_grad():
        assert torch.equal(loaded.encode(["a cat"]).context, t5_encoder.encode(["a cat"]).context)
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        T5TextEncoder.from_pretrained(tmp_path, "text_encoder_3", "missing")
    with pytest.raises(ValueError, match="clip_skip applies to CLIP encoders only"):
        t5_encoder.encode(["a cat"], clip_skip=1)
    with pytest.raises(ValueError, match="pass max_length"):
        T5TextEncoder(t5_encoder.model, t5_encoder.tokenizer)
