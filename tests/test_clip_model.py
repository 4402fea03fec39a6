"""The torch-only CLIP text path (clip_model.py, bpe.py) against transformers on the same weights.

Tolerance everywhere: none (torch.equal). Our model calls the same torch kernels as transformers'
CLIPTextModel (Linear, LayerNorm, scaled_dot_product_attention with the same is_causal / mask
arguments) in the same order on the same float32 weights, so CPU results are bitwise equal.
"""

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from text_encoder import (
    CLIP_TEXT_PRESETS,
    ClipBpeTokenizer,
    ClipTextConfig,
    ClipTextEncoder,
    ClipTextModel,
    encode_prompt,
    offline_clip_tokenizer,
    write_clip_tokenizer,
)
from text_encoder.clip_model import eos_positions

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = 49406, 49407

# (hidden_act, width, intermediate, layers, heads, eos_token_id): OpenAI-style and OpenCLIP-style
# (SD 2.x: gelu, eos_token_id=2 i.e. pooling at the largest id), different shapes.
CONFIGS = {
    "quick_gelu": dict(hidden_act="quick_gelu", hidden_size=32, intermediate_size=37,
                       num_hidden_layers=3, num_attention_heads=4),
    "gelu_eos2": dict(hidden_act="gelu", hidden_size=48, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=3, eos_token_id=2,
                      bos_token_id=0, layer_norm_eps=1e-6),
    "wide": dict(hidden_act="quick_gelu", hidden_size=64, intermediate_size=80,
                 num_hidden_layers=4, num_attention_heads=8, max_position_embeddings=40),
}  # fmt: skip

PROMPTS = [
    "a photo of a cat",
    "A RED Circle above a blue square",
    "Hello, World!",
    "An astronaut riding a horse on Mars, 4k, trending on artstation.",
    "it's  they're   I'll we'd don't IT'S",
    "price: $3.50 (50% off) #sale @home",
    "a\tb\nc   ",
    "  leading and trailing  ",
    "café naïve façade",
    "Ünïcödé ÅÄÖ ñ ß ΟΔΟΣ İstanbul",
    "e\u0301 (decomposed é) ﬁ ﬀ Ｆｕｌｌｗｉｄｔｈ",
    "日本の猫, 中文提示词",
    "Привет мир",
    "🐱🐶 emoji! 👩‍👩‍👧",
    "x²+y²=z² ½ ⅓ ① ٣",
    "red_circle-blue.square/green\\triangle",
    "a (red:1.3) [cat] {dog} <tag>",
    "0123456789 3.14159",
    "masterpiece, best quality, 1girl, ultra-detailed, 8K UHD!!!",
    "hello!! ?! a!b !",
    "supercalifragilisticexpialidocious",
    "'s''s ' quote's",
    "&amp; &lt;b&gt; html entities",
    "<|endoftext|> inside, <|ENDOFTEXT|>!, <|startoftext|>x",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic\u2028line\x1cfs",
    "",
    "   ",
    "cat " * 100,  # truncated
    "a very long prompt, " * 30,
]


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter (LayerNorm gains too) so that no weight is a trivial 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def reference_model(name: str):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **CONFIGS[name])).eval()
    randomize(model, seed=1)
    return model


def random_ids(length: int, seed: int) -> torch.Tensor:
    """Framed rows (BOS ... EOS, EOS-padded) of several lengths, and one row without EOS."""
    ids = torch.randint(0, BOS, (4, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = BOS
    for row, end in enumerate([3, length // 2, length - 1]):
        ids[row, end:] = EOS
    return ids


@pytest.fixture(scope="module")
def tokenizers():
    return ClipBpeTokenizer.offline(), offline_clip_tokenizer()


# ---- the model --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("masked", [False, True])
def test_model_equals_transformers(name, masked):
    theirs = reference_model(name)
    ours = ClipTextModel.from_state_dict(theirs.state_dict(), ClipTextConfig(**CONFIGS[name]))
    length = CONFIGS[name].get("max_position_embeddings", 77)
    ids = random_ids(length, seed=2)
    mask = None
    if masked:  # a padding mask with zeros: the boolean causal-and-padding path of SDPA
        mask = torch.ones_like(ids)
        mask[0, 4:], mask[1, length // 2 + 1 :] = 0, 0
    with torch.no_grad():
        a = theirs(ids, attention_mask=mask, output_hidden_states=True)
        b = ours(ids, attention_mask=mask, output_hidden_states=True)
    assert len(b.hidden_states) == CONFIGS[name]["num_hidden_layers"] + 1
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)
    assert b.last_hidden_state.abs().max() > 0.1  # not a degenerate comparison


def test_pooling_rules():
    ids = torch.tensor([[5, 9, 7, 2, 2], [5, 7, 7, 3, 1]])
    # transformers' rule: the first eos_token_id, except for old configs (2): the largest id.
    assert eos_positions(ids, 7).tolist() == [2, 1]
    assert eos_positions(ids, 2).tolist() == [1, 1]
    assert eos_positions(ids, 49407).tolist() == [0, 0]  # no EOS: position 0, as transformers


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_encoder_equals_transformers_encoder(tokenizers, clip_skip):
    theirs = ClipTextEncoder(reference_model("quick_gelu"), tokenizers[1])
    ours = ClipTextEncoder(
        ClipTextModel.from_state_dict(
            theirs.model.state_dict(), ClipTextConfig(**CONFIGS["quick_gelu"])
        ),
        tokenizers[0],
    )
    prompts = PROMPTS[:4]
    with torch.no_grad():
        a, b = (
            theirs.encode(prompts, clip_skip=clip_skip),
            ours.encode(prompts, clip_skip=clip_skip),
        )
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
    assert torch.equal(a.mask, b.mask)


def test_encode_prompt_through_ours_equals_through_transformers(tokenizers):
    theirs = ClipTextEncoder(reference_model("gelu_eos2"), offline_clip_tokenizer(pad_token="!"))
    config = ClipTextConfig(**CONFIGS["gelu_eos2"])
    ours = ClipTextEncoder(
        ClipTextModel.from_state_dict(theirs.model.state_dict(), config),
        ClipBpeTokenizer.offline(pad_token="!"),
    )
    prompts = ["a (red:1.3) circle!", "a very long prompt, " * 40]  # 200 tokens: 3 chunks
    options = dict(clip_skip=1, long_prompt="chunk", weighting=True)
    with torch.no_grad():
        a = encode_prompt(theirs, prompts, ["blurry!", ""], 2, True, **options)
        b = encode_prompt(ours, prompts, ["blurry!", ""], 2, True, **options)
    assert a[0].shape == (4, 3 * 77, 48)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_use_attention_mask_config():
    """diffusers' opt-in `use_attention_mask`: padding is masked, in ours as in transformers."""
    from transformers import CLIPTextConfig, CLIPTextModel

    kwargs = dict(CONFIGS["quick_gelu"], use_attention_mask=True)
    torch.manual_seed(0)
    theirs = CLIPTextModel(CLIPTextConfig(**kwargs)).eval()
    randomize(theirs, seed=3)
    state = theirs.state_dict()
    masked = ClipTextEncoder(ClipTextModel.from_state_dict(state, ClipTextConfig(**kwargs)))
    plain = ClipTextEncoder(
        ClipTextModel.from_state_dict(state, ClipTextConfig(**CONFIGS["quick_gelu"]))
    )
    with torch.no_grad():
        expected = ClipTextEncoder(theirs, offline_clip_tokenizer()).encode(["a cat"]).context
        a, b = masked.encode(["a cat"]).context, plain.encode(["a cat"]).context
    assert torch.equal(a, expected)
    assert torch.equal(a[0, :4], b[0, :4]) and not torch.equal(a[0, 4:], b[0, 4:])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = ClipTextModel(CLIP_TEXT_PRESETS["tiny"])
    ids = random_ids(77, seed=4)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model.train()(ids).last_hidden_state.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    # Tolerance: none; the recomputed forward is the same computation.
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_fresh_model_init():
    torch.manual_seed(0)
    model = ClipTextModel(CLIP_TEXT_PRESETS["tiny"])
    layer = model.text_model.encoder.layers[0]
    assert torch.equal(layer.layer_norm1.weight, torch.ones(32))
    assert torch.equal(layer.self_attn.q_proj.bias, torch.zeros(32))
    std = model.text_model.embeddings.token_embedding.weight.std().item()
    assert abs(std - 0.02) < 0.001  # 1.6M draws: the sample std is within 0.1% of 0.02
    assert layer.mlp.fc1.weight.std().item() == pytest.approx(64**-0.5, rel=0.1)  # 2048 draws


# ---- the folder format ------------------------------------------------------------------------


def test_load_folders_written_by_transformers(tmp_path):
    theirs = reference_model("quick_gelu")
    theirs.save_pretrained(tmp_path / "tf5")  # transformers 5: keys without `text_model.`
    ClipTextEncoder(theirs).save_pretrained(tmp_path / "diffusers")  # `text_model.` keys
    legacy = tmp_path / "legacy"  # transformers 4: a pickle with the position_ids buffer
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "tf5" / "config.json").read_text())
    state = {"text_model." + k: v for k, v in theirs.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, legacy / "pytorch_model.bin")
    ids = random_ids(77, seed=5)
    with torch.no_grad():
        expected = theirs(ids).last_hidden_state
        for folder in (tmp_path / "tf5", tmp_path / "diffusers" / "text_encoder", legacy):
            ours = ClipTextModel.from_pretrained(folder)
            assert ours.config == ClipTextConfig(**CONFIGS["quick_gelu"])
            assert torch.equal(ours(ids).last_hidden_state, expected), folder.name


def test_transformers_loads_what_we_save(tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    ours = ClipTextModel(ClipTextConfig(**CONFIGS["gelu_eos2"])).eval()
    randomize(ours, seed=6)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (
        config["architectures"] == ["CLIPTextModel"] and config["model_type"] == "clip_text_model"
    )
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert "text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    assert "text_model.final_layer_norm.weight" in keys and len(keys) == 2 + 16 * 2 + 2
    theirs = CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = random_ids(77, seed=7)
    with torch.no_grad():
        a, b = theirs(ids), ours(ids)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)


def test_dtype_follows_the_config(tmp_path):
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    ClipTextModel(CLIP_TEXT_PRESETS["tiny"]).half().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    assert ClipTextModel.from_pretrained(tmp_path).text_model.final_layer_norm.weight.dtype == (
        CLIPTextModel.from_pretrained(tmp_path).final_layer_norm.weight.dtype
    )
    assert ClipTextModel.from_pretrained(tmp_path, dtype=torch.float32).config.hidden_size == 32


def test_encoder_folder_round_trip_both_backends(tmp_path):
    theirs = ClipTextEncoder(reference_model("quick_gelu"), offline_clip_tokenizer(pad_token="!"))
    theirs.save_pretrained(tmp_path / "a")
    ours = ClipTextEncoder.from_pretrained(tmp_path / "a")
    assert isinstance(ours.model, ClipTextModel) and isinstance(ours.tokenizer, ClipBpeTokenizer)
    assert ours.pad_id == 0 and ours.architecture == theirs.architecture == "CLIPTextModel"
    ours.save_pretrained(tmp_path / "b")
    again = ClipTextEncoder.from_pretrained(tmp_path / "b", backend="transformers")
    assert type(again.model).__name__ == "CLIPTextModel" and again.pad_id == 0
    with torch.no_grad():
        contexts = [e.encode(PROMPTS[:3], clip_skip=1).context for e in (theirs, ours, again)]
    assert torch.equal(contexts[0], contexts[1]) and torch.equal(contexts[0], contexts[2])


def test_backend_torch_does_not_import_transformers(tmp_path):
    torch.manual_seed(0)
    ClipTextEncoder(ClipTextModel(CLIP_TEXT_PRESETS["tiny"])).save_pretrained(tmp_path)
    script = (
        "import sys, torch\n"
        "from text_encoder import ClipTextEncoder\n"
        f"encoder = ClipTextEncoder.from_pretrained({str(tmp_path)!r})\n"
        "with torch.no_grad():\n"
        "    context = encoder.encode(['a red circle above a blue square']).context\n"
        "assert context.shape == (1, 77, 32), context.shape\n"
        "heavy = ('transformers', 'open_clip', 'tokenizers')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        ClipTextEncoder.from_pretrained(tmp_path, backend="jax")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        ClipTextEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        ClipTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="must divide"):
        ClipTextConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="model_type"):
        ClipTextConfig.from_dict({"model_type": "t5"})
    state = ClipTextModel(CLIP_TEXT_PRESETS["tiny"]).state_dict()
    with pytest.raises(ValueError, match="1 unexpected keys"):
        ClipTextModel.from_state_dict(
            {**state, "text_projection.weight": torch.zeros(1)}, CLIP_TEXT_PRESETS["tiny"]
        )
    with pytest.raises(ValueError, match="missing keys"):
        ClipTextModel.from_state_dict(state, ClipTextConfig(**CONFIGS["quick_gelu"]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ClipTextModel(CLIP_TEXT_PRESETS["tiny"])(torch.zeros(1, 78, dtype=torch.long))
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no text encoder weights"):
        ClipTextEncoder.from_pretrained(tmp_path)


# ---- the tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_ids_equal_transformers(pad_token):
    ours = ClipBpeTokenizer.offline(pad_token=pad_token)
    theirs = offline_clip_tokenizer(pad_token=pad_token)
    call = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    a, b = ours(PROMPTS, **call), theirs(PROMPTS, **call)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    plain = dict(add_special_tokens=False)
    assert ours(PROMPTS, **plain)["input_ids"] == theirs(PROMPTS, **plain)["input_ids"]
    assert ours(PROMPTS[2])["input_ids"] == theirs(PROMPTS[2])["input_ids"]  # a single str
    longest = ours(PROMPTS[:3], padding=True)
    assert longest == dict(theirs(PROMPTS[:3], padding=True))
    for row in b["input_ids"][[0, 9, 13, 23]]:
        assert ours.decode(row) == theirs.decode(row)
        assert ours.decode(row, skip_special_tokens=True) == theirs.decode(
            row, skip_special_tokens=True
        )


def test_tokenizer_on_a_sample_of_all_unicode(tokenizers):
    """3000 random characters, each in letters, digits and repeats, tokenize as transformers.

    Sampled among characters assigned by Unicode 3.2, which every Unicode table in use agrees
    on. Characters unassigned in Python's table (14.0 on 3.11) but assigned in the newer one of
    `tokenizers` can differ (\\p{L}, lowercasing): 1545 of the first 0x30000 code points do.
    """
    generator = torch.Generator().manual_seed(0)
    points = torch.randint(0, 0x30000, (20000,), generator=generator).tolist()
    old = unicodedata.ucd_3_2_0
    chars = [chr(p) for p in points if old.category(chr(p)) not in ("Cn", "Cs")][:3000]
    texts = [f"q{c}Z{c}{c} 7{c}" for c in chars]
    ours, theirs = tokenizers
    assert len(texts) == 3000
    assert [ours.encode(t) for t in texts] == theirs(texts, add_special_tokens=False)["input_ids"]


def test_tokenizer_folders(tmp_path, tokenizers):
    from transformers import CLIPTokenizer

    ours, theirs = tokenizers
    sd2 = ClipBpeTokenizer.offline(pad_token="!")
    sd2.save_pretrained(tmp_path / "ours")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "ours")
    assert loaded.pad_token == "!" and loaded.model_max_length == 77
    assert loaded(PROMPTS)["input_ids"] == sd2(PROMPTS)["input_ids"]
    written = write_clip_tokenizer(tmp_path / "theirs")  # transformers' files
    ours_loaded = ClipBpeTokenizer.from_pretrained(written)
    assert ours_loaded.vocab == ours.vocab and ours_loaded.merges == ours.merges
    assert ours_loaded(PROMPTS)["input_ids"] == theirs(PROMPTS)["input_ids"]
    only_json = tmp_path / "json"  # tokenizer.json alone
    only_json.mkdir()
    (only_json / "tokenizer.json").write_bytes((written / "tokenizer.json").read_bytes())
    assert (
        ClipBpeTokenizer.from_pretrained(only_json)(PROMPTS)["input_ids"]
        == (theirs(PROMPTS)["input_ids"])
    )
    with pytest.raises(FileNotFoundError, match="neither vocab.json"):
        ClipBpeTokenizer.from_pretrained(tmp_path)


def test_tokenizer_errors(tokenizers):
    ours = tokenizers[0]
    with pytest.raises(ValueError, match="padding must be one of"):
        ours("a", padding="max")
    with pytest.raises(ValueError, match="needs sequences of one length"):
        ours(["a", "a b"], return_tensors="pt")
    with pytest.raises(ValueError, match="pad_token must be a symbol"):
        ClipBpeTokenizer.offline(pad_token="not-a-symbol")
    with pytest.raises(ValueError, match="model_max_length"):
        ClipBpeTokenizer.offline(max_length=1)
