"""Sinusoidal test helpers: the published conventions, the float64 table truth, the add check against
oracle positions (tests/positions_oracle.py).
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref
from posenc_kernels.ops.sinusoidal import op as sin_op

import positions_oracle as po
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
    """Run add_sinusoidal(_) and compare with the float64 truth under the dtype-tied rule. The truth adds the
    table at the positions the oracle gives for ``positions`` / ``offsets`` (tests/positions_oracle.py),
    not at the package's own resolution of them."""
    x_scale = kw.get("x_scale", 1.0)
    conv = {k: v for k, v in kw.items() if k not in ("positions", "offsets", "x_scale")}
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    pos = po.as_tensor(po.token_positions(x3.shape[0], x3.shape[1], positions=kw.get("positions"),
                                          offsets=kw.get("offsets", 0)), device=x.device)  # fmt: skip
    # the kernels take positions to fp32 first (fp64 for fp64 inputs), as every published implementation does
    pos = pos.to(torch.float64 if x.dtype == torch.float64 else torch.float32)

    def x_scale_plus_pe(dtype):
        pe = ref.sinusoidal_table_reference(pos, x3.shape[-1], dtype=dtype, **conv)
        return (x3.to(dtype) * x_scale + pe).reshape(x.shape)

    truth = x_scale_plus_pe(torch.float64)
    same_in_torch = x_scale_plus_pe(torch.float32).to(x.dtype)
    if x.dtype != torch.float32:  # torch in the input dtype: x * s + PE with PE rounded to x's dtype first
        pe_low = (same_in_torch.float() - x.float() * x_scale).to(x.dtype)
        same_in_torch = x * x_scale + pe_low
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
