"""Learned-embedding test helpers: random positions, the forward check, the gradient backend.
"""

import torch

from posenc_kernels import add_position_embedding, add_position_embedding_
from posenc_kernels import reference as ref
from posenc_kernels.ops import registry
from posenc_kernels import get_backend

from conftest import DEVICE, INTERPRET, assert_dtype_tolerance, ulp_err


P = 13  # table rows: odd on purpose


def rand_pos(*shape, rows=P, dtype=torch.int64):
    return torch.randint(0, rows, shape, device=DEVICE, dtype=dtype)


def check_forward(x, table, positions, *, inplace, what=""):
    truth = ref.add_position_embedding_reference(x, table, positions)
    # The same computation done by torch in x's dtype: the gathered rows rounded to x's dtype, then added.
    same_in_torch = x + table.to(x.dtype)[positions.long()]
    x0 = x.clone()
    if inplace:
        out = add_position_embedding_(x, table, positions)
        assert out is x
    else:
        out = add_position_embedding(x, table, positions)
        assert torch.equal(x, x0)
    assert out.dtype == x0.dtype and out.shape == x0.shape
    assert_dtype_tolerance(out, truth, same_in_torch, what=what)
    # Stronger than the rule: the add happens in fp32 (or fp64) and is rounded once, so the result is the
    # correctly rounded sum up to fp32 noise. (The interpreter's fp32 -> bf16 cast truncates instead of
    # rounding: up to 1 ulp there; GPUs round to nearest.)
    if x0.dtype != torch.float64:
        trunc = x0.dtype == torch.bfloat16 and INTERPRET and get_backend() != "torch"
        limit = (1.0 if trunc else 0.5) + 1e-3
        assert ulp_err(out, truth, x0.dtype) <= limit, f"{what}: not a single rounding of the fp32 sum"


def _grad_backend(backend):
    """The backend the table-gradient op runs under ``backend`` (it has no native kernel: "native" runs it
    as "auto" does)."""
    return registry.backend_for(registry.spec("position_embedding_backward"), DEVICE.type)


def _close(out, truth):
    """Within one ulp of out's dtype (relative) of the float64 truth: one rounding on store."""
    return torch.allclose(out.double(), truth.double(), rtol=torch.finfo(out.dtype).eps, atol=1e-5)
