"""Multi-head attention for the U-Net: one attention function, four backends, one module.

softmax(q kᵀ / sqrt(d)) v  (Vaswani et al. 2017, Eq. 1), computed by a swappable backend:

| backend    | what runs                                          | memory            |
|------------|----------------------------------------------------|-------------------|
| "sdpa"     | torch scaled_dot_product_attention (default)       | fused kernel      |
| "xformers" | xformers memory_efficient_attention (CUDA only)    | fused kernel      |
| "sliced"   | the "math" path over chunks of `slice_size` queries | O(slice_size · Lk) |
| "math"     | matmul, softmax, matmul: the reference             | O(Lq · Lk)        |

Tensors are (B, heads, L, d) throughout: q is (B, H, Lq, d), k and v are (B, H, Lk, d), the
output is (B, H, Lq, d). Self-attention and cross-attention differ only in where k and v come
from, so both call the same `attention` function.

`upcast` (Stable Diffusion 2.x's `upcast_attention`) computes the scores and the softmax in
float32 when the inputs are float16/bfloat16, where q kᵀ can overflow. The fused kernels
("sdpa", "xformers") already accumulate the scores and the softmax in float32, so they need no
extra work; "math" and "sliced" cast explicitly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_BACKENDS = ("sdpa", "xformers", "sliced", "math")
DEFAULT_SLICE_SIZE = 1024  # queries per chunk for "sliced": scores of 1024 × Lk floats per head


def _import_xformers():
    """Import xformers.ops only when the xformers backend is actually used."""
    try:
        import xformers.ops as xops
    except ImportError as err:
        raise ImportError(
            "attention backend 'xformers' needs the xformers package (pip install xformers); "
            f"without it use one of {[b for b in ATTENTION_BACKENDS if b != 'xformers']}"
        ) from err
    return xops


def check_backend(backend: str, slice_size: int | None = None) -> None:
    """Raise ValueError unless `backend` is a known name and `slice_size` fits it."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if slice_size is not None:
        if backend != "sliced":
            raise ValueError(
                f"slice_size applies to backend 'sliced' only, got backend {backend!r}"
            )
        if not isinstance(slice_size, int) or slice_size < 1:
            raise ValueError(f"slice_size must be a positive int, got {slice_size!r}")
    if backend == "xformers":
        _import_xformers()


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The backends that can run on `device` in this environment."""
    names = [b for b in ATTENTION_BACKENDS if b != "xformers"]
    if torch.device(device).type == "cuda":
        try:
            _import_xformers()
            names.insert(1, "xformers")
        except ImportError:
            pass
    return tuple(names)


def _math(q: Tensor, k: Tensor, v: Tensor, upcast: bool) -> Tensor:
    """Reference attention: explicit scores, softmax, weighted sum."""
    dtype = v.dtype
    if upcast:
        q, k = q.float(), k.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    probs = scores.softmax(dim=-1).to(dtype)
    return torch.matmul(probs, v)


def _sliced(q: Tensor, k: Tensor, v: Tensor, upcast: bool, slice_size: int) -> Tensor:
    """The math path over chunks of queries, so the scores never exceed slice_size × Lk."""
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    for start in range(0, q.shape[2], slice_size):
        end = start + slice_size
        out[:, :, start:end] = _math(q[:, :, start:end], k, v, upcast)
    return out


def _xformers(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """xformers' memory-efficient kernel; it wants (B, L, heads, d)."""
    if q.device.type != "cuda":
        raise ValueError(
            f"attention backend 'xformers' needs CUDA tensors, got device {q.device.type!r}; "
            "use 'sdpa' on this device"
        )
    xops = _import_xformers()
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    backend: str = "sdpa",
    *,
    upcast: bool = False,
    slice_size: int | None = None,
) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v (Vaswani et al. 2017, Eq. 1) with the chosen backend.

    Args:
        q: queries, (B, heads, Lq, d).
        k, v: keys and values, (B, heads, Lk, d).
        backend: one of ATTENTION_BACKENDS.
        upcast: compute scores and softmax in float32 (matters for float16/bfloat16 inputs).
        slice_size: queries per chunk for backend "sliced" (default DEFAULT_SLICE_SIZE).
    Returns:
        (B, heads, Lq, d), in the dtype of v.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return _math(q, k, v, upcast)
    if backend == "sliced":
        return _sliced(q, k, v, upcast, slice_size or DEFAULT_SLICE_SIZE)
    if backend == "xformers":
        return _xformers(q, k, v)
    raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")


class Attention(nn.Module):
    """Multi-head attention of x on itself (context=None) or on a context (cross-attention).

    Parameter names are diffusers' (to_q, to_k, to_v, to_out.0), so its weights load as they are.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        upcast: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])
        # set for the whole model by UNet.set_attention_backend
        self.backend = "sdpa"
        self.slice_size: int | None = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, L, dim); context: (B, Lc, context_dim) or None for self-attention."""
        B, L, _ = x.shape
        ctx = x if context is None else context
        # (B, L, heads·d) -> (B, heads, L, d): views only, the backends accept the strides
        q = self.to_q(x).view(B, L, self.heads, -1).transpose(1, 2)
        k = self.to_k(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)
        out = attention(q, k, v, self.backend, upcast=self.upcast, slice_size=self.slice_size)
        out = out.transpose(1, 2).reshape(B, L, -1)
        return self.to_out[1](self.to_out[0](out))
