"""RoPE + KV-cache write property cases: a drawn :class:`CacheCase` (plain values; its repr reruns it) and
:func:`check`: ``rope_and_cache_`` (or ``qk_norm_rope_and_cache_``) on the backend against the unfused
sequence on the same backend (``apply_rope_`` / ``qk_norm_rope_``, then a scatter), bit for bit: q, k and both
caches, every row not written untouched.

The q/k part is QK-norm's draw (:mod:`.qknorm_cases`, itself RoPE's: shapes, memory layouts, position modes,
angle sources, partial rotary, interleaved pairs), with k present; packed draws address a paged cache by
``slot_mapping`` (a random subset of slots, some -1, the mapping possibly shorter than the tokens), the others a
contiguous cache by ``cache_positions`` (``[S]`` or ``[B, S]``, some -1). Drawn too: NHD or HND, the cache's
own memory (contiguous, or a window of a wider buffer), its dtype (the input's or FP8 with per-tensor or
per-head scales), v's head_dim (or no v), the norm stage on or off.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

import posenc_kernels as pk

from cache.common import poisoned, same_bits, unfused

from . import qknorm_cases as qc
from .qknorm_cases import QkNormCase  # noqa: F401  (the reproducer note names it)
from .common import DTYPES, backends, make, use


@dataclasses.dataclass(frozen=True)
class CacheCase:
    qk: qc.QkNormCase
    with_norm: bool
    layout: str  # "NHD" | "HND"
    block_size: int  # paged; contiguous: S_max - S
    extra_slots: int
    mapping_len: int  # paged: len(slot_mapping) <= T
    pad_every: int  # every n-th token gets -1 (0: none)
    per_row: bool  # contiguous: cache_positions [B, S]
    window: bool  # the caches are a window of a wider buffer
    fp8: str  # "none" | "tensor" | "head"
    Dv: int  # 0: no v
    seed: int = 0

    @property
    def B(self) -> int:
        return self.qk.B

    @property
    def S(self) -> int:
        return self.qk.S


@st.composite
def cache_cases(draw) -> CacheCase:
    be = draw(st.sampled_from(backends("rope_and_cache_")))
    c = draw(qc.qknorm_cases(backend=be))
    # k is required here; v and the caches are separate tensors (no shared-buffer q/k layout)
    c = dataclasses.replace(c, Hk=max(c.Hk, 1), layout="contiguous" if c.layout == "shared" else c.layout, qkv="none")
    T = c.S
    return CacheCase(
        qk=c, with_norm=draw(st.booleans()), layout=draw(st.sampled_from(["NHD", "HND"])),
        block_size=draw(st.sampled_from([1, 2, 4, 16])), extra_slots=draw(st.integers(0, 5)),
        mapping_len=draw(st.integers(0, T)) if draw(st.booleans()) else T, pad_every=draw(st.sampled_from([0, 2, 3])),
        per_row=draw(st.booleans()), window=draw(st.booleans()), fp8=draw(st.sampled_from(["none", "none", "tensor", "head"])),
        Dv=draw(st.sampled_from([0, c.D, 8])), seed=c.seed,
    )  # fmt: skip


def _cache(shape, dtype, window: bool, gen):
    if not window:
        return poisoned(shape, dtype)
    big = poisoned(shape[:-1] + (shape[-1] + 5,), dtype)
    return big[..., 2 : 2 + shape[-1]]  # unit last stride, padded rows, a storage offset


def build(cc: CacheCase):
    """``(q, k, v, k_cache, v_cache, norm_args, kw)``: the inputs and keywords of the fused call."""
    c = cc.qk
    q, k, qw, k_w, kw, _, _ = qc.build(c)
    gen = torch.Generator().manual_seed(cc.seed + 11)
    dtype = DTYPES[c.dtype]
    Hk, D = k.shape[-2], k.shape[-1]
    v = make(k.shape[:-1] + (cc.Dv,), dtype, c.layout, gen) if cc.Dv else None
    cdt = torch.float8_e4m3fn if cc.fp8 != "none" else dtype
    if c.packed:
        T = q.shape[0]
        n_slots = T + cc.extra_slots
        blocks = -(-max(n_slots, 1) // cc.block_size)
        perm = torch.randperm(blocks * cc.block_size, generator=gen)[: cc.mapping_len]
        if cc.pad_every:
            perm[:: cc.pad_every] = -1
        kw["slot_mapping"] = perm
        dims = (lambda d: (blocks, cc.block_size, Hk, d)) if cc.layout == "NHD" else (lambda d: (blocks, Hk, cc.block_size, d))
    else:
        B, S = q.shape[0], q.shape[1]
        s_max = S + cc.extra_slots
        rows = [torch.randperm(s_max, generator=gen)[:S] for _ in range(B if cc.per_row else 1)]
        pos = (torch.stack(rows) if rows else torch.zeros(0, S, dtype=torch.int64)) if cc.per_row else rows[0]
        if cc.pad_every:
            pos[..., :: cc.pad_every] = -1
        kw["cache_positions"] = pos
        dims = (lambda d: (B, s_max, Hk, d)) if cc.layout == "NHD" else (lambda d: (B, Hk, s_max, d))
    kc = _cache(dims(D), cdt, cc.window, gen)
    vc = _cache(dims(cc.Dv), cdt, cc.window, gen) if cc.Dv else None
    kw["kv_layout"] = cc.layout
    if cc.fp8 == "tensor":
        kw["k_scale"] = 0.5
        if cc.Dv:
            kw["v_scale"] = torch.tensor(0.25)
    elif cc.fp8 == "head":
        kw["k_scale"] = torch.rand(Hk, generator=gen) + 0.1
        if cc.Dv:
            kw["v_scale"] = torch.rand(Hk, generator=gen) + 0.1
    norm = dict(q_weight=qw, k_weight=k_w, eps=kw.pop("eps"), norm=kw.pop("norm"), weight_offset=kw.pop("weight_offset"))
    return q, k, v, kc, vc, norm, kw


def check(cc: CacheCase) -> None:
    q, k, v, kc, vc, norm, kw = build(cc)
    clone = lambda t: None if t is None else t.clone()  # noqa: E731 (clones keep values, not the window)
    b = [clone(t) for t in (q, k, v)]
    bc = [None if t is None else t.clone() for t in (kc, vc)]
    with use(cc.qk.backend):
        if cc.with_norm:
            out = pk.qk_norm_rope_and_cache_(q, k, v, kc, vc, norm["q_weight"], norm["k_weight"], eps=norm["eps"],
                                             norm=norm["norm"], weight_offset=norm["weight_offset"], **kw)  # fmt: skip
        else:
            out = pk.rope_and_cache_(q, k, v, kc, vc, **kw)
        assert out[0] is q and out[1] is k
        cos, sin = kw.pop("cos", None), kw.pop("sin", None)
        extra = dict(norm=norm["norm"] if cc.with_norm else None)
        if cc.with_norm:
            extra.update(q_weight=norm["q_weight"], k_weight=norm["k_weight"], eps=norm["eps"],
                         weight_offset=norm["weight_offset"])  # fmt: skip
        unfused(*b, *bc, cos, sin, **kw, **extra)  # on the same backend, then the reference scatter
    for name, x, y in (("q", q, b[0]), ("k", k, b[1]), ("k_cache", kc, bc[0]), ("v_cache", vc, bc[1])):
        if x is not None:
            assert same_bits(x.contiguous(), y.contiguous()), f"{name} differs from the unfused sequence"
