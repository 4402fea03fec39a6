"""Text encoders with one interface: prompts -> TextEmbedding(context, pooled, mask).

transformers and open_clip are imported only when an encoder that uses them is built or loaded;
the CLIP path of `ClipTextEncoder.from_pretrained` (backend="torch", the default) uses neither.
"""

from .base import TextEmbedding, TextEncoder, encode_prompt
from .bpe import ClipBpeTokenizer
from .clip import ClipTextEncoder
from .clip_model import CLIP_TEXT_PRESETS, ClipTextConfig, ClipTextModel
from .openclip import OpenClipTextEncoder, clip_text_to_open_clip, open_clip_to_clip_text
from .t5 import T5TextEncoder
from .tokenizer import load_clip_tokenizer, offline_clip_tokenizer, write_clip_tokenizer
from .weighting import parse_prompt_weights

__all__ = [
    "CLIP_TEXT_PRESETS",
    "ClipBpeTokenizer",
    "ClipTextConfig",
    "ClipTextEncoder",
    "ClipTextModel",
    "OpenClipTextEncoder",
    "T5TextEncoder",
    "TextEmbedding",
    "TextEncoder",
    "clip_text_to_open_clip",
    "encode_prompt",
    "load_clip_tokenizer",
    "offline_clip_tokenizer",
    "open_clip_to_clip_text",
    "parse_prompt_weights",
    "write_clip_tokenizer",
]
