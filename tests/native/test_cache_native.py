"""The native CPU kernel of posenc::rope_and_cache_ / rope_and_cache: q and k bit for bit native apply_rope_
(or qk_norm_rope_) and the caches bit for bit a scatter of the rotated k (and v) afterwards (paged NHD / HND,
contiguous HND with [B, S] positions / NHD with [S], bf16 / fp32), MLA's Dv != D, k-only caches, padded tokens
and untouched rows (NaN-poisoned caches), the out-of-place twin, FP8 caches and q_fp8 bitwise equal to the
torch path (torch_impl.quantise), the version counters, and that the C++ kernel is what ran.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels.ops import registry

from .native_common import *  # noqa: F401,F403  (native_cpu fixture: backend "native")

pytestmark = pytest.mark.skipif(
    "rope_and_cache_" not in _native.ops_for("CPU"), reason=f"no native rope_and_cache_: {_native.load_error()}"
)

BF16, F32 = torch.bfloat16, torch.float32


def _g(*shape, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _bits(t):
    return t.detach().contiguous().view(torch.uint8)


def _same(a, b):
    """Bitwise equal (NaN poison included)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _tables(D, rows=64, dtype=F32):
    return pk.rope_cos_sin(rows, pk.rope_frequencies(D)[0], dtype=dtype)


def _nan_cache(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _assert_native_ran(monkeypatch):
    calls = []
    run_python = registry.run_python
    monkeypatch.setattr(registry, "run_python", lambda *a: calls.append(a) or run_python(*a))
    return calls


def test_native_in_force():
    assert_native("rope_and_cache_")
    assert_native("rope_and_cache")


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_paged_bit_exact(layout, dtype, monkeypatch):
    T, Hq, Hk, D, nb, bs = 13, 4, 2, 32, 6, 4
    q, k, v = _g(T, Hq, D, dtype=dtype), _g(T, Hk, D, dtype=dtype, seed=1), _g(T, Hk, D, dtype=dtype, seed=2)
    cos, sin = _tables(D)
    pos = torch.tensor([3, 9, 1, 0, 7, 20, 5, 6, 2, 11, 4, 8, 30])
    slots = torch.tensor([5, 0, -1, 23, 7, 12, -1, 3, 17, 9, 22])  # 11 < T: the last two tokens are padding
    shape = (nb, bs, Hk, D) if layout == "NHD" else (nb, Hk, bs, D)
    kc, vc = _nan_cache(shape, dtype), _nan_cache(shape, dtype)
    # the unfused sequence on the native backend: apply_rope_, then the scatter
    q_ref, k_ref = q.clone(), k.clone()
    pk.apply_rope_(q_ref, k_ref, cos, sin, positions=pos)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kv4 = (kc_ref, vc_ref) if layout == "NHD" else (kc_ref.transpose(1, 2), vc_ref.transpose(1, 2))
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            kv4[0][s // bs, s % bs] = k_ref[t]
            kv4[1][s // bs, s % bs] = v[t]
    calls = _assert_native_ran(monkeypatch)
    pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, slot_mapping=slots, positions=pos, kv_layout=layout)
    assert not calls, "a Python kernel ran"
    assert _same(q, q_ref) and _same(k, k_ref)
    assert _same(kc, kc_ref) and _same(vc, vc_ref)  # unwritten rows still NaN


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_contiguous_bit_exact(layout, dtype):
    B, S, Hq, Hk, D, S_max = 2, 5, 4, 2, 16, 12
    q, k, v = _g(B, S, Hq, D, dtype=dtype), _g(B, S, Hk, D, dtype=dtype, seed=1), _g(B, S, Hk, D, dtype=dtype, seed=2)
    cos, sin = _tables(D)
    cp = torch.tensor([[4, 5, 6, -1, 7], [0, 11, 2, 3, -1]], dtype=torch.int32)
    if layout == "NHD":  # one row of cache positions for every sequence ([S])
        cp = cp[1]
    shape = (B, S_max, Hk, D) if layout == "NHD" else (B, Hk, S_max, D)
    kc, vc = _nan_cache(shape, dtype), _nan_cache(shape, dtype)
    q_ref, k_ref = q.clone(), k.clone()
    pk.apply_rope_(q_ref, k_ref, cos, sin, offsets=torch.tensor([4, 0]))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kv4 = (kc_ref, vc_ref) if layout == "NHD" else (kc_ref.transpose(1, 2), vc_ref.transpose(1, 2))
    for b in range(B):
        for s in range(S):
            p = int(cp[b, s] if cp.dim() == 2 else cp[s])
            if p >= 0:
                kv4[0][b, p], kv4[1][b, p] = k_ref[b, s], v[b, s]
    pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, cache_positions=cp, offsets=torch.tensor([4, 0]), kv_layout=layout)
    assert _same(q, q_ref) and _same(k, k_ref) and _same(kc, kc_ref) and _same(vc, vc_ref)


@pytest.mark.parametrize("norm", ["head", "heads"])
def test_norm_stage_bit_exact(norm):
    T, Hq, Hk, D = 7, 4, 2, 32
    q, k, v = _g(T, Hq, D, dtype=BF16), _g(T, Hk, D, dtype=BF16, seed=1), _g(T, Hk, D, dtype=BF16, seed=2)
    qw = _g(D if norm == "head" else Hq * D, dtype=BF16, seed=3)
    kw = _g(D if norm == "head" else Hk * D, dtype=BF16, seed=4)
    cos, sin = _tables(D)
    slots = torch.tensor([2, 9, 4, -1, 0, 15, 1])
    kc, vc = _nan_cache((4, 4, Hk, D), BF16), _nan_cache((4, 4, Hk, D), BF16)
    q_ref, k_ref = q.clone(), k.clone()
    pk.qk_norm_rope_(q_ref, k_ref, qw, kw, cos, sin, norm=norm, offsets=3)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            kc_ref[s // 4, s % 4], vc_ref[s // 4, s % 4] = k_ref[t], v[t]
    pk.qk_norm_rope_and_cache_(q, k, v, kc, vc, qw, kw, cos, sin, norm=norm, offsets=3, slot_mapping=slots)
    assert _same(q, q_ref) and _same(k, k_ref) and _same(kc, kc_ref) and _same(vc, vc_ref)


def test_mla_dv_differs_and_strided_q():
    """MLA: q_pe a strided slice of q, a one-head latent v with Dv != D, both caches column ranges of one
    cache (interleaved pairs)."""
    T, H, rope_dim, rank = 5, 3, 16, 24
    qfull = _g(T, H, 8 + rope_dim)
    q_pe, k_pe, kv_c = qfull[..., 8:], _g(T, rope_dim, seed=1), _g(T, rank, seed=2)
    cache = _nan_cache((2, 4, rank + rope_dim), F32)
    cos, sin = _tables(rope_dim)
    slots, pos = torch.tensor([0, 7, -1, 3, 4]), torch.tensor([0, 1, 2, 3, 9])
    q_ref, k_ref = q_pe.clone(), k_pe.clone()[:, None]
    pk.apply_rope_(q_ref, k_ref, cos, sin, positions=pos, interleaved=True)
    ref = cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            ref[s // 4, s % 4] = torch.cat([kv_c[t], k_ref[t, 0]])
    pk.mla_rope_and_cache_(q_pe, k_pe, kv_c, cache, cos, sin, slot_mapping=slots, positions=pos)
    assert _same(q_pe, q_ref) and _same(k_pe, k_ref[:, 0]) and _same(cache, ref)


def test_k_only_and_out_of_place_twin():
    T, Hq, Hk, D = 6, 2, 1, 16
    q, k = _g(T, Hq, D, dtype=BF16), _g(T, Hk, D, dtype=BF16, seed=1)
    cos, sin = _tables(D)
    slots = torch.tensor([3, -1, 0, 5])
    kc = _nan_cache((2, 4, Hk, D), BF16)
    cache = (None, kc, None, None, slots, None, 0) + (None,) * 6  # v, caches, q_fp8, index, layout, scales
    no_norm = (None, None, 0.0, -1, 0.0)
    rope = (cos, sin, None, torch.arange(T), None, 0, None, None, 1.0, False, False, False)
    args = (q, k) + cache + no_norm + rope
    q_o, k_o, kc_o, vc_o, qf_o = torch.ops.posenc.rope_and_cache.default(*args)
    assert vc_o.numel() == 0 and qf_o.numel() == 0
    q_ref, k_ref = q.clone(), k.clone()
    pk.apply_rope_(q_ref, k_ref, cos, sin, positions=torch.arange(T))
    kc_before = kc.clone()
    torch.ops.posenc.rope_and_cache_.default(*args)  # in place: same values as the twin
    assert _same(q_o, q) and _same(k_o, k) and _same(kc_o, kc) and _same(q, q_ref) and _same(k, k_ref)
    assert _same(kc[1, 1], k_ref[3]) and _same(kc[0, 3], k_ref[0]) and _same(kc[0, 0], k_ref[2])
    assert torch.isnan(kc[0, 1:3].float()).all() and torch.isnan(kc[1, 2:].float()).all()
    assert not _same(kc_before, kc)


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_bitwise_like_torch(fmt):
    """FP8 caches (per-head tensor scale for k, a float for v; values beyond the format's range clamp) and
    q_fp8 (one scale): bitwise what the torch path (torch_impl.quantise) stores."""
    T, Hq, Hk, D = 9, 4, 2, 32
    q, k, v = _g(T, Hq, D, dtype=BF16) * 300, _g(T, Hk, D, dtype=BF16, seed=1) * 3e4, _g(T, Hk, D, dtype=BF16, seed=2)
    cos, sin = _tables(D)
    slots, pos = torch.tensor([1, 2, 3, -1, 5, 6, 7, 8]), torch.arange(T)
    k_scale, q_scale = torch.tensor([0.5, 2.0], dtype=BF16), torch.tensor(0.75)
    results = {}
    for backend in ("torch", "native"):
        qq, kk = q.clone(), k.clone()
        kc, vc = torch.zeros(3, 4, Hk, D, dtype=fmt), torch.zeros(3, 4, Hk, D, dtype=fmt)
        q8 = torch.zeros(T, Hq, D, dtype=fmt)
        with pk.use_backend(backend):
            pk.rope_and_cache_(qq, kk, v, kc, vc, cos, sin, slot_mapping=slots, positions=pos, k_scale=k_scale,
                               v_scale=0.1, q_fp8=q8, q_scale=q_scale)  # fmt: skip
        results[backend] = (qq, kk, kc, vc, q8)
    for a, b in zip(results["torch"], results["native"]):
        assert _same(a, b)
    assert _same(results["native"][0], q)  # q itself is left as it is with q_fp8


def test_versions_bumped_and_empty():
    T, D = 3, 8
    q, k, v = _g(T, 2, D), _g(T, 1, D), _g(T, 1, D)
    kc, vc = torch.zeros(1, 4, 1, D), torch.zeros(1, 4, 1, D)
    before = [t._version for t in (q, k, kc, vc)]
    pk.rope_and_cache_(q, k, v, kc, vc, *_tables(D), slot_mapping=torch.tensor([0, 1, 2]))
    assert all(t._version > b for t, b in zip((q, k, kc, vc), before))
    e = [torch.empty(0, h, D) for h in (2, 1, 1)]
    pk.rope_and_cache_(*e, kc, vc, *_tables(D), slot_mapping=torch.tensor([], dtype=torch.long))


def test_value_checks_off_never_writes_outside():
    """With value checks off, a slot outside the cache is skipped (never an out-of-bounds write)."""
    q, k = _g(2, 2, 8), _g(2, 1, 8)
    buf = _nan_cache((3, 4, 1, 8), F32)
    kc = buf[1:2]
    pk.set_value_checks(False)
    try:
        pk.rope_and_cache_(q, k, None, kc, None, *_tables(8), slot_mapping=torch.tensor([4, 1]))
    finally:
        pk.set_value_checks(True)
    assert torch.isnan(buf[0]).all() and torch.isnan(buf[2]).all()
    assert _same(kc[0, 1], k[1]) and torch.isnan(kc[0, 0]).all()


def test_fp8_norm_contiguous_hnd_like_torch():
    """The QK-norm item kernel's cache write and q_fp8: a contiguous HND FP8 cache, per-head v scale, a
    per-head q scale, head_dim 80 (pass-through channels: partial rotary)."""
    B, S, Hq, Hk, D = 2, 3, 4, 2, 80
    q, k, v = _g(B, S, Hq, D, dtype=BF16), _g(B, S, Hk, D, dtype=BF16, seed=1), _g(B, S, Hk, D, dtype=BF16, seed=2)
    qw, kw = _g(D, dtype=BF16, seed=3), _g(D, dtype=BF16, seed=4)
    cos, sin = _tables(64)  # R = 64 < D
    cp = torch.tensor([[5, -1, 0], [2, 3, 7]])
    results = {}
    for backend in ("torch", "native"):
        qq, kk = q.clone(), k.clone()
        kc, vc = (torch.zeros(B, Hk, 8, D, dtype=torch.float8_e4m3fn) for _ in range(2))
        q8 = torch.zeros(B, S, Hq, D, dtype=torch.float8_e5m2)
        with pk.use_backend(backend):
            pk.qk_norm_rope_and_cache_(qq, kk, v, kc, vc, qw, kw, cos, sin, cache_positions=cp, kv_layout="HND",
                                       k_scale=0.02, v_scale=torch.tensor([0.01, 0.05]), q_fp8=q8,
                                       q_scale=torch.tensor([0.1, 0.2, 0.3, 0.4]), offsets=2)  # fmt: skip
        results[backend] = (qq, kk, kc, vc, q8)
    for a, b in zip(results["torch"], results["native"]):
        assert _same(a, b)


# ---- the FP8 conversion (rope_cpu.cpp fp8_bits: c10's rounding, branch-free and vectorised), near-exhaustive

FP8_FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]


def _fp32_from_bits(bits):
    return bits.to(torch.int64).to(torch.int32).view(torch.float32)  # bit patterns [0, 2^32) as fp32


def _fp8_probe_values(fmt):
    """fp32 inputs around every fp8 rounding decision: every fp8 value (NaN included), the midpoint between
    each pair of consecutive fp8 values (and between 0 and the smallest subnormal, and past the largest) and
    each +-1 and +-2 ulp, both signs and both zeros; fp32 subnormals; the clamp edges; inf and NaNs (both
    signs, quiet and signalling payloads)."""
    grid = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(fmt).to(torch.float64)
    pos = torch.unique(grid[torch.isfinite(grid) & (grid >= 0)])  # sorted, 0 first
    fmax = torch.finfo(fmt).max
    nxt = torch.cat([pos[1:], torch.tensor([2 * fmax])])  # one step past the largest too
    mids = ((pos + nxt) / 2).to(torch.float32)  # exact in fp32 (fp8 has 2 or 3 mantissa bits)
    mb = mids.view(torch.int32)
    near = torch.cat([mids] + [(mb + d).view(torch.float32) for d in (-2, -1, 1, 2)])
    near = near[near > 0]
    pos32 = pos.to(torch.float32)
    pb = pos32[pos32 > 0].view(torch.int32)
    around = torch.cat([pos32] + [(pb + d).view(torch.float32) for d in (-1, 1)])
    sub = _fp32_from_bits(torch.tensor([1, 2, 3, 0x7FFFFF, 0x400000, 0x400001, 0x3FFFFF]))
    special = torch.tensor([fmax, float("inf"), 1e30, 3.4e38, 464.0, 480.0, 496.0, 57344.0, 61440.0, 65536.0])
    edges = torch.cat([special, (special.view(torch.int32) + 1).view(torch.float32),
                       (special.view(torch.int32) - 1).view(torch.float32)])  # fmt: skip
    nans = _fp32_from_bits(torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7FA00000]))
    v = torch.cat([near, around, sub, edges, nans])
    return torch.cat([v, -v, torch.tensor([0.0, -0.0])])


def _fp32_sweep(n_bits=20, seed=0):
    """2^n_bits fp32 patterns: every value of the top n_bits bits (sign, exponent, leading mantissa bits),
    random low bits (the sticky part of each rounding decision)."""
    g = torch.Generator().manual_seed(seed)
    hi = torch.arange(1 << n_bits, dtype=torch.int64) << (32 - n_bits)
    lo = torch.randint(0, 1 << (32 - n_bits), (1 << n_bits,), generator=g, dtype=torch.int64)
    return _fp32_from_bits(hi | lo)


def _quantise_native(v, fmt, v_scale, strided=False):
    """v [N] (any float dtype) through the op's v -> v_cache quantisation (paged, one token per slot);
    returns (the cache bytes, torch_impl.quantise's bytes) as [T, Hk, D]."""
    from posenc_kernels.ops.cache.torch_impl import quantise

    Hk, D = 2, 128
    T = -(-v.numel() // (Hk * D))
    pad = T * Hk * D - v.numel()
    vv = torch.cat([v, torch.zeros(pad, dtype=v.dtype)]).view(T, Hk, D)
    if strided:  # a non-unit channel stride: the strided gather before the conversion
        vv = vv.transpose(1, 2).contiguous().transpose(1, 2)
    q, k = torch.zeros(T, 1, D, dtype=v.dtype), torch.zeros(T, Hk, D, dtype=v.dtype)
    kc, vc = torch.zeros(T, 1, Hk, D, dtype=fmt), torch.zeros(T, 1, Hk, D, dtype=fmt)
    scale_t = torch.tensor(v_scale) if isinstance(v_scale, list) else None
    pk.rope_and_cache_(q, k, vv, kc, vc, *_tables(D, rows=1), slot_mapping=torch.arange(T),
                       positions=torch.zeros(T, dtype=torch.long), k_scale=1.0,
                       v_scale=scale_t if scale_t is not None else v_scale)  # fmt: skip
    ref = quantise(vv, scale_t, None if scale_t is not None else v_scale, fmt)
    return _bits(vc.view(T, Hk, D)), _bits(ref)


def _assert_bytes_equal(got, want, v):
    bad = (got != want).flatten().nonzero()[:, 0]
    if bad.numel():
        vals = torch.cat([v, torch.zeros(got.numel() - v.numel(), dtype=v.dtype)])
        i = bad[:8]
        raise AssertionError(f"{bad.numel()} bytes differ; inputs {vals[i].tolist()} got "
                             f"{got.flatten()[i].tolist()} want {want.flatten()[i].tolist()}")  # fmt: skip


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=str)
def test_fp8_conversion_fp32_near_exhaustive(fmt):
    """fp32 inputs, scale 1 (x / 1 is x: the conversion alone): 2^20 patterns over every exponent and the
    probe set around every fp8 rounding decision; bitwise torch_impl.quantise (torch's clamp and cast)."""
    v = torch.cat([_fp8_probe_values(fmt), _fp32_sweep()])
    _assert_bytes_equal(*_quantise_native(v, fmt, 1.0), v)


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=str)
def test_fp8_conversion_every_16bit_pattern(fmt, dtype):
    """Every bf16 / fp16 bit pattern, with a scale of 1, a per-head pair of scales (a true division:
    0.37 and 3e-3 move values across the subnormal and clamp edges) and a strided v."""
    v = torch.arange(1 << 16, dtype=torch.int64).to(torch.int16).view(dtype)
    for scale, strided in ((1.0, False), ([0.37, 3e-3], False), (0.37, True)):
        _assert_bytes_equal(*_quantise_native(v, fmt, scale, strided), v)


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=str)
def test_fp8_conversion_scaled_fp32(fmt):
    """fp32 probes divided by scales whose quotients are inexact (the division, not a reciprocal product)."""
    v = torch.cat([_fp8_probe_values(fmt), _fp32_sweep(16, seed=1)])
    for scale in ([0.1, 7.0], 1.0 / 3.0):
        _assert_bytes_equal(*_quantise_native(v, fmt, scale), v)
