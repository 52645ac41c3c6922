"""Sinusoidal encodings: every published convention, the fused add, gradients, ops, compile, errors."""

import math

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref
from posenc_kernels.configs import MODEL_CONFIGS
from posenc_kernels.ops.sinusoidal import op as sin_op

from conftest import DEVICE, DTYPES, assert_dtype_tolerance, max_err

NATIVE_OP = "add_sinusoidal_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)

CONV = pk.SINUSOIDAL_CONVENTIONS


def truth_table(pos, dim, **kw):
    """float64 truth for fp32 positions (the kernels take positions to fp32 first, as every source does)."""
    return ref.sinusoidal_table_reference(pos.to(torch.float32), dim, **kw)


# ---------------------------------------------------------------------------------------------
# Published conventions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [512, 64, 6])  # the paper defines even d_model only
def test_transformer_paper(backend, dim):
    length = 300
    ours = pk.sinusoidal_table(length, dim, **CONV["transformer"], device=DEVICE)
    published = ref.published_transformer(length, dim)
    truth = truth_table(torch.arange(length), dim, **CONV["transformer"])
    assert_dtype_tolerance(ours.cpu(), truth, published, what="transformer")


@pytest.mark.parametrize("channels,min_ts,max_ts", [(512, 1.0, 1e4), (33, 1.0, 1e4), (4, 1.0, 1e4), (64, 2.0, 5e3)])
def test_tensor2tensor(backend, channels, min_ts, max_ts):
    length = 257
    # min_timescale != 1: base = max/min, and the angle is scaled by 1/min_timescale... as inv_timescales
    # are multiplied by min_timescale in the source, scale = min_timescale reproduces it.
    kw = dict(**CONV["tensor2tensor"], base=max_ts / min_ts, scale=min_ts)
    ours = pk.sinusoidal_table(length, channels, **kw, device=DEVICE)
    published = ref.published_tensor2tensor(length, channels, min_timescale=min_ts, max_timescale=max_ts)
    truth = truth_table(torch.arange(length), channels, **kw)
    assert_dtype_tolerance(ours.cpu(), truth, published, what="tensor2tensor")


@pytest.mark.parametrize("dim", [1024, 65, 10])
def test_fairseq(backend, dim):
    n = 130
    ours = pk.sinusoidal_table(n, dim, **CONV["fairseq"], device=DEVICE)
    published = ref.published_fairseq(n, dim)
    truth = truth_table(torch.arange(n), dim, **CONV["fairseq"])
    assert_dtype_tolerance(ours.cpu(), truth, published, what="fairseq")


@pytest.mark.parametrize(
    "dim,flip,shift,scale,max_period",
    [(320, True, 0, 1, 10000), (256, False, 1, 1, 10000), (33, True, 1, 1000.0, 10000), (128, False, 0, 1, 5000)],
)
def test_diffusers(backend, dim, flip, shift, scale, max_period):
    t = torch.cat([torch.tensor([0.0, 1.0, 999.0]), torch.rand(20) * 1000])  # float diffusion timesteps
    ours = pk.sinusoidal_table(
        t.to(DEVICE), dim, base=max_period, interleaved=False, cos_first=flip, freq_shift=shift, scale=scale
    )
    published = ref.published_diffusers(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale, max_period=max_period)
    truth = truth_table(t, dim, base=max_period, interleaved=False, cos_first=flip, freq_shift=shift, scale=scale)
    assert_dtype_tolerance(ours.cpu(), truth, published, what="diffusers")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved,cos_first", [(True, False), (True, True), (False, False), (False, True)])
def test_table_layouts_and_dtypes(backend, interleaved, cos_first, dtype):
    pos = torch.tensor([[0, 5, 17], [1023, 2, 70000]], device=DEVICE)  # any shape, large values
    kw = dict(interleaved=interleaved, cos_first=cos_first, base=500.0, freq_shift=0.5)
    ours = pk.sinusoidal_table(pos, 23, dtype=dtype, **kw)
    assert ours.shape == (2, 3, 23) and ours.dtype == dtype
    truth = truth_table(pos, 23, **kw)
    same_in_torch = ref.sinusoidal_table_reference(pos.float(), 23, dtype=torch.float32, **kw).to(dtype)
    assert_dtype_tolerance(ours, truth, same_in_torch)
    assert torch.all(ours[..., -1] == 0), "odd dim: the last column must be zero"


def test_table_empty_and_tiny(backend):
    assert pk.sinusoidal_table(0, 8, device=DEVICE).shape == (0, 8)
    assert pk.sinusoidal_table(torch.empty(0, 3, device=DEVICE), 8).shape == (0, 3, 8)
    one = pk.sinusoidal_table(3, 1, device=DEVICE)  # no frequency at all: the zero column only
    assert torch.equal(one.cpu(), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="device .* must match the positions' device"):
        pk.sinusoidal_table(torch.arange(3), 8, device="meta")


def _launcher(backend):
    """The backend's launcher (the native kernels allocate their own outputs: nothing to poison there)."""
    if backend not in sin_op.LAUNCHERS:
        pytest.skip("the native kernels write outputs they allocate themselves")
    return sin_op.LAUNCHERS[backend]


def test_table_writes_every_element(backend):
    launcher = _launcher(backend)
    for dim, inter in [(9, True), (9, False), (64, True)]:
        out = torch.full((1, 11, dim), float("nan"), device=DEVICE)
        sin_op.run_launcher(launcher, None, out, None, None, 3, 1.0, 10000.0, inter, False, 0.0, 1.0)
        truth = truth_table(torch.arange(3, 14), dim, interleaved=inter)
        assert not torch.isnan(out).any()
        assert max_err(out[0], truth) < 1e-4


# ---------------------------------------------------------------------------------------------
# Fused add
# ---------------------------------------------------------------------------------------------


def check_add(x, *, inplace, what="", **kw):
    truth = ref.add_sinusoidal_reference(x, **kw)
    same_in_torch = ref.add_sinusoidal_reference(x, dtype=torch.float32, **kw).to(x.dtype)
    if x.dtype != torch.float32:  # torch in the input dtype: x * s + PE with PE rounded to x's dtype first
        pe_low = (same_in_torch.float() - x.float() * kw.get("x_scale", 1.0)).to(x.dtype)
        same_in_torch = x * kw.get("x_scale", 1.0) + pe_low
    x0 = x.clone()
    if inplace:
        out = pk.add_sinusoidal_(x, **kw)
        assert out is x
    else:
        out = pk.add_sinusoidal(x, **kw)
        assert torch.equal(x, x0)
    assert out.dtype == x0.dtype and out.shape == x0.shape
    assert_dtype_tolerance(out, truth, same_in_torch, what=what)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", ["llama2-7b", "phi-2"])
def test_add_model_widths(backend, config, dtype, inplace):
    d = MODEL_CONFIGS[config].hidden_size // 8  # scaled down for the interpreter; keeps the odd factors
    x = torch.randn(2, 13, d, device=DEVICE, dtype=dtype)
    check_add(x, inplace=inplace, x_scale=math.sqrt(d), offsets=3)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize(
    "mode", ["offsets_tensor", "positions_2d", "positions_1d", "float_positions", "tokens_2d", "odd_dim", "halves_layout"]
)
def test_add_modes(backend, mode, inplace):
    B, S, D = 3, 7, 24
    x = torch.randn(B, S, D, device=DEVICE)
    kw = {}
    if mode == "offsets_tensor":
        kw = dict(offsets=torch.tensor([0, 100, 5], device=DEVICE))
    elif mode == "positions_2d":
        kw = dict(positions=torch.randint(0, 5000, (B, S), device=DEVICE))
    elif mode == "positions_1d":
        kw = dict(positions=torch.randint(0, 5000, (S,), device=DEVICE, dtype=torch.int32))
    elif mode == "float_positions":
        kw = dict(positions=torch.rand(B, S, device=DEVICE) * 1000, **CONV["diffusers"])
    elif mode == "tokens_2d":
        x = torch.randn(11, D, device=DEVICE)
        kw = dict(offsets=2, **CONV["fairseq"])
    elif mode == "odd_dim":
        x = torch.randn(B, S, 25, device=DEVICE)
        kw = dict(x_scale=0.5, cos_first=True)
    elif mode == "halves_layout":
        kw = dict(interleaved=False, scale=3.0, base=100.0)
    check_add(x, inplace=inplace, what=mode, **kw)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
def test_float64_is_computed_in_float64(backend, inplace):
    """fp64 inputs get fp64 angles: error near fp64 rounding, not fp32's, even at large positions."""
    x = torch.randn(2, 5, 32, dtype=torch.float64, device=DEVICE)
    pos = torch.tensor([3001.0, 12345.5, 7.25, 99999.0, 0.0], dtype=torch.float64, device=DEVICE)
    truth = ref.add_sinusoidal_reference(x, positions=pos, x_scale=1.5)
    out = (pk.add_sinusoidal_ if inplace else pk.add_sinusoidal)(x.clone(), positions=pos, x_scale=1.5)
    assert max_err(out, truth) < 1e-11
    table = pk.sinusoidal_table(pos, 32, dtype=torch.float64)
    assert max_err(table, ref.sinusoidal_table_reference(pos, 32)) < 1e-11


def test_add_inplace_autograd_errors_before_writing(backend):
    leaf = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        pk.add_sinusoidal_(leaf)
    assert torch.equal(leaf.detach(), before)
    a, b = (leaf * 1.0).split([1, 2], dim=1)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="multi-output op"):
        pk.add_sinusoidal_(a)
    assert torch.equal(a.detach(), before)


def test_add_non_contiguous_in_place(backend):
    """[S, B, D] storage passed as .transpose(0, 1), and a token-strided slice: written where they live."""
    base = torch.randn(9, 2, 16, device=DEVICE)
    x = base.transpose(0, 1)
    expect = ref.add_sinusoidal_reference(x.clone())
    pk.add_sinusoidal_(x)
    assert max_err(base.transpose(0, 1), expect) < 1e-5
    buf = torch.randn(2, 10, 40, device=DEVICE)
    before = buf.clone()
    view = buf[:, ::3, 8:32]
    expect = ref.add_sinusoidal_reference(view.clone(), offsets=4)
    pk.add_sinusoidal_(view, offsets=4)
    assert max_err(view, expect) < 1e-5
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[:, ::3, 8:32] = False
    assert torch.equal(buf[mask], before[mask])


def _close(out, truth):
    """Within one ulp of out's dtype (relative) of the float64 truth: one rounding on store."""
    return torch.allclose(out.double(), truth.double(), rtol=torch.finfo(out.dtype).eps, atol=1e-5)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_channel_strided_in_place(backend, interleaved, dtype):
    """A non-unit channel stride (every other channel of a wider buffer, odd D too): written where it
    lives, no copy; the channels in between untouched. Out of place on such a view as well."""
    for D in (12, 9):
        buf = torch.randn(2, 6, 2 * D, device=DEVICE, dtype=dtype)
        before = buf.clone()
        view = buf[..., ::2]
        assert view.stride(-1) == 2
        kw = dict(offsets=torch.tensor([3, 0], device=DEVICE), x_scale=1.5, interleaved=interleaved)
        expect = ref.add_sinusoidal_reference(view.clone(), **kw)
        out = pk.add_sinusoidal(view, **kw)
        assert _close(out, expect)
        ptr = view.data_ptr()
        assert pk.add_sinusoidal_(view, **kw) is view and view.data_ptr() == ptr
        assert _close(view, expect)
        assert torch.equal(buf[..., 1::2], before[..., 1::2]), "channels between the view's were written"
        pos = torch.rand(6, device=DEVICE) * 100  # float positions through the channel-strided path
        view2 = buf[..., 1::2]
        expect = ref.add_sinusoidal_reference(view2.clone(), positions=pos, interleaved=interleaved)
        pk.add_sinusoidal_(view2, positions=pos, interleaved=interleaved)
        assert _close(view2, expect)


def test_add_writes_every_element(backend):
    launcher = _launcher(backend)
    for D, inter in [(17, True), (17, False), (32, True)]:
        x = torch.randn(2, 5, D, device=DEVICE)
        out = torch.full_like(x, float("nan"))
        sin_op.run_launcher(launcher, x, out, None, None, 0, 2.0, 10000.0, inter, False, 0.0, 1.0)
        assert not torch.isnan(out).any()
        assert max_err(out, ref.add_sinusoidal_reference(x, x_scale=2.0, interleaved=inter)) < 1e-5


def test_empty_add(backend):
    for shape in [(0, 4, 8), (2, 0, 8), (0, 8)]:
        x = torch.randn(*shape, device=DEVICE)
        assert pk.add_sinusoidal_(x).shape == shape
        assert pk.add_sinusoidal(x).shape == shape


def test_module(backend):
    enc = pk.SinusoidalPositionalEncoding(16, x_scale=4.0, **CONV["fairseq"])
    x = torch.randn(2, 5, 16, device=DEVICE)
    assert max_err(enc(x), ref.add_sinusoidal_reference(x, x_scale=4.0, **CONV["fairseq"])) < 1e-5
    with pytest.raises(ValueError, match="x must have 16 channels"):
        enc(torch.randn(2, 5, 8))
    assert "freq_shift=1.0" in repr(enc)


# ---------------------------------------------------------------------------------------------
# Autograd, ops, compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
def test_gradients(backend, inplace):
    xw = torch.randn(2, 6, 12, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 6, 12, device=DEVICE)
    x = xw * 1.0
    out = (pk.add_sinusoidal_ if inplace else pk.add_sinusoidal)(x, x_scale=3.0, offsets=2)
    (gx,) = torch.autograd.grad(out, xw, g)
    x64 = xw.detach().double().requires_grad_()
    (tx,) = torch.autograd.grad(ref.add_sinusoidal_reference(x64, x_scale=3.0, offsets=2), x64, g.double())
    assert max_err(gx, tx) < 1e-6


def test_gradcheck_float64(backend):
    x = torch.randn(2, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    pos = torch.tensor([0.5, 3.0, 7.0], dtype=torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(lambda x: pk.add_sinusoidal(x, positions=pos, x_scale=1.5), (x,))
    assert torch.autograd.gradcheck(lambda x: pk.add_sinusoidal_(x * 1.0, x_scale=-2.0, offsets=4), (x,))


def test_inplace_autograd_rules(backend):
    leaf = torch.randn(2, 3, 4, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        pk.add_sinusoidal_(leaf)
    t = torch.randn(2, 3, 4, device=DEVICE)
    v = t._version
    pk.add_sinusoidal_(t)
    assert t._version > v


def test_opcheck(backend):
    x = torch.randn(2, 5, 12, device=DEVICE)
    pos = torch.randint(0, 100, (2, 5), device=DEVICE)
    offs = torch.tensor([3, 9], device=DEVICE)
    torch.library.opcheck(torch.ops.posenc.add_sinusoidal_.default, (x.clone(), pos, None, 0, 2.0, 1e4, True, False, 0.0, 1.0))
    torch.library.opcheck(torch.ops.posenc.add_sinusoidal_.default, (x.clone(), None, offs, 0, 1.0, 1e4, False, True, 1.0, 2.0))
    torch.library.opcheck(
        torch.ops.posenc.add_sinusoidal.default, (x.clone().requires_grad_(), None, None, 7, 2.0, 1e4, True, False, 0.0, 1.0)
    )
    torch.library.opcheck(
        torch.ops.posenc.sinusoidal_table.default, (pos.float(), 0, 9, 1e4, False, True, 1.0, 1.0, torch.float16, DEVICE)
    )
    torch.library.opcheck(
        torch.ops.posenc.sinusoidal_table.default, (None, 7, 8, 1e4, True, False, 0.0, 1.0, torch.float32, DEVICE)
    )


def _embed(x, t):
    h = pk.add_sinusoidal(x, x_scale=2.0, offsets=1)
    h = h * 1.0
    pk.add_sinusoidal_(h, positions=t)
    return h + pk.sinusoidal_table(t, x.shape[-1], **CONV["diffusers"]).to(h.dtype)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    x = torch.randn(2, 4, 16, device=DEVICE, requires_grad=True)
    t = torch.rand(4, device=DEVICE) * 100
    eager = _embed(x, t)
    g = torch.randn_like(eager)
    (ge,) = torch.autograd.grad(eager, x, g)
    out = torch.compile(_embed, fullgraph=True, backend=compile_backend)(x, t)
    (gc,) = torch.autograd.grad(out, x, g)
    assert max_err(out, eager) < 1e-5 and max_err(gc, ge) < 1e-6


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_inplace_on_a_leaf_clone_matches_eager(backend, dynamic):
    """``f(x): add_sinusoidal_(x); return x`` on ``leaf.clone()``, compiled (aot_eager, fullgraph): values
    and the gradient reaching the leaf (x_scale * g) as in eager."""

    def f(x, offs):
        pk.add_sinusoidal_(x, offsets=offs, x_scale=3.0, **CONV["fairseq"])
        return x

    leaf = torch.randn(2, 5, 12, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 5, 12, device=DEVICE)
    offs = torch.tensor([4, 1], device=DEVICE)
    eager_leaf = leaf.detach().clone().requires_grad_()
    want = f(eager_leaf.clone(), offs)
    want.backward(g)
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)(leaf.clone(), offs)
    got.backward(g)
    assert max_err(got, want) < 1e-5
    assert torch.allclose(leaf.grad, eager_leaf.grad) and torch.allclose(leaf.grad, 3.0 * g)


def test_offsets_is_the_keyword(backend):
    """One name per concept: per-sequence start positions are ``offsets`` (as in RoPE); ``offset=`` is gone."""
    x = torch.randn(2, 4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="offset"):
        pk.add_sinusoidal(x, offset=3)
    with pytest.raises(TypeError, match="offset"):
        pk.concat_sinusoidal(x, 4, offset=3)
    enc = pk.SinusoidalPositionalEncoding(8)
    assert max_err(enc(x, offsets=3), ref.add_sinusoidal_reference(x, offsets=3)) < 1e-5
    with pytest.raises(TypeError, match="offsets must be an int or a \\[B\\] integer tensor"):
        pk.add_sinusoidal(x, offsets=1.5)


def test_table_factory_op_routes_by_device(backend):
    """sinusoidal_table without positions has no tensor argument: its BackendSelect kernel picks the
    backend from ``device`` (the override of this thread included), and meta devices get shapes."""
    from posenc_kernels.ops import registry

    assert registry.registered_kernels("sinusoidal_table")["BackendSelect"] == "factory"
    ran = []
    spec = registry.spec("sinusoidal_table")
    impl = spec.impls.get(backend)
    if impl is not None:
        spec.impls[backend] = lambda *a: ran.append(backend) or impl(*a)
    try:
        pe = pk.sinusoidal_table(6, 8, device=DEVICE)
    finally:
        if impl is not None:
            spec.impls[backend] = impl
    assert ran == ([backend] if impl is not None else [])
    assert max_err(pe, truth_table(torch.arange(6), 8)) < 1e-5
    meta = torch.ops.posenc.sinusoidal_table.default(None, 5, 8, 1e4, True, False, 0.0, 1.0, torch.float16, "meta")
    assert meta.device.type == "meta" and meta.shape == (5, 8) and meta.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(dim=2, freq_shift=1.0), ValueError, "divides by zero"),
        (dict(dim=0), ValueError, "dim must be a positive int"),
        (dict(dim=8, base=0.0), ValueError, "base must be a positive finite"),
        (dict(dim=8, dtype=torch.int64), TypeError, "dtype must be a floating dtype"),
        (dict(dim=8, scale=float("inf")), ValueError, "scale must be finite"),
        (dict(dim=8, positions=torch.zeros(3, dtype=torch.bool)), TypeError, "positions must be an integer or floating"),
        (dict(dim=8, positions=-3), ValueError, "positions_or_length must be >= 0"),
        (dict(dim=8, positions="7"), TypeError, "positions_or_length must be an int or a tensor"),
    ],
)
def test_table_bad_input(kwargs, exc, msg):
    kwargs = dict(kwargs)
    pos = kwargs.pop("positions", 5)
    dim = kwargs.pop("dim")
    with pytest.raises(exc, match=msg):
        pk.sinusoidal_table(pos, dim, **kwargs)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize(
    "case",
    ["x_int", "x_rank", "positions_shape", "positions_bool", "positions_device", "offsets_shape",
     "both", "freq_shift_zero", "x_scale_nan", "x_expanded"],
)  # fmt: skip
def test_add_bad_input(backend, case, inplace):
    x = torch.randn(2, 5, 8, device=DEVICE)
    kw = {}
    exc, msg = ValueError, None
    if case == "x_int":
        x, exc, msg = x.to(torch.int32), TypeError, "x must have dtype"
    elif case == "x_rank":
        x, msg = torch.randn(2, 2, 5, 8, device=DEVICE), "x must have 2 or 3 dimensions"
    elif case == "positions_shape":
        kw, msg = dict(positions=torch.zeros(5, 2, device=DEVICE)), r"positions must have shape \[S\]"
    elif case == "positions_bool":
        kw, exc, msg = dict(positions=torch.zeros(5, dtype=torch.bool, device=DEVICE)), TypeError, "positions must be an integer or floating"
    elif case == "positions_device":
        kw, msg = dict(positions=torch.zeros(5, device="meta")), "positions must be on the same device"
    elif case == "offsets_shape":
        kw, msg = dict(offsets=torch.zeros(3, dtype=torch.long, device=DEVICE)), r"offsets must have shape \[B\]"
    elif case == "both":
        kw, msg = dict(positions=torch.zeros(5, device=DEVICE), offsets=2), "not both"
    elif case == "freq_shift_zero":
        x, kw, msg = torch.randn(2, 5, 2, device=DEVICE), dict(freq_shift=1.0), "divides by zero"
    elif case == "x_scale_nan":
        kw, msg = dict(x_scale=float("nan")), "x_scale must be finite"
    elif case == "x_expanded":
        if not inplace:
            x = torch.randn(2, 1, 8, device=DEVICE).expand(2, 5, 8)
            assert pk.add_sinusoidal(x).shape == (2, 5, 8)  # reading an expanded view is fine
            return
        x, msg = torch.randn(2, 1, 8, device=DEVICE).expand(2, 5, 8), "internally overlapping"
    before = x.clone()
    with pytest.raises(exc, match=msg):
        (pk.add_sinusoidal_ if inplace else pk.add_sinusoidal)(x, **kw)
    assert torch.equal(before, x)


# ---------------------------------------------------------------------------------------------
# Concatenation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,dim_pe,kw",
    [
        ((2, 7, 12), 8, {}),
        ((11, 6), 5, dict(offsets=3, **CONV["fairseq"])),
        ((3, 4, 16), 16, dict(offsets="tensor", interleaved=False, cos_first=True)),
        ((2, 5, 8), 6, dict(positions="float", **CONV["diffusers"])),
    ],
)
def test_concat_values(backend, shape, dim_pe, kw, dtype):
    kw = dict(kw)
    if kw.get("offsets") == "tensor":
        kw["offsets"] = torch.tensor([0, 9, 2], device=DEVICE)
    if kw.get("positions") == "float":
        kw["positions"] = torch.rand(shape[1], device=DEVICE) * 500
    x = torch.randn(*shape, device=DEVICE, dtype=dtype)
    out = pk.concat_sinusoidal(x, dim_pe, **kw)
    assert out.shape == shape[:-1] + (shape[-1] + dim_pe,) and out.dtype == dtype
    truth = ref.concat_sinusoidal_reference(x, dim_pe, **kw)
    same_in_torch = ref.concat_sinusoidal_reference(x, dim_pe, dtype=torch.float32, **kw).to(dtype)
    assert_dtype_tolerance(out, truth, same_in_torch)
    assert torch.equal(out[..., : shape[-1]], x), "x must be copied exactly"


def test_concat_grad_opcheck_compile(backend):
    x = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 5, 14, device=DEVICE)
    (gx,) = torch.autograd.grad(pk.concat_sinusoidal(x, 6, offsets=2), x, g)
    assert torch.equal(gx, g[..., :8])
    x64 = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pk.concat_sinusoidal(t, 4), (x64,))
    torch.library.opcheck(
        torch.ops.posenc.concat_sinusoidal.default, (x.detach().clone().requires_grad_(), None, None, 3, 6, 1e4, True, False, 0.0, 1.0)
    )
    torch._dynamo.reset()
    fn = torch.compile(lambda t: pk.concat_sinusoidal(t * 2, 6).sum(-1), fullgraph=True, backend="aot_eager")
    assert max_err(fn(x), pk.concat_sinusoidal(x * 2, 6).sum(-1)) < 1e-5


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(dim_pe=0), ValueError, "dim_pe must be a positive int"),
        (dict(dim_pe=2, freq_shift=1.0), ValueError, "divides by zero"),
        (dict(dim_pe=4, offsets=torch.zeros(3, dtype=torch.long)), ValueError, r"offsets must have shape \[B\]"),
        (dict(dim_pe=4, x=torch.zeros(2, 3, 4, dtype=torch.int32)), TypeError, "x must have dtype"),
    ],
)
def test_concat_bad_input(kwargs, exc, msg):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", torch.zeros(2, 3, 4))
    with pytest.raises(exc, match=msg):
        pk.concat_sinusoidal(x, **kwargs)
