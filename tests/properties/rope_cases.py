"""RoPE property cases: a drawn :class:`RopeCase` (plain values; its repr reruns it), the tensors it
builds, and :func:`check`: the backend against the float64 truth at oracle positions, and the in-place op
against its out-of-place twin.

Modes: ``offset`` (an int), ``offsets`` (``[B]``), ``positions`` (``[B, S]``), ``positions_s`` (``[S]``),
``varlen`` (packed ``[T, H, D]`` with ``cu_seqlens``, per-sequence or int offsets, padding tokens after
``cu_seqlens[-1]``), ``mrope`` (``axis_map`` and positions ``[A, B, S]`` / ``[A, T]``). Angles: ``table``
(fp32 cos/sin tables), ``inv_freq`` (fp32 frequencies, angles in the kernel, an attention factor) or
``exact`` (float64 frequencies, ``exact=True``). Rotary dim ``2 * half <= D`` (partial when less),
``interleaved`` pairs, memory layouts of q and k from :data:`common.LAYOUTS` plus ``shared`` (q and k are
disjoint head slices of one buffer, as packed QKV).
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

import posenc_kernels as pk
from posenc_kernels import reference as ref

import positions_oracle as po
from conftest import ulp_err

from .common import DTYPES, LAYOUTS, assert_rule, backends, compiled_equals_eager, make, use

MODES = ("offset", "offsets", "positions", "positions_s", "varlen", "mrope")
ANGLES = ("table", "inv_freq", "exact")


@dataclasses.dataclass(frozen=True)
class RopeCase:
    backend: str
    dtype: str
    B: int  # 1 for packed inputs
    S: int  # tokens per sequence (T when packed)
    Hq: int
    Hk: int  # 0: no k
    D: int
    half: int  # rotary dim R = 2 * half <= D
    layout: str  # of q (and of k unless "shared": q and k slices of one [.., Hq + Hk, D] buffer)
    mode: str
    angles: str
    interleaved: bool
    packed: bool
    offset: int = 0  # mode "offset", and the int offset of "varlen" without per-sequence offsets
    lengths: tuple = ()  # varlen: the sequences' lengths (sum <= S; the rest is padding)
    sections: tuple = ()  # mrope: tokens' axis sections (sum == half)
    mrope_interleaved: bool = False
    attention_factor: float = 1.0
    seed: int = 0


@st.composite
def rope_cases(draw, backend=None) -> RopeCase:
    be = draw(st.sampled_from(backends("rope_"))) if backend is None else backend
    mode = draw(st.sampled_from(MODES))
    packed = mode == "varlen" or (mode in ("offset", "positions_s", "mrope") and draw(st.booleans()))
    # Triton runs through the interpreter (one Python program per token block): keep its token count small
    max_tokens = 6 if be == "triton" else 12
    B = 1 if packed else 0 if draw(st.integers(0, 7)) == 0 else draw(st.integers(1, 3))  # 1 in 8 empty (and S)
    S = 0 if draw(st.integers(0, 7)) == 0 else draw(st.integers(1, max_tokens // max(B, 1)))
    half = draw(st.integers(1, 6))
    D = 2 * half + draw(st.sampled_from([0, 0, 1, 2, 5]))  # partial rotary, odd head dims
    case = dict(
        backend=be, dtype=draw(st.sampled_from(list(DTYPES))), B=B, S=S, Hq=draw(st.integers(1, 3)),
        Hk=draw(st.integers(0, 2)), D=D, half=half, layout=draw(st.sampled_from(LAYOUTS + ("shared",))),
        mode=mode, angles=draw(st.sampled_from(ANGLES)), interleaved=draw(st.booleans()), packed=packed,
        seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip
    if case["layout"] == "shared" and case["Hk"] == 0:
        case["layout"] = "contiguous"
    if case["angles"] != "table":
        case["attention_factor"] = draw(st.sampled_from([1.0, 0.75]))
    if mode == "offset":
        case["offset"] = draw(st.integers(0, 40))
    if mode == "varlen":
        n = draw(st.integers(1, 3))
        lengths = draw(st.lists(st.integers(0, S), min_size=n, max_size=n))
        while sum(lengths) > S:  # fits in the T tokens; what is left over is padding
            lengths[lengths.index(max(lengths))] -= 1
        case["lengths"] = tuple(lengths)
        case["offset"] = draw(st.sampled_from([0, 7, -1]))  # -1: per-sequence offsets tensor
    if mode == "mrope":
        A = draw(st.integers(1, 3))
        cuts = sorted(draw(st.lists(st.integers(0, half), min_size=A - 1, max_size=A - 1)))
        case["sections"] = tuple(b - a for a, b in zip([0] + cuts, cuts + [half]))
        case["mrope_interleaved"] = draw(st.booleans())
    return RopeCase(**case)


# ---- building the inputs


def _qk(c: RopeCase, gen):
    dtype = DTYPES[c.dtype]
    lead = (c.S,) if c.packed else (c.B, c.S)
    if c.layout == "shared":
        both = make(lead + (c.Hq + c.Hk, c.D), dtype, "contiguous", gen)
        return both[..., : c.Hq, :], both[..., c.Hq :, :]
    q = make(lead + (c.Hq, c.D), dtype, c.layout, gen)
    k = make(lead + (c.Hk, c.D), dtype, c.layout, gen) if c.Hk else None
    return q, k


def build(c: RopeCase):
    """``(q, k, kwargs, rows)``: the inputs, the keywords of apply_rope, and the oracle's position of every
    token and frequency ``[B, S, half]`` (int64; B = 1 when packed)."""
    gen = torch.Generator().manual_seed(c.seed)
    q, k = _qk(c, gen)
    B, S = (1, c.S) if c.packed else (c.B, c.S)
    kw = dict(interleaved=c.interleaved)
    if c.mode == "offset":
        kw["offsets"] = c.offset
        tok = po.token_positions(B, S, offsets=c.offset)
    elif c.mode == "offsets":
        offs = torch.randint(0, 40, (B,), generator=gen)
        kw["offsets"] = offs
        tok = po.token_positions(B, S, offsets=offs)
    elif c.mode in ("positions", "positions_s"):
        shape = (B, S) if c.mode == "positions" else (S,)
        kw["positions"] = torch.randint(0, 60, shape, generator=gen)
        tok = po.token_positions(B, S, positions=kw["positions"])
    elif c.mode == "varlen":
        cu = torch.tensor([0] + list(torch.tensor(c.lengths).cumsum(0).tolist()), dtype=torch.int32)
        kw["cu_seqlens"] = cu
        if c.offset < 0:
            offs = torch.randint(0, 40, (len(c.lengths),), generator=gen)
            kw["offsets"] = offs
            tok = [po.packed_positions(cu, S, offsets=offs)]
        else:
            kw["offsets"] = c.offset
            tok = [po.packed_positions(cu, S, offset=c.offset)]
    else:  # mrope
        A = len(c.sections)
        axes = po.axis_map(list(c.sections), interleaved=c.mrope_interleaved)
        kw["axis_map"] = pk.mrope_axis_map(list(c.sections), interleaved=c.mrope_interleaved)
        assert kw["axis_map"].tolist() == axes
        pos = torch.randint(0, 60, (A, S) if c.packed else (A, B, S), generator=gen)
        kw["positions"] = pos
        if B * S == 0:  # (the oracle reads the sizes off its nested lists)
            return q, k, kw, torch.zeros(B, S, c.half, dtype=torch.int64)
        rows = po.per_frequency_positions(pos[:, None] if c.packed else pos, axes)
        return q, k, kw, po.as_tensor(rows, dtype=torch.int64).reshape(B, S, c.half)
    rows = po.as_tensor(tok, dtype=torch.int64).reshape(B, S, 1).expand(B, S, c.half)
    return q, k, kw, rows


def _angles(c: RopeCase, kw: dict, rows: torch.Tensor):
    """Add the angle source to ``kw``; return ``(cos, sin)`` per token and frequency ``[B, S, half]`` as the
    truth sees them (float64) and as torch computes them in fp32 (the tolerance rule's torch-in-dtype)."""
    R = 2 * c.half
    # table rows: every position the oracle uses, plus a few; with M-RoPE the op checks every axis' positions
    # against the table, those of an axis no frequency follows (a section of 0) too
    used = kw["positions"] if c.mode == "mrope" and kw["positions"].numel() else rows
    P = (int(used.max()) + 1 if used.numel() else 0) + 1 + c.seed % 5
    if c.angles == "table":
        inv, _ = pk.rope_frequencies(R, 10000.0)
        cos, sin = pk.rope_cos_sin(P, inv)  # fp32 tables: the truth takes their values as given
        kw["cos"], kw["sin"] = cos, sin
        c64, s64 = cos.double()[rows, torch.arange(c.half)], sin.double()[rows, torch.arange(c.half)]
        return (c64, s64), (c64.float(), s64.float())
    if c.angles == "inv_freq":
        inv, _ = pk.rope_frequencies(R, 10000.0)  # fp32
        angle32 = rows.float() * inv  # HF: one fp32 product
        low = (angle32.cos() * c.attention_factor, angle32.sin() * c.attention_factor)
    else:  # exact: the float64 angle reduced to [-pi, pi], rounded once to fp32 (docs/rope.md), fp32 cos/sin
        inv, _ = pk.rope_frequencies(R, 10000.0, dtype=torch.float64)
        kw["exact"] = True
        r32 = (torch.remainder(rows.double() * inv + torch.pi, 2 * torch.pi) - torch.pi).float()
        low = (r32.cos() * c.attention_factor, r32.sin() * c.attention_factor)
    kw["inv_freq"] = inv
    kw["attention_factor"] = c.attention_factor
    angle = rows.double() * inv.double()
    return (angle.cos() * c.attention_factor, angle.sin() * c.attention_factor), low


def _rotate(x, cs, c: RopeCase, dtype):
    """x ``[B, S, H, D]`` (or packed ``[T, H, D]``) rotated by per-token tables ``cs`` ``[B, S, half]``."""
    x4 = x.unsqueeze(0) if c.packed else x
    B, S = x4.shape[0], x4.shape[1]
    cos, sin = (t.reshape(B * S, c.half).to(dtype) for t in cs)
    rows = torch.arange(B * S).view(B, S)
    out = ref.rotate_reference(x4, cos, sin, rows, interleaved=c.interleaved, dtype=dtype)
    return out.squeeze(0) if c.packed else out


def _rotate_fma(x, cs, c: RopeCase, dtype):
    """As :func:`_rotate`, in ``dtype``, written as the torch backend writes it (``addcmul``: one rounding
    fewer per output, so a different last bit where the pair's products cancel)."""
    x4 = (x.unsqueeze(0) if c.packed else x).to(dtype)
    cos, sin = (t.to(dtype)[:, :, None, :] for t in cs)
    rot = x4[..., : 2 * c.half]
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if c.interleaved else (rot[..., : c.half], rot[..., c.half :])
    o1, o2 = torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin)
    out = torch.stack((o1, o2), -1).flatten(-2) if c.interleaved else torch.cat((o1, o2), -1)
    out = torch.cat((out, x4[..., 2 * c.half :]), -1)
    return out.squeeze(0) if c.packed else out


def _same_in_torch(x, cs, c: RopeCase, truth):
    """The tolerance rule's "same computation done by torch in x's dtype": of its two ways of writing the
    rotation (HF's a*c - b*s, and the torch backend's addcmul), the one farther from the truth. On a few
    elements either may be lucky (the error of a cancelling pair depends on which products are rounded)."""
    forms = (_rotate(x, cs, c, x.dtype), _rotate_fma(x, cs, c, x.dtype))
    return max(forms, key=lambda f: ulp_err(f, truth, x.dtype))


def _calibration(c: RopeCase):
    """``(truth, same_in_torch)`` of q for the same angles, dtype and rotary layout on 512 pairs (see
    :func:`common.assert_rule`)."""
    cal = dataclasses.replace(c, B=4, S=16, Hq=8 // c.half + 1, Hk=0, layout="contiguous", mode="positions",
                              packed=False, lengths=(), sections=(), seed=c.seed + 1)  # fmt: skip
    q, _, kw, rows = build(cal)
    truth_cs, low_cs = _angles(cal, kw, rows)
    truth = _rotate(q, truth_cs, cal, torch.float64)
    return truth, _same_in_torch(q, low_cs, cal, truth)


def check(c: RopeCase) -> None:
    """apply_rope on ``c.backend`` against the float64 truth (dtype-tied tolerance); apply_rope_ on copies
    gives the out-of-place twin's values bit for bit, and leaves the pass-through channels untouched."""
    q, k, kw, rows = build(c)
    truth_cs, low_cs = _angles(c, kw, rows)
    dtype = q.dtype
    calibration = _calibration(c)
    q0, k0 = q.clone(), (k.clone() if k is not None else None)
    with use(c.backend):
        out_q, out_k = pk.apply_rope(q, k, **kw)
    assert torch.equal(q, q0) and (k is None or torch.equal(k, k0)), "apply_rope modified its inputs"
    for name, x, out in (("q", q0, out_q), ("k", k0, out_k)):
        if x is None:
            assert out is None
            continue
        truth = _rotate(x, truth_cs, c, torch.float64)
        same_in_torch = _same_in_torch(x, low_cs, c, truth)  # tables rounded to x's dtype, math in it
        assert_rule(out, truth, same_in_torch, calibration=calibration, backend=c.backend, what=name)
        R = 2 * c.half
        assert torch.equal(out[..., R:], x[..., R:]), f"{name}: pass-through channels changed"
    # the in-place twin, on the very layout drawn (views of one buffer when shared)
    with use(c.backend):
        rq, rk = pk.apply_rope_(q, k, **kw)
    assert rq is q and rk is k
    assert torch.equal(q, out_q), "apply_rope_ (q) differs from apply_rope"
    assert k is None or torch.equal(k, out_k), "apply_rope_ (k) differs from apply_rope"


def check_compiled(c: RopeCase) -> None:
    """Compiled apply_rope / apply_rope_ equal eager apply_rope bit for bit (same backend)."""
    q, k, kw, rows = build(c)
    _angles(c, kw, rows)

    def out_of_place(q, k):
        return pk.apply_rope(q, k, **kw)

    def in_place(q, k):
        pk.apply_rope_(q, k, **kw)
        return q, k

    with use(c.backend):
        compiled_equals_eager(out_of_place, (q, k), inplace_call=in_place)
