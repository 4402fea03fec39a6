"""OpenAI CLIP's byte-level BPE tokenizer in pure Python, giving transformers' CLIPTokenizer ids.

A prompt becomes ids in five steps, the ones transformers 5's CLIPTokenizer (a `tokenizers`
pipeline) takes, so the ids are the same:

    1. special tokens   the raw text is cut at exact occurrences of BOS, EOS, UNK and PAD
                        (case-sensitive); each becomes its id, the text between is step 2..5
    2. normalise        NFC, every run of Unicode whitespace -> one space, lowercase char by char
    3. pre-tokenise     CLIP's regex (contractions, letter runs, single digits, symbol runs;
                        whitespace dropped), then GPT-2's regex inside each piece (it only splits
                        pieces that look like "<|endoftext|>")
    4. bytes            each word's UTF-8 bytes -> GPT-2's printable characters
    5. BPE              merge the pair of lowest rank until none applies; the last symbol
                        carries the end-of-word marker "</w>"

What it deliberately does not do: ftfy and HTML unescaping (OpenAI's reference code and
open_clip do; transformers 5 does not), stripping (whitespace is dropped by step 3 anyway).
Lowercasing is per character, as `tokenizers` does, so a final capital sigma becomes "σ" where
Python's str.lower() would give "ς".

The vocabulary comes from a model folder's `tokenizer/` (vocab.json + merges.txt, or
tokenizer.json) or, offline, from open_clip's `bpe_simple_vocab_16e6.txt.gz`.
`ClipBpeTokenizer.save_pretrained` writes vocab.json, merges.txt, special_tokens_map.json and
tokenizer_config.json: the files of a Stable Diffusion `tokenizer/` folder, which transformers
loads.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import unicodedata
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path

import regex
import torch

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP keeps the first 48894 merge rules of the file
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
DEFAULT_MAX_LENGTH = 77  # CLIP's context length, for folders without tokenizer_config.json
PADDING_MODES = (False, True, "longest", "max_length", "do_not_pad")
WORD_CACHE_SIZE = 65536

# Step 3: CLIP's split, keeping the matches only (whitespace and nothing else falls between).
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# GPT-2's split, which the byte-level step of `tokenizers` applies to every CLIP piece.
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
WHITESPACE = regex.compile(r"\s+")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    # Printable Latin-1 bytes map to themselves; the rest (controls, space, soft hyphen) are moved
    # past 255 in byte order, so no symbol of the vocabulary is whitespace or a control character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    for n, b in enumerate(shifted):
        mapping[b] = chr(256 + n)
    return mapping


def bpe_file() -> Path:
    """The BPE merges file inside the installed open_clip package (which is not imported)."""
    # importlib.resources.files("open_clip") would run open_clip's __init__, which imports
    # transformers and timm (seconds); find_spec only locates the package folder.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"open_clip is not installed; it ships CLIP's {BPE_FILE}")
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILE


@lru_cache(maxsize=1)
def clip_merges() -> tuple[str, ...]:
    """OpenAI CLIP's 48894 merge rules, "left right" in rank order, from open_clip's file."""
    path = bpe_file()
    if not path.is_file():
        raise FileNotFoundError(f"open_clip does not ship {BPE_FILE} at {path}")
    # The file holds 262k rules; split off only the header line and the rules CLIP keeps.
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n", NUM_MERGES + 1)
    merges = tuple(lines[1 : 1 + NUM_MERGES])  # line 0 is the "#version" header
    if len(merges) != NUM_MERGES or "\n".join(merges).count(" ") != NUM_MERGES:
        raise ValueError(f"{path} does not hold {NUM_MERGES} merge rules of two symbols")
    return merges


def clip_vocab(merges: Sequence[str]) -> dict[str, int]:
    """OpenAI CLIP's ids: 256 bytes, the same with "</w>", one symbol per merge, BOS, EOS."""
    symbols = list(byte_to_unicode().values())
    symbols += [s + END_OF_WORD for s in symbols]
    symbols += [m.replace(" ", "") for m in merges]
    symbols += [BOS_TOKEN, EOS_TOKEN]
    return {s: i for i, s in enumerate(symbols)}


def normalize(text: str) -> str:
    """Step 2: NFC, whitespace runs -> " ", per-character lowercase (as `tokenizers` does)."""
    text = WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


def pre_tokenize(text: str) -> list[str]:
    """Step 3: the words of normalised text (CLIP's regex, then GPT-2's inside each piece)."""
    return [word for piece in CLIP_PATTERN.findall(text) for word in GPT2_PATTERN.findall(piece)]


def bpe(word: str, ranks: dict[str, int]) -> list[str]:
    """Step 5: merge a word's symbols, lowest merge rank first, every occurrence left to right.

    ranks: merge rule "left right" -> its rank (symbols never hold a space: bytes are mapped).
    """
    symbols = [*word[:-1], word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        pairs = {f"{a} {b}" for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        left, right = best.split(" ")
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _token_content(value: object) -> str | None:
    """A special token as saved by transformers: a str, or a dict with "content"."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ClipBpeTokenizer:
    """CLIP's BPE tokenizer, called like transformers' CLIPTokenizer; no transformers needed."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[str],
        *,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        added_tokens: dict[str, int] | None = None,
    ):
        self.vocab = dict(vocab)  # the BPE symbols, as in vocab.json
        self.added_tokens = dict(added_tokens or {})  # e.g. textual-inversion tokens
        self.token_to_id = {**self.vocab, **self.added_tokens} if added_tokens else self.vocab
        for name, token in [("bos_token", bos_token), ("eos_token", eos_token),
                            ("unk_token", unk_token), ("pad_token", pad_token)]:  # fmt: skip
            if token not in self.token_to_id:
                raise ValueError(f"{name} must be a symbol of the vocabulary, got {token!r}")
        if not isinstance(model_max_length, int) or model_max_length < 2:
            raise ValueError(
                "model_max_length must be an int >= 2 (room for BOS and EOS), "
                f"got {model_max_length!r}"
            )
        self.merges = tuple(merges)  # "left right", in rank order
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.bos_token_id = self.token_to_id[bos_token]
        self.eos_token_id = self.token_to_id[eos_token]
        self.unk_token_id = self.token_to_id[unk_token]
        self.pad_token_id = self.token_to_id[pad_token]
        # Matched in the raw text before anything else, longest first, as transformers does.
        specials = {bos_token, eos_token, unk_token, pad_token, *self.added_tokens}
        self.special_tokens = tuple(sorted(specials, key=len, reverse=True))
        self._special_split = regex.compile(
            "(" + "|".join(regex.escape(t) for t in self.special_tokens) + ")"
        )
        self._byte_map = byte_to_unicode()
        self._byte_unmap = {c: b for b, c in self._byte_map.items()}
        # Prompts repeat their words; one cache entry per distinct word.
        self.word_ids = lru_cache(maxsize=WORD_CACHE_SIZE)(self._word_ids)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def offline(
        cls, max_length: int = DEFAULT_MAX_LENGTH, pad_token: str = EOS_TOKEN
    ) -> ClipBpeTokenizer:
        """OpenAI CLIP's tokenizer from open_clip's vocabulary file (no network, no transformers).

        pad_token: "<|endoftext|>" as in SD 1.x, or "!" (id 0) as in SD 2.x folders; being
        special, a "!" typed in a prompt then becomes id 0, as with transformers.
        """
        merges = clip_merges()
        return cls(clip_vocab(merges), merges, model_max_length=max_length, pad_token=pad_token)

    @classmethod
    def from_pretrained(cls, folder: str | Path, max_length: int | None = None) -> ClipBpeTokenizer:
        """Load vocab.json + merges.txt (or tokenizer.json) and the special tokens of a folder."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = _read_merges((folder / "merges.txt").read_text(encoding="utf-8"))
        elif (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = model["vocab"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        else:
            raise FileNotFoundError(
                f"tokenizer folder {folder} has neither vocab.json + merges.txt nor tokenizer.json"
            )
        settings = _read_special_tokens(folder)
        if max_length is not None:
            settings["model_max_length"] = max_length
        return cls(vocab, merges, **settings)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = json.dumps(self.vocab, ensure_ascii=False)
        (folder / "vocab.json").write_text(vocab + "\n", encoding="utf-8")
        merges = "\n".join([MERGES_HEADER, *self.merges])
        (folder / "merges.txt").write_text(merges + "\n", encoding="utf-8")
        special = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        added = {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for t, i in self.added_tokens.items()
        }  # fmt: skip
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            "do_lower_case": True,
            "add_prefix_space": False,
            "errors": "replace",
            **special,
            **({"added_tokens_decoder": added} if added else {}),
        }
        for name, data in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
            (folder / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    # ---- encoding -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.token_to_id)

    @cached_property
    def ids_to_tokens(self) -> dict[int, str]:
        return {i: s for s, i in self.token_to_id.items()}

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Steps 4-5 for one word: bytes -> printable characters -> BPE symbols -> ids."""
        chars = "".join(self._byte_map[b] for b in word.encode("utf-8"))
        return tuple(self.vocab.get(s, self.unk_token_id) for s in bpe(chars, self.ranks))

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without BOS/EOS, padding or truncation."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for k, segment in enumerate(self._special_split.split(text)):
            if k % 2:  # the split's odd pieces are the special tokens themselves
                ids.append(self.token_to_id[segment])
                continue
            for word in pre_tokenize(normalize(segment)):
                ids += self.word_ids(word)
        return ids

    def __call__(
        self,
        text: str | list[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> dict:
        """{"input_ids", "attention_mask"} as transformers' tokenizer returns them.

        Args:
            text: one str, or a list of str.
            add_special_tokens: frame each sequence as BOS ... EOS.
            padding: False / "do_not_pad", True / "longest", or "max_length".
            truncation: cut to max_length, keeping EOS last.
            max_length: defaults to model_max_length.
            return_tensors: None (lists) or "pt" (long tensors (B, L); needs equal lengths).
            verbose: accepted for transformers compatibility; this tokenizer never warns.
        """
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        length = self.model_max_length if max_length is None else max_length
        rows = [self._frame(self.encode(t), add_special_tokens, truncation, length) for t in texts]
        if padding in (True, "longest"):
            length = max(len(row) for row in rows)
        pad = padding not in (False, "do_not_pad")
        masks = [[1] * len(row) + [0] * (length - len(row)) * pad for row in rows]
        rows = [row + [self.pad_token_id] * (length - len(row)) * pad for row in rows]
        if return_tensors == "pt":
            if len({len(row) for row in rows}) > 1:
                raise ValueError("return_tensors='pt' needs sequences of one length: pass padding")
            out = {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}
        else:
            out = {"input_ids": rows, "attention_mask": masks}
        if isinstance(text, str):
            out = {key: value[0] for key, value in out.items()}
        return out

    def _frame(self, ids: list[int], specials: bool, truncation: bool, length: int) -> list[int]:
        if truncation:
            ids = ids[: max(0, length - 2 * specials)]
        return [self.bos_token_id, *ids, self.eos_token_id] if specials else ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of token ids: end-of-word markers become spaces, as transformers decodes."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = {self.token_to_id[t] for t in self.special_tokens}
        tokens = [self.ids_to_tokens[i] for i in ids if not (skip_special_tokens and i in specials)]
        text = "".join(tokens)
        data = bytes(self._byte_unmap.get(c, ord(" ")) for c in text.replace(END_OF_WORD, " "))
        return data.decode("utf-8", errors="replace").strip()


def _read_merges(text: str) -> list[str]:
    """merges.txt: an optional "#version" line, then one "left right" pair per line."""
    lines = text.split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [line for line in lines if line]


def _read_special_tokens(folder: Path) -> dict:
    """Special tokens and model_max_length from tokenizer_config.json / special_tokens_map.json."""
    settings: dict = {}
    added: dict[str, int] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(data.get(key))
            if content is not None:
                settings[key] = content
        for token_id, token in data.get("added_tokens_decoder", {}).items():
            if _token_content(token):
                added[_token_content(token)] = int(token_id)
        max_length = data.get("model_max_length")
        if isinstance(max_length, int) and max_length < 10**6:  # 1e30 means "unset"
            settings["model_max_length"] = max_length
    settings["added_tokens"] = added
    return settings
