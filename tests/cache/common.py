"""RoPE + KV-cache test helpers: paged and contiguous inputs, poisoned caches, the unfused sequence on the
same backend (the exactness baseline), and bitwise comparison (NaN and FP8 as bytes)."""

import torch

import posenc_kernels as pk
from posenc_kernels.ops.cache.reference import write_cache_reference

from conftest import DEVICE
from rope.common import tables

POISON = float("nan")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers of its width, in its shape (NaN payloads and FP8 compared
    exactly; a fresh copy with standard strides, whatever the view's)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t.detach()).view(ints)


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def poisoned(shape, dtype, *, hnd_of=None):
    """A cache filled with NaN (FP8 formats: e4m3fn's NaN byte 0x7f, e5m2's 0x7e)."""
    if dtype in FP8:
        c = torch.empty(shape, dtype=torch.uint8, device=DEVICE).fill_(0x7F if dtype == torch.float8_e4m3fn else 0x7E)
        return c.view(dtype)
    return torch.full(shape, POISON, dtype=dtype, device=DEVICE)


def paged(T=5, Hq=4, Hk=2, D=16, Dv=None, *, dtype=torch.float32, cache_dtype=None, layout="NHD", blocks=4, bs=4):
    """q/k/v [T, H, D], caches of ``blocks`` blocks of ``bs`` slots, NaN-poisoned."""
    Dv = D if Dv is None else Dv
    cache_dtype = cache_dtype or dtype
    q = torch.randn(T, Hq, D, dtype=dtype, device=DEVICE)
    k = torch.randn(T, Hk, D, dtype=dtype, device=DEVICE)
    v = torch.randn(T, Hk, Dv, dtype=dtype, device=DEVICE)
    shape = (lambda d: (blocks, bs, Hk, d)) if layout == "NHD" else (lambda d: (blocks, Hk, bs, d))
    return q, k, v, poisoned(shape(D), cache_dtype), poisoned(shape(Dv), cache_dtype)


def contiguous(B=2, S=3, Hq=4, Hk=2, D=16, *, dtype=torch.float32, cache_dtype=None, layout="HND", s_max=8):
    """q/k/v [B, S, H, D] as views of HF's [B, H, S, D] projections, caches [B, Hk, S_max, D] (HND)."""
    cache_dtype = cache_dtype or dtype
    q = torch.randn(B, Hq, S, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, Hk, S, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    v = torch.randn(B, Hk, S, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    shape = (B, Hk, s_max, D) if layout == "HND" else (B, s_max, Hk, D)
    return q, k, v, poisoned(shape, cache_dtype), poisoned(shape, cache_dtype)


def angles(D, R=None, P=64):
    return tables(P, R or D)


def clone_all(*ts):
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in ts)


def unfused(q, k, v, k_cache, v_cache, cos, sin, *, slot_mapping=None, cache_positions=None, kv_layout="NHD",
            k_scale=None, v_scale=None, norm=None, q_weight=None, k_weight=None, **rope_kw):  # fmt: skip
    """The unfused sequence on the backend in force, in place: ``apply_rope_`` (or ``qk_norm_rope_``), then the
    rotated k and v scattered into the caches (quantised as the reference says for FP8)."""
    if norm is None:
        pk.apply_rope_(q, k, cos, sin, **rope_kw)
    else:
        pk.qk_norm_rope_(q, k, q_weight, k_weight, cos, sin, norm=norm, **rope_kw)
    write_cache_reference(k, v, k_cache, v_cache, slot_mapping=slot_mapping, cache_positions=cache_positions,
                          kv_layout=kv_layout, k_scale=k_scale, v_scale=v_scale)
    return q, k
