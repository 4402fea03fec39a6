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

`Attention.fuse_qkv` (inference) computes a self-attention's q, k and v with one matmul against
the stacked (3·inner, dim) weight instead of three; its state_dict keeps the to_q / to_k / to_v
keys, so checkpoints load and save the same whether the module is fused or not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_BACKENDS = ("sdpa", "xformers", "sliced", "math")
QKV = ("to_q", "to_k", "to_v")  # the projections fuse_qkv stacks, in this order
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
        self.is_self_attention = context_dim is None  # k, v are projected from x itself
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])
        # (3·inner, dim) = [W_q; W_k; W_v] after fuse_qkv, replacing to_q/to_k/to_v; else None
        self.register_parameter("qkv_weight", None)
        # set for the whole model by UNet.set_attention_backend
        self.backend = "sdpa"
        self.slice_size: int | None = None

    @property
    def fused(self) -> bool:
        return self.qkv_weight is not None

    def fuse_qkv(self) -> None:
        """Replace to_q/to_k/to_v by one stacked weight: one matmul instead of three (inference)."""
        if not self.is_self_attention:
            raise ValueError("fuse_qkv applies to self-attention only (this module has a context)")
        if self.fused:
            return
        weights = [getattr(self, name).weight for name in QKV]
        stacked = torch.cat([w.detach() for w in weights])
        self.qkv_weight = nn.Parameter(stacked, requires_grad=weights[0].requires_grad)
        for name in QKV:
            delattr(self, name)

    def unfuse_qkv(self) -> None:
        """Split the stacked weight back into the to_q / to_k / to_v Linear layers."""
        if not self.fused:
            return
        requires_grad = self.qkv_weight.requires_grad
        for name, w in zip(QKV, self.qkv_weight.detach().chunk(3)):
            linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            linear.weight = nn.Parameter(w.clone(), requires_grad=requires_grad)
            setattr(self, name, linear)
        self.qkv_weight = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A fused module saves the to_q / to_k / to_v keys of the unfused one."""
        if not self.fused:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.qkv_weight if keep_vars else self.qkv_weight.detach()
        for name, part in zip(QKV, w.chunk(3)):
            # copies, not views: safetensors refuses to save tensors that share memory
            destination[f"{prefix}{name}.weight"] = part if keep_vars else part.clone()

    def _load_from_state_dict(self, state_dict, prefix, meta, strict, missing, unexpected, msgs):
        """A fused module loads the to_q / to_k / to_v keys into its stacked weight."""
        args = (prefix, meta, strict, missing, unexpected, msgs)
        if not self.fused:
            return super()._load_from_state_dict(state_dict, *args)
        keys = [f"{prefix}{name}.weight" for name in QKV]
        found = [k for k in keys if k in state_dict]
        rest = {k: v for k, v in state_dict.items() if k not in keys}
        if len(found) == len(keys):
            rest[prefix + "qkv_weight"] = torch.cat([state_dict[k] for k in keys])
        elif found:
            msgs.append(f"{prefix[:-1]} is fused and loads {', '.join(QKV)} together; "
                        f"got only {', '.join(found)} (call unfuse_qkv first)")  # fmt: skip
        super()._load_from_state_dict(rest, *args)
        if len(found) < len(keys) and strict:  # name the keys the caller knows, not qkv_weight
            missing.remove(prefix + "qkv_weight")
            missing.extend(k for k in keys if k not in state_dict)

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q from x, k and v from the context (or x): each (B, L, heads·d)."""
        if not self.fused:
            ctx = x if context is None else context
            return self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        if context is None:
            return F.linear(x, self.qkv_weight).chunk(3, dim=-1)
        w_q, w_k, w_v = self.qkv_weight.chunk(3)
        return F.linear(x, w_q), F.linear(context, w_k), F.linear(context, w_v)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, L, dim); context: (B, Lc, context_dim) or None for self-attention."""
        B, L, _ = x.shape
        Lc = L if context is None else context.shape[1]
        q, k, v = self._project(x, context)
        # (B, L, heads·d) -> (B, heads, L, d): views only, the backends accept the strides
        q = q.view(B, L, self.heads, -1).transpose(1, 2)
        k = k.view(B, Lc, self.heads, -1).transpose(1, 2)
        v = v.view(B, Lc, self.heads, -1).transpose(1, 2)
        out = attention(q, k, v, self.backend, upcast=self.upcast, slice_size=self.slice_size)
        out = out.transpose(1, 2).reshape(B, L, -1)
        return self.to_out[1](self.to_out[0](out))
