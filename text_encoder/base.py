"""One interface for every text encoder: a batch of prompts -> context, pooled and mask.

    prompts --tokenizer--> token ids --long prompts--> chunks of max_length --model--> context

Long prompts. A prompt has room for `max_length - specials` tokens (75 for CLIP: 77 minus BOS
and EOS). With long_prompt="truncate" (the default, as diffusers does) the rest is dropped and a
warning says how many tokens were dropped and which text they were. With long_prompt="chunk"
(as SD web tools do) the tokens are cut into consecutive 75-token chunks, each framed as its own
BOS ... EOS pad sequence of max_length, encoded on its own, and the chunks' contexts are
concatenated along L. Prompts of a batch with fewer chunks get empty chunks (BOS EOS pad...),
so context is (B, n_chunks * max_length, D). `pooled` is the first chunk's.

Weighting (`weighting=True`) parses the `(word:1.3)` syntax and multiplies the weighted tokens'
rows of context; see `text_encoder.weighting` for the syntax and the mean handling.

`encode_prompt` adds classifier-free guidance on top, with the semantics of diffusers'
StableDiffusionPipeline.encode_prompt (negative prompts, num_images_per_prompt, clip_skip).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from .weighting import apply_token_weights, parse_prompt_weights

logger = logging.getLogger(__name__)

LONG_PROMPT_MODES = ("truncate", "chunk")


@dataclass
class TextEmbedding:
    """Encoder output: context (B, L, D), pooled (B, D) or None, mask (B, L) bool, True = token."""

    context: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor


@dataclass
class TokenBatch:
    """Framed token ids of a batch: ids, mask, weights all (B, n_chunks * max_length)."""

    ids: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    n_chunks: int


class TextEncoder:
    """Base class: tokenizing, long prompts and weighting; subclasses run their model."""

    model: nn.Module
    tokenizer: object
    max_length: int
    bos_id: int | None  # None for tokenizers without a start token (T5)
    eos_id: int
    pad_id: int

    # ---- what a subclass provides -------------------------------------------------------------

    def forward_ids(
        self, ids: torch.Tensor, mask: torch.Tensor, clip_skip: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model on framed ids (N, max_length): context (N, L, D), pooled (N, D) or None."""
        raise NotImplementedError

    # ---- the shared interface -----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TextEncoder:
        """Move the model (in place) and return self."""
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def tokens_per_chunk(self) -> int:
        """Room for prompt tokens in one max_length sequence: 75 for CLIP, max_length - 1 for T5."""
        return self.max_length - (self.bos_id is not None) - 1

    def encode(
        self,
        prompts: list[str],
        *,
        clip_skip: int | None = None,
        long_prompt: str = "truncate",
        weighting: bool = False,
        restore_mean: bool = False,
    ) -> TextEmbedding:
        """Encode a batch of prompts (gradients flow; wrap in torch.no_grad() for inference).

        Args:
            prompts: the prompts, a list of str.
            clip_skip: skip this many final layers (CLIP / OpenCLIP); None = the model's default.
            long_prompt: "truncate" (drop tokens past max_length, with a warning) or "chunk".
            weighting: parse `(word:1.3)` weights and scale the weighted tokens' context rows.
            restore_mean: with weighting, rescale each chunk back to its unweighted mean (A1111).
        """
        check_prompt_list(prompts, "prompts")
        if long_prompt not in LONG_PROMPT_MODES:
            raise ValueError(f"long_prompt must be one of {LONG_PROMPT_MODES}, got {long_prompt!r}")
        batch = self.tokenize(prompts, long_prompt=long_prompt, weighting=weighting)
        n, length = len(prompts), self.max_length
        ids = batch.ids.view(n * batch.n_chunks, length).to(self.device)
        mask = batch.mask.view(n * batch.n_chunks, length).to(self.device)
        context, pooled = self.forward_ids(ids, mask, clip_skip)
        context = context.reshape(n, batch.n_chunks * length, context.shape[-1])
        if pooled is not None:
            pooled = pooled.view(n, batch.n_chunks, -1)[:, 0]
        if weighting:
            weights = batch.weights.to(context.device)
            context = apply_token_weights(context, weights, length, restore_mean)
        return TextEmbedding(context=context, pooled=pooled, mask=batch.mask.to(context.device))

    def tokenize(
        self, prompts: list[str], *, long_prompt: str = "truncate", weighting: bool = False
    ) -> TokenBatch:
        """Token ids of the prompts, framed with BOS/EOS/padding, truncated or chunked."""
        rows = self.prompt_tokens(prompts, weighting)
        chunked = [self.split_tokens(ids, w, long_prompt, i) for i, (ids, w) in enumerate(rows)]
        n_chunks = max(len(chunks) for chunks in chunked)
        ids, mask, weights = [], [], []
        for chunks in chunked:
            chunks = chunks + [([], [])] * (n_chunks - len(chunks))  # empty chunks: BOS EOS pad...
            for chunk_ids, chunk_weights in chunks:
                framed = self.frame(chunk_ids, chunk_weights)
                ids += framed[0]
                mask += framed[1]
                weights += framed[2]
        shape = (len(prompts), n_chunks * self.max_length)
        return TokenBatch(
            ids=torch.tensor(ids, dtype=torch.long).view(shape),
            mask=torch.tensor(mask, dtype=torch.bool).view(shape),
            weights=torch.tensor(weights, dtype=torch.float32).view(shape),
            n_chunks=n_chunks,
        )

    def prompt_tokens(
        self, prompts: list[str], weighting: bool
    ) -> list[tuple[list[int], list[float]]]:
        """Each prompt's token ids (no special tokens) and one weight per token."""
        if not weighting:
            rows = self._token_ids(prompts)
            return [(row, [1.0] * len(row)) for row in rows]
        parsed = [parse_prompt_weights(prompt) for prompt in prompts]
        fragment_ids = iter(self._token_ids([text for frags in parsed for text, _ in frags]))
        rows = []
        for fragments in parsed:
            ids: list[int] = []
            weights: list[float] = []
            for _, weight in fragments:
                frag = next(fragment_ids)
                ids += frag
                weights += [weight] * len(frag)
            rows.append((ids, weights))
        return rows

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: long prompts are expected here and reported by split_tokens.
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def split_tokens(
        self, ids: list[int], weights: list[float], long_prompt: str, index: int
    ) -> list[tuple[list[int], list[float]]]:
        """Cut one prompt's tokens into chunks of tokens_per_chunk, or truncate with a warning."""
        room = self.tokens_per_chunk
        if long_prompt == "truncate":
            if len(ids) > room:
                dropped = self.tokenizer.decode(ids[room:])
                logger.warning(
                    "prompt %d has %d tokens but %s takes %d (max_length %d); dropped the last %d "
                    "tokens: %r. Pass long_prompt='chunk' to keep them.",
                    index, len(ids), type(self).__name__, room, self.max_length,
                    len(ids) - room, dropped,
                )  # fmt: skip
            return [(ids[:room], weights[:room])]
        n_chunks = max(1, math.ceil(len(ids) / room))
        return [
            (ids[k * room : (k + 1) * room], weights[k * room : (k + 1) * room])
            for k in range(n_chunks)
        ]

    def frame(
        self, ids: list[int], weights: list[float]
    ) -> tuple[list[int], list[bool], list[float]]:
        """BOS + ids + EOS + padding to max_length, with its mask and per-token weights."""
        head = [] if self.bos_id is None else [self.bos_id]
        tokens = head + ids + [self.eos_id]
        n_pad = self.max_length - len(tokens)
        return (
            tokens + [self.pad_id] * n_pad,
            [True] * len(tokens) + [False] * n_pad,
            [1.0] * len(head) + weights + [1.0] * (1 + n_pad),
        )


def check_prompt_list(prompts: object, name: str) -> None:
    """Raise ValueError unless `prompts` is a non-empty list of str."""
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{name} must be a list of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name} must hold at least one prompt, got an empty list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(prompt).__name__}")


def _as_prompt_list(prompt: str | list[str], name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    check_prompt_list(prompts, name)
    return list(prompts)


def _negative_prompts(negative_prompt: str | list[str] | None, batch_size: int) -> list[str]:
    """The negative prompt per prompt: "" for None, a str repeated, or a list of equal length."""
    if negative_prompt is None:
        return [""] * batch_size
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch_size
    negatives = _as_prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != batch_size:
        raise ValueError(
            f"negative_prompt has {len(negatives)} prompts but prompt has {batch_size}; "
            "pass one negative prompt per prompt, a single str, or None"
        )
    return negatives


def _pad_chunks(
    encoder: TextEncoder, context: torch.Tensor, length: int, clip_skip: int | None
) -> torch.Tensor:
    """Append empty-chunk contexts to reach `length` tokens (prompts with fewer chunks)."""
    missing = (length - context.shape[1]) // encoder.max_length
    if missing == 0:
        return context
    empty = encoder.encode([""], clip_skip=clip_skip).context  # (1, max_length, D)
    padding = empty.expand(context.shape[0], -1, -1).repeat(1, missing, 1)
    return torch.cat([context, padding], dim=1)


def encode_prompt(
    encoder: TextEncoder,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None,
    num_images_per_prompt: int,
    do_classifier_free_guidance: bool,
    clip_skip: int | None = None,
    *,
    long_prompt: str = "truncate",
    weighting: bool = False,
    restore_mean: bool = False,
    clip_skip_negative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt contexts for sampling: (cond, uncond), each (B * num_images_per_prompt, L, D).

    Matches diffusers' StableDiffusionPipeline.encode_prompt: rows are grouped per prompt
    (prompt 0's images first); uncond is None without guidance; negative_prompt None means "".
    diffusers applies clip_skip to the prompt only, never to the negative prompt; so do we by
    default, for identical images. clip_skip_negative=True applies it to both (as A1111 does).
    A single str negative_prompt is used for every prompt. With long_prompt="chunk" the side
    with fewer chunks is padded with empty chunks so cond and uncond have the same L.
    """
    prompts = _as_prompt_list(prompt, "prompt")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt}")
    options = dict(long_prompt=long_prompt, weighting=weighting, restore_mean=restore_mean)
    cond = encoder.encode(prompts, clip_skip=clip_skip, **options).context
    uncond = None
    if do_classifier_free_guidance:
        negatives = _negative_prompts(negative_prompt, len(prompts))
        negative_skip = clip_skip if clip_skip_negative else None
        uncond = encoder.encode(negatives, clip_skip=negative_skip, **options).context
        length = max(cond.shape[1], uncond.shape[1])
        cond = _pad_chunks(encoder, cond, length, clip_skip)
        uncond = _pad_chunks(encoder, uncond, length, negative_skip)
        uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0)
    return cond.repeat_interleave(num_images_per_prompt, dim=0), uncond
