"""The OpenAI CLIP tokenizer, built offline from the BPE vocabulary that open_clip ships.

OpenAI's CLIP tokenizer is a byte-level BPE over 49408 symbols:

    ids 0..255        the 256 bytes, each mapped to a printable unicode character
    ids 256..511      the same 256 characters with the end-of-word marker "</w>"
    ids 512..49405    one symbol per merge rule, in merge order (the first 48894 rules of the file)
    id 49406          <|startoftext|>
    id 49407          <|endoftext|>

open_clip ships the merge rules as `bpe_simple_vocab_16e6.txt.gz`; `text_encoder.bpe` reads
them (and tokenizes without transformers); this module builds a transformers `CLIPTokenizer`
from them, so a folder without tokenizer files still gets OpenAI's ids with no network.
`write_clip_tokenizer` writes the same tokenizer as a standard `tokenizer/` folder that
transformers and diffusers load.

One known difference from OpenAI's reference code: it runs `ftfy.fix_text` and unescapes HTML
entities before tokenizing, while transformers' CLIPTokenizer applies NFC normalisation only.
The ids agree for ordinary text (ASCII, accents, CJK, emoji); they differ for mojibake or
literal entities such as "&amp;", exactly as diffusers' own tokenizer does.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .bpe import (
    EOS_TOKEN,
    byte_to_unicode,  # noqa: F401  (the vocabulary's byte layout, re-exported)
    clip_merges,
    clip_vocab,
)

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

SD2_PAD_TOKEN = "!"  # SD 2.x (open_clip) pads with id 0, which is "!"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """OpenAI CLIP's vocabulary (symbol -> id) and merge rules, read from open_clip's file."""
    merges = clip_merges()
    return clip_vocab(merges), tuple(tuple(m.split(" ")) for m in merges)


def offline_clip_tokenizer(max_length: int = 77, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A transformers CLIPTokenizer with OpenAI CLIP's ids, built without network or files.

    pad_token: "<|endoftext|>" as in SD 1.x / OpenAI CLIP, or "!" (id 0) as in SD 2.x folders.
    transformers treats the pad token as special, so with "!" a "!" typed in a prompt becomes
    id 0 (as with diffusers' SD 2.x tokenizer) where open_clip's tokenizer gives 256.
    """
    from transformers import CLIPTokenizer

    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length}")
    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad_token must be a symbol of the CLIP vocabulary, got {pad_token!r}")
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), model_max_length=max_length, pad_token=pad_token
    )


def write_clip_tokenizer(
    folder: str | Path, max_length: int = 77, pad_token: str = EOS_TOKEN
) -> Path:
    """Write the offline CLIP tokenizer into `folder` in the standard layout; return the folder."""
    folder = Path(folder)
    save_clip_tokenizer(offline_clip_tokenizer(max_length, pad_token), folder)
    return folder


def save_clip_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    """Save a CLIP tokenizer: tokenizer.json + tokenizer_config.json, and vocab.json + merges.txt.

    transformers 5 reads the first two; older transformers' slow CLIPTokenizer needs the
    vocab/merges pair and special_tokens_map.json, so both are written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    tokenizer.backend_tokenizer.model.save(str(folder))  # vocab.json + merges.txt
    special = {
        "bos_token": str(tokenizer.bos_token),
        "eos_token": str(tokenizer.eos_token),
        "unk_token": str(tokenizer.unk_token),
        "pad_token": str(tokenizer.pad_token),
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether `folder` holds a saved tokenizer (tokenizer.json or vocab.json)."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_clip_tokenizer(folder: str | Path, max_length: int | None = None) -> CLIPTokenizer:
    """Load a CLIPTokenizer from a folder of tokenizer files."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if not has_tokenizer_files(folder):
        raise FileNotFoundError(
            f"tokenizer folder {folder} has none of {', '.join(TOKENIZER_FILES)}"
        )
    extra = {} if max_length is None else {"model_max_length": max_length}
    return CLIPTokenizer.from_pretrained(folder, **extra)
