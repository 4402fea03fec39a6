"""T5 encoder through transformers (T5EncoderModel + the tokenizer of its model folder).

T5 frames a prompt as `tokens </s> <pad>...`: no start token, so one sequence has room for
max_length - 1 prompt tokens (the chunk size of long_prompt="chunk"). context is the encoder's
last hidden state (B, L, D); T5 has no pooled output (None). The padding mask goes into the
encoder by default, as PixArt and DeepFloyd IF do; SD 3 runs its T5 without it
(use_attention_mask=False). clip_skip does not apply to T5.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .base import TextEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, T5EncoderModel

# transformers marks "no limit" with a huge model_max_length; anything above this is not real.
_UNSET_MAX_LENGTH = 1_000_000


class T5TextEncoder(TextEncoder):
    """T5 encoder with its tokenizer; context (B, max_length, D), pooled None."""

    def __init__(
        self,
        model: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
        use_attention_mask: bool = True,
    ):
        if max_length is None:
            max_length = tokenizer.model_max_length
            if max_length > _UNSET_MAX_LENGTH:
                raise ValueError(
                    "the tokenizer sets no model_max_length: pass max_length (e.g. 77, 120, 256)"
                )
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_attention_mask = use_attention_mask
        self.bos_id = None
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        if self.eos_id is None or self.pad_id is None:
            raise ValueError("tokenizer must define eos_token and pad_token")

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        subfolder_model: str | None = None,
        subfolder_tokenizer: str | None = None,
        torch_dtype: torch.dtype | None = None,
        max_length: int | None = None,
    ) -> T5TextEncoder:
        """Load from a local model folder (or its subfolders, e.g. "text_encoder_3")."""
        from transformers import AutoTokenizer, T5EncoderModel

        folder = Path(folder)
        model_dir = folder / subfolder_model if subfolder_model else folder
        tokenizer_dir = folder / subfolder_tokenizer if subfolder_tokenizer else folder
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no T5 encoder at {model_dir} (config.json is missing)")
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist")
        dtype = {} if torch_dtype is None else {"dtype": torch_dtype}
        model = T5EncoderModel.from_pretrained(model_dir, **dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        return cls(model, tokenizer, max_length=max_length)

    def save_pretrained(
        self,
        folder: str | Path,
        subfolder_model: str | None = None,
        subfolder_tokenizer: str | None = None,
    ) -> None:
        """Write the model and tokenizer (into the folder itself unless subfolders are named)."""
        folder = Path(folder)
        self.model.save_pretrained(folder / subfolder_model if subfolder_model else folder)
        self.tokenizer.save_pretrained(
            folder / subfolder_tokenizer if subfolder_tokenizer else folder
        )

    def forward_ids(
        self, ids: torch.Tensor, mask: torch.Tensor, clip_skip: int | None
    ) -> tuple[torch.Tensor, None]:
        """The encoder's last hidden state; T5 has no pooled output."""
        if clip_skip is not None:
            raise ValueError(f"clip_skip applies to CLIP encoders only; T5 got {clip_skip!r}")
        attention_mask = mask.long() if self.use_attention_mask else None
        out = self.model(input_ids=ids, attention_mask=attention_mask)
        return out.last_hidden_state, None
