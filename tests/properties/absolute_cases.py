"""Property cases of the other public ops: a drawn :class:`AbsCase` (plain values; its repr reruns it) and
:func:`check`, one op per case:

* ``sinusoidal_table`` (a length, or int / float positions of any shape), ``add_sinusoidal`` (and its
  in-place twin), ``concat_sinusoidal``: positions from an int offset, ``[B]`` offsets, ``[B, S]`` / ``[S]``
  int or float positions; every convention knob;
* ``add_position_embedding`` (and its twin): a table of any float dtype, ``[B, S]`` / ``[S]`` positions,
  ``padding_idx``;
* ``rope_cos_sin``: int or float positions of any shape, an attention factor, the output dtype;
* ``apply_rope_qkv_``: a fused ``[.., Hq + 2 Hkv, D]`` projection against apply_rope on its q/k heads;
* ``alibi_bias``, ``t5_relative_bias``: shapes, offsets, causal / bidirectional, bucket settings.

Each against its float64 reference with the dtype-tied tolerance (lookups: exactly), positions from the
oracle (tests/positions_oracle.py), x in the drawn memory layout.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

import posenc_kernels as pk
from posenc_kernels import reference as ref

import positions_oracle as po

from .common import DTYPES, LAYOUTS, assert_rule, backends, compiled_equals_eager, make, use

#: op -> the posenc op whose backends it runs on
OPS = {
    "sinusoidal_table": "sinusoidal_table",
    "add_sinusoidal": "add_sinusoidal",
    "concat_sinusoidal": "concat_sinusoidal",
    "add_position_embedding": "add_position_embedding",
    "rope_cos_sin": "rope_cos_sin",
    "apply_rope_qkv_": "rope_",
    "alibi_bias": "alibi_bias",
    "t5_relative_bias": "t5_relative_bias",
}
POSITION_MODES = ("offset", "offsets", "positions", "positions_s", "float_positions")


@dataclasses.dataclass(frozen=True)
class AbsCase:
    op: str
    backend: str
    dtype: str
    B: int
    S: int
    D: int  # channels of x (sinusoidal / learned), head_dim (qkv), heads (relative)
    layout: str
    two_d: bool = False  # x [T, D] instead of [B, S, D]
    mode: str = "offset"
    offset: int = 0
    dim_pe: int = 0  # concat
    interleaved: bool = True
    cos_first: bool = False
    freq_shift: float = 0.0
    base: float = 10000.0
    scale: float = 1.0
    x_scale: float = 1.0
    table_dtype: str = "float32"  # learned table; rope_cos_sin / relative: a second dtype
    flag: bool = False  # padding_idx used / causal / bidirectional / float positions
    extra: int = 0  # qkv: Hkv; t5: num_buckets; rope_cos_sin: half
    seed: int = 0


@st.composite
def abs_cases(draw, op=None) -> AbsCase:
    op = draw(st.sampled_from(list(OPS))) if op is None else op
    be = draw(st.sampled_from(backends(OPS[op])))
    small = be == "triton"  # the interpreter runs one Python program per block: fewer tokens
    two_d = draw(st.booleans())
    B = 1 if two_d else 0 if draw(st.integers(0, 7)) == 0 else draw(st.integers(1, 3))  # 1 in 8 empty (and S)
    S = 0 if draw(st.integers(0, 7)) == 0 else draw(st.integers(1, (6 if small else 12) // max(B, 1)))
    c = dict(op=op, backend=be, dtype=draw(st.sampled_from(list(DTYPES))), B=B, S=S, two_d=two_d,
             D=draw(st.integers(1, 12)), layout=draw(st.sampled_from(LAYOUTS)),
             seed=draw(st.integers(0, 2**16)))  # fmt: skip
    if op in ("sinusoidal_table", "add_sinusoidal", "concat_sinusoidal"):
        c.update(interleaved=draw(st.booleans()), cos_first=draw(st.booleans()),
                 base=draw(st.sampled_from([10000.0, 100.0])), scale=draw(st.sampled_from([1.0, 0.5])),
                 freq_shift=draw(st.sampled_from([0.0, 1.0])))  # fmt: skip
        dim = c["D"] if op != "concat_sinusoidal" else draw(st.integers(1, 9))
        c["dim_pe"] = dim
        if dim // 2 == 1 and c["freq_shift"] == 1.0:  # dim // 2 - freq_shift = 0 divides by zero: refused
            c["freq_shift"] = 0.0
    if op in ("add_sinusoidal", "concat_sinusoidal"):
        c["mode"] = draw(st.sampled_from(POSITION_MODES))
        c["x_scale"] = draw(st.sampled_from([1.0, 2.5])) if op == "add_sinusoidal" else 1.0
    if op == "sinusoidal_table":
        c["mode"] = draw(st.sampled_from(["length", "positions", "float_positions"]))
    if op == "add_position_embedding":
        c["mode"] = draw(st.sampled_from(["positions", "positions_s"]))
        c["table_dtype"] = draw(st.sampled_from(list(DTYPES)))
        c["flag"] = draw(st.booleans())
    if op == "rope_cos_sin":
        c["extra"] = draw(st.integers(1, 6))
        c["flag"] = draw(st.booleans())
        c["x_scale"] = draw(st.sampled_from([1.0, 0.75]))  # the attention factor
    if op == "apply_rope_qkv_":
        c["D"] = 2 * draw(st.integers(1, 5)) + draw(st.sampled_from([0, 1]))
        c["extra"] = draw(st.integers(1, 2))
        c["interleaved"] = draw(st.booleans())
        c["mode"] = draw(st.sampled_from(["offset", "offsets", "positions"]))
        c["layout"] = draw(st.sampled_from(["contiguous", "sliced"]))
    if op in ("alibi_bias", "t5_relative_bias"):
        c["D"] = draw(st.integers(1, 4))
        c["B"], c["S"] = draw(st.integers(0, 9)), draw(st.integers(0, 17))  # Lq, Lk
        c["flag"] = draw(st.booleans())
        if op == "t5_relative_bias":
            c["extra"] = draw(st.sampled_from([4, 6, 8, 32]))
            max_exact = (c["extra"] // 2 if c["flag"] else c["extra"]) // 2
            c["dim_pe"] = max_exact + draw(st.sampled_from([1, 2, 12, 120]))  # max_distance > max_exact
    if c.get("mode") == "offset" or op in ("alibi_bias", "t5_relative_bias"):
        c["offset"] = draw(st.integers(0, 40))
    return AbsCase(**c)


# ---- positions


def _positions(c: AbsCase, gen, B: int, S: int):
    """``(kwargs, [B, S] positions from the oracle)``."""
    if c.mode == "offset":
        return dict(offsets=c.offset), po.token_positions(B, S, offsets=c.offset)
    if c.mode == "offsets":
        offs = torch.randint(0, 40, (B,), generator=gen)
        return dict(offsets=offs), po.token_positions(B, S, offsets=offs)
    if c.mode == "positions_s":
        pos = torch.randint(0, 50, (S,), generator=gen)
    elif c.mode == "float_positions":
        pos = torch.rand((B, S), generator=gen, dtype=torch.float64) * 60
    else:
        pos = torch.randint(0, 50, (B, S), generator=gen)
    return dict(positions=pos), po.token_positions(B, S, positions=pos)


def _convention(c: AbsCase) -> dict:
    return dict(interleaved=c.interleaved, cos_first=c.cos_first, freq_shift=c.freq_shift, base=c.base, scale=c.scale)


def _pe(pos_bs, dim, c: AbsCase, dtype):
    """The table at fp32-rounded positions (the kernels take positions to fp32 first, as every source does)."""
    pos = po.as_tensor(pos_bs, dtype=torch.float64).to(torch.float32)
    return ref.sinusoidal_table_reference(pos, dim, dtype=dtype, **_convention(c))


def _x(c: AbsCase, gen):
    dtype = DTYPES[c.dtype]
    x = make((c.S, c.D) if c.two_d else (c.B, c.S, c.D), dtype, c.layout, gen)
    return x, x.unsqueeze(0) if c.two_d else x


# ---- the checks, one per op


def _calibration_case(c: AbsCase) -> AbsCase:
    """The same computation (op, dtype, convention, position mode) on 256 tokens (common.assert_rule)."""
    return dataclasses.replace(c, B=8, S=32, two_d=False, layout="contiguous", seed=c.seed + 1)


def _add_expected(c: AbsCase, gen):
    """``(x, x3, kwargs, truth, same_in_torch)`` of add_sinusoidal for case ``c``."""
    x, x3 = _x(c, gen)
    kw, pos = _positions(c, gen, x3.shape[0], x3.shape[1])
    kw.update(_convention(c), x_scale=c.x_scale)
    if x3.shape[0] * x3.shape[1]:
        truth = (x3.double() * c.x_scale + _pe(pos, c.D, c, torch.float64)).reshape(x.shape)
        pe_low = _pe(pos, c.D, c, torch.float32).to(x.dtype)  # torch in x's dtype: PE rounded to it, then x*s + PE
        same_in_torch = (x3 * c.x_scale + pe_low).reshape(x.shape)
    else:
        truth, same_in_torch = x.double() * c.x_scale, x * c.x_scale
    return x, kw, truth, same_in_torch


def _check_add_sinusoidal(c: AbsCase, gen):
    x, kw, truth, same_in_torch = _add_expected(c, gen)
    cal = _add_expected(_calibration_case(c), torch.Generator().manual_seed(c.seed + 1))[2:]
    x0 = x.clone()
    with use(c.backend):
        out = pk.add_sinusoidal(x, **kw)
    assert torch.equal(x, x0), "add_sinusoidal modified x"
    assert_rule(out, truth, same_in_torch, calibration=cal, backend=c.backend, what="add_sinusoidal")
    with use(c.backend):
        assert pk.add_sinusoidal_(x, **kw) is x
    assert torch.equal(x, out), "add_sinusoidal_ differs from add_sinusoidal"


def _concat_expected(c: AbsCase, gen):
    x, x3 = _x(c, gen)
    kw, pos = _positions(c, gen, x3.shape[0], x3.shape[1])
    kw.update(_convention(c))
    if x3.shape[0] * x3.shape[1] == 0:
        return x, x3, kw, None, None
    return x, x3, kw, _pe(pos, c.dim_pe, c, torch.float64), _pe(pos, c.dim_pe, c, torch.float32).to(x.dtype)


def _check_concat(c: AbsCase, gen):
    x, x3, kw, truth, same_in_torch = _concat_expected(c, gen)
    with use(c.backend):
        out = pk.concat_sinusoidal(x, c.dim_pe, **kw)
    assert out.shape == x.shape[:-1] + (c.D + c.dim_pe,)
    assert torch.equal(out[..., : c.D], x), "concat_sinusoidal changed x's channels"
    if truth is not None:
        pe = out.reshape(x3.shape[0], x3.shape[1], -1)[..., c.D :]
        cal = _concat_expected(_calibration_case(c), torch.Generator().manual_seed(c.seed + 1))[3:]
        assert_rule(pe, truth, same_in_torch, calibration=cal, backend=c.backend, what="concat_sinusoidal")


def _table_expected(c: AbsCase, gen):
    dtype = DTYPES[c.dtype]
    conv = _convention(c)
    if c.mode == "length":
        arg, pos = c.S, torch.arange(c.S)
    else:
        shape = (c.B, c.S) if not c.two_d else (c.S,)
        pos = (torch.rand(shape, generator=gen, dtype=torch.float64) * 100 if c.mode == "float_positions"
               else torch.randint(0, 1000, shape, generator=gen))  # fmt: skip
        arg = pos
    p32 = pos.to(torch.float32)
    truth = ref.sinusoidal_table_reference(p32, c.D, dtype=torch.float64, **conv)
    return arg, truth, ref.sinusoidal_table_reference(p32, c.D, dtype=torch.float32, **conv).to(dtype)


def _check_table(c: AbsCase, gen):
    arg, truth, same = _table_expected(c, gen)
    cal = _table_expected(_calibration_case(c), torch.Generator().manual_seed(c.seed + 1))[1:]
    with use(c.backend):
        out = pk.sinusoidal_table(arg, c.D, dtype=DTYPES[c.dtype], **_convention(c))
    assert_rule(out, truth, same, calibration=cal, backend=c.backend, what="sinusoidal_table")


def _check_learned(c: AbsCase, gen):
    x, x3 = _x(c, gen)
    P = 1 + c.seed % 7 + 3
    table = torch.randn(P, c.D, generator=gen).to(DTYPES[c.table_dtype])
    shape = (x3.shape[0], x3.shape[1]) if c.mode == "positions" and not c.two_d else (x3.shape[1],)
    positions = torch.randint(0, P, shape, generator=gen)
    padding_idx = (c.seed % P) if c.flag else None
    truth = ref.add_position_embedding_reference(x, table, positions, padding_idx=padding_idx)
    same_in_torch = x + table.to(x.dtype)[positions.long()]
    x0 = x.clone()
    with use(c.backend):
        out = pk.add_position_embedding(x, table, positions, padding_idx=padding_idx)
    assert torch.equal(x, x0), "add_position_embedding modified x"
    assert_rule(out, truth, same_in_torch, backend=c.backend, what="add_position_embedding")
    with use(c.backend):
        assert pk.add_position_embedding_(x, table, positions, padding_idx=padding_idx) is x
    assert torch.equal(x, out), "add_position_embedding_ differs from add_position_embedding"


def _cos_sin_expected(c: AbsCase, gen):
    half, dtype = c.extra, DTYPES[c.dtype]
    inv, _ = pk.rope_frequencies(2 * half, 10000.0)
    shape = (c.B, c.S) if not c.two_d else (c.S,)
    if c.flag:
        pos = torch.rand(shape, generator=gen, dtype=torch.float64).float() * 200
    else:
        pos = torch.randint(0, 4096, shape, generator=gen)
    tc, ts = ref.rope_cos_sin_reference(pos.to(torch.float32), inv, c.x_scale)
    a32 = pos.to(torch.float32)[..., None] * inv  # HF: one fp32 product, fp32 cos/sin
    return pos, inv, (tc, (a32.cos() * c.x_scale).to(dtype)), (ts, (a32.sin() * c.x_scale).to(dtype))


def _check_cos_sin(c: AbsCase, gen):
    pos, inv, cos_expected, sin_expected = _cos_sin_expected(c, gen)
    _, _, cos_cal, sin_cal = _cos_sin_expected(_calibration_case(c), torch.Generator().manual_seed(c.seed + 1))
    with use(c.backend):
        cos, sin = pk.rope_cos_sin(pos, inv, attention_factor=c.x_scale, dtype=DTYPES[c.dtype])
    assert_rule(cos, *cos_expected, calibration=cos_cal, backend=c.backend, what="rope_cos_sin cos")
    assert_rule(sin, *sin_expected, calibration=sin_cal, backend=c.backend, what="rope_cos_sin sin")


def _check_qkv(c: AbsCase, gen):
    Hq, Hkv, D = 2, c.extra, c.D
    half = D // 2
    dtype = DTYPES[c.dtype]
    lead = (c.S,) if c.two_d else (c.B, c.S)
    qkv = make(lead + (Hq + 2 * Hkv, D), dtype, c.layout, gen)
    B, S = (1, c.S) if c.two_d else (c.B, c.S)
    if c.mode == "positions":
        kw = dict(positions=torch.randint(0, 30, (S,), generator=gen))
    elif c.mode == "offsets" and not c.two_d:
        kw = dict(offsets=torch.randint(0, 30, (B,), generator=gen))
    else:
        kw = dict(offsets=c.offset)
    cos, sin = pk.rope_cos_sin(80, pk.rope_frequencies(2 * half)[0])
    kw.update(interleaved=c.interleaved)
    with use(c.backend):
        q_exp, k_exp = pk.apply_rope(qkv[..., :Hq, :], qkv[..., Hq : Hq + Hkv, :], cos, sin, **kw)
        v0 = qkv[..., Hq + Hkv :, :].clone()
        assert pk.apply_rope_qkv_(qkv, cos, sin, num_heads_q=Hq, num_heads_kv=Hkv, **kw) is qkv
    assert torch.equal(qkv[..., :Hq, :], q_exp) and torch.equal(qkv[..., Hq : Hq + Hkv, :], k_exp)
    assert torch.equal(qkv[..., Hq + Hkv :, :], v0), "apply_rope_qkv_ changed v"


def _check_alibi(c: AbsCase, gen):
    slopes = pk.alibi_slopes(c.D) * (1 + c.seed % 3)
    dtype = DTYPES[c.dtype]
    kw = dict(causal=c.flag, q_offset=c.offset)
    with use(c.backend):
        out = pk.alibi_bias(slopes, c.B, c.S, dtype=dtype, **kw)
    truth = ref.alibi_bias_reference(slopes, c.B, c.S, **kw)
    same_in_torch = ref.alibi_bias_eager(slopes, c.B, c.S, dtype=dtype, **kw)
    assert_rule(out, truth, same_in_torch, backend=c.backend, what="alibi_bias")


def _check_t5(c: AbsCase, gen):
    table = torch.randn(c.extra, c.D, generator=gen).to(DTYPES[c.dtype])
    kw = dict(bidirectional=c.flag, max_distance=c.dim_pe, q_offset=c.offset)
    with use(c.backend):
        out = pk.t5_relative_bias(table, c.B, c.S, **kw)
    truth = ref.t5_relative_bias_reference(table, c.B, c.S, **kw)
    assert out.dtype == table.dtype and torch.equal(out.double(), truth), "t5_relative_bias is a lookup: exact"


_CHECKS = {
    "sinusoidal_table": _check_table,
    "add_sinusoidal": _check_add_sinusoidal,
    "concat_sinusoidal": _check_concat,
    "add_position_embedding": _check_learned,
    "rope_cos_sin": _check_cos_sin,
    "apply_rope_qkv_": _check_qkv,
    "alibi_bias": _check_alibi,
    "t5_relative_bias": _check_t5,
}


def check(c: AbsCase) -> None:
    _CHECKS[c.op](c, torch.Generator().manual_seed(c.seed))


def check_compiled(c: AbsCase) -> None:
    """Compiled add_sinusoidal(_) / add_position_embedding(_) / concat_sinusoidal equal eager (bit for bit,
    same backend)."""
    gen = torch.Generator().manual_seed(c.seed)
    x, x3 = _x(c, gen)
    if c.op == "add_position_embedding":
        table = torch.randn(7, c.D, generator=gen).to(DTYPES[c.table_dtype])
        positions = torch.randint(0, 7, (x3.shape[1],), generator=gen)

        def out_of_place(x):
            return pk.add_position_embedding(x, table, positions)

        def in_place(x):
            return pk.add_position_embedding_(x, table, positions)

    else:
        kw, _ = _positions(c, gen, x3.shape[0], x3.shape[1])
        kw.update(_convention(c))
        if c.op == "concat_sinusoidal":
            out_of_place, in_place = (lambda x: pk.concat_sinusoidal(x, c.dim_pe, **kw)), None
        else:
            kw["x_scale"] = c.x_scale
            out_of_place, in_place = (lambda x: pk.add_sinusoidal(x, **kw)), (lambda x: pk.add_sinusoidal_(x, **kw))
    with use(c.backend):
        compiled_equals_eager(out_of_place, (x,), inplace_call=in_place)
