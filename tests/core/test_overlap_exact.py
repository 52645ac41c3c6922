"""Overlap detection is exact for any two strided views of one storage (issue 20, item 4 of the repro and
must-have 3): refused whenever they share an element, accepted whenever they do not, in Python
(``ops/checks.py``) and C++ (``csrc/alias_checks.h``, reached through the native kernels) alike, against a
brute-force oracle (the sets of byte addresses) over seeded random view pairs."""

import random

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels.ops.checks import OVERLAP_WORK, check_disjoint, shared_element

NATIVE_OP = "rope_"
DTYPES = (torch.uint8, torch.int16, torch.float32, torch.float64)


def _bytes(t: torch.Tensor) -> set:
    """Every byte address of t's elements (the oracle)."""
    e = t.element_size()
    n = t.untyped_storage().nbytes() // e
    idx = torch.arange(n).as_strided(t.shape, t.stride(), t.storage_offset()).flatten().tolist()
    return {i * e + j for i in idx for j in range(e)}


def _random_view(rng: random.Random, base: torch.Tensor) -> torch.Tensor:
    """A random strided view of base's storage (uint8, 96 bytes): any dtype, rank 1-3, sizes 1-4, strides
    0-9 in any order (slices, transposes, shifted copies of one layout, expanded dims), any offset that fits."""
    flat = base.view(rng.choice(DTYPES))
    while True:
        rank = rng.randint(1, 3)
        shape = [rng.randint(1, 4) for _ in range(rank)]
        stride = [rng.choice((0, 1, 1, 2, 3, 4, 5, 6, 8, 9)) for _ in range(rank)]
        extent = sum((n - 1) * s for n, s in zip(shape, stride)) + 1
        if extent <= flat.numel():
            return flat.as_strided(shape, stride, rng.randint(0, flat.numel() - extent))


def test_token_shift_repro_is_refused_on_every_path(backend):
    """The issue's repro: q and k one token apart in one buffer share elements (they were rotated twice)."""
    buf = torch.randn(1, 6, 3, 4)
    q, k = buf[:, :5, 1:3], buf[:, 1:, 0:2]
    cos, sin = pk.rope_cos_sin(5, pk.rope_frequencies(4)[0])
    before = buf.clone()
    with pytest.raises(ValueError, match="k must not overlap q"):
        pk.apply_rope_(q, k, cos, sin)
    assert torch.equal(buf, before), "nothing may be written before the error"
    # disjoint token ranges of the same layout are accepted
    pk.apply_rope_(buf[:, :3, 0:2], buf[:, 3:, 0:2], *pk.rope_cos_sin(3, pk.rope_frequencies(4)[0]))


def test_python_check_matches_the_oracle_on_random_views():
    rng = random.Random(0)
    base = torch.zeros(96, dtype=torch.uint8)
    shared = disjoint = 0
    for _ in range(3000):
        a, b = _random_view(rng, base), _random_view(rng, base)
        truth = bool(_bytes(a) & _bytes(b))
        got = shared_element(a, b)
        assert got is not None, f"search ran out of work on {a.shape}{a.stride()}@{a.storage_offset()}"
        assert got == truth, (a.dtype, a.shape, a.stride(), a.storage_offset(), b.dtype, b.shape, b.stride(),
                              b.storage_offset())  # fmt: skip
        shared, disjoint = shared + truth, disjoint + (not truth)
    assert shared > 500 and disjoint > 500  # both answers are exercised


def test_conservative_refusal_says_so():
    """An adversarial as_strided pair whose search needs more than the budget: refused, with a message that
    says disjointness was not proven (never silently accepted)."""
    base = torch.zeros(1 << 17)
    # coprime strides with wide bounds: many partial sums to rule out one by one
    a = base.as_strided((60, 60), (1009, 1013), 0)
    b = base.as_strided((60, 60), (1019, 1021), 7)
    assert shared_element(a, b, work=OVERLAP_WORK) is None
    with pytest.raises(ValueError, match="too irregular to prove that they do not share an element"):
        check_disjoint("q", a, "k", b)


def _rope_views(rng: random.Random, buf: torch.Tensor):
    """q and k [B, S, H, D] sliced from one [B, S, H, D]-ordered or transposed buffer: random token, head and
    channel ranges (same B and D), so they may coincide, interleave, or shift by tokens."""
    B, S, H, D = buf.shape
    s0, s1 = rng.randint(0, 2), rng.randint(0, 2)
    n = S - max(s0, s1) - rng.randint(0, 1)
    h0, h1 = rng.randint(0, H - 1), rng.randint(0, H - 1)
    hq, hk = rng.randint(1, H - h0), rng.randint(1, H - h1)
    d0, d1 = rng.choice(((0, 0), (0, 2), (2, 0), (1, 2))), 2
    q = buf[:, s0 : s0 + n, h0 : h0 + hq, d0[0] : d0[0] + d1]
    k = buf[:, s1 : s1 + n, h1 : h1 + hk, d0[1] : d0[1] + d1]
    return q, k


@pytest.mark.skipif("rope_" not in _native.ops_for("CPU"), reason="the native extension is not built")
def test_native_and_python_checks_agree_with_the_oracle():
    """The C++ check (csrc/alias_checks.h, run by the native kernels) and the Python one answer alike, and
    as the oracle does, on random q/k slices of one buffer (token shifts, head and channel ranges)."""
    rng = random.Random(1)
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(2)[0])
    counts = {True: 0, False: 0}
    for i in range(300):
        raw = torch.randn(2, 8, 4, 4)
        buf = raw if i % 2 else raw.transpose(1, 2).contiguous().transpose(1, 2)  # token-major or head-major
        q, k = _rope_views(rng, buf)
        n = q.shape[1]
        truth = bool(_bytes(q) & _bytes(k))
        counts[truth] += 1
        for name in ("native", "torch"):
            with pk.use_backend(name):
                try:
                    pk.apply_rope_(q, k, cos[:n], sin[:n])
                    refused = False
                except ValueError as e:
                    assert "k must not overlap q" in str(e), str(e)
                    refused = True
            assert refused == truth, (name, q.shape, q.stride(), q.storage_offset(), k.shape, k.stride(),
                                      k.storage_offset())  # fmt: skip
    assert counts[True] > 50 and counts[False] > 50
