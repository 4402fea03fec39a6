"""Attention backends agree with the math reference; the module matches diffusers' Attention."""

import importlib.util

import pytest
import torch

from ldm.attention import (
    ATTENTION_BACKENDS,
    Attention,
    attention,
    available_backends,
    check_backend,
)

HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def _qkv(lq=37, lk=37, b=2, h=3, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, h, lk, d, generator=g)
    v = torch.randn(b, h, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_backend_names():
    assert ATTENTION_BACKENDS == ("sdpa", "xformers", "sliced", "math")
    assert available_backends("cpu") == ("sdpa", "sliced", "math")


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("lk", [37, 5])  # self-attention, cross-attention on 5 tokens
def test_backends_match_math(backend, lk):
    q, k, v = _qkv(lk=lk)
    ref = attention(q, k, v, "math")
    # slice_size 8 does not divide 37 queries: the last chunk is short
    out = attention(q, k, v, backend, slice_size=8 if backend == "sliced" else None)
    assert out.shape == (2, 3, 37, 8)
    # float32 rounding of two 8-term dot products and a 37-term sum: 1e-6 is ~10 ulps
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_math_is_softmax_formula():
    q, k, v = _qkv(lq=4, lk=6, b=1, h=1)
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / 8**0.5
    ref = torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v.double())
    torch.testing.assert_close(attention(q, k, v, "math").double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["math", "sliced"])
def test_upcast_avoids_float16_overflow(backend):
    # scores of ~100·100·8 overflow float16 (max 65504); upcast computes them in float32
    q, k, v = _qkv(lq=16, lk=16, b=1, h=2)
    q, k, v = (q * 100).half(), (k * 100).half(), v.half()
    ref = attention(q.float(), k.float(), v.float(), "math")
    assert not attention(q, k, v, backend, upcast=False).isfinite().all()
    out = attention(q, k, v, backend, upcast=True)
    assert out.dtype == torch.float16
    # float16 output of a float32 computation: half-precision rounding, 2^-10 relative
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


def test_sdpa_bfloat16_close_to_float32():
    q, k, v = _qkv()
    ref = attention(q, k, v, "math")
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "sdpa")
    assert out.dtype == torch.bfloat16
    # bfloat16 has 8 mantissa bits: inputs and output each rounded by up to 2^-8 relative
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_bad_backend_and_slice_size():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="must be one of"):
        attention(q, k, v, "flash")
    with pytest.raises(ValueError, match="must be one of .*'sdpa'"):
        check_backend("flash")
    with pytest.raises(ValueError, match="slice_size applies to backend 'sliced' only"):
        check_backend("sdpa", slice_size=8)
    with pytest.raises(ValueError, match="positive int"):
        check_backend("sliced", slice_size=0)


def test_xformers_needs_cuda():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention(q, k, v, "xformers")


@pytest.mark.skipif(HAS_XFORMERS, reason="xformers is installed here")
def test_xformers_missing_is_a_clear_error():
    with pytest.raises(ImportError, match="pip install xformers"):
        check_backend("xformers")


@pytest.mark.parametrize("cross", [False, True])
def test_module_matches_diffusers_attention(cross):
    from diffusers.models.attention_processor import Attention as RefAttention

    torch.manual_seed(0)
    ctx_dim = 12 if cross else None
    ref = RefAttention(query_dim=16, heads=4, dim_head=8, cross_attention_dim=ctx_dim).eval()
    ours = Attention(16, heads=4, head_dim=8, context_dim=ctx_dim).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 10, 16)
    ctx = torch.randn(2, 7, 12) if cross else None
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=ctx)
        for backend in available_backends("cpu"):
            ours.backend = backend
            # same kernels up to the reshapes: a few float32 ulps
            torch.testing.assert_close(ours(x, ctx), expected, rtol=1e-5, atol=1e-6)
