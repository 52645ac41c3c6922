"""Shared fixtures: device, backends, seeding, the dtype-tied tolerance rule.

On a CPU machine the suite must be run with TRITON_INTERPRET=1 set before import (scripts/test does it),
so every Triton kernel runs through the interpreter; the torch backend is tested beside it.
"""

import os

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels.ops.registry import HAS_TRITON

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = pk.interpreter_enabled()
TRITON_RUNS = HAS_TRITON and (DEVICE.type == "cuda" or INTERPRET)
BACKENDS = ["triton", "torch"] if TRITON_RUNS else ["torch"]
if not TRITON_RUNS and os.environ.get("CI"):
    raise RuntimeError("CI must exercise the Triton kernels: run the suite with TRITON_INTERPRET=1 (scripts/test)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _interpreter_fp8_cast_rounds_to_nearest_even():
    """The Triton interpreter's fp32 -> FP8 cast (``triton.runtime.interpreter._convert_float``, Triton 3.9)
    rounds half up on the first dropped bit, drops the carry when that overflows the mantissa (1.96 -> e4m3
    1.0, not 2.0) and truncates subnormals. What a kernel's cast lowers to on the GPU (sm_90:
    ``cvt.rn.satfinite.e4m3x2.f32`` / ``.e5m2x2``) rounds to nearest even and saturates to the largest finite
    value: the interpreter does that here, through torch's correctly rounded cast (NaN stays NaN), so an FP8
    kernel (the KV-cache write) is checked on its own code. Every other conversion is the interpreter's."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst in fp8:
            x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            fmax = torch.finfo(fp8[dst]).max
            x = torch.where(x.isnan(), x, x.clamp(-fmax, fmax))  # satfinite
            return x.to(fp8[dst]).view(torch.uint8).numpy().reshape(np.shape(data))
        return original(data, src, dst, rounding_mode)

    interpreter._convert_float = convert


def _interpreter_fma_rounds_once():
    """Triton 3.6's interpreter computes ``tl.fma(x, y, z)`` as ``x * y + z`` in the operands' dtype: two
    roundings where the GPU's ``fma.rn`` rounds once (Triton 3.9's interpreter has a correctly rounded fp32
    fma). A kernel whose result rests on the fused rounding (the KV-cache write's correctly rounded division:
    a Markstein correction) is checked on its own code here by an fma through x86's 64-bit-mantissa long
    double: the fp32 product is exact there and the sum rounds once more only where it needs more than 64 bits."""
    import inspect

    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if "fma_fp32" in inspect.getsource(builder.create_fma) or np.finfo(np.longdouble).nmant < 63:
        return

    def create_fma(self, x, y, z):
        dtype = np.result_type(x.data, y.data, z.data)
        wide = [np.asarray(t.data, dtype=np.longdouble) for t in (x, y, z)]
        return interpreter.TensorHandle((wide[0] * wide[1] + wide[2]).astype(dtype), z.dtype.scalar)

    builder.create_fma = create_fma


if INTERPRET and HAS_TRITON:
    _interpreter_fp8_cast_rounds_to_nearest_even()
    _interpreter_fma_rounds_once()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    pk.set_backend("auto")


# The native C++ extension has CPU kernels for RoPE, the sinusoidal and the learned ops: their suites run
# on it too when it is built (CI builds it; tests/native/test_extension.py fails there if it is missing). A
# test module opts in by naming the op whose native kernel it needs: NATIVE_OP = "rope_" (module level).
NATIVE_CPU = DEVICE.type == "cpu" and "rope_" in _native.ops_for("CPU")


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        names = list(BACKENDS)
        op = getattr(metafunc.module, "NATIVE_OP", None)
        if DEVICE.type == "cpu" and op is not None and op in _native.ops_for("CPU"):
            names.append("native")
        metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
def backend(request):
    with pk.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return DEVICE


def gradcheck_kw(backend: str) -> dict:
    """Options for gradcheck. Through the Triton interpreter every perturbed input element costs two launches
    of an interpreted kernel (minutes for a few dozen elements on 2 cores, a third of the suite's time), so
    the Triton backend is checked in fast mode: the analytical vector-Jacobian products against numerical
    Jacobian-vector products along random directions, which still fails on any wrong gradient. The torch and
    native backends keep the full Jacobian."""
    return {"fast_mode": backend == "triton" and INTERPRET}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def ulp_err(x: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest error of ``x`` in units of ``dtype``'s ulp at the true value. Magnitudes below 1/16 of the
    tensor's largest are measured at that floor, so results that cancel to ~0 do not dominate."""
    if truth.numel() == 0:
        return 0.0
    truth = truth.double()
    mag = truth.abs()
    floor = max(mag.max().item() / 16, torch.finfo(dtype).tiny)
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(mag.clamp_min(floor))))
    return ((x.double() - truth).abs() / ulp).max().item()


def assert_dtype_tolerance(out, truth, same_in_torch, *, factor: float = 2.0, atol_ulp: float = 0.5, what: str = ""):
    """The tolerance rule: the kernel's error against the float64 truth may be at most ``factor`` x the
    error of the same computation done by torch in the input dtype, plus a tiny atol. Errors are measured
    in ulps of the output dtype (so a correctly rounded result, 0.5 ulp, always passes), atol is 0.5 ulp."""
    assert out.shape == truth.shape, (out.shape, truth.shape)
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err = ulp_err(out, truth, out.dtype)
    base = ulp_err(same_in_torch, truth, out.dtype)
    limit = factor * base + atol_ulp
    assert err <= limit, f"{what}: error {err:.2f} ulp > {factor} x torch-in-dtype error {base:.2f} ulp + {atol_ulp}"
