"""QK-norm + RoPE property cases: a drawn :class:`QkNormCase` (plain values; its repr reruns it) and
:func:`check`: ``qk_norm_rope`` on the backend against the float64 truth (the norm reference, then the
rotation at the position oracle's rows), ``qk_norm_rope_`` against it bit for bit, and, with ``qkv``,
``qk_norm_rope_qkv_`` against ``qk_norm_rope_`` on the split views of the same buffer.

Norms: ``head`` (weights ``[D]``) and ``heads`` (weights ``[H*D]``), ``weight_offset`` 0 or 1 (Gemma's
``1 + w``), each weight present or None, k present or None. Shapes, layouts (including ``shared``: q and k
head slices of one buffer), position modes, angle sources, partial rotary and interleaved pairs are RoPE's
(:mod:`.rope_cases`, whose inputs and oracle rows are reused through :func:`_rope_case`).
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

import posenc_kernels as pk
from posenc_kernels.ops.qknorm.reference import hf_rms_norm, rms_norm_reference

from . import rope_cases as rc
from .common import DTYPES, assert_rule, backends, make, use

#: how ``qk_norm_rope_qkv_`` gets the fused buffer: none (no qkv check), ``heads`` ``[.., Hq + 2 Hk, D]``,
#: ``flat`` ``[.., (Hq + 2 Hk) * D]`` with ``head_dim``
QKV = ("none", "heads", "flat")


@dataclasses.dataclass(frozen=True)
class QkNormCase:
    backend: str
    dtype: str
    B: int  # 1 for packed inputs
    S: int  # tokens per sequence (T when packed)
    Hq: int
    Hk: int  # 0: no k
    D: int
    half: int  # rotary dim R = 2 * half <= D
    norm: str  # "head" | "heads"
    weight_offset: float
    q_weight: bool  # present (else None)
    k_weight: bool
    layout: str
    mode: str
    angles: str
    interleaved: bool
    packed: bool
    eps: float = 1e-6
    qkv: str = "none"
    offset: int = 0
    lengths: tuple = ()
    sections: tuple = ()
    mrope_interleaved: bool = False
    attention_factor: float = 1.0
    seed: int = 0


def _rope_case(c: QkNormCase) -> rc.RopeCase:
    fields = {f.name for f in dataclasses.fields(rc.RopeCase)}
    return rc.RopeCase(**{k: v for k, v in dataclasses.asdict(c).items() if k in fields})


@st.composite
def qknorm_cases(draw, backend=None) -> QkNormCase:
    be = draw(st.sampled_from(backends("qk_norm_rope_"))) if backend is None else backend
    r = draw(rc.rope_cases(backend=be))  # RoPE's draw: shapes, layout, positions, angles
    D, half = r.D, r.half  # head_dim and rotary dim: RoPE's (odd, partial) or a model-like head_dim
    if draw(st.booleans()):
        D = max(2 * half, draw(st.sampled_from([8, 12, 16, 24])))
        if r.mode != "mrope" and draw(st.booleans()):  # (M-RoPE's sections are tied to the drawn half)
            half = D // 2  # full rotary
    c = dict(dataclasses.asdict(r), D=D, half=half, norm=draw(st.sampled_from(["head", "heads"])),
             weight_offset=draw(st.sampled_from([0.0, 1.0])), q_weight=draw(st.booleans()),
             k_weight=draw(st.booleans()), eps=draw(st.sampled_from([1e-6, 1e-6, 0.1])))  # fmt: skip
    c["Hq"] = draw(st.sampled_from([1, 2, 3, 5]))  # odd head counts (and RoPE's Hk: 0 = no k, 1, 2)
    if c["Hk"]:
        c["qkv"] = draw(st.sampled_from(QKV))
    else:
        c["k_weight"] = False  # (no k: no k weight)
    return QkNormCase(**c)


# ---- building the inputs and the expected values


def _weights(c: QkNormCase, gen, dtype):
    n = (lambda H: c.D) if c.norm == "head" else (lambda H: H * c.D)
    qw = torch.randn(n(c.Hq), generator=gen).to(dtype) if c.q_weight else None
    kw = torch.randn(n(c.Hk), generator=gen).to(dtype) if c.k_weight and c.Hk else None
    return qw, kw


def build(c: QkNormCase):
    """``(q, k, q_weight, k_weight, kwargs, truth_cs, low_cs)``: RoPE's inputs for the same draw, the weights
    (in q's dtype), the keywords of qk_norm_rope, and the per-token angles as the truth and as torch see them."""
    r = _rope_case(c)
    q, k, kw, rows = rc.build(r)
    truth_cs, low_cs = rc._angles(r, kw, rows)
    qw, k_w = _weights(c, torch.Generator().manual_seed(c.seed + 7), q.dtype)
    kw.update(eps=c.eps, norm=c.norm, weight_offset=c.weight_offset)
    return q, k, qw, k_w, kw, truth_cs, low_cs


def _hf_norm(x, w, c: QkNormCase):
    """HF's RMSNorm in x's dtype (fp32 statistics, normalised value cast back, then the weight)."""
    if c.norm == "head":
        return hf_rms_norm(x, w, c.eps, c.weight_offset)
    return hf_rms_norm(x.flatten(-2), w, c.eps, c.weight_offset).view(x.shape)


def _expected(c: QkNormCase, x, w, truth_cs, low_cs):
    """``(truth, same_in_torch)`` of one tensor: the float64 norm then rotation; HF eager in x's dtype
    (its norm, then the rotation at tables rounded to x's dtype, the farther of RoPE's two torch forms)."""
    r = _rope_case(c)
    nk = dict(eps=c.eps, norm=c.norm, weight_offset=c.weight_offset)
    truth = rc._rotate(rms_norm_reference(x, w, **nk), truth_cs, r, torch.float64)
    return truth, rc._same_in_torch(_hf_norm(x, w, c), low_cs, r, truth)


def _calibration(c: QkNormCase):
    """``(truth, same_in_torch)`` of q for the same norm, weights, angles, dtype and rotary layout on a few
    hundred elements (see :func:`common.assert_rule`)."""
    cal = dataclasses.replace(c, B=4, S=8, Hq=max(1, 64 // c.D), Hk=0, layout="contiguous", mode="positions",
                              packed=False, lengths=(), sections=(), qkv="none", seed=c.seed + 1)  # fmt: skip
    q, _, qw, _, _, truth_cs, low_cs = build(cal)
    return _expected(cal, q, qw, truth_cs, low_cs)


def check(c: QkNormCase) -> None:
    """qk_norm_rope on ``c.backend`` against the float64 truth (dtype-tied tolerance), inputs untouched;
    qk_norm_rope_ on the drawn layout gives the same bits; with ``c.qkv``, qk_norm_rope_qkv_ on a fused
    buffer equals qk_norm_rope_ on its q / k head views and leaves v alone."""
    q, k, qw, k_w, kw, truth_cs, low_cs = build(c)
    calibration = _calibration(c)
    q0, k0 = q.clone(), (k.clone() if k is not None else None)
    with use(c.backend):
        out_q, out_k = pk.qk_norm_rope(q, k, qw, k_w, **kw)
    assert torch.equal(q, q0) and (k is None or torch.equal(k, k0)), "qk_norm_rope modified its inputs"
    for name, x, w, out in (("q", q0, qw, out_q), ("k", k0, k_w, out_k)):
        if x is None:
            assert out is None
            continue
        truth, same_in_torch = _expected(c, x, w, truth_cs, low_cs)
        assert_rule(out, truth, same_in_torch, calibration=calibration, backend=c.backend, what=name)
    with use(c.backend):
        rq, rk = pk.qk_norm_rope_(q, k, qw, k_w, **kw)
    assert rq is q and rk is k
    assert torch.equal(q, out_q), "qk_norm_rope_ (q) differs from qk_norm_rope"
    assert k is None or torch.equal(k, out_k), "qk_norm_rope_ (k) differs from qk_norm_rope"
    if c.qkv != "none":
        _check_qkv(c, qw, k_w, kw)


def _check_qkv(c: QkNormCase, qw, k_w, kw) -> None:
    """The fused buffer in q's drawn memory layout (contiguous for ``shared``), packed like q."""
    gen = torch.Generator().manual_seed(c.seed + 3)
    H = c.Hq + 2 * c.Hk
    lead = (c.S,) if c.packed else (c.B, c.S)
    shape = lead + ((H * c.D,) if c.qkv == "flat" else (H, c.D))  # flat: a QKV linear's output
    x = make(shape, DTYPES[c.dtype], "contiguous" if c.layout == "shared" else c.layout, gen)
    split = x.unflatten(-1, (H, c.D)) if c.qkv == "flat" else x
    want = x.clone()
    wsplit = want.unflatten(-1, (H, c.D)) if c.qkv == "flat" else want
    head_dim = dict(head_dim=c.D) if c.qkv == "flat" else {}
    with use(c.backend):
        pk.qk_norm_rope_(wsplit[..., : c.Hq, :], wsplit[..., c.Hq : c.Hq + c.Hk, :], qw, k_w, **kw)
        assert pk.qk_norm_rope_qkv_(x, qw, k_w, num_heads_q=c.Hq, num_heads_kv=c.Hk, **head_dim, **kw) is x
    assert torch.equal(split[..., : c.Hq + c.Hk, :], wsplit[..., : c.Hq + c.Hk, :]), (
        "qk_norm_rope_qkv_ differs from qk_norm_rope_ on the split views"
    )
    assert torch.equal(x, want), "qk_norm_rope_qkv_ changed v"
