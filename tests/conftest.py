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


if INTERPRET and HAS_TRITON:
    from posenc_dev.interpreter import round_as_the_gpu_does

    round_as_the_gpu_does()


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
