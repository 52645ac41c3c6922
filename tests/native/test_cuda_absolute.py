"""The CUDA C++ sinusoidal kernels through their public functions on the native backend, against the
float64 references (GPU only; see test_cuda_rope.py)."""



import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref

from conftest import assert_dtype_tolerance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu_check.sh)")

from .native_cuda_common import *  # noqa: F401,F403  (the shared helpers: native_cuda_common.__all__)

# ----------------------------------------------------------------------------------------------
# Sinusoidal: the public ops on the native backend (pending their port to the op layer)
# ----------------------------------------------------------------------------------------------


@needs_port
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("cos_first", [False, True])
@pytest.mark.parametrize("D", [64, 80, 33, 1, 6])
def test_sinusoidal_table(dtype, interleaved, cos_first, D):
    for name in ("sinusoidal_table", "add_sinusoidal_", "add_sinusoidal", "concat_sinusoidal"):
        assert_native_cuda(name)
    S = 37
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    conv = dict(interleaved=interleaved, cos_first=cos_first, freq_shift=0.0, scale=1.3)
    for positions in (torch.arange(S, device=DEV) + 5, torch.rand(2, S, device=DEV) * 1000):
        with nan_poisoned_allocations():
            out = pk.sinusoidal_table(positions, D, dtype=dtype, **conv)
        truth = ref.sinusoidal_table_reference(positions.to(math_dtype), D, **conv)
        same_in_torch = ref.sinusoidal_table_reference(positions.to(math_dtype), D, dtype=math_dtype, **conv).to(dtype)
        assert_dtype_tolerance(out, truth, same_in_torch, what=f"table {dtype} D={D}")
    with nan_poisoned_allocations():
        out = pk.sinusoidal_table(S, D, dtype=dtype, device=DEV, **conv)  # no tensor argument: BackendSelect
    assert out.device.type == "cuda"
    truth = ref.sinusoidal_table_reference(torch.arange(S, device=DEV).to(math_dtype), D, **conv)
    same_in_torch = ref.sinusoidal_table_reference(torch.arange(S, device=DEV).to(math_dtype), D, dtype=math_dtype,
                                                   **conv).to(dtype)  # fmt: skip
    assert_dtype_tolerance(out, truth, same_in_torch, what=f"table {dtype} D={D} from a length")


def _ref_offsets_kw(fn, value):
    import inspect

    return {"offsets": value} if "offsets" in inspect.signature(fn).parameters else {"offset": value}


@needs_port
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows", ["positions_int", "positions_float", "positions_s", "offsets"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
@pytest.mark.parametrize("inplace", [False, True])
def test_sinusoidal_add(dtype, rows, layout, inplace):
    B, S, D = 3, 11, 128
    x = torch.randn(B, S, D + (1 if layout == "misaligned" else 0), device=DEV, dtype=dtype)
    if layout == "misaligned":
        x = x[..., 1:]
    elif layout == "strided":
        x = torch.randn(S, B, D, device=DEV, dtype=dtype).transpose(0, 1)
    kw, offsets = {}, 0
    if rows == "positions_int":
        kw["positions"] = torch.randint(0, 1000, (B, S), device=DEV, dtype=torch.int32)
    elif rows == "positions_float":
        kw["positions"] = torch.rand(B, S, device=DEV) * 1000
    elif rows == "positions_s":
        kw["positions"] = torch.randint(0, 1000, (S,), device=DEV)
    else:
        offsets = torch.randint(0, 100, (B,), device=DEV)
    conv = dict(interleaved=False, cos_first=True, freq_shift=1.0)
    x0 = x.clone()
    with nan_poisoned_allocations():
        if inplace:
            out = pk.add_sinusoidal_(x, x_scale=2.0, offsets=offsets, **kw, **conv)
        else:
            out = pk.add_sinusoidal(x, x_scale=2.0, offsets=offsets, **kw, **conv)
    assert (out is x) == inplace
    okw = _ref_offsets_kw(ref.add_sinusoidal_reference, offsets)
    truth = ref.add_sinusoidal_reference(x0, x_scale=2.0, **kw, **okw, **conv)
    same_in_torch = ref.add_sinusoidal_reference(x0, x_scale=2.0, dtype=dtype, **kw, **okw, **conv).to(dtype)
    assert_dtype_tolerance(out, truth, same_in_torch, what=f"add {dtype} {rows} {layout}")


@needs_port
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinusoidal_concat(dtype):
    x = torch.randn(2, 9, 40, device=DEV, dtype=dtype)
    offsets = torch.tensor([0, 50], device=DEV)
    with nan_poisoned_allocations():
        out = pk.concat_sinusoidal(x, 24, offsets=offsets)
    okw = _ref_offsets_kw(ref.concat_sinusoidal_reference, offsets)
    truth = ref.concat_sinusoidal_reference(x, 24, **okw)
    same_in_torch = ref.concat_sinusoidal_reference(x, 24, dtype=torch.float32, **okw).to(dtype)
    assert torch.equal(out[..., :40], x)
    assert_dtype_tolerance(out, truth, same_in_torch, what="concat")


@needs_port
def test_sinusoidal_graph_and_no_allocation():
    x = torch.randn(4, 8192, 1024, device=DEV, dtype=torch.bfloat16)
    add_ = torch.ops.posenc.add_sinusoidal_.default
    conv = (10000.0, True, False, 0.0, 1.0)
    add_(x, None, None, 0, 1.0, *conv)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    add_(x, None, None, 0, 1.0, *conv)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == before, "in-place native sinusoidal allocated memory"
    offsets = torch.zeros(2, device=DEV, dtype=torch.int64)
    out = torch.zeros(2, 16, 64, device=DEV)
    add_(out.clone(), None, offsets, 0, 0.0, *conv)  # warm-up (the cached inv_freq)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        add_(out, None, offsets, 0, 0.0, *conv)  # x_scale 0: out = PE
    for start in (0, 100, 5000):
        offsets.fill_(start)
        out.zero_()
        g.replay()
        truth = ref.sinusoidal_table_reference((torch.arange(16, device=DEV) + start).float(), 64)
        torch.testing.assert_close(out[1], truth.float(), rtol=0, atol=2e-6 * max(1, start / 100))


@needs_port
def test_sinusoidal_errors():
    with pytest.raises((RuntimeError, ValueError), match="internally overlapping"):
        pk.add_sinusoidal_(torch.randn(1, 1, 64, device=DEV).expand(2, 3, 64))
    x = torch.randn(2, 3, 128, device=DEV)[..., ::2]  # channel stride 2: refused by the CUDA kernel
    with pytest.raises(RuntimeError, match=r"stride\(-1\) == 1"):
        torch.ops.posenc.add_sinusoidal.default(x, None, None, 0, 1.0, 10000.0, True, False, 0.0, 1.0)
    with pytest.raises(ValueError, match="offset must be 0 when an offsets tensor is given"):
        torch.ops.posenc.add_sinusoidal.default(x.contiguous(), None, torch.zeros(2, dtype=torch.long, device=DEV), 3,
                                                1.0, 10000.0, True, False, 0.0, 1.0)  # fmt: skip
