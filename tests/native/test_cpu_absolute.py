"""The native CPU sinusoidal and learned kernels through their public functions, against the float64
references."""

import inspect

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels import reference as ref
from posenc_kernels.ops import registry

from conftest import assert_dtype_tolerance, max_err
from .native_common import *  # noqa: F401,F403  (the shared helpers: native_common.__all__)

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"native extension unavailable: {_native.load_error()}")


# ---------------------------------------------------------------------------------------------
# Sinusoidal and learned: the public functions on the native backend against the float64 references
# ---------------------------------------------------------------------------------------------

PORTED = "add_sinusoidal_" in registry._OPS
needs_port = pytest.mark.skipif(
    not PORTED,
    reason="the sinusoidal/learned ops are not defined on the op layer yet (posenc::add_sinusoidal_ is not in "
    "posenc_kernels.ops.registry._OPS): their port is pending",
)


def _offsets_kw(fn, value):
    """The position-start keyword of a reference function (``offsets=``, or ``offset=`` before the rename)."""
    return {"offsets": value} if "offsets" in inspect.signature(fn).parameters else {"offset": value}


@needs_port
def test_sinusoidal_learned_kernels_are_native():
    for name in ("sinusoidal_table", "add_sinusoidal_", "add_sinusoidal", "concat_sinusoidal",
                 "add_position_embedding_", "add_position_embedding"):  # fmt: skip
        assert name in _native.ops_for("CPU"), name
        assert_native(name)


@needs_port
@pytest.mark.parametrize("dim", [1, 7, 64, 130])
@pytest.mark.parametrize("interleaved,cos_first", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sinusoidal_table_native(native_backend, no_python_kernels, dim, interleaved, cos_first, dtype):
    conv = dict(interleaved=interleaved, cos_first=cos_first, freq_shift=1.0 if dim >= 4 else 0.0, scale=1.5)
    math = torch.float64 if dtype == torch.float64 else torch.float32
    for pos, arg in ((torch.arange(300), 300), (torch.rand(3, 50) * 1000, None)):
        arg = pos if arg is None else arg
        table = pk.sinusoidal_table(arg, dim, dtype=dtype, **conv)
        assert table.shape == pos.shape + (dim,) and table.dtype == dtype
        truth = ref.sinusoidal_table_reference(pos.to(math), dim, **conv)
        same_in_torch = ref.sinusoidal_table_reference(pos.to(math), dim, dtype=math, **conv).to(dtype)
        if dtype == torch.float64:  # torch in fp64 *is* the truth here: allow fp64 sin/cos's last-bit differences
            assert max_err(table, truth) < 1e-12
        else:
            assert_dtype_tolerance(table, truth, same_in_torch, what="table")
        if dim % 2:
            assert torch.equal(table[..., -1], torch.zeros_like(table[..., -1]))


def _sin_positions(mode, B, S):
    if mode == "offset":
        return {}, 5
    if mode == "offsets":
        return {}, torch.tensor([0, 7, 100][:B])
    if mode == "positions_int":
        return {"positions": torch.randint(0, 1000, (B, S) if B > 1 else (S,))}, 0
    return {"positions": torch.rand(S) * 50}, 0  # float positions (diffusion timesteps)


@needs_port
@pytest.mark.parametrize("layout", ["bsd", "transposed", "td"])
@pytest.mark.parametrize("mode", ["offset", "offsets", "positions_int", "positions_float"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_add_sinusoidal_native(native_backend, no_python_kernels, mode, inplace, dtype, layout):
    B, S, D = 3, 11, 48
    if layout == "td":
        if mode == "offsets":
            pytest.skip("[T, D] input: one sequence, no per-sequence offsets")
        B = 1
    kw, offsets = _sin_positions(mode, B, S)
    if layout == "transposed":
        x = torch.randn(S, B, D, dtype=dtype).transpose(0, 1)
    else:
        x = torch.randn(B, S, D, dtype=dtype)
    if layout == "td":
        x = x[0]
    truth = ref.add_sinusoidal_reference(x, x_scale=2.0, **kw, **_offsets_kw(ref.add_sinusoidal_reference, offsets))
    same_in_torch = ref.add_sinusoidal_reference(x, x_scale=2.0, dtype=dtype, **kw,
                                                 **_offsets_kw(ref.add_sinusoidal_reference, offsets)).to(dtype)
    x0 = x.clone()
    v = x._version
    with nan_poisoned_allocations():
        if inplace:
            out = pk.add_sinusoidal_(x, x_scale=2.0, offsets=offsets, **kw)
        else:
            out = pk.add_sinusoidal(x, x_scale=2.0, offsets=offsets, **kw)
    if inplace:
        assert out is x and x._version == v + 1
    else:
        assert torch.equal(x, x0) and x._version == v
    if dtype == torch.float64:
        assert max_err(out, truth) < 1e-11
    else:
        assert_dtype_tolerance(out, truth, same_in_torch, what=mode)


@needs_port
@pytest.mark.parametrize("mode", ["offset", "offsets", "positions_int", "positions_float"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_concat_sinusoidal_native(native_backend, no_python_kernels, mode, dtype):
    B, S, D, P = 3, 9, 20, 33
    kw, offsets = _sin_positions(mode, B, S)
    x = torch.randn(B, S, D, dtype=dtype)
    conv = dict(interleaved=False, cos_first=True, freq_shift=1.0)
    okw = _offsets_kw(ref.concat_sinusoidal_reference, offsets)
    truth = ref.concat_sinusoidal_reference(x, P, **kw, **okw, **conv)
    same_in_torch = ref.concat_sinusoidal_reference(x, P, dtype=dtype, **kw, **okw, **conv).to(dtype)
    with nan_poisoned_allocations():
        out = pk.concat_sinusoidal(x, P, offsets=offsets, **kw, **conv)
    assert out.shape == (B, S, D + P)
    assert torch.equal(out[..., :D], x)
    if dtype == torch.float64:
        assert max_err(out, truth) < 1e-11
    else:
        assert_dtype_tolerance(out, truth, same_in_torch, what=mode)


@needs_port
def test_sinusoidal_errors_and_opcheck(native_backend):
    x = torch.randn(2, 3, 8)
    with pytest.raises((RuntimeError, ValueError), match="internally overlapping"):
        pk.add_sinusoidal_(torch.randn(1, 1, 8).expand(2, 3, 8))
    with pytest.raises((RuntimeError, ValueError), match="positions or offsets, not both"):
        pk.add_sinusoidal(x, positions=torch.zeros(3), offsets=torch.zeros(2, dtype=torch.long))
    with torch.inference_mode():
        xi = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="inference tensor"):
        pk.add_sinusoidal_(xi)
    ops = torch.ops.posenc
    conv = (10000.0, True, False, 0.0, 1.0)
    torch.library.opcheck(ops.add_sinusoidal_.default, (x, None, torch.tensor([1, 2]), 0, 2.0, *conv))
    torch.library.opcheck(ops.add_sinusoidal.default, (x, torch.rand(2, 3), None, 0, 1.0, *conv))
    torch.library.opcheck(ops.add_sinusoidal.default, (x[0], None, None, 3, 1.0, 10000.0, False, True, 1.0, 0.5))
    torch.library.opcheck(ops.concat_sinusoidal.default, (x, None, None, 2, 6, *conv))
    torch.library.opcheck(ops.sinusoidal_table.default,
                          (torch.arange(5), 0, 8, *conv, torch.float32, torch.device("cpu")))  # fmt: skip


@needs_port
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("pos_shape", ["BS", "S", "TD"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_add_position_embedding_native(native_backend, no_python_kernels, dtype, inplace, pos_shape, table_dtype):
    """x + table[positions] (the learned table of any float dtype, fp32 math) against float64."""
    B, S, D, P = 2, 7, 40, 16
    table = torch.randn(P, D, dtype=table_dtype)
    if pos_shape == "TD":
        x, positions = torch.randn(S, D, dtype=dtype), torch.randint(0, P, (S,))
    else:
        x = torch.randn(S, B, D, dtype=dtype).transpose(0, 1)  # strided [B, S, D]
        positions = torch.randint(0, P, (B, S) if pos_shape == "BS" else (S,))
    truth = x.double() + table.double()[positions]
    same_in_torch = x + table[positions].to(dtype)
    x0 = x.clone()
    v = x._version
    with nan_poisoned_allocations():
        if inplace:
            out = pk.add_position_embedding_(x, table, positions)
        else:
            out = pk.add_position_embedding(x, table, positions)
    if inplace:
        assert out is x and x._version == v + 1
    else:
        assert torch.equal(x, x0)
    if dtype == torch.float64 and table_dtype == torch.float64:
        assert max_err(out, truth) < 1e-12
    else:
        assert_dtype_tolerance(out, truth, same_in_torch.to(dtype), what="learned")


@needs_port
def test_add_position_embedding_rows_outside_table(native_backend):
    x, table = torch.randn(1, 4, 8), torch.randn(6, 8)
    positions = torch.tensor([0, 6, -1, 5])
    x0 = x.clone()
    with pytest.raises(ValueError):
        pk.add_position_embedding_(x, table, positions)
    assert torch.equal(x, x0)
    with value_checks_off():
        out = torch.ops.posenc.add_position_embedding.default(x, table, positions, None, False)
    bad = torch.tensor([False, True, True, False])
    assert torch.isnan(out[0, bad]).all() and not torch.isnan(out[0, ~bad]).any()
    torch.library.opcheck(torch.ops.posenc.add_position_embedding_.default, (x, table, torch.tensor([0, 1, 2, 3]), None))
    torch.library.opcheck(torch.ops.posenc.add_position_embedding.default,
                          (x, table, torch.tensor([[0, 1, 2, 3]]), 0, True))  # fmt: skip
