"""Sinusoidal test helpers: the published conventions, the float64 table truth, the add check against
oracle positions (tests/positions_oracle.py).
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref
from posenc_kernels.ops.sinusoidal import op as sin_op

from conftest import assert_dtype_tolerance


CONV = pk.SINUSOIDAL_CONVENTIONS


def truth_table(pos, dim, **kw):
    """float64 truth for fp32 positions (the kernels take positions to fp32 first, as every source does)."""
    return ref.sinusoidal_table_reference(pos.to(torch.float32), dim, **kw)


def _launcher(backend):
    """The backend's launcher (the native kernels allocate their own outputs: nothing to poison there)."""
    if backend not in sin_op.LAUNCHERS:
        pytest.skip("the native kernels write outputs they allocate themselves")
    return sin_op.LAUNCHERS[backend]


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


def _close(out, truth):
    """Within one ulp of out's dtype (relative) of the float64 truth: one rounding on store."""
    return torch.allclose(out.double(), truth.double(), rtol=torch.finfo(out.dtype).eps, atol=1e-5)
