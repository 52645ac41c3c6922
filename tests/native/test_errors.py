"""The native kernels raise what the Python implementations raise: for each bad input, calling
``torch.ops.posenc.<op>.default`` under ``use_backend("native")`` (the C++ chooser runs the C++ kernel, whose
glue checks everything itself: csrc/py_checks.h, rope_args.h, sinusoidal_args.h) and under
``use_backend("torch")`` (the Python kernel: the op's Python check) gives the same exception type and the
same message. Also: the native calls never reach a Python kernel.
"""

from __future__ import annotations

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels.ops import registry

pytestmark = pytest.mark.skipif(
    "rope_" not in _native.ops_for("CPU"), reason=f"native extension unavailable: {_native.load_error()}"
)

F32 = torch.float32


def _g(*shape, dtype=F32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g).to(dtype)


def _rope_args(**kw):
    """rope_'s schema arguments: q [2, 5, 4, 8], k [2, 5, 2, 8], cos/sin [16, 4], overridden by kw."""
    a = dict(q=_g(2, 5, 4, 8), k=_g(2, 5, 2, 8), cos=_g(16, 4), sin=_g(16, 4), inv_freq=None, positions=None,
             offsets=None, offset=0, cu_seqlens=None, axis_map=None, attention_factor=1.0, interleaved=False,
             conjugate=False, exact=False)  # fmt: skip
    a.update(kw)
    return tuple(a.values())


def _packed(**kw):
    return _rope_args(**{"q": _g(7, 4, 8), "k": _g(7, 2, 8), **kw})


def _ax(**kw):
    return _rope_args(**{"positions": torch.zeros(3, 2, 5, dtype=torch.long), "axis_map": torch.tensor([0, 1, 2, 0]),
                         **kw})


_qkv = _g(2, 5, 6, 8)
_exp = _g(2, 5, 1, 8).expand(2, 5, 4, 8)
with torch.inference_mode():
    _inf = _g(2, 5, 4, 8)
I64 = torch.long

ROPE_CASES = {
    "q int": _rope_args(q=torch.zeros(2, 5, 4, 8, dtype=torch.int32)),
    "q 2-D": _rope_args(q=_g(5, 8)),
    "k 3-D": _rope_args(k=_g(5, 2, 8)),
    "k dtype": _rope_args(k=_g(2, 5, 2, 8, dtype=torch.float64)),
    "k batch": _rope_args(k=_g(3, 5, 2, 8)),
    "k packed seq": _packed(k=_g(6, 2, 8)),
    "cos without sin": _rope_args(sin=None),
    "no angles": _rope_args(cos=None, sin=None),
    "cos int": _rope_args(cos=torch.zeros(16, 4, dtype=torch.int32)),
    "cos 3-D": _rope_args(cos=_g(1, 16, 4)),
    "cos sin shapes": _rope_args(sin=_g(15, 4)),
    "cos sin dtypes": _rope_args(sin=_g(16, 4, dtype=torch.float64)),
    "attention_factor with tables": _rope_args(attention_factor=2.0),
    "exact with tables": _rope_args(exact=True),
    "tables and inv_freq": _rope_args(inv_freq=_g(4)),
    "inv_freq 2-D": _rope_args(cos=None, sin=None, inv_freq=_g(1, 4)),
    "inv_freq int": _rope_args(cos=None, sin=None, inv_freq=torch.ones(4, dtype=torch.int64)),
    "exact fp32": _rope_args(cos=None, sin=None, inv_freq=_g(4), exact=True),
    "attention_factor nan": _rope_args(cos=None, sin=None, inv_freq=_g(4), attention_factor=float("nan")),
    "attention_factor inf": _rope_args(cos=None, sin=None, inv_freq=_g(4), attention_factor=float("inf")),
    "cos no columns": _rope_args(cos=_g(16, 0), sin=_g(16, 0)),
    "inv_freq empty": _rope_args(cos=None, sin=None, inv_freq=_g(0)),
    "R > D": _rope_args(cos=_g(16, 5), sin=_g(16, 5)),
    "R > D inv_freq": _rope_args(cos=None, sin=None, inv_freq=_g(5)),
    "cu_seqlens unpacked": _rope_args(cu_seqlens=torch.tensor([0, 5])),
    "positions float": _rope_args(positions=_g(5)),
    "positions bool": _rope_args(positions=torch.zeros(5, dtype=torch.bool)),
    "positions shape": _rope_args(positions=torch.zeros(4, dtype=I64)),
    "positions 3-D": _rope_args(positions=torch.zeros(1, 2, 5, dtype=I64)),
    "positions and offsets": _rope_args(positions=torch.zeros(5, dtype=I64), offsets=torch.zeros(2, dtype=I64)),
    "positions and offset": _rope_args(positions=torch.zeros(5, dtype=I64), offset=3),
    "offsets float": _rope_args(offsets=_g(2)),
    "offsets shape": _rope_args(offsets=torch.zeros(3, dtype=I64)),
    "offsets 2-D": _rope_args(offsets=torch.zeros(2, 1, dtype=I64)),
    "offsets and offset": _rope_args(offsets=torch.zeros(2, dtype=I64), offset=1),
    "cu_seqlens float": _packed(cu_seqlens=torch.tensor([0.0, 7.0])),
    "cu_seqlens 2-D": _packed(cu_seqlens=torch.tensor([[0, 7]])),
    "cu_seqlens short": _packed(cu_seqlens=torch.tensor([0])),
    "cu_seqlens and positions": _packed(cu_seqlens=torch.tensor([0, 7]), positions=torch.zeros(7, dtype=I64)),
    "cu_seqlens offsets shape": _packed(cu_seqlens=torch.tensor([0, 3, 7]), offsets=torch.zeros(3, dtype=I64)),
    "cu_seqlens start": _packed(cu_seqlens=torch.tensor([1, 3, 7])),
    "cu_seqlens decreasing": _packed(cu_seqlens=torch.tensor([0, 5, 3, 7])),
    "cu_seqlens past T": _packed(cu_seqlens=torch.tensor([0, 3, 9])),
    "cu_seqlens rows": _packed(cu_seqlens=torch.tensor([0, 3, 7]), offsets=torch.tensor([0, 14])),
    "cu_seqlens int32 rows": _packed(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), offset=13),
    "axis_map float": _ax(axis_map=_g(4)),
    "axis_map 2-D": _ax(axis_map=torch.zeros(1, 4, dtype=I64)),
    "axis_map with cu_seqlens": _packed(axis_map=torch.zeros(4, dtype=I64), cu_seqlens=torch.tensor([0, 7])),
    "axis_map length": _ax(axis_map=torch.zeros(3, dtype=I64)),
    "axis_map no positions": _rope_args(axis_map=torch.zeros(4, dtype=I64)),
    "axis_map positions 1-D": _ax(positions=torch.zeros(5, dtype=I64)),
    "axis_map positions shape": _ax(positions=torch.zeros(3, 2, 4, dtype=I64)),
    "axis_map positions no axis": _ax(positions=torch.zeros(0, 5, dtype=I64)),
    "axis_map positions float": _ax(positions=torch.zeros(3, 5)),
    "axis_map and offsets": _ax(offsets=torch.zeros(2, dtype=I64)),
    "axis_map values": _ax(axis_map=torch.tensor([0, 1, 3, 0])),
    "axis_map negative": _ax(axis_map=torch.tensor([0, -1, 2, 0])),
    "axis_map positions rows": _ax(positions=torch.full((3, 2, 5), 16, dtype=I64)),
    "positions rows": _rope_args(positions=torch.tensor([0, 1, 2, 3, 16])),
    "positions negative": _rope_args(positions=torch.tensor([[0, 1, 2, 3, 4], [0, -1, 2, 3, 4]])),
    "positions int8 rows": _rope_args(positions=torch.tensor([0, 1, 2, 3, 100], dtype=torch.int8)),
    "offsets rows": _rope_args(offsets=torch.tensor([0, 12])),
    "offset rows": _rope_args(offset=12),
    "offset negative": _rope_args(offset=-1),
    "k on meta": _rope_args(k=torch.empty(2, 5, 2, 8, device="meta")),
    "cos on meta": _rope_args(cos=torch.empty(16, 4, device="meta")),
}
# In place only: writability and aliasing.
ROPE_INPLACE_CASES = {
    "k overlaps q": _rope_args(q=_qkv[:, :, :4], k=_qkv[:, :, 2:]),
    "q expanded": _rope_args(q=_exp),
    "q inference": _rope_args(q=_inf, k=None),
}
_q = _g(2, 5, 4, 8)
ROPE_INPLACE_CASES["k is q"] = _rope_args(q=_q, k=_q)  # the same tensor twice


def _schema_args(**defaults):
    """A builder of one op's positional arguments: schema order, a fresh x per case, keywords overriding."""

    def build(**kw):
        a = dict(x=_g(2, 5, 8), **defaults)
        a.update(kw)
        return tuple(a.values())

    return build


_CONVENTION = dict(base=10000.0, interleaved=True, cos_first=False, freq_shift=0.0, scale=1.0)
_sin_args = _schema_args(positions=None, offsets=None, offset=0, x_scale=1.0, **_CONVENTION)


SIN_CASES = {
    "x int": _sin_args(x=torch.zeros(2, 5, 8, dtype=torch.int32)),
    "x 4-D": _sin_args(x=_g(1, 2, 5, 8)),
    "x no channels": _sin_args(x=_g(2, 5, 0)),
    "positions bool": _sin_args(positions=torch.zeros(5, dtype=torch.bool)),
    "positions shape": _sin_args(positions=torch.zeros(2, 4)),
    "positions and offsets": _sin_args(positions=torch.zeros(5), offsets=torch.zeros(2, dtype=I64)),
    "offsets float": _sin_args(offsets=torch.zeros(2)),
    "offsets and offset": _sin_args(offsets=torch.zeros(2, dtype=I64), offset=2),
    "positions on meta": _sin_args(positions=torch.zeros(5, device="meta")),
    "base zero": _sin_args(base=0.0),
    "base inf": _sin_args(base=float("inf")),
    "freq_shift nan": _sin_args(freq_shift=float("nan")),
    "freq_shift divides by zero": _sin_args(freq_shift=4.0),
    "freq_shift fractional": _sin_args(x=_g(2, 5, 2), freq_shift=1.0),
    "scale inf": _sin_args(scale=float("-inf")),
    "x_scale nan": _sin_args(x_scale=float("nan")),
}
SIN_INPLACE_CASES = {
    "x expanded": _sin_args(x=_g(2, 1, 8).expand(2, 5, 8)),
    "x inference": _sin_args(x=_inf[:, :, 0]),
}


_concat_args = _schema_args(positions=None, offsets=None, offset=0, dim_pe=6, **_CONVENTION)


CONCAT_CASES = {
    "x int": _concat_args(x=torch.zeros(2, 5, 8, dtype=torch.int64)),
    "dim_pe zero": _concat_args(dim_pe=0),
    "dim_pe freq_shift": _concat_args(dim_pe=2, freq_shift=1.0),
    "base negative": _concat_args(base=-1.0),
    "positions shape": _concat_args(positions=torch.zeros(3, dtype=I64)),
}


def _table_args(**kw):
    a = dict(positions=None, length=6, dim=8, base=10000.0, interleaved=True, cos_first=False, freq_shift=0.0,
             scale=1.0, dtype=F32, device=torch.device("cpu"))  # fmt: skip
    a.update(kw)
    return tuple(a.values())


TABLE_CASES = {
    "dim zero": _table_args(dim=0),
    "dim negative": _table_args(dim=-2),
    "length negative": _table_args(length=-1),
    "dtype int": _table_args(dtype=torch.int32),
    "positions bool": _table_args(positions=torch.zeros(3, dtype=torch.bool)),
    "positions complex": _table_args(positions=torch.zeros(3, dtype=torch.complex64)),
    "positions on meta": _table_args(positions=torch.zeros(3, device="meta")),
    "freq_shift": _table_args(dim=2, freq_shift=1.0),
    "scale nan": _table_args(scale=float("nan")),
    "base nan": _table_args(base=float("nan")),
}


def _pe_args(**kw):
    a = dict(x=_g(2, 5, 8), table=_g(16, 8), positions=torch.arange(5), padding_idx=None)
    a.update(kw)
    return tuple(a.values())


_buf = _g(26, 8)
PE_CASES = {
    "x int": _pe_args(x=torch.zeros(2, 5, 8, dtype=torch.int32)),
    "x 1-D": _pe_args(x=_g(8)),
    "table int": _pe_args(table=torch.zeros(16, 8, dtype=torch.int64)),
    "table 3-D": _pe_args(table=_g(1, 16, 8)),
    "table width": _pe_args(table=_g(16, 6)),
    "table on meta": _pe_args(table=torch.empty(16, 8, device="meta")),
    "positions float": _pe_args(positions=torch.zeros(5)),
    "positions shape": _pe_args(positions=torch.zeros(2, 4, dtype=I64)),
    "positions 3-D": _pe_args(positions=torch.zeros(1, 2, 5, dtype=I64)),
    "padding_idx high": _pe_args(padding_idx=16),
    "padding_idx low": _pe_args(padding_idx=-17),
    "positions rows": _pe_args(positions=torch.tensor([0, 1, 2, 3, 16])),
    "positions negative": _pe_args(positions=torch.tensor([[0, 1, 2, 3, 4], [0, 1, -2, 3, 4]])),
}
PE_INPLACE_CASES = {
    "x overlaps table": _pe_args(x=_buf[:10].view(2, 5, 8), table=_buf[5:21]),
    "x expanded": _pe_args(x=_g(2, 1, 8).expand(2, 5, 8)),
    "x inference": _pe_args(x=_inf[:, :, 0]),
}


def _qk_args(**kw):
    """qk_norm_rope_'s schema arguments: rope_'s (q [2, 5, 4, 8], k [2, 5, 2, 8]) with weights [8] inserted."""
    norm = dict(q_weight=_g(8), k_weight=_g(8), eps=1e-6, norm=0, weight_offset=0.0)
    rope_kw = {n: kw.pop(n) for n in list(kw) if n not in norm}
    norm.update(kw)
    r = _rope_args(**rope_kw)
    return r[:2] + tuple(norm.values()) + r[2:]


QK_CASES = {
    "norm code": _qk_args(norm=2),
    "eps negative": _qk_args(eps=-1.0),
    "eps nan": _qk_args(eps=float("nan")),
    "weight_offset inf": _qk_args(weight_offset=float("inf")),
    "conjugate": _qk_args(conjugate=True),
    "q_weight length": _qk_args(q_weight=_g(7)),
    "q_weight 2-D": _qk_args(q_weight=_g(1, 8)),
    "q_weight dtype": _qk_args(q_weight=_g(8, dtype=torch.float64)),
    "q_weight int": _qk_args(q_weight=torch.ones(8, dtype=torch.int32)),
    "k_weight per-head with heads": _qk_args(norm=1, q_weight=_g(32)),
    "q_weight per-head with heads": _qk_args(norm=1, k_weight=_g(16)),
    "k_weight without k": _qk_args(k=None),
    "k shape": _qk_args(k=_g(2, 4, 2, 8)),
    "positions shape": _qk_args(positions=torch.zeros(4, dtype=torch.long)),
    "row outside table": _qk_args(offset=14),
}
_qbuf = _g(2, 5, 6, 8)
QK_INPLACE_CASES = {
    "k overlaps q": _qk_args(q=_qbuf[:, :, :4], k=_qbuf[:, :, 3:5]),
    "q expanded": _qk_args(q=_g(2, 1, 4, 8).expand(2, 5, 4, 8)),
}


def _cache_args(**kw):
    """rope_and_cache_'s schema arguments: paged q [7, 4, 8], k/v [7, 2, 8], caches [4 blocks, 4 slots, 2, 8]
    (NHD), slot_mapping arange(7), no norm, cos/sin [16, 4]; contiguous=True: q [2, 5, 4, 8], caches
    [2, 6, 2, 8], cache_positions arange(5)."""
    contiguous = kw.pop("contiguous", False)
    lead, cache = ((2, 5), (2, 6)) if contiguous else ((7,), (4, 4))
    a = dict(q=_g(*lead, 4, 8), k=_g(*lead, 2, 8), v=_g(*lead, 2, 8), k_cache=_g(*cache, 2, 8),
             v_cache=_g(*cache, 2, 8), q_fp8=None, slot_mapping=None if contiguous else torch.arange(7),
             cache_positions=torch.arange(5) if contiguous else None, kv_layout=0, k_scale=None, v_scale=None,
             q_scale=None, k_scale_value=None, v_scale_value=None, q_scale_value=None, q_weight=None, k_weight=None,
             eps=0.0, norm=-1, weight_offset=0.0)  # fmt: skip
    rope_kw = {n: kw.pop(n) for n in list(kw) if n not in a}
    a.update(kw)
    r = _rope_args(**rope_kw)
    return tuple(a.values()) + r[2:]


_F8 = torch.float8_e4m3fn
_kv = _g(4, 4, 2, 8)
CACHE_CASES = {
    "both slot_mapping and cache_positions": _cache_args(cache_positions=torch.arange(7)),
    "neither slot_mapping nor cache_positions": _cache_args(slot_mapping=None),
    "v without v_cache": _cache_args(v_cache=None),
    "v heads differ from k heads": _cache_args(v=_g(7, 3, 8)),
    "slot_mapping float": _cache_args(slot_mapping=torch.zeros(7)),
    "k_cache shape": _cache_args(k_cache=_g(4, 4, 3, 8)),
    "k_cache dtype": _cache_args(k_cache=_g(4, 4, 2, 8, dtype=torch.float64)),
    "v_cache dtype differs from k_cache": _cache_args(v_cache=torch.zeros(4, 4, 2, 8, dtype=_F8)),
    "FP8 cache without scales": _cache_args(k_cache=torch.zeros(4, 4, 2, 8, dtype=_F8),
                                            v_cache=torch.zeros(4, 4, 2, 8, dtype=_F8)),
    "FP8 scale values": _cache_args(k_cache=torch.zeros(4, 4, 2, 8, dtype=_F8),
                                    v_cache=torch.zeros(4, 4, 2, 8, dtype=_F8), k_scale=torch.tensor([1.0, 0.0]),
                                    v_scale_value=1.0),
    "q_fp8 without q_scale": _cache_args(q_fp8=torch.zeros(7, 4, 8, dtype=_F8)),
    "slot out of range": _cache_args(slot_mapping=torch.tensor([0, 1, 2, 3, 4, 5, 16])),
    "slot written twice": _cache_args(slot_mapping=torch.tensor([0, 1, 2, 3, 9, 5, 3], dtype=torch.int32)),
    "cache position out of range": _cache_args(contiguous=True, cache_positions=torch.tensor([[0, 1, 2, 3, 4],
                                                                                             [0, 1, 6, 3, 4]])),
    "cache position written twice": _cache_args(contiguous=True, cache_positions=torch.tensor([0, 1, -1, 1, -1])),
    "v_cache is k_cache": _cache_args(k_cache=_kv, v_cache=_kv),
    "k_cache shape HND": _cache_args(kv_layout=1, k_cache=_g(4, 3, 4, 8), v_cache=_g(4, 3, 4, 8)),
    "v_cache shape HND": _cache_args(kv_layout=1, k_cache=_g(4, 2, 4, 8), v_cache=_g(4, 2, 3, 8)),
    "FP8 scale NaN": _cache_args(k_cache=torch.zeros(4, 4, 2, 8, dtype=_F8), v_cache=torch.zeros(4, 4, 2, 8, dtype=_F8),
                                 k_scale=torch.tensor([1.0, float("nan")]), v_scale_value=1.0),
    "FP8 scale strided bf16": _cache_args(k_cache=torch.zeros(4, 4, 2, 8, dtype=_F8),
                                          v_cache=torch.zeros(4, 4, 2, 8, dtype=_F8), k_scale_value=1.0,
                                          v_scale=torch.tensor([2.0, 7.0, -0.5, 1.0], dtype=torch.bfloat16)[::2]),
    # 600 slots (the duplicate scan's heap table); two duplicates, the smaller one named
    "slot written twice, 600 slots": _cache_args(
        q=_g(600, 4, 8), k=_g(600, 2, 8), v=_g(600, 2, 8), k_cache=_g(200, 4, 2, 8), v_cache=_g(200, 4, 2, 8),
        slot_mapping=torch.arange(600).index_put_((torch.tensor([10, 580]),), torch.tensor([550, 30])),
        positions=torch.zeros(600, dtype=torch.long)),
}


def _raised(op, args, backend):
    with pk.use_backend(backend):
        try:
            op(*args)
        except Exception as e:  # noqa: BLE001 - compared below
            return type(e), str(e).split("\nException raised from")[0]
    return None


def _cases():
    ops = torch.ops.posenc
    for name, args in ROPE_CASES.items():
        yield f"rope_-{name}", ops.rope_.default, args
        yield f"rope-{name}", ops.rope.default, args
    for name, args in ROPE_INPLACE_CASES.items():
        yield f"rope_-{name}", ops.rope_.default, args
    for name, args in QK_CASES.items():
        yield f"qk_norm_rope_-{name}", ops.qk_norm_rope_.default, args
        yield f"qk_norm_rope-{name}", ops.qk_norm_rope.default, args
    for name, args in QK_INPLACE_CASES.items():
        yield f"qk_norm_rope_-{name}", ops.qk_norm_rope_.default, args
    for name, args in CACHE_CASES.items():
        yield f"rope_and_cache_-{name}", ops.rope_and_cache_.default, args
        yield f"rope_and_cache-{name}", ops.rope_and_cache.default, args
    for name, args in {**SIN_CASES, **SIN_INPLACE_CASES}.items():
        yield f"add_sinusoidal_-{name}", ops.add_sinusoidal_.default, args
    for name, args in SIN_CASES.items():
        yield f"add_sinusoidal-{name}", ops.add_sinusoidal.default, args
    for name, args in CONCAT_CASES.items():
        yield f"concat_sinusoidal-{name}", ops.concat_sinusoidal.default, args
    for name, args in TABLE_CASES.items():
        yield f"sinusoidal_table-{name}", ops.sinusoidal_table.default, args
    for name, args in {**PE_CASES, **PE_INPLACE_CASES}.items():
        yield f"add_position_embedding_-{name}", ops.add_position_embedding_.default, args
    for name, args in PE_CASES.items():
        yield f"add_position_embedding-{name}", ops.add_position_embedding.default, args + (False,)


CASES = list(_cases())


@pytest.mark.parametrize("name,op,args", CASES, ids=[c[0] for c in CASES])
def test_native_raises_like_python(name, op, args, monkeypatch):
    python_calls = []
    run_python = registry.run_python
    monkeypatch.setattr(registry, "run_python", lambda *a: python_calls.append(a) or run_python(*a))
    native = _raised(op, args, "native")
    on_cpu_native = not python_calls
    python_calls.clear()
    reference = _raised(op, args, "torch")
    assert reference is not None, f"{name}: the Python check accepts this input; not a bad-input case"
    assert native is not None, f"{name}: the native kernel accepted what Python refuses: {reference}"
    assert native == reference, name
    # the native call never went through a Python kernel (the meta cases may go to the fake: same check)
    assert on_cpu_native or "meta" in name, f"{name}: the native call reached a Python kernel"


def test_messages_are_python_formatted():
    """A few messages spelled out, so a formatting helper cannot drift with both sides (py_checks.h)."""
    ops = torch.ops.posenc
    with pk.use_backend("native"):
        with pytest.raises(TypeError, match=r"^q must have dtype in \(float16, bfloat16, float32, float64\), got torch\.int32"):
            ops.rope_.default(*ROPE_CASES["q int"])
        with pytest.raises(ValueError, match=r"^positions must have shape \[S\] = \[5\] or \[B, S\] = \[2, 5\], got \(4,\)"):
            ops.rope.default(*ROPE_CASES["positions shape"])
        with pytest.raises(ValueError, match=r"^freq_shift=4\.0 with dim=8 divides by zero"):
            ops.add_sinusoidal.default(*SIN_CASES["freq_shift divides by zero"])
        with pytest.raises(ValueError, match=r"^attention_factor must be finite, got nan"):
            ops.rope.default(*ROPE_CASES["attention_factor nan"])


def test_value_checks_off_skips_only_value_checks():
    """With value checks off, the native kernel accepts rows outside the table (NaN, never a read out of
    bounds) but still refuses bad shapes."""
    ops = torch.ops.posenc
    pk.set_value_checks(False)
    try:
        with pk.use_backend("native"):
            q = _g(2, 5, 4, 8)
            ops.rope_.default(*_rope_args(q=q, k=None, positions=torch.tensor([0, 1, 2, 3, 16])))
            assert torch.isnan(q[:, 4]).all() and not torch.isnan(q[:, :4]).any()
            with pytest.raises(ValueError, match="positions must have shape"):
                ops.rope_.default(*ROPE_CASES["positions shape"])
    finally:
        pk.set_value_checks(True)


@pytest.mark.parametrize("name", list(CACHE_CASES))
def test_cache_errors_write_nothing(name):
    """A refused rope_and_cache_ call leaves q, k and the caches as they were (every check runs first)."""
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in CACHE_CASES[name])
    if name == "v_cache is k_cache":
        args = args[:4] + (args[3],) + args[5:]
    before = [a.clone() for a in args[:5] if a is not None]
    with pk.use_backend("native"), pytest.raises((ValueError, TypeError)):
        torch.ops.posenc.rope_and_cache_.default(*args)
    after = [a for a in args[:5] if a is not None]
    for b, a in zip(before, after):
        assert torch.equal(b.view(torch.uint8), a.view(torch.uint8)), name
