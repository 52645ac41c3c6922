"""RoPE + KV-cache write on Triton (the prologue kernel's cache stage), against what it replaces:

* a cache in the input dtype: q, k and every cache row bit for bit Triton ``apply_rope_`` (or
  ``qk_norm_rope_``) followed by a scatter; rows not written (slot -1, tokens past ``len(slot_mapping)``,
  cache position -1) stay bitwise as they were (caches poisoned with NaN first);
* an FP8 cache / q: bit for bit ``torch_impl.quantise`` of those values (per-tensor and per-head scales,
  tensors and floats; values past the format's range clamp, never NaN);
* every RoPE mode (tables, on-the-fly and exact angles, positions, offsets, cu_seqlens, an axis map, partial
  rotary, interleaved pairs), v with its own head_dim (MLA), a k-only cache, the out-of-place op;
* the launcher's 64-bit choices (q/k/v offsets, the slot division), on meta tensors.

Through the interpreter the FP8 cast is the GPU's round-to-nearest-even (posenc_dev/interpreter.py replaces
the interpreter's own, which drops the carry of a rounding that crosses a power of two).

Small shapes: every case runs through the Triton interpreter on CPU (or on CUDA when there is one).
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops.cache import kernel as cache_kernel
from posenc_kernels.ops.cache.op import rope_and_cache
from posenc_kernels.ops.cache.torch_impl import NHD, quantise

from posenc_kernels.ops.cache.reference import write_cache_reference, written_rows

from cache.common import bits, poisoned
from conftest import DEVICE, TRITON_RUNS

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")


FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def assert_bits(a, b, what=""):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.equal(bits(a), bits(b)), f"{what}: {(bits(a) != bits(b)).sum().item()} elements differ"


def tables(n, R):
    return pk.rope_cos_sin(n, pk.rope_frequencies(R)[0].to(DEVICE))


def unfused(q, k, v, kc, vc, *, slot_mapping=None, cache_positions=None, kv_layout="NHD", k_scale=None,
            v_scale=None, norm=None, weights=(None, None), **rope):  # fmt: skip
    """Triton apply_rope_ (qk_norm_rope_) on copies, then the rotated k and v written row by row (the reference
    scatter; FP8 as ``quantise_reference``, bitwise ``torch_impl.quantise``). Returns (q, k, k_cache, v_cache)."""
    q, k = q.clone(), k.clone()
    kc = kc.clone()
    vc = vc.clone() if vc is not None else None
    with pk.use_backend("triton"):
        if norm is None:
            pk.apply_rope_(q, k, **rope)
        else:
            pk.qk_norm_rope_(q, k, *weights, norm=norm, **rope)
    write_cache_reference(k, v, kc, vc, slot_mapping=slot_mapping, cache_positions=cache_positions,
                          kv_layout=kv_layout, k_scale=k_scale, v_scale=v_scale)
    return q, k, kc, vc


def fused(q, k, v, kc, vc, *, norm=None, weights=(None, None), **kw):
    q, k, kc = q.clone(), k.clone(), kc.clone()
    vc = vc.clone() if vc is not None else None
    with pk.use_backend("triton"):
        if norm is None:
            pk.rope_and_cache_(q, k, v, kc, vc, **kw)
        else:
            pk.qk_norm_rope_and_cache_(q, k, v, kc, vc, *weights, norm=norm, **kw)
    return q, k, kc, vc


def compare(got, want):
    for name, a, b in zip(("q", "k", "k_cache", "v_cache"), got, want):
        if a is not None or b is not None:
            assert_bits(a, b, name)


def cache_shape(layout, n0, n1, H, D):
    return (n0, n1, H, D) if layout == "NHD" else (n0, H, n1, D)


# ---- a cache in the input dtype: bit for bit apply_rope_ + scatter


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["paged_NHD", "paged_HND", "contiguous_HND"])
def test_matches_apply_rope_then_scatter(dtype, case):
    Hq, Hk, D = 4, 2, 32
    cos, sin = tables(64, D)
    layout = case.split("_")[1]
    if case.startswith("paged"):
        T = 7
        q, k, v = (torch.randn(T, H, D, device=DEVICE, dtype=dtype) for H in (Hq, Hk, Hk))
        idx = dict(slot_mapping=torch.tensor([5, 6, -1, 0, 13, 2], device=DEVICE))  # the 7th token: padding
        rope = dict(positions=torch.tensor([9, 10, 0, 3, 4, 50, 63], device=DEVICE))
        n0, n1 = 4, 4
    else:
        B, S = 2, 3
        q, k, v = (torch.randn(B, S, H, D, device=DEVICE, dtype=dtype) for H in (Hq, Hk, Hk))
        idx = dict(cache_positions=torch.tensor([[3, 4, 5], [0, -1, 7]], device=DEVICE))
        rope = dict(offsets=torch.tensor([3, 0], device=DEVICE))
        n0, n1 = B, 8
    kc, vc = poisoned(cache_shape(layout, n0, n1, Hk, D), dtype), poisoned(cache_shape(layout, n0, n1, Hk, D), dtype)
    want = unfused(q, k, v, kc, vc, kv_layout=layout, cos=cos, sin=sin, **idx, **rope)
    got = fused(q, k, v, kc, vc, cos=cos, sin=sin, kv_layout=layout, **idx, **rope)
    compare(got, want)
    written = len(written_rows(idx.get("slot_mapping"), idx.get("cache_positions"), q.shape[0] if q.dim() == 4 else 1,
                          q.shape[-3], n1))  # fmt: skip
    assert int((~torch.isnan(got[2].float())).sum()) == written * Hk * D  # every other row still NaN


@pytest.mark.parametrize("norm", ["head", "heads"])
def test_norm_matches_qk_norm_rope_then_scatter(norm):
    T, Hq, Hk, D, dtype = 5, 4, 2, 32, torch.bfloat16
    cos, sin = tables(32, D)
    q, k, v = (torch.randn(T, H, D, device=DEVICE, dtype=dtype) for H in (Hq, Hk, Hk))
    n = (lambda H: D) if norm == "head" else (lambda H: H * D)
    weights = (torch.randn(n(Hq), device=DEVICE, dtype=dtype), torch.randn(n(Hk), device=DEVICE, dtype=dtype))
    kc, vc = poisoned((3, 4, Hk, D), dtype), poisoned((3, 4, Hk, D), dtype)
    kw = dict(slot_mapping=torch.tensor([1, 2, 9, -1], device=DEVICE), positions=torch.arange(T, device=DEVICE) + 7)
    want = unfused(q, k, v, kc, vc, norm=norm, weights=weights, cos=cos, sin=sin, **kw)
    got = fused(q, k, v, kc, vc, norm=norm, weights=weights, cos=cos, sin=sin, **kw)
    compare(got, want)


@pytest.mark.parametrize("mode", ["on_the_fly", "exact", "cu_seqlens", "axis_map", "partial_interleaved"])
def test_rope_modes(mode):
    T, Hq, Hk, D, dtype = 6, 2, 1, 24, torch.bfloat16
    R = 16 if mode == "partial_interleaved" else D
    rope = {}
    if mode in ("on_the_fly", "exact"):
        freq_dtype = torch.float64 if mode == "exact" else torch.float32
        rope["inv_freq"] = pk.rope_frequencies(R, dtype=freq_dtype)[0].to(DEVICE)
        rope["exact"] = mode == "exact"
        rope["positions"] = torch.tensor([0, 5, 100, 7, 3000, 1], device=DEVICE)
    else:
        rope["cos"], rope["sin"] = tables(64, R)
        if mode == "cu_seqlens":
            rope["cu_seqlens"] = torch.tensor([0, 2, 6], device=DEVICE, dtype=torch.int32)
        elif mode == "axis_map":
            rope["positions"] = torch.randint(0, 64, (3, T), device=DEVICE)
            rope["axis_map"] = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2][: R // 2], device=DEVICE)
        else:
            rope["positions"] = torch.arange(T, device=DEVICE) * 3
            rope["interleaved"] = True
    q, k, v = (torch.randn(T, H, D, device=DEVICE, dtype=dtype) for H in (Hq, Hk, Hk))
    kc, vc = poisoned((2, 8, Hk, D), dtype), poisoned((2, 8, Hk, D), dtype)
    slots = torch.tensor([8, 9, 10, 0, 1, 15], device=DEVICE)
    compare(fused(q, k, v, kc, vc, slot_mapping=slots, **rope), unfused(q, k, v, kc, vc, slot_mapping=slots, **rope))


def test_out_of_place_op_and_k_only_cache():
    """The out-of-place op (fresh q/k/caches: the pass-through tail written by the kernel) equals the in-place
    one; a k-only cache (v None) writes k's rows alone."""
    T, Hq, Hk, D, R, dtype = 4, 2, 2, 20, 8, torch.float32
    cos, sin = tables(16, R)
    q, k = torch.randn(T, Hq, D, device=DEVICE, dtype=dtype), torch.randn(T, Hk, D, device=DEVICE, dtype=dtype)
    kc = poisoned((2, 4, Hk, D), dtype)
    slots = torch.tensor([0, 5, -1, 3], device=DEVICE)
    pos = torch.tensor([1, 2, 3, 15], device=DEVICE)
    want = unfused(q, k, None, kc, None, slot_mapping=slots, cos=cos, sin=sin, positions=pos)
    got = fused(q, k, None, kc, None, slot_mapping=slots, cos=cos, sin=sin, positions=pos)
    compare(got, want)
    before = [t.clone() for t in (q, k, kc)]
    with pk.use_backend("triton"):
        args = (q, k, None, kc, None, None, slots, None, NHD, None, None, None, None, None, None, None, None, 0.0, -1,
                0.0, cos, sin, None, pos, None, 0, None, None, 1.0, False, False, False)  # fmt: skip
        qo, ko, kco, _, _ = rope_and_cache.call(*args)
    compare((qo, ko, kco), want[:3])
    for name, t, t0 in zip(("q", "k", "k_cache"), (q, k, kc), before):
        assert_bits(t, t0, f"{name} (an input of the out-of-place op)")


def test_mla_latent_cache():
    """v's head_dim differs from k's (DeepSeek MLA: a 1-head latent beside k_pe), q a strided slice."""
    T, H, rope_dim, rank, dtype = 3, 4, 16, 40, torch.bfloat16
    q = torch.randn(T, H, 8 + rope_dim, device=DEVICE, dtype=dtype)
    q_pe, k_pe, kv_c = q[..., 8:], torch.randn(T, rope_dim, device=DEVICE, dtype=dtype), torch.randn(
        T, rank, device=DEVICE, dtype=dtype)  # fmt: skip
    kv_cache = poisoned((2, 4, rank + rope_dim), dtype)
    cos, sin = tables(16, rope_dim)
    slots, pos = torch.tensor([0, 7, 2], device=DEVICE), torch.tensor([3, 9, 4], device=DEVICE)
    want_q, want_k = q_pe.clone(), k_pe.clone()
    with pk.use_backend("triton"):
        pk.apply_rope_(want_q, want_k[:, None], cos, sin, positions=pos, interleaved=True)
        got_cache = kv_cache.clone()
        pk.mla_rope_and_cache_(q_pe, k_pe, kv_c, got_cache, cos, sin, slot_mapping=slots, positions=pos)
    want_cache = kv_cache.clone()
    for t, slot in enumerate(slots.tolist()):
        want_cache[slot // 4, slot % 4] = torch.cat([kv_c[t], want_k[t]])
    assert_bits(q_pe, want_q, "q_pe")
    assert_bits(k_pe, want_k, "k_pe")
    assert_bits(got_cache, want_cache, "kv_cache")


# ---- FP8


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # x * (1 / s) of 3e38: inf, clamped
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("scale", ["tensor", "per_head", "float"])
def test_fp8_cache_matches_quantise(fp8, scale):
    """Rotated k and v quantised as torch_impl.quantise does, bit for bit; v spans far past the format's range
    (clamped, never NaN) and many magnitudes (the correctly rounded division)."""
    T, Hq, Hk, D, dtype = 5, 2, 2, 32, torch.float32
    cos, sin = tables(16, D)
    q, k = torch.randn(T, Hq, D, device=DEVICE, dtype=dtype), torch.randn(T, Hk, D, device=DEVICE, dtype=dtype)
    v = torch.randn(T, Hk, D, device=DEVICE, dtype=dtype) * torch.logspace(-6, 6, D, device=DEVICE)
    fmax = torch.finfo(fp8).max
    v[0, 0, :4] = torch.tensor([fmax * 0.37, -fmax * 0.371, 1e30, -3e38])  # past the range once divided
    if scale == "tensor":
        ks, vs = torch.tensor(0.37, device=DEVICE), torch.tensor([0.0123], device=DEVICE, dtype=torch.float64)
    elif scale == "per_head":
        ks, vs = torch.tensor([0.3, 1.7], device=DEVICE), torch.tensor([1e-3, 0.77], device=DEVICE)
    else:
        ks, vs = 0.37, 0.0123
    kc, vc = poisoned((2, 4, Hk, D), torch.float32).to(fp8), poisoned((2, 4, Hk, D), torch.float32).to(fp8)
    kw = dict(slot_mapping=torch.tensor([0, 3, -1, 6], device=DEVICE), k_scale=ks, v_scale=vs, cos=cos, sin=sin,
              positions=torch.tensor([1, 2, 3, 4, 5], device=DEVICE))  # fmt: skip
    got, want = fused(q, k, v, kc, vc, **kw), unfused(q, k, v, kc, vc, **kw)
    compare(got, want)
    nan = 0x7F if fp8 == torch.float8_e4m3fn else 0x7E  # e4m3fn's NaN is S.1111.111, e5m2's S.11111.1x
    written = bits(got[3])[bits(got[3]) != bits(vc)[0, 0, 0, 0]]
    assert not ((written & 0x7F) >= nan).any(), "a finite value became NaN or inf"
    assert (written.view(fp8).float().abs() == fmax).sum() >= 3, "out-of-range values must clamp to the max"


def near_midpoints(scale: float, n: int, fp8=torch.float8_e4m3fn) -> torch.Tensor:
    """``n`` fp32 values ``x`` whose quotient ``x / scale`` lies within a few fp32 ulps of a rounding midpoint
    of ``fp8`` (``x = fp32(M * scale)`` and its 2 neighbours either side, both signs): where a division
    off by one fp32 ulp (``x * fp32(1 / scale)`` alone) rounds to the other FP8 neighbour."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(fp8).double()
    grid = grid[grid.isfinite()]
    mids = (grid[1:] + grid[:-1]) / 2
    x = (mids[mids > 2**-6] * torch.tensor(scale, dtype=torch.float32).double()).float()
    x = torch.cat([(x.view(torch.int32) + d).view(torch.float32) for d in (-2, -1, 0, 1, 2)])
    x = torch.cat([x, -x])
    return x[torch.randint(0, x.numel(), (n,))]


def test_fp8_quantise_division_is_correctly_rounded():
    """v over 24 binades and v whose quotients sit next to FP8 rounding midpoints, with per-head scales: the
    kernel's division (a correctly rounded reciprocal and one Markstein correction) must give torch's
    correctly rounded ``x / s`` then the FP8 rounding, on every value (``x * (1 / s)`` alone fails here)."""
    T, Hk, D = 8, 4, 128
    q, k = torch.randn(T, 1, 16, device=DEVICE), torch.randn(T, Hk, 16, device=DEVICE)
    vs = torch.tensor([0.0173, 3.3, 0.7071, 1.1e-3], device=DEVICE)
    v = torch.randn(T, Hk, D) * torch.exp(torch.empty(T, Hk, D).uniform_(-8, 8))
    for h in range(Hk):
        v[:, h, D // 2:] = near_midpoints(float(vs[h]), T * D // 2).view(T, D // 2)
    v = v.to(DEVICE)
    kc = torch.zeros(1, T, Hk, 16, device=DEVICE).to(torch.float8_e4m3fn)
    vc = torch.zeros(1, T, Hk, D, device=DEVICE).to(torch.float8_e4m3fn)
    cos, sin = tables(T, 16)
    kw = dict(slot_mapping=torch.arange(T, device=DEVICE), k_scale=1.0, v_scale=vs, cos=cos, sin=sin)
    got = fused(q, k, v, kc, vc, **kw)
    assert_bits(got[3][0], quantise(v, vs, None, torch.float8_e4m3fn), "v_cache")


@pytest.mark.parametrize("same_format", [True, False])
def test_q_fp8(same_format):
    """q_fp8 receives the rotated q quantised with q_scale (per q head); q itself is left as it is."""
    T, Hq, Hk, D, dtype = 3, 4, 2, 16, torch.bfloat16
    cos, sin = tables(8, D)
    q, k, v = (torch.randn(T, H, D, device=DEVICE, dtype=dtype) for H in (Hq, Hk, Hk))
    cache_dtype = torch.float8_e4m3fn if same_format else dtype
    kc, vc = torch.zeros(1, 4, Hk, D, device=DEVICE, dtype=cache_dtype), torch.zeros(1, 4, Hk, D, device=DEVICE,
                                                                                      dtype=cache_dtype)  # fmt: skip
    q_fp8 = torch.zeros(T, Hq, D, device=DEVICE, dtype=torch.float8_e4m3fn if same_format else torch.float8_e5m2)
    qs = torch.tensor([0.5, 0.01, 1.5, 0.03], device=DEVICE)
    scales = dict(k_scale=0.1, v_scale=torch.tensor(0.2, device=DEVICE)) if same_format else {}
    kw = dict(slot_mapping=torch.tensor([0, 1, 2], device=DEVICE), cos=cos, sin=sin, **scales)
    want = unfused(q, k, v, kc, vc, **kw)
    qq = q.clone()
    got = fused(qq, k, v, kc, vc, q_fp8=q_fp8, q_scale=qs, **kw)
    assert_bits(got[0], q, "q (left as it is)")
    compare(got[1:], want[1:])
    assert_bits(q_fp8, quantise(want[0], qs, None, q_fp8.dtype), "q_fp8")


# ---- the launcher's index widths


def test_index_widths_choice():
    """64-bit q/k/v offsets only past 2**31 elements of an input; the slot division in 64 bits only for a
    cache of more than 2**31 slots; checked on meta tensors (nothing allocated)."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(1, 16, 32, 128, **meta)
    k, v = torch.empty(1, 16, 8, 128, **meta), torch.empty(1, 16, 8, 128, **meta)
    small = torch.empty(1024, 16, 8, 128, **meta)
    assert cache_kernel.index_widths(q, k, v, q, k, None, (), small, True) == (False, False)
    big_k = torch.empty_strided((1, 16, 8, 128), (2**32, 2**28, 128, 1), **meta)  # a strided view of a huge buffer
    assert cache_kernel.index_widths(q, big_k, v, q, big_k, None, (), small, True) == (True, False)
    huge = torch.empty_strided((2**27, 17, 8, 128), (17 * 1024, 1024, 128, 1), **meta)  # 2**27 * 17 slots
    assert cache_kernel.index_widths(q, k, v, q, k, None, (), huge, True) == (False, True)
    assert cache_kernel.index_widths(q, k, v, q, k, None, (), huge, False) == (False, False)  # no division
