"""apply_rope / apply_rope_: values against the float64 reference (dtype-tied tolerance) for model
configs, shapes, layouts, position modes and strided views; the frequency and cos/sin table helpers.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref
from posenc_kernels.configs import MODEL_CONFIGS

from conftest import DEVICE, DTYPES, assert_dtype_tolerance, max_err
from .common import make_qk, tables, check_rope

NATIVE_OP = "rope_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(MODEL_CONFIGS.values()), ids=lambda c: c.name)
def test_model_configs(backend, config, dtype):
    q, k = make_qk(2, 13, config.num_heads_q, config.num_heads_kv, config.head_dim, dtype)
    cos, sin = tables(64, config.rotary_dim, base=config.rope_theta)
    check_rope(q, k, cos, sin, inplace=True, interleaved=config.interleaved, offsets=5, what=config.name)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    "B,S,Hq,Hk,D,R",
    [
        (2, 13, 4, 2, 80, 80),  # head_dim 80, odd seq
        (3, 1, 4, 1, 64, 64),  # decode: seq 1, MQA
        (1, 13, 3, 3, 64, 16),  # partial rotary 0.25
        (2, 7, 5, 1, 64, 32),  # partial rotary 0.5, odd head count
        (1, 6, 2, 0, 32, 32),  # k = None
        (1, 5, 1, 1, 16, 2),  # a single rotary pair
        (2, 5, 1, 4, 32, 16),  # more k heads than q heads, partial rotary
        (2, 5, 0, 2, 32, 16),  # no q heads at all, partial rotary (out of place must still copy k's tail)
    ],
)
def test_shapes_and_layouts(backend, B, S, Hq, Hk, D, R, interleaved, inplace):
    for dtype in (torch.float32, torch.bfloat16):
        q, k = make_qk(B, S, Hq, Hk, D, dtype)
        cos, sin = tables(S + 3, R)
        check_rope(q, k, cos, sin, inplace=inplace, interleaved=interleaved, what=f"{dtype}")


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("mode", ["int_offset", "batch_offsets", "positions_2d", "positions_1d", "positions_int32"])
def test_position_modes(backend, mode, inplace):
    B, S = 3, 9
    q, k = make_qk(B, S, 4, 2, 32, torch.float16)
    cos, sin = tables(40, 32, dtype=torch.bfloat16)  # tables of another float dtype than q
    kw = {
        "int_offset": dict(offsets=17),
        "batch_offsets": dict(offsets=torch.tensor([0, 30, 7], device=DEVICE)),
        "positions_2d": dict(positions=torch.randint(0, 40, (B, S), device=DEVICE)),
        "positions_1d": dict(positions=torch.randperm(40, device=DEVICE)[:S]),
        "positions_int32": dict(positions=torch.randint(0, 40, (B, S), device=DEVICE, dtype=torch.int32)),
    }[mode]
    check_rope(q, k, cos, sin, inplace=inplace, what=mode, **kw)


def test_non_contiguous_views_rotate_storage_in_place(backend):
    """HF [B, H, S, D] tensors passed as .transpose(1, 2): rotated in their own storage, no copy."""
    q, k = make_qk(2, 11, 4, 2, 64, torch.bfloat16, hf_layout=True)
    assert not q.is_contiguous()
    cos, sin = tables(11, 64)
    q_base, k_base = q.transpose(1, 2), k.transpose(1, 2)  # the HF-layout tensors
    ptr_q, ptr_k = q.data_ptr(), k.data_ptr()
    expect_q, expect_k = ref.rope_hf_eager(q, k, cos, sin)
    truth_q, truth_k = ref.rope_reference(q, k, cos, sin)
    pk.apply_rope_(q, k, cos, sin)
    assert q.data_ptr() == ptr_q and k.data_ptr() == ptr_k
    assert_dtype_tolerance(q_base.transpose(1, 2), truth_q, expect_q, what="q via storage")
    assert_dtype_tolerance(k_base.transpose(1, 2), truth_k, expect_k, what="k via storage")


def test_strided_tokens_and_heads(backend):
    """Gaps between tokens and between heads (a slice of a wider buffer) are honoured."""
    buf = torch.randn(2, 10, 12, 48, device=DEVICE)
    q = buf[:, ::2, 1:9:2, :32]  # stride over S, over heads, and a D slice with stride(-1) == 1
    k = buf[:, 1::2, 9:11, 16:48]
    before = buf.clone()
    cos, sin = tables(5, 32)
    truth_q, truth_k = ref.rope_reference(q, k, cos, sin)
    eager_q, eager_k = ref.rope_hf_eager(q, k, cos, sin)
    pk.apply_rope_(q, k, cos, sin)
    assert_dtype_tolerance(q, truth_q, eager_q)
    assert_dtype_tolerance(k, truth_k, eager_k)
    touched = torch.zeros_like(buf, dtype=torch.bool)
    touched[:, ::2, 1:9:2, :32] = True
    touched[:, 1::2, 9:11, 16:48] = True
    assert torch.equal(buf[~touched], before[~touched]), "elements outside q and k were written"


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_strides_in_place_without_copy(backend, dtype, interleaved):
    """Any strides, the channel dimension's too (TransformerEngine passes such inputs): rotated in place in
    the caller's storage, never through a copy; tables with a column stride as well."""
    buf = torch.randn(2, 5, 3, 64, device=DEVICE, dtype=dtype)
    q = buf[..., ::2]  # stride(-1) == 2
    kbuf = torch.randn(2, 5, 32, 2, device=DEVICE, dtype=dtype)
    k = kbuf[..., 0].unsqueeze(2).transpose(2, 3).squeeze(3).unsqueeze(2)[:, :, :, :]  # [2, 5, 1, 32], stride(-1) 2
    assert q.stride(-1) == 2 and k.stride(-1) == 2
    cos_wide, sin_wide = tables(5, 32)
    cos = torch.stack([cos_wide, cos_wide], -1)[..., 0]  # column stride 2
    sin = torch.stack([sin_wide, sin_wide], -1)[..., 0]
    truth_q, truth_k = ref.rope_reference(q, k, cos_wide, sin_wide, interleaved=interleaved)
    eager_q, eager_k = ref.rope_hf_eager(q, k, cos_wide, sin_wide, interleaved=interleaved)
    untouched = buf[..., 1::2].clone()
    ptr = q.data_ptr()
    pk.apply_rope_(q, k, cos, sin, interleaved=interleaved)
    assert q.data_ptr() == ptr
    assert_dtype_tolerance(q, truth_q, eager_q, what="q")
    assert_dtype_tolerance(k, truth_k, eager_k, what="k")
    assert torch.equal(buf[..., 1::2], untouched), "channels between q's were written"
    q2, _ = pk.apply_rope(buf[..., ::2], None, cos, sin, interleaved=interleaved)
    assert_dtype_tolerance(q2, ref.rope_reference(buf[..., ::2], None, cos_wide, sin_wide, interleaved=interleaved)[0],
                           ref.rope_hf_eager(buf[..., ::2], None, cos_wide, sin_wide, interleaved=interleaved)[0])


def test_packed_qkv_views(backend):
    """q and k as disjoint head slices of one projection buffer; v untouched."""
    B, S, Hq, Hk, D = 2, 5, 4, 2, 32
    qkv = torch.randn(B, S, Hq + 2 * Hk, D, device=DEVICE)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hk], qkv[:, :, Hq + Hk :]
    v0 = v.clone()
    cos, sin = tables(S, D)
    check_rope(q, k, cos, sin, inplace=True)
    assert torch.equal(v, v0)


@pytest.mark.parametrize("shape", [(0, 5, 2, 16), (2, 0, 2, 16), (2, 3, 0, 16)])
def test_empty_is_noop(backend, shape):
    q = torch.randn(*shape, device=DEVICE)
    k = torch.randn(shape[0], shape[1], 1, 16, device=DEVICE)
    cos, sin = tables(4, 16)
    q2, k2 = pk.apply_rope_(q, k, cos, sin)
    assert q2.shape == q.shape
    out_q, out_k = pk.apply_rope(q, k, cos, sin)
    assert out_q.shape == q.shape and out_k.shape == k.shape


def test_inverse_rotation_roundtrip(backend):
    q, k = make_qk(2, 7, 4, 2, 64, torch.float32)
    q0, k0 = q.clone(), k.clone()
    cos, sin = tables(7, 64)
    torch.ops.posenc.rope_(q, k, cos, sin, None, None, None, 0, None, None, 1.0, False, False, False)
    torch.ops.posenc.rope_(q, k, cos, sin, None, None, None, 0, None, None, 1.0, False, True, False)
    assert max_err(q, q0) < 1e-5 and max_err(k, k0) < 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_of_place_writes_every_element(backend, dtype, interleaved):
    """NaN-poisoned outputs: every element (rotary and pass-through) must be written."""
    q, k = make_qk(2, 5, 3, 1, 48, dtype)
    cos, sin = tables(5, 16)
    real_empty_like = torch.empty_like

    def poisoned(t, *a, **kw):  # the op allocates its outputs: poison them
        return real_empty_like(t, *a, **kw).fill_(float("nan"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty_like", poisoned)
        q_out, k_out = pk.apply_rope(q, k, cos, sin, interleaved=interleaved)
    truth_q, truth_k = ref.rope_reference(q, k, cos, sin, interleaved=interleaved)
    eager_q, eager_k = ref.rope_hf_eager(q, k, cos, sin, interleaved=interleaved)
    assert_dtype_tolerance(q_out, truth_q, eager_q)
    assert_dtype_tolerance(k_out, truth_k, eager_k)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("R,base", [(128, 10000.0), (64, 500000.0), (2, 10000.0), (80, 1e6)])
def test_rope_frequencies_nearest_fp32(R, base):
    inv = pk.rope_frequencies(R, base)[0]
    truth = ref.rope_frequencies_reference(R, base)
    assert inv.dtype == torch.float32 and inv.shape == (R // 2,)
    assert torch.equal(inv, truth.to(torch.float32)), "not the fp32 value nearest the exact frequency"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("positions", ["length", "int2d", "float"])
def test_rope_cos_sin(backend, positions, dtype):
    inv = pk.rope_frequencies(48, 10000.0)[0].to(DEVICE)
    pos = {
        "length": 37,
        "int2d": torch.randint(0, 5000, (3, 11), device=DEVICE),
        "float": torch.rand(13, device=DEVICE) * 100,
    }[positions]
    cos, sin = pk.rope_cos_sin(pos, inv, attention_factor=1.25, dtype=dtype)
    p = torch.arange(pos, device=DEVICE) if isinstance(pos, int) else pos
    assert cos.shape == p.shape + (24,) and cos.dtype == dtype
    # Truth: the exact angle of the fp32 position and the given fp32 inv_freq.
    truth_cos, truth_sin = ref.rope_cos_sin_reference(p.to(torch.float32), inv, 1.25)
    angle32 = p.to(torch.float32)[..., None] * inv
    eager_cos = (angle32.cos() * 1.25).to(dtype)
    eager_sin = (angle32.sin() * 1.25).to(dtype)
    assert_dtype_tolerance(cos, truth_cos, eager_cos, what="cos")
    assert_dtype_tolerance(sin, truth_sin, eager_sin, what="sin")


@pytest.mark.parametrize("half", [1, 8, 20, 32, 40, 64, 128])
@pytest.mark.parametrize("tail", [0, 16, 48, 192])
def test_block_heuristic_powers_of_two(half, tail):
    import posenc_kernels.ops.rope.kernel as rk

    for heads_q, heads_k in [(32, 8), (3, 3), (8, 1), (28, 4), (1, 0)]:
        for seqlen in (1, 13, 4096):
            for tile in (rk.ROPE_TILE, rk.ROPE_TILE_ANGLES, rk.ROPE_TILE_AXES):
                bh, bt_, h, t, w = rk.rope_blocks(half, tail, heads_q, heads_k, seqlen, tile)
                for v in (bh, h, t, w) + ((bt_,) if tail else ()):
                    assert v & (v - 1) == 0, (half, tail, heads_q, heads_k, seqlen)
                assert bh >= half and (not tail or bt_ >= tail)
                # a program's tokens lie in one sequence: never more rows than the sequence has (decode: 1)
                assert t <= max(1, seqlen) * 2 and t <= 16 and 1 <= w <= 8
                assert t * h * (2 * bh + bt_) <= max(tile[0], 2 * bh + bt_), "tile too large"
                if seqlen == 1 and heads_q == 32 and heads_k == 8 and half == 64 and tile == rk.ROPE_TILE:
                    assert (t, h, w) == (1, 8, 1), "Llama-3-8B decode: one token x 8 heads per program, 1 warp"
