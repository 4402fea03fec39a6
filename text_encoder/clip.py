"""CLIP text encoder (SD 1.x / 2.x): our torch CLIP text model, or transformers' CLIPTextModel.

context = the last hidden state after final_layer_norm, (B, 77, D); with clip_skip = k the hidden
state k layers before the last, passed through final_layer_norm, as SD tooling does:

    clip_skip   None or 0    1                    2
    context     ln(h_N)      ln(h_{N-1})          ln(h_{N-2})      h_i: output of layer i

which is diffusers' `hidden_states[-(clip_skip + 1)]` followed by final_layer_norm. (A1111's
"Clip skip" setting counts from 1, so its 2 is our 1.) `pooled` is transformers' pooler_output:
the final layer's state at the first EOS token, whatever clip_skip is.

Two backends with the same outputs (bitwise on CPU float32, see tests/test_clip_model.py):
- "torch" (the default for loading): `clip_model.ClipTextModel` + `bpe.ClipBpeTokenizer`,
  which never import transformers (importing it takes seconds; `ldm generate` must not).
- "transformers": transformers' CLIPTextModel + CLIPTokenizer.
The encoder takes any mix of the two models and two tokenizers.

Folder layout read and written (diffusers): <folder>/text_encoder/{config.json,model.safetensors}
and <folder>/tokenizer/. A folder without tokenizer files gets the offline CLIP tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .base import TextEncoder
from .bpe import ClipBpeTokenizer
from .clip_model import ClipTextModel
from .tokenizer import (
    has_tokenizer_files,
    load_clip_tokenizer,
    offline_clip_tokenizer,
    save_clip_tokenizer,
)

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "transformers")

# Key prefix of diffusers folders and original transformers 4.x checkpoints. transformers 5
# dropped the `text_model` wrapper (keys without prefix) but still loads prefixed files.
LEGACY_PREFIX = "text_model."


def check_clip_skip(clip_skip: int | None, num_layers: int) -> int:
    """clip_skip as an int in [0, num_layers - 1]; None means 0."""
    if clip_skip is None:
        return 0
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
        raise ValueError(f"clip_skip must be None or an int, got {clip_skip!r}")
    if not 0 <= clip_skip < num_layers:
        raise ValueError(
            f"clip_skip must be in [0, {num_layers - 1}] for a {num_layers}-layer text model, "
            f"got {clip_skip}"
        )
    return clip_skip


def text_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding embeddings/encoder/final_layer_norm (transformers 4 nests it)."""
    return model if hasattr(model, "final_layer_norm") else model.text_model


class ClipTextEncoder(TextEncoder):
    """CLIP text model with its tokenizer; context (B, 77, D), pooled (B, D)."""

    def __init__(
        self,
        model: ClipTextModel | CLIPTextModel,
        tokenizer: ClipBpeTokenizer | CLIPTokenizer | None = None,
    ):
        config = model.config
        if tokenizer is None:  # the offline tokenizer of the model's backend
            tokenizer = offline_tokenizer(model, config.max_position_embeddings)
        self.model = model
        self.tokenizer = tokenizer
        # Tokenizers saved without tokenizer_config.json report a huge model_max_length.
        self.max_length = min(tokenizer.model_max_length, config.max_position_embeddings)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        if None in (self.bos_id, self.eos_id, self.pad_id):
            raise ValueError("tokenizer must define bos_token, eos_token and pad_token")

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def architecture(self) -> str:
        """The model's class name in diffusers' model_index.json ("CLIPTextModel")."""
        return getattr(self.model, "architecture", type(self.model).__name__)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        subfolder_model: str = "text_encoder",
        subfolder_tokenizer: str = "tokenizer",
        torch_dtype: torch.dtype | None = None,
        backend: str = "torch",
    ) -> ClipTextEncoder:
        """Load from a diffusers pipeline folder (local); offline tokenizer if it has none.

        Args:
            folder: the pipeline folder holding `subfolder_model` and `subfolder_tokenizer`.
            torch_dtype: the weights' dtype; None keeps config.json's (else the stored one).
            backend: "torch" (ClipTextModel + ClipBpeTokenizer; does not import transformers)
                or "transformers" (CLIPTextModel + CLIPTokenizer).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        folder = Path(folder)
        model_dir = folder / subfolder_model
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no text encoder at {model_dir} (config.json is missing)")
        if backend == "torch":
            model = ClipTextModel.from_pretrained(model_dir, dtype=torch_dtype)
        else:
            from transformers import CLIPTextModel

            dtype = {} if torch_dtype is None else {"dtype": torch_dtype}
            model = CLIPTextModel.from_pretrained(model_dir, **dtype).eval()
        tokenizer_dir = folder / subfolder_tokenizer
        if not has_tokenizer_files(tokenizer_dir):
            logger.info("no tokenizer files in %s: using the offline CLIP tokenizer", tokenizer_dir)
            return cls(model)
        if backend == "torch":
            return cls(model, ClipBpeTokenizer.from_pretrained(tokenizer_dir))
        return cls(model, load_clip_tokenizer(tokenizer_dir))

    def save_pretrained(
        self,
        folder: str | Path,
        subfolder_model: str = "text_encoder",
        subfolder_tokenizer: str = "tokenizer",
    ) -> None:
        """Write <folder>/text_encoder and <folder>/tokenizer in the diffusers layout."""
        model_dir = Path(folder) / subfolder_model
        if isinstance(self.model, ClipTextModel):
            self.model.save_pretrained(model_dir)
        else:
            save_transformers_model(self.model, model_dir)
        tokenizer_dir = Path(folder) / subfolder_tokenizer
        if isinstance(self.tokenizer, ClipBpeTokenizer):
            self.tokenizer.save_pretrained(tokenizer_dir)
        else:
            save_clip_tokenizer(self.tokenizer, tokenizer_dir)

    def forward_ids(
        self, ids: torch.Tensor, mask: torch.Tensor, clip_skip: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (N, L, D) from the layer clip_skip before the last, and the pooled output."""
        skip = check_clip_skip(clip_skip, self.num_layers)
        # Only configs that ask for it get the padding mask; SD's CLIP attends causally to all.
        use_mask = getattr(self.model.config, "use_attention_mask", False)
        attention_mask = mask.long() if use_mask else None
        if skip == 0:
            out = self.model(ids, attention_mask=attention_mask)
            return out.last_hidden_state, out.pooler_output
        out = self.model(ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-(skip + 1)]
        return text_transformer(self.model).final_layer_norm(hidden), out.pooler_output


def offline_tokenizer(model: torch.nn.Module, max_length: int) -> ClipBpeTokenizer | CLIPTokenizer:
    """OpenAI CLIP's tokenizer built offline: ours for our model, transformers' for theirs."""
    if isinstance(model, ClipTextModel):
        return ClipBpeTokenizer.offline(max_length)
    return offline_clip_tokenizer(max_length)


def save_transformers_model(model: CLIPTextModel, model_dir: Path) -> None:
    """config.json + model.safetensors of a transformers CLIPTextModel, keys `text_model.*`."""
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(model_dir)
    # Keys in the `text_model.` layout of every diffusers folder, which transformers 4 and 5
    # both load (transformers 5 alone would write them unprefixed, unreadable by 4.x).
    state = {
        LEGACY_PREFIX + key.removeprefix(LEGACY_PREFIX): value.detach().contiguous()
        for key, value in model.state_dict().items()
        if not key.endswith("position_ids")
    }
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
