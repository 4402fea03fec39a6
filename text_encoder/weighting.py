"""Prompt weighting in the common `(word:1.3)` syntax of Stable Diffusion web tools.

Syntax (the same as AUTOMATIC1111's web UI):

    (text)        weight x 1.1
    ((text))      weight x 1.1 x 1.1 = 1.21; brackets nest by multiplying
    (text:1.3)    weight x 1.3 instead of 1.1 (any decimal, also 0.5 or -1)
    [text]        weight x 1/1.1
    \\( \\) \\[ \\]   literal brackets; \\\\ is a literal backslash
    a ")" or "]" with nothing open is literal text; a "(" or "[" left open at the end weights
    everything after it, as if closed at the end of the prompt.

`parse_prompt_weights` turns a prompt into (text, weight) fragments. Each fragment is tokenized
on its own and every token inherits its fragment's weight; BOS, EOS and padding keep weight 1.

How a weight acts (`apply_token_weights`): the encoder runs on the plain token ids, and then the
output row of each token (its row of `context`, shape (L, D)) is multiplied by that token's
weight, as the A1111 web UI does. Rows of weight 1 are left bitwise unchanged. A1111 then
rescales the whole chunk so its mean equals the unweighted mean; we do NOT do that by default,
so that weighting changes exactly the weighted tokens' rows. Pass `restore_mean=True` to get
A1111's behaviour: every (prompt, 75-token chunk) block of `context` is rescaled by
mean(before) / mean(after).
"""

from __future__ import annotations

import re

import torch

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One token of the weighting syntax per match: an escape, a ":number)" closer, a bracket, a run
# of plain text, or a lone backslash / colon that is plain text.
_SYNTAX = re.compile(
    r"""
    \\(?P<escaped>[()\[\]\\])
    | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)
    | (?P<bracket>[()\[\]])
    | (?P<text>[^\\()\[\]:]+|[\\:])
    """,
    re.VERBOSE,
)


def parse_prompt_weights(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments; adjacent fragments of equal weight merge."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    fragments: list[list] = []  # [text, weight], weights multiplied as brackets close
    open_round: list[int] = []  # index into fragments where each open "(" starts
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _SYNTAX.finditer(prompt):
        bracket, weight = match["bracket"], match["weight"]
        if weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif bracket == "(":
            open_round.append(len(fragments))
        elif bracket == "[":
            open_square.append(len(fragments))
        elif bracket == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif bracket == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            # escapes, plain text, unmatched closers, and ":1.3)" with no "(" open
            fragments.append([match["escaped"] or match.group(0), 1.0])
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(fragments)


def _merge_equal_weights(fragments: list[list]) -> list[tuple[str, float]]:
    """Join neighbours of the same weight and drop empty text; never return an empty list."""
    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if not text:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def apply_token_weights(
    context: torch.Tensor, weights: torch.Tensor, chunk_length: int, restore_mean: bool = False
) -> torch.Tensor:
    """Multiply each token's row of `context` (B, L, D) by its weight (B, L).

    restore_mean: rescale each chunk of `chunk_length` rows back to its unweighted mean (A1111).
    """
    if weights.shape != context.shape[:2]:
        raise ValueError(
            f"weights shape {tuple(weights.shape)} != context {tuple(context.shape[:2])}"
        )
    # x * 1.0 == x exactly in IEEE arithmetic, so rows of weight 1 stay bitwise unchanged.
    weighted = context * weights.to(context.dtype).unsqueeze(-1)
    if not restore_mean:
        return weighted
    batch, length, dim = context.shape
    blocks = (batch, length // chunk_length, chunk_length * dim)
    before = context.reshape(blocks).mean(dim=-1, keepdim=True)
    after = weighted.reshape(blocks).mean(dim=-1, keepdim=True)
    return (weighted.reshape(blocks) * (before / after)).reshape(batch, length, dim)
