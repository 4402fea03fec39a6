"""The offline CLIP tokenizer gives OpenAI CLIP's token ids (text_encoder/tokenizer.py)."""

import json

import pytest
import torch

from text_encoder import load_clip_tokenizer, offline_clip_tokenizer, write_clip_tokenizer
from text_encoder.tokenizer import byte_to_unicode, clip_vocab_and_merges

BOS, EOS = 49406, 49407

# Published ids (transformers' CLIP documentation example, openai/clip-vit-base-patch32).
PUBLISHED = {
    "a photo of a cat": [BOS, 320, 1125, 539, 320, 2368, EOS],
    "a photo of a dog": [BOS, 320, 1125, 539, 320, 1929, EOS],
}

# Punctuation, case, whitespace, digits, contractions, accents, CJK, Cyrillic, emoji, symbols.
PROMPTS = [
    "a photo of a cat",
    "Hello, World!",
    "An astronaut riding a horse on Mars, 4k, trending on artstation.",
    "it's  they're   I'll we'd don't",
    "price: $3.50 (50% off) #sale @home",
    "a\tb\nc   ",
    "  leading and trailing  ",
    "café naïve façade",
    "Ünïcödé ÅÄÖ ñ ß",
    "日本の猫",
    "Привет мир",
    "🐱🐶 emoji!",
    "x²+y²=z² ½ ⅓",
    "red_circle-blue.square/green\\triangle",
    "a (red:1.3) [cat] {dog} <tag>",
    "0123456789 3.14159",
    "masterpiece, best quality, 1girl, ultra-detailed, 8K UHD!!!",
    "supercalifragilisticexpialidocious",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return offline_clip_tokenizer()


@pytest.fixture(scope="module")
def reference():
    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
    return open_clip_tokenizer.SimpleTokenizer()  # OpenAI's tokenizer, as open_clip ships it


def test_published_ids(tokenizer):
    for prompt, ids in PUBLISHED.items():
        assert tokenizer(prompt)["input_ids"] == ids


def test_ids_equal_open_clip_simple_tokenizer(tokenizer, reference):
    ours = tokenizer(PROMPTS)["input_ids"]
    for prompt, ids in zip(PROMPTS, ours):
        assert ids == [BOS, *reference.encode(prompt), EOS], prompt


def test_vocabulary_layout():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    units = list(byte_to_unicode().values())
    assert len(set(units)) == 256 and not any(u.isspace() for u in units)
    assert vocab[units[0]] == 0 and vocab[units[0] + "</w>"] == 256
    assert vocab["".join(merges[0])] == 512


def test_padding_and_truncation(tokenizer):
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77)["input_ids"]
    assert len(ids) == 77 and ids[:7] == PUBLISHED["a photo of a cat"] and set(ids[7:]) == {EOS}
    long = tokenizer("cat " * 100, truncation=True, max_length=77)["input_ids"]
    assert len(long) == 77 and long[0] == BOS and long[-1] == EOS


def test_sd2_padding_matches_open_clip_tokenize():
    open_clip = pytest.importorskip("open_clip")
    sd2 = offline_clip_tokenizer(pad_token="!")
    prompts = ["a photo of a cat", "café 日本の猫, 4k"]
    ids = sd2(prompts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert sd2.pad_token_id == 0
    assert torch.equal(ids, open_clip.tokenize(prompts))


def test_written_folder_loads_in_transformers(tmp_path, tokenizer):
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer(tmp_path / "tokenizer")
    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    loaded = CLIPTokenizer.from_pretrained(folder)
    assert loaded.model_max_length == 77 and loaded.pad_token == "<|endoftext|>"
    assert loaded(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"]
    assert (folder / "merges.txt").read_text().startswith("#version: 0.2\ni n\n")
    assert json.loads((folder / "vocab.json").read_text())["cat</w>"] == 2368


def test_vocab_and_merges_alone_load(tmp_path, tokenizer):
    """The files a transformers 4.x slow CLIPTokenizer reads are enough on their own."""
    from transformers import CLIPTokenizer

    full = write_clip_tokenizer(tmp_path / "full")
    slim = tmp_path / "slim"
    slim.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (slim / name).write_bytes((full / name).read_bytes())
    loaded = CLIPTokenizer.from_pretrained(slim)
    assert loaded(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_clip_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="max_length"):
        offline_clip_tokenizer(max_length=1)
    with pytest.raises(ValueError, match="pad_token"):
        offline_clip_tokenizer(pad_token="not-a-symbol")
