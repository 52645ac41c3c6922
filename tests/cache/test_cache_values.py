"""rope_and_cache_ values on every backend: bit for bit the unfused sequence (``apply_rope_`` / ``qk_norm_rope_``
then a scatter) on the same backend; close to the float64 reference; FP8 caches equal to the reference's
own quantisation; every cache row not written bitwise untouched (NaN-poisoned caches); CUDA-graph padding
(slot -1, tokens past ``len(slot_mapping)``) rotated and not written; MLA's latent cache."""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops.cache.reference import quantise_reference, rope_and_cache_reference

from cache.common import FP8, angles, bits, clone_all, contiguous, paged, poisoned, same_bits, unfused
from conftest import DEVICE

NATIVE_OP = "rope_and_cache_"

# one case per property: addressing, layout, dtype, rotary mode (partial, interleaved), positions
CASES = [
    dict(mode="paged", layout="NHD", dtype=torch.float32, R=16, interleaved=False),
    dict(mode="paged", layout="HND", dtype=torch.bfloat16, R=8, interleaved=True),
    dict(mode="contiguous", layout="HND", dtype=torch.float16, R=16, interleaved=False),
    dict(mode="contiguous", layout="NHD", dtype=torch.bfloat16, R=12, interleaved=False, per_row=True),
]


def _case(c):
    R, D = c["R"], 16
    cos, sin = angles(D, R)
    if c["mode"] == "paged":
        q, k, v, kc, vc = paged(T=6, dtype=c["dtype"], layout=c["layout"])
        addr = dict(slot_mapping=torch.tensor([7, 0, -1, 13, 2], device=DEVICE))  # token 5: past the mapping
        rope = dict(positions=torch.tensor([3, 9, 0, 31, 4, 5], device=DEVICE))
    else:
        q, k, v, kc, vc = contiguous(dtype=c["dtype"], layout=c["layout"])
        if c.get("per_row"):
            addr = dict(cache_positions=torch.tensor([[2, 3, 4], [5, -1, 6]], device=DEVICE))
            rope = dict(offsets=torch.tensor([2, 5], device=DEVICE))
        else:
            addr = dict(cache_positions=torch.tensor([4, 5, 6], device=DEVICE))
            rope = dict(offsets=4)
    return q, k, v, kc, vc, cos, sin, dict(kv_layout=c["layout"], interleaved=c["interleaved"], **addr, **rope)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['mode']}-{c['layout']}-{str(c['dtype'])[6:]}-R{c['R']}")
def test_bit_for_bit_the_unfused_sequence(backend, case):
    q, k, v, kc, vc, cos, sin, kw = _case(case)
    a = clone_all(q, k, v, kc, vc)
    b = clone_all(q, k, v, kc, vc)
    out = pk.rope_and_cache_(*a, cos, sin, **kw)
    assert out[0] is a[0] and out[1] is a[1]
    unfused(*b, cos, sin, **kw)
    for name, x, y in zip(("q", "k", "v", "k_cache", "v_cache"), a, b):
        assert same_bits(x, y), name
    # and close to the float64 definition (the rotated k rounded to its dtype in the cache)
    r = rope_and_cache_reference(q, k, v, kc, vc, cos.double(), sin.double(), **kw)
    tol = dict(atol=1e-5, rtol=1e-5) if q.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(a[0].double(), r[0], **tol)
    assert same_bits(a[3], r[2]) or torch.allclose(a[3].double(), r[2].double(), equal_nan=True, **tol)


def test_rows_not_written_stay_untouched(backend):
    """NaN-poisoned caches: exactly the written rows change; padding (-1, past the mapping) writes nothing."""
    q, k, v, kc, vc = paged(T=8, blocks=3, bs=4)
    cos, sin = angles(16)
    slots = torch.tensor([5, -1, 0, 11, -1, 6], device=DEVICE)  # tokens 6, 7 past the mapping
    kc0, vc0 = kc.clone(), vc.clone()
    q0, k0 = q.clone(), k.clone()
    pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, slot_mapping=slots, positions=torch.arange(8, device=DEVICE))
    written = {5: 0, 0: 2, 11: 3, 6: 5}
    for slot in range(12):
        blk, off = divmod(slot, 4)
        if slot in written:
            t = written[slot]
            assert torch.equal(kc[blk, off], k[t]) and torch.equal(vc[blk, off], v[t])
        else:
            assert torch.equal(bits(kc[blk, off]), bits(kc0[blk, off])), slot
            assert torch.equal(bits(vc[blk, off]), bits(vc0[blk, off])), slot
    # padded tokens are rotated all the same
    q2, k2 = pk.apply_rope(q0, k0, cos, sin, positions=torch.arange(8, device=DEVICE))
    assert torch.equal(q, q2) and torch.equal(k, k2)


@pytest.mark.parametrize("fp8", FP8, ids=["e4m3fn", "e5m2"])
def test_fp8_cache_is_the_reference_quantisation(backend, fp8):
    q, k, v, kc, vc = paged(T=5, dtype=torch.bfloat16, cache_dtype=fp8)
    k.mul_(300)  # beyond e4m3fn's 448 once divided by the scales below: clamped, never NaN
    cos, sin = angles(16)
    slots = torch.tensor([3, 8, -1, 1, 15], device=DEVICE)
    ks = torch.tensor([0.5, 0.25], device=DEVICE)  # per kv head
    kw = dict(slot_mapping=slots, positions=torch.tensor([0, 1, 2, 3, 4], device=DEVICE), k_scale=ks, v_scale=0.125)
    a, b = clone_all(q, k, v, kc, vc), clone_all(q, k, v, kc, vc)
    pk.rope_and_cache_(*a, cos, sin, **kw)
    unfused(*b, cos, sin, **kw)
    for name, x, y in zip(("q", "k", "k_cache", "v_cache"), (a[0], a[1], a[3], a[4]), (b[0], b[1], b[3], b[4])):
        assert same_bits(x, y), name
    for slot in (3, 8, 1, 15):  # written rows: finite (overflow clamps)
        assert not a[3][slot // 4, slot % 4].float().isnan().any(), slot
    blk, off = 2, 0  # slot 8 <- token 1
    assert same_bits(a[3][blk, off], quantise_reference(a[1][1], ks, fp8))
    assert a[3].float()[blk, off].abs().max() <= torch.finfo(fp8).max


def test_q_fp8_output_and_kv_heads_dims(backend):
    """q_fp8 receives the rotated q quantised (q unchanged); v's head_dim may differ from k's; k-only."""
    q, k, v, kc, vc = paged(T=3, Dv=24)
    cos, sin = angles(16)
    slots = torch.tensor([1, 2, 3], device=DEVICE)
    pos = torch.tensor([4, 5, 6], device=DEVICE)
    qf = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    q0 = q.clone()
    pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, slot_mapping=slots, positions=pos, q_fp8=qf, q_scale=0.5)
    assert torch.equal(q, q0)
    q_rot, _ = pk.apply_rope(q0, None, cos, sin, positions=pos)
    assert same_bits(qf, quantise_reference(q_rot, 0.5, torch.float8_e4m3fn))
    assert torch.equal(vc[0, 1:4], v)
    k2, kc2 = k.clone(), paged(T=3)[3]
    pk.rope_and_cache_(q.clone(), k2, None, kc2, None, cos, sin, slot_mapping=slots, positions=pos)
    assert torch.equal(kc2[0, 1:4], k2)


def test_norm_stage_is_qk_norm_rope_then_scatter(backend):
    q, k, v, kc, vc = contiguous(dtype=torch.bfloat16)
    cos, sin = angles(16)
    qw, kw_ = torch.rand(16, dtype=torch.bfloat16, device=DEVICE), torch.rand(16, dtype=torch.bfloat16, device=DEVICE)
    kw = dict(cache_positions=torch.tensor([0, 1, 2], device=DEVICE), kv_layout="HND")
    a, b = clone_all(q, k, v, kc, vc), clone_all(q, k, v, kc, vc)
    pk.qk_norm_rope_and_cache_(*a, qw, kw_, cos, sin, weight_offset=1.0, **kw)
    pk.qk_norm_rope_(b[0], b[1], qw, kw_, cos, sin, weight_offset=1.0)
    kc4 = b[3].transpose(1, 2)
    vc4 = b[4].transpose(1, 2)
    kc4[:, 0:3] = b[1]
    vc4[:, 0:3] = b[2]
    for name, x, y in zip(("q", "k", "k_cache", "v_cache"), (a[0], a[1], a[3], a[4]), (b[0], b[1], b[3], b[4])):
        assert same_bits(x, y), name


def test_out_of_place_twin(backend):
    q, k, v, kc, vc = paged(T=4)
    cos, sin = angles(16)
    args = dict(slot_mapping=torch.tensor([2, 9, -1, 4], device=DEVICE), positions=torch.arange(4, device=DEVICE))
    ins = clone_all(q, k, v, kc, vc)
    a = clone_all(q, k, v, kc, vc)
    pk.rope_and_cache_(*a, cos, sin, **args)
    op_args = [q, k, v, kc, vc, None, args["slot_mapping"], None, 0, None, None, None, None, None, None,
               None, None, 1e-6, -1, 0.0, cos, sin, None, args["positions"], None, 0, None, None, 1.0, False, False,
               False]  # fmt: skip
    out = torch.ops.posenc.rope_and_cache(*op_args)
    for x, y in zip(out[:4], (a[0], a[1], a[3], a[4])):
        assert same_bits(x, y)
    assert out[4].numel() == 0
    for x, y in zip((q, k, v, kc, vc), ins):
        assert same_bits(x, y), "the out-of-place op modified its inputs"
    # with an FP8 q output (poisoned: the op writes all of it): q's new value is q, q_fp8's the in-place one
    qf = poisoned(q.shape, torch.float8_e4m3fn)
    a = clone_all(q, k, v, kc, vc, qf)
    pk.rope_and_cache_(*a[:5], cos, sin, q_fp8=a[5], q_scale=0.5, **args)
    op_args[5], op_args[14] = qf, 0.5  # q_fp8, q_scale_value
    out = torch.ops.posenc.rope_and_cache(*op_args)
    for x, y in zip(out, (a[0], a[1], a[3], a[4], a[5])):
        assert same_bits(x, y)
    assert same_bits(out[0], q) and same_bits(qf, poisoned(q.shape, torch.float8_e4m3fn))


def test_mla_latent_cache(backend):
    T, H, R, L = 3, 4, 16, 32
    q = torch.randn(T, H, 24 + R, device=DEVICE)
    q_pe, k_pe, kv_c = q[..., 24:], torch.randn(T, R, device=DEVICE), torch.randn(T, L, device=DEVICE)
    cache = torch.full((2, 4, L + R), float("nan"), device=DEVICE)
    cos, sin = angles(R)
    slots, pos = torch.tensor([6, -1, 1], device=DEVICE), torch.tensor([7, 8, 9], device=DEVICE)
    q0, k0, cache0 = q.clone(), k_pe.clone(), cache.clone()
    pk.mla_rope_and_cache_(q_pe, k_pe, kv_c, cache, cos, sin, slot_mapping=slots, positions=pos)
    qr, kr = pk.apply_rope(q0[..., 24:], k0[:, None], cos, sin, positions=pos, interleaved=True)
    assert torch.equal(q[..., 24:], qr) and torch.equal(q[..., :24], q0[..., :24]) and torch.equal(k_pe, kr[:, 0])
    assert torch.equal(cache[1, 2], torch.cat([kv_c[0], k_pe[0]]))
    assert torch.equal(cache[0, 1], torch.cat([kv_c[2], k_pe[2]]))
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1, 2] = keep[0, 1] = False
    assert torch.equal(bits(cache[keep]), bits(cache0[keep]))
