"""Tiled application of the encoder or decoder to images larger than memory allows.

The input is cut into overlapping square tiles on the latent grid; each tile is mapped on its
own and the outputs are blended back together. Every tile's output is weighted by a window that
is 1 in its middle and ramps linearly to ~0 across the overlap on each side that has a
neighbour; the blended output is sum_k w_k y_k / sum_k w_k, a convex combination of the tiles
that cover a pixel, so the weight of a tile fades in and out smoothly and no seam shows where a
tile ends.

Tile positions are spread evenly over the image (the last tile ends at the image border), so
every tile is full size and neighbours overlap by at least the requested overlap; the ramp is as
wide as the smallest actual overlap on that axis.

Sizes are in grid units (latent pixels): a tile of `tile` units covers tile * in_scale input
pixels and tile * out_scale output pixels (decode: in_scale=1, out_scale=f; encode: in_scale=f,
out_scale=1, f the downsampling factor).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced starts of tiles of length `tile` covering [0, size), overlapping >= overlap."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got {tile=}, {overlap=}")
    if size <= tile:
        return [0]
    # Fewest tiles whose stride (size - tile) / (n - 1) is at most tile - overlap.
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(k * (size - tile) / (n - 1)) for k in range(n)]


def blend_window(length: int, ramp: int, fade_in: bool, fade_out: bool) -> Tensor:
    """1-D weights of one tile: 1 inside, (k + 1) / (ramp + 1) over `ramp` pixels at faded ends."""
    k = torch.arange(length, dtype=torch.float32)
    w = torch.ones(length)
    if fade_in:
        w = torch.minimum(w, (k + 1) / (ramp + 1))
    if fade_out:
        w = torch.minimum(w, (length - k) / (ramp + 1))
    return w


def _axis_windows(size: int, tile: int, overlap: int, scale: int) -> list[tuple[int, Tensor]]:
    """(start in grid units, output-pixel window) for every tile along one axis."""
    starts = tile_starts(size, tile, overlap)
    extent = min(tile, size)
    stride = max((b - a for a, b in zip(starts, starts[1:])), default=extent)
    ramp = (extent - stride) * scale  # the smallest overlap between neighbours, in output pixels
    last = starts[-1]
    return [(s, blend_window(extent * scale, ramp, s > 0, s < last)) for s in starts]


def tiled_map(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int,
    overlap: int,
    in_scale: int = 1,
    out_scale: int = 1,
) -> Tensor:
    """Apply fn to overlapping tiles of x (B, C, H, W) and blend the outputs without seams.

    Args:
        fn: maps a (B, C, t * in_scale, t * in_scale) tile to (B, C', t * out_scale, t * out_scale).
        x: input whose height and width are multiples of in_scale.
        tile: tile side in grid units.
        overlap: minimum overlap between neighbouring tiles in grid units (0 <= overlap < tile).
        in_scale, out_scale: input and output pixels per grid unit.
    """
    if x.shape[-2] % in_scale or x.shape[-1] % in_scale:
        raise ValueError(
            f"x height and width must be multiples of {in_scale=}, got {tuple(x.shape[-2:])}"
        )
    rows = _axis_windows(x.shape[-2] // in_scale, tile, overlap, out_scale)
    cols = _axis_windows(x.shape[-1] // in_scale, tile, overlap, out_scale)
    th, tw = len(rows[0][1]) // out_scale, len(cols[0][1]) // out_scale
    height = x.shape[-2] // in_scale * out_scale
    width = x.shape[-1] // in_scale * out_scale
    out = weight = None
    for i, w_row in rows:
        for j, w_col in cols:
            y = fn(x[..., i * in_scale : (i + th) * in_scale, j * in_scale : (j + tw) * in_scale])
            if out is None:
                # Accumulate in float32 so bfloat16 tiles do not lose precision in the sum.
                out = torch.zeros((*y.shape[:-2], height, width), device=y.device)
                weight = torch.zeros((height, width), device=y.device)
            rs = slice(i * out_scale, (i + th) * out_scale)
            cs = slice(j * out_scale, (j + tw) * out_scale)
            w = (w_row[:, None] * w_col[None, :]).to(y.device)
            out[..., rs, cs] += y.float() * w
            weight[rs, cs] += w
    return (out / weight).to(y.dtype)
