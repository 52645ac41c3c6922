"""add_sinusoidal(_): values against the float64 truth at oracle positions for every position mode,
layouts and strides, every element written, the module, bad input.
"""

import math

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref
from posenc_kernels.configs import MODEL_CONFIGS
from posenc_kernels.ops.sinusoidal import op as sin_op

from conftest import DEVICE, DTYPES, max_err
from .common import CONV, check_add, _close, _launcher

NATIVE_OP = "add_sinusoidal_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


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
