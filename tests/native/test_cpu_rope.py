"""The native CPU RoPE kernel: values for model configs, layouts, position sources, conjugate, table
dtypes, one-buffer q/k, channel strides, out-of-table rows, empty input, value-check messages, and the
public API, gradients and compile on the native backend.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels import reference as ref
from posenc_kernels.configs import MODEL_CONFIGS
from posenc_kernels.ops.rope.op import check_rope

from conftest import assert_dtype_tolerance, max_err
from .native_common import *  # noqa: F401,F403  (the shared helpers: native_common.__all__)


pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"native extension unavailable: {_native.load_error()}")


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("config", list(MODEL_CONFIGS.values()), ids=lambda c: c.name)
def test_model_configs(config, dtype):
    q, k = make(2, 13, config.num_heads_q, config.num_heads_kv, config.head_dim, dtype)
    cos, sin = tables(20, config.rotary_dim)
    check(q, k, cos, sin, inplace=True, offsets=3, interleaved=config.interleaved, what=config.name)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("D,R", [(128, 128), (80, 80), (96, 64), (64, 6), (130, 34)])
def test_layouts(D, R, dtype, interleaved, inplace):
    """Head dims around the vector width (tails), partial rotary (pass-through copied out of place), GQA,
    an HF-transposed q and a contiguous k."""
    q, _ = make(2, 7, 5, 0, D, dtype, hf_layout=True)
    _, k = make(2, 7, 0, 2, D, dtype)
    cos, sin = tables(16, R)
    check(q, k, cos, sin, inplace=inplace, offsets=4, interleaved=interleaved, what=f"D={D} R={R}")


@pytest.mark.parametrize("idx", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("mode", ["positions_bs", "positions_s", "offsets", "strided_positions"])
def test_position_sources(mode, idx):
    B, S = 3, 9
    q, k = make(B, S, 4, 2, 64, torch.float32)
    cos, sin = tables(40, 64)
    positions, offsets = None, 0
    if mode == "positions_bs":
        positions = torch.randint(0, 40, (B, S), dtype=idx)
    elif mode == "positions_s":
        positions = torch.randint(0, 40, (S,), dtype=idx)
    elif mode == "strided_positions":
        positions = torch.randint(0, 40, (S, B), dtype=idx).t()  # [B, S] with strides (1, B)
    else:
        offsets = torch.tensor([0, 5, 31], dtype=idx)
    check(q, k, cos, sin, inplace=True, positions=positions, offsets=offsets, what=mode)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_conjugate_inverts(interleaved):
    q, k = make(2, 5, 3, 1, 32, torch.float64)
    cos, sin = ref.rope_cos_sin_reference(torch.arange(8), ref.rope_frequencies_reference(32))  # cos^2+sin^2=1
    check(q.clone(), k.clone(), cos, sin, inplace=False, conjugate=True, interleaved=interleaved)
    q2, k2 = run_native(q.clone(), k.clone(), cos=cos, sin=sin, interleaved=interleaved)
    run_native(q2, k2, cos=cos, sin=sin, interleaved=interleaved, conjugate=True)
    assert max_err(q2, q) < 1e-12 and max_err(k2, k) < 1e-12


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_table_dtypes_and_row_stride(table_dtype):
    """Tables of any float dtype are used as they are; a row stride other than R/2 (a column slice)."""
    q, k = make(1, 6, 2, 1, 32, torch.float32)
    wide_c, wide_s = tables(10, 64, dtype=table_dtype)
    cos, sin = wide_c[:, :16], wide_s[:, :16]  # row stride 32, R/2 = 16
    assert cos.stride() == (32, 1)
    check(q, k, cos, sin, inplace=False)
    check(q, k, wide_c.t().contiguous().t()[:, :16], wide_s.t().contiguous().t()[:, :16], inplace=False,
          what="column-major tables")  # fmt: skip


def test_qk_in_one_buffer():
    """q and k as head slices of one packed QKV buffer, rotated in place."""
    qkv = torch.randn(2, 5, 4 + 2 + 2, 64)
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]
    v0 = qkv[:, :, 6:].clone()
    cos, sin = tables(5, 64)
    check(q, k, cos, sin, inplace=True)
    assert torch.equal(qkv[:, :, 6:], v0)


# ---- any strides, the channel stride too (scalar path, in place without a copy)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_channel_strides_in_place(dtype, interleaved):
    """q with channel stride 2 (every other channel of a buffer), k with channel stride 3 and a transposed
    [B, S, D, H] q: rotated in place through their strides - the data pointer unchanged (no copy), the
    neighbouring channels of the buffer untouched; partial rotary leaves the pass-through channels alone."""
    B, S, D, R = 2, 5, 24, 16
    cos, sin = tables(8, R)
    qbuf = torch.randn(B, S, 3, 2 * D, dtype=dtype)
    kbuf = torch.randn(B, S, 2, 3 * D, dtype=dtype)
    q, k = qbuf[..., ::2], kbuf[..., 1::3]
    assert q.stride(-1) == 2 and k.stride(-1) == 3
    qbuf0, kbuf0 = qbuf.clone(), kbuf.clone()
    ptrs = (q.data_ptr(), k.data_ptr())
    check(q, k, cos, sin, inplace=True, offsets=1, interleaved=interleaved, what="channel strides")
    assert (q.data_ptr(), k.data_ptr()) == ptrs
    assert torch.equal(qbuf[..., 1::2], qbuf0[..., 1::2]), "q's neighbouring channels were written"
    assert torch.equal(kbuf[..., 0::3], kbuf0[..., 0::3]) and torch.equal(kbuf[..., 2::3], kbuf0[..., 2::3])
    qt = torch.randn(B, S, D, 3, dtype=dtype).transpose(-1, -2)  # [B, S, H, D] with strides (.., 1, 3)
    assert qt.stride(-1) == 3
    check(qt, None, cos, sin, inplace=True, interleaved=interleaved, what="transposed channels")
    check(qt, None, cos, sin, inplace=False, interleaved=interleaved, what="transposed channels out of place")
    check(q, k, cos, sin, inplace=False, interleaved=interleaved, what="channel strides out of place")


def test_out_of_table_rows_are_nan():
    """With value checks off the kernel never reads outside the table: such tokens come out NaN (this is
    the last line of defence; with checks on the op raises, see test_value_check_messages)."""
    q, k = make(1, 4, 2, 1, 16, torch.float32)
    cos, sin = tables(8, 8)  # partial: pass-through channels stay finite
    positions = torch.tensor([[0, 8, -1, 7]])
    bad = torch.tensor([False, True, True, False])
    with value_checks_off():
        out_q, out_k = run_native(q, k, cos=cos, sin=sin, positions=positions, inplace=False)
        for out, x in ((out_q, q), (out_k, k)):
            assert torch.isnan(out[0, bad, :, :8]).all()
            assert not torch.isnan(out[0, ~bad]).any()
            assert torch.equal(out[..., 8:], x[..., 8:])
        q2 = q.clone()
        run_native(q2, None, cos=cos, sin=sin, positions=positions)  # in place too
        assert torch.isnan(q2[0, bad, :, :8]).all() and not torch.isnan(q2[0, ~bad]).any()
        # offsets [B] past the end
        qb = torch.randn(2, 4, 2, 16)
        out, _ = run_native(qb, None, cos=cos, sin=sin, offsets=torch.tensor([0, 6]), inplace=False)
        assert not torch.isnan(out[0]).any() and not torch.isnan(out[1, :2]).any()
        assert torch.isnan(out[1, 2:, :, :8]).all()
        # cu_seqlens with offsets past the end
        qp = torch.randn(7, 2, 16)
        out, _ = run_native(qp, None, cos=cos, sin=sin, cu_seqlens=torch.tensor([0, 3, 7]),
                            offsets=torch.tensor([0, 100]), inplace=False)  # fmt: skip
        assert not torch.isnan(out[:3]).any() and torch.isnan(out[3:, :, :8]).all()
        # an axis map pointing outside positions' axes, and positions outside the table
        am = torch.zeros(4, dtype=torch.long)
        am[3] = 5  # 2 axes only
        pos = torch.zeros(2, 1, 4, dtype=torch.long)
        out, _ = run_native(q, None, cos=cos, sin=sin, positions=pos, axis_map=am, inplace=False)
        assert torch.isnan(out[..., [3, 7]]).all() and not torch.isnan(out[..., [0, 1, 2, 4, 5, 6]]).any()
        pos[1, 0, 2] = 99
        out, _ = run_native(q, None, cos=cos, sin=sin, positions=pos, axis_map=torch.tensor([0, 1, 1, 0]),
                            inplace=False)  # fmt: skip
        assert torch.isnan(out[0, 2, :, [1, 2, 5, 6]]).all()
        assert not torch.isnan(out[0, 2, :, [0, 3, 4, 7]]).any() and not torch.isnan(out[0, [0, 1, 3]]).any()
        # an int offset needs no value read: refused even with value checks off (as by the Python check)
        with pytest.raises(ValueError, match=r"offsets=6 with seqlen 4 needs table rows \[6, 10\)"):
            run_native(q, None, cos=cos, sin=sin, offset=6, inplace=False)


def test_empty():
    cos, sin = tables(4, 8)
    for shape in [(0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 0, 8), (0, 2, 8), (3, 0, 8)]:
        q = torch.randn(shape)
        run_native(q, None, cos=cos, sin=sin, inplace=True)
        out, _ = run_native(q, None, cos=cos, sin=sin, inplace=False)
        assert out.shape == q.shape
    run_native(torch.randn(0, 2, 8), torch.randn(0, 1, 8), cos=cos, sin=sin, cu_seqlens=torch.tensor([0, 0]))


# ---------------------------------------------------------------------------------------------
# Value checks: the Python check's exact messages (ValueError), before anything is written
# ---------------------------------------------------------------------------------------------


def _value_cases():
    cos, sin = tables(8, 16)
    inv = pk.rope_frequencies(16)[0]
    q4, k4 = lambda: torch.randn(2, 3, 4, 16), lambda: torch.randn(2, 3, 2, 16)  # noqa: E731
    qp, kp = lambda: torch.randn(7, 4, 16), lambda: torch.randn(7, 2, 16)  # noqa: E731
    t = dict(cos=cos, sin=sin)
    yield "positions_above", q4, k4, dict(t, positions=torch.tensor([[0, 8, 1], [2, 3, 4]]))
    yield "positions_negative", q4, k4, dict(t, positions=torch.tensor([-1, 0, 1], dtype=torch.int32))
    yield "offsets_tensor", q4, k4, dict(t, offsets=torch.tensor([0, 6]))
    yield "offsets_negative", q4, k4, dict(t, offsets=torch.tensor([-2, 0]))
    yield "offset_int", q4, k4, dict(t, offset=6)
    yield "offset_negative", q4, k4, dict(t, offset=-1)
    yield "cu_not_zero", qp, kp, dict(t, cu_seqlens=torch.tensor([1, 3, 7]))
    yield "cu_decreasing", qp, kp, dict(t, cu_seqlens=torch.tensor([0, 4, 2]))
    yield "cu_exceeds", qp, kp, dict(t, cu_seqlens=torch.tensor([0, 3, 9]))
    yield "cu_rows", qp, kp, dict(t, cu_seqlens=torch.tensor([0, 3, 7]), offsets=torch.tensor([0, 5]))
    yield "cu_offset_int", qp, kp, dict(t, cu_seqlens=torch.tensor([0, 3, 7]), offset=6)
    yield "cu_on_the_fly", qp, kp, dict(inv_freq=inv, cu_seqlens=torch.tensor([0, 8]))
    empty_c, empty_s = cos[:0], sin[:0]
    yield "cu_padded_empty_table", qp, kp, dict(cos=empty_c, sin=empty_s, cu_seqlens=torch.tensor([0, 0]))
    am = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])  # 3 axes: 3 is outside
    pos3 = torch.zeros(3, 2, 3, dtype=torch.long)
    yield "axis_map_above", q4, k4, dict(t, positions=pos3, axis_map=am)
    yield "axis_map_negative", q4, k4, dict(inv_freq=inv, positions=pos3, axis_map=am - 1)
    big = pos3.clone()
    big[2, 1, 1] = 8
    yield "axis_positions", q4, k4, dict(t, positions=big, axis_map=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))


@pytest.mark.parametrize("inplace", [True, False], ids=["rope_", "rope"])
@pytest.mark.parametrize("case,make_q,make_k,kw", list(_value_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_value_check_messages(case, make_q, make_k, kw, inplace):
    """The C++ kernel refuses bad values with a ValueError whose message is the Python check's, character
    for character (so eager and compiled code, native and Python backends raise alike), and writes nothing."""
    q, k = make_q(), make_k()
    args = op_args(**kw)
    with pytest.raises(ValueError) as py:
        check_rope(q, k, *args, values=True, inplace=inplace)
    q0, k0 = q.clone(), k.clone()
    with pytest.raises(ValueError) as cpp:
        (rope_ if inplace else rope)(q, k, *args)
    assert str(cpp.value) == str(py.value)
    assert torch.equal(q, q0) and torch.equal(k, k0), "an error must leave the inputs unchanged"


# ---------------------------------------------------------------------------------------------
# The public API on the native backend: values, gradients, compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_apply_rope_native_backend(native_backend, no_python_kernels, dtype, interleaved):
    q, k = make(2, 6, 4, 2, 48, dtype, hf_layout=True)
    cos, sin = tables(10, 32)
    offsets = torch.tensor([0, 4])
    truth_q, truth_k = ref.rope_reference(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    eager_q, eager_k = ref.rope_hf_eager(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    out_q, out_k = pk.apply_rope(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    assert_dtype_tolerance(out_q, truth_q, eager_q, what="apply_rope q")
    assert_dtype_tolerance(out_k, truth_k, eager_k, what="apply_rope k")
    q2, k2 = pk.apply_rope_(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    assert q2 is q and torch.equal(q, out_q) and torch.equal(k, out_k)


def test_public_api_errors_are_the_python_messages(native_backend):
    """The public functions re-raise a native refusal with the op layer's own message."""
    cos, sin = tables(8, 16)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
        pk.apply_rope_(_Q(), None, cos, sin, positions=torch.tensor([0, 1, 8]))
    with pytest.raises(ValueError, match="k must not overlap q"):
        q = _Q()
        pk.apply_rope_(q, q, cos, sin)


def test_gradients_native_backend(native_backend):
    q, k = make(2, 5, 4, 2, 32, torch.float32)
    cos, sin = tables(8, 24)
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    go_q, go_k = torch.randn_like(q), torch.randn_like(k)
    qa, ka = qr * 1.0, kr * 1.0  # non-leaf: in place is allowed
    pk.apply_rope_(qa, ka, cos, sin, offsets=2)
    torch.autograd.backward((qa, ka), (go_q, go_k))
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    tq, tk = ref.rope_reference(q64, k64, cos, sin, offsets=2)
    torch.autograd.backward((tq, tk), (go_q.double(), go_k.double()))
    assert max_err(qr.grad, q64.grad) < 1e-5 and max_err(kr.grad, k64.grad) < 1e-5
    qr.grad = kr.grad = None
    oq, ok = pk.apply_rope(qr, kr, cos, sin, offsets=2)
    torch.autograd.backward((oq, ok), (go_q, go_k))
    assert max_err(qr.grad, q64.grad) < 1e-5 and max_err(kr.grad, k64.grad) < 1e-5
    qd = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    c64, s64 = tables(3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: pk.apply_rope(x, None, c64, s64)[0], (qd,))
    assert torch.autograd.gradcheck(lambda x: pk.apply_rope_(x * 1.0, None, c64, s64)[0], (qd,))
    qp = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 5])
    assert torch.autograd.gradcheck(lambda x: pk.apply_rope(x, None, c64, s64, cu_seqlens=cu)[0], (qp,))


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_native_backend(native_backend, dynamic):
    q, k = make(1, 7, 4, 2, 32, torch.float32)
    cos, sin = tables(7, 32)

    def f(q, k):
        q = q * 2.0
        k = k + 1.0
        pk.apply_rope_(q, k, cos, sin)
        return q, k

    want = f(q, k)
    got = torch.compile(f, fullgraph=True, dynamic=dynamic)(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
