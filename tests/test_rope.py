"""RoPE: values vs the float64 reference (dtype-tied tolerance), layouts, gradients, ops, compile, errors."""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref
from posenc_kernels.configs import MODEL_CONFIGS

from conftest import DEVICE, DTYPES, assert_dtype_tolerance, max_err


def make_qk(B, S, Hq, Hk, D, dtype, *, hf_layout=False, device=DEVICE):
    """q/k as [B, S, H, D]; with hf_layout they are transposed views of [B, H, S, D] storage."""
    if hf_layout:
        q = torch.randn(B, Hq, S, D, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Hk, S, D, device=device, dtype=dtype).transpose(1, 2) if Hk else None
    else:
        q = torch.randn(B, S, Hq, D, device=device, dtype=dtype)
        k = torch.randn(B, S, Hk, D, device=device, dtype=dtype) if Hk else None
    return q, k


def tables(P, R, *, base=10000.0, dtype=torch.float32, device=DEVICE):
    inv = pk.rope_frequencies(R, base)[0].to(device)
    return pk.rope_cos_sin(P, inv, dtype=dtype)


def check_rope(q, k, cos, sin, *, inplace, what="", **kw):
    """Run apply_rope(_) and compare with the float64 truth under the dtype-tied rule."""
    truth_q, truth_k = ref.rope_reference(q, k, cos, sin, **kw)
    eager_q, eager_k = ref.rope_hf_eager(q, k, cos, sin, **kw)
    q0 = q.clone()
    k0 = k.clone() if k is not None else None
    if inplace:
        out_q, out_k = pk.apply_rope_(q, k, cos, sin, **kw)
        assert out_q is q and out_k is k
    else:
        out_q, out_k = pk.apply_rope(q, k, cos, sin, **kw)
        assert torch.equal(q, q0) and (k is None or torch.equal(k, k0)), "out-of-place op modified its inputs"
    assert out_q.dtype == q0.dtype
    assert_dtype_tolerance(out_q, truth_q, eager_q, what=f"{what} q")
    if k is not None:
        assert_dtype_tolerance(out_k, truth_k, eager_k, what=f"{what} k")
    else:
        assert out_k is None
    R = 2 * cos.shape[-1]
    assert torch.equal(out_q[..., R:], q0[..., R:]), "pass-through channels changed"


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


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
def test_gradients_match_reference_autograd(backend, inplace, interleaved):
    B, S, Hq, Hk, D = 2, 6, 4, 2, 32
    qw = torch.randn(B, S, Hq, D, device=DEVICE, requires_grad=True)
    kw_ = torch.randn(B, S, Hk, D, device=DEVICE, requires_grad=True)
    cos, sin = tables(S + 4, 16)
    offsets = torch.tensor([0, 3], device=DEVICE)
    gq_up, gk_up = torch.randn(B, S, Hq, D, device=DEVICE), torch.randn(B, S, Hk, D, device=DEVICE)

    q, k = qw * 1.0, kw_ * 1.0  # non-leaf, so the in-place form is legal
    fn = pk.apply_rope_ if inplace else pk.apply_rope
    oq, ok = fn(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    gq, gk = torch.autograd.grad((oq, ok), (qw, kw_), (gq_up, gk_up))

    q64, k64 = qw.detach().double().requires_grad_(), kw_.detach().double().requires_grad_()
    rq, rk = ref.rope_reference(q64, k64, cos, sin, offsets=offsets, interleaved=interleaved)
    tq, tk = torch.autograd.grad((rq, rk), (q64, k64), (gq_up.double(), gk_up.double()))
    assert max_err(gq, tq) < 1e-5 and max_err(gk, tk) < 1e-5


def test_gradient_with_hf_layout_views(backend):
    """In-place on transposed views of non-leaf tensors: autograd routes the gradient through the view."""
    x = torch.randn(2, 4, 5, 16, device=DEVICE, requires_grad=True)  # [B, H, S, D]
    y = x * 2.0
    q = y.transpose(1, 2)
    cos, sin = tables(5, 16)
    pk.apply_rope_(q, None, cos, sin)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    r, _ = ref.rope_reference((x.detach().double() * 2).transpose(1, 2).requires_grad_(), None, cos, sin)
    assert max_err(y.detach().transpose(1, 2), r) < 1e-5
    # d/dx of rope(2x) = 2 * R^T g
    expect = 2 * ref.rope_reference(g.transpose(1, 2), None, cos, sin, conjugate=True)[0].transpose(1, 2)
    assert max_err(gx, expect) < 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(backend, interleaved):
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    cos, sin = tables(6, 6, dtype=torch.float64)
    pos = torch.tensor([[4, 0, 2]], device=DEVICE)

    def out_of_place(q, k):
        return pk.apply_rope(q, k, cos, sin, positions=pos, interleaved=interleaved)

    def in_place(q, k):
        return pk.apply_rope_(q * 1.0, k * 1.0, cos, sin, positions=pos, interleaved=interleaved)

    assert torch.autograd.gradcheck(out_of_place, (q, k))
    assert torch.autograd.gradcheck(in_place, (q, k))
    assert torch.autograd.gradgradcheck(out_of_place, (q, k))


def test_inplace_follows_autograd_rules(backend):
    cos, sin = tables(4, 8)
    leaf = torch.randn(1, 4, 2, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        pk.apply_rope_(leaf, None, cos, sin)
    # Version counter: saving a tensor for backward then rotating it in place is caught at backward.
    x = torch.randn(1, 4, 2, 8, device=DEVICE, requires_grad=True)
    y = x * 1.0
    z = (y * y).sum()  # saves y
    v = y._version
    pk.apply_rope_(y, None, cos, sin)
    assert y._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    # Without grad the in-place op bumps the version counter too.
    t = torch.randn(1, 4, 2, 8, device=DEVICE)
    v = t._version
    pk.apply_rope_(t, None, cos, sin)
    assert t._version > v


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


def test_opcheck(backend):
    q, k = make_qk(2, 5, 4, 2, 32, torch.float32)
    cos, sin = tables(8, 16)
    pos = torch.randint(0, 8, (2, 5), device=DEVICE)
    offs = torch.tensor([1, 3], device=DEVICE)
    for args in [
        (q.clone(), k.clone(), cos, sin, None, None, None, 2, None, None, 1.0, False, False, False),
        (q.clone(), None, cos, sin, None, pos, None, 0, None, None, 1.0, True, False, False),
        (q.clone(), k.clone(), cos, sin, None, None, offs, 0, None, None, 1.0, False, True, False),
    ]:
        torch.library.opcheck(torch.ops.posenc.rope_.default, args)
    qg = q.clone().requires_grad_()
    torch.library.opcheck(torch.ops.posenc.rope.default, (qg, k.clone().requires_grad_(), cos, sin, None, pos, None, 0, None, None, 1.0, True, False, False))
    torch.library.opcheck(torch.ops.posenc.rope.default, (qg, None, cos, sin, None, None, offs, 0, None, None, 1.0, False, False, False))
    inv = pk.rope_frequencies(16)[0].to(DEVICE)
    torch.library.opcheck(torch.ops.posenc.rope_cos_sin.default, (pos, inv, 1.0, torch.bfloat16))


def _attention_block(q, k, cos, sin, offsets):
    q = q * 1.0
    k = k * 1.0
    pk.apply_rope_(q, k, cos, sin, offsets=offsets)
    q2, k2 = pk.apply_rope(q, k, cos, sin, offsets=offsets, interleaved=True)
    return torch.einsum("bshd,bthd->bhst", q2[:, :, :2], k2.expand(-1, -1, 2, -1))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    q = torch.randn(2, 5, 4, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 5, 1, 32, device=DEVICE, requires_grad=True)
    cos, sin = tables(9, 32)
    offs = torch.tensor([0, 4], device=DEVICE)
    eager = _attention_block(q, k, cos, sin, offs)
    g = torch.randn_like(eager)
    ge = torch.autograd.grad(eager, (q, k), g)
    compiled = torch.compile(_attention_block, fullgraph=True, backend=compile_backend)
    out = compiled(q, k, cos, sin, offs)
    gc = torch.autograd.grad(out, (q, k), g)
    assert max_err(out, eager) < 1e-5
    assert max_err(gc[0], ge[0]) < 1e-5 and max_err(gc[1], ge[1]) < 1e-5
    # Inference path (no grad): the mutating op under functionalization.
    with torch.no_grad():
        assert max_err(compiled(q, k, cos, sin, offs), eager) < 1e-5


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, raised before anything is written
# ---------------------------------------------------------------------------------------------


def _bad_cases():
    q = lambda: torch.randn(2, 4, 3, 16, device=DEVICE)  # noqa: E731
    k = lambda: torch.randn(2, 4, 1, 16, device=DEVICE)  # noqa: E731
    cos, sin = tables(6, 16)
    other = torch.device("meta")
    return {
        "q_int": (lambda: dict(q=q().to(torch.int32)), TypeError, "q must have dtype"),
        "q_rank": (lambda: dict(q=torch.randn(4, 16, device=DEVICE)), ValueError, "q must have 3 or 4 dimensions"),
        "k_dtype": (lambda: dict(k=k().half()), TypeError, "k must have the same dtype as q"),
        "k_shape": (lambda: dict(k=torch.randn(2, 5, 1, 16, device=DEVICE)), ValueError, "k must be"),
        "k_device": (lambda: dict(k=torch.randn(2, 4, 1, 16, device=other)), ValueError, "k must be on the same device"),
        "k_alias": (lambda: {"alias": True}, ValueError, "k must not overlap q"),
        "q_expanded": (
            lambda: dict(q=torch.randn(2, 4, 1, 16, device=DEVICE).expand(2, 4, 3, 16)),
            ValueError,
            "q has internally overlapping memory",
        ),
        "cos_int": (lambda: dict(cos=cos.to(torch.int64)), TypeError, "cos must have dtype"),
        "cos_rank": (lambda: dict(cos=cos[None]), ValueError, "cos must have 2 dimensions"),
        "sin_shape": (lambda: dict(sin=sin[:, :4]), ValueError, "cos and sin must have the same shape"),
        "cos_device": (lambda: dict(cos=cos.to(other), sin=sin.to(other)), ValueError, "cos must be on the same device"),
        "R_gt_D": (lambda: dict(cos=tables(6, 32)[0], sin=tables(6, 32)[1]), ValueError, "exceeds head_dim"),
        "R_zero": (lambda: dict(cos=cos[:, :0], sin=sin[:, :0]), ValueError, "R/2 >= 1"),
        "positions_float": (lambda: dict(positions=torch.zeros(2, 4, device=DEVICE)), TypeError, "positions must be an integer"),
        "positions_bool": (
            lambda: dict(positions=torch.zeros(2, 4, device=DEVICE, dtype=torch.bool)),
            TypeError,
            "positions must be an integer",
        ),
        "positions_shape": (
            lambda: dict(positions=torch.zeros(4, 2, device=DEVICE, dtype=torch.long)),
            ValueError,
            r"positions must have shape \[S\]",
        ),
        "positions_range_hi": (
            lambda: dict(positions=torch.tensor([0, 1, 2, 6], device=DEVICE)),
            ValueError,
            r"positions must lie in \[0, 6\)",
        ),
        "positions_range_lo": (
            lambda: dict(positions=torch.tensor([[0, 1, 2, 3], [0, -1, 0, 0]], device=DEVICE)),
            ValueError,
            r"positions must lie in",
        ),
        "offset_range": (lambda: dict(offsets=3), ValueError, "offsets=3 with seqlen 4"),
        "offset_negative": (lambda: dict(offsets=-1), ValueError, "offsets=-1"),
        "offsets_tensor_range": (
            lambda: dict(offsets=torch.tensor([0, 3], device=DEVICE)),
            ValueError,
            "offsets \\+ seqlen must stay within",
        ),
        "offsets_float": (lambda: dict(offsets=torch.zeros(2, device=DEVICE)), TypeError, "offsets must be an int"),
        "offsets_shape": (lambda: dict(offsets=torch.zeros(3, device=DEVICE, dtype=torch.long)), ValueError, r"offsets must have shape \[B\]"),
        "offsets_py_float": (lambda: dict(offsets=1.5), TypeError, "offsets must be an int"),
        "both": (
            lambda: dict(positions=torch.zeros(4, device=DEVICE, dtype=torch.long), offsets=1),
            ValueError,
            "pass positions or offsets, not both",
        ),
    }, q, k, cos, sin


INPLACE_ONLY = {"k_alias", "q_expanded"}  # reading through aliased or expanded views is fine
BAD = [(c, True) for c in _bad_cases()[0]] + [(c, False) for c in _bad_cases()[0] if c not in INPLACE_ONLY]


@pytest.mark.parametrize("case,inplace", BAD, ids=[f"{c}-{'inplace' if i else 'outofplace'}" for c, i in BAD])
def test_bad_input(backend, case, inplace):
    cases, mk_q, mk_k, cos, sin = _bad_cases()
    make, exc, msg = cases[case]
    over = make()
    args = dict(q=mk_q(), k=mk_k(), cos=cos, sin=sin)
    kw = {}
    for name in ("positions", "offsets"):
        if name in over:
            kw[name] = over.pop(name)
    if over.pop("alias", False):
        args["k"] = args["q"]
    args.update(over)
    snapshot = [t.clone() if isinstance(t, torch.Tensor) and t.device.type != "meta" else None for t in (args["q"], args["k"])]
    fn = pk.apply_rope_ if inplace else pk.apply_rope
    with pytest.raises(exc, match=msg):
        fn(args["q"], args["k"], args["cos"], args["sin"], **kw)
    for before, t in zip(snapshot, (args["q"], args["k"])):
        if before is not None:
            assert torch.equal(before, t), "input changed although the call raised"


def test_rope_frequencies_bad_input():
    with pytest.raises(ValueError, match="rotary_dim must be a positive even int"):
        pk.rope_frequencies(7)[0]
    with pytest.raises(ValueError, match="rotary_dim must be a positive even int"):
        pk.rope_frequencies(0)[0]
    with pytest.raises(TypeError, match="rotary_dim must be an int"):
        pk.rope_frequencies(8.0)[0]
    with pytest.raises(ValueError, match="base must be a positive finite"):
        pk.rope_frequencies(8, base=-1.0)[0]


def test_rope_cos_sin_bad_input():
    inv = pk.rope_frequencies(8)[0].to(DEVICE)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        pk.rope_cos_sin(4, inv, dtype=torch.int32)
    with pytest.raises(ValueError, match="inv_freq must have 1 dimensions"):
        pk.rope_cos_sin(4, inv[None])
    with pytest.raises(TypeError, match="positions_or_length must be an int or a tensor"):
        pk.rope_cos_sin(4.0, inv)
    with pytest.raises(ValueError, match="positions_or_length must be >= 0"):
        pk.rope_cos_sin(-1, inv)


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


def test_unchecked_out_of_table_rows_become_nan():
    """With value checks off (as under CUDA graph capture) the kernel never reads outside the table: a
    token whose row is out of range gets NaN, the others are rotated correctly."""
    from conftest import TRITON_RUNS

    if not TRITON_RUNS:
        pytest.skip("needs the Triton kernels (CUDA or TRITON_INTERPRET=1)")
    q, k = make_qk(1, 4, 2, 1, 16, torch.float32)
    cos, sin = tables(6, 16)
    pos = torch.tensor([0, 9, 5, -1], device=DEVICE)
    good = torch.tensor([0, 0, 5, 0], device=DEVICE)
    truth_q, _ = ref.rope_reference(q, k, cos, sin, positions=good)
    pk.set_value_checks(False)
    try:
        with pk.use_backend("triton"):
            pk.apply_rope_(q, k, cos, sin, positions=pos)
    finally:
        pk.set_value_checks(True)
    assert torch.isnan(q[:, [1, 3]]).all() and torch.isnan(k[:, [1, 3]]).all()
    assert max_err(q[:, [0, 2]], truth_q[:, [0, 2]]) < 1e-5


def _q_k_pairs_sharing_memory():
    buf = torch.randn(2, 5, 6, 16, device=DEVICE)
    yield "partial head overlap", buf[:, :, 0:3], buf[:, :, 2:4]
    buf = torch.randn(2, 5, 6, 16, device=DEVICE)
    yield "k a slice of q", buf, buf[:, :, :1]
    buf = torch.randn(2, 5, 6, 16, device=DEVICE)
    yield "different strides", buf[:, :, 0:4], buf[:, :, 1::2][:, :, :2]  # heads 1 and 3 in both


def test_overlapping_q_k_refused_before_writing(backend):
    cos, sin = tables(8, 16)
    for what, q, k in _q_k_pairs_sharing_memory():
        base = q._base if q._base is not None else q
        before = base.clone()
        with pytest.raises(ValueError, match="k must not overlap q"):
            pk.apply_rope_(q, k, cos, sin)
        assert torch.equal(base, before), what


def test_overlapping_q_k_refused_before_writing_under_grad(backend):
    cos, sin = tables(8, 16)
    x = torch.randn(2, 5, 6, 16, device=DEVICE, requires_grad=True)
    y = x * 1.0
    before = y.detach().clone()
    with pytest.raises(ValueError, match="k must not overlap q"):
        pk.apply_rope_(y[:, :, 0:3], y[:, :, 2:4], cos, sin)
    assert torch.equal(y.detach(), before)


def test_packed_qkv_slices_are_not_overlap(backend):
    qkv = torch.randn(2, 5, 8, 16, device=DEVICE)
    cos, sin = tables(5, 16)
    pk.apply_rope_(qkv[:, :, 0:4], qkv[:, :, 4:6], cos, sin)  # disjoint head ranges: accepted
    x = torch.randn(2, 5, 4, 48, device=DEVICE)
    pk.apply_rope_(x[..., 0:16], x[..., 16:32], cos, sin)  # disjoint channel ranges: accepted


@pytest.mark.parametrize(
    "case", ["leaf_q", "leaf_k", "view_of_leaf", "split_views", "expanded_k"]
)
def test_inplace_autograd_errors_raised_before_writing(backend, case):
    cos, sin = tables(8, 16)
    x = torch.randn(2, 5, 6, 16, device=DEVICE, requires_grad=True)
    if case == "leaf_q":
        q, k = torch.randn(2, 5, 2, 16, device=DEVICE, requires_grad=True), None
        exc, msg = RuntimeError, "leaf Variable that requires grad"
    elif case == "leaf_k":
        q, k = x * 1.0, torch.randn(2, 5, 1, 16, device=DEVICE, requires_grad=True)
        exc, msg = RuntimeError, "k: a leaf Variable"
    elif case == "view_of_leaf":
        q, k = x[:, :, :2], None
        exc, msg = RuntimeError, "view of a leaf Variable"
    elif case == "split_views":
        q, k, _ = (x * 1.0).split([3, 2, 1], dim=2)
        exc, msg = RuntimeError, "multi-output op"
    else:
        q, k = x * 1.0, (torch.randn(2, 5, 1, 16, device=DEVICE) * 1.0).expand(2, 5, 3, 16)
        exc, msg = ValueError, "k has internally overlapping memory"
    snapshot = [t.detach().clone() for t in (q, k) if t is not None]
    with pytest.raises(exc, match=msg):
        pk.apply_rope_(q, k, cos, sin)
    for before, t in zip(snapshot, [t for t in (q, k) if t is not None]):
        assert torch.equal(before, t.detach()), "written although the call raised"


def test_bad_positions_under_grad_write_nothing(backend):
    """Under autograd q and k take one launch each; q's launch checks the shared positions before writing
    anything, so a bad position leaves both untouched."""
    cos, sin = tables(6, 16)
    x = torch.randn(2, 4, 3, 16, device=DEVICE, requires_grad=True)
    q, k = x[:, :, :2] * 1.0, x[:, :, 2:] * 1.0
    before = (q.detach().clone(), k.detach().clone())
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 6\)"):
        pk.apply_rope_(q, k, cos, sin, positions=torch.tensor([0, 1, 2, 6], device=DEVICE))
    assert torch.equal(q.detach(), before[0]) and torch.equal(k.detach(), before[1])
