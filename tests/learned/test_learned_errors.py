"""add_position_embedding(_) refusals: bad input named before any write, the backward op's input,
in-place autograd errors, a table sharing x's memory.
"""

import pytest
import torch

from posenc_kernels import add_position_embedding, add_position_embedding_
from posenc_kernels import reference as ref

from conftest import DEVICE, max_err
from .common import P, rand_pos

NATIVE_OP = "add_position_embedding_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize(
    "case",
    ["x_int", "x_rank", "x_type", "x_expanded", "table_int", "table_rank", "table_dim", "table_device",
     "positions_float", "positions_bool", "positions_shape", "positions_device", "positions_list", "positions_high",
     "positions_negative", "padding_high", "padding_low", "padding_bool", "deterministic_type", "table_overlaps_x"],
)  # fmt: skip
def test_bad_input(backend, case, inplace):
    x = torch.randn(2, 5, 8, device=DEVICE)
    table = torch.randn(P, 8, device=DEVICE)
    pos = rand_pos(2, 5)
    kw = {}
    exc, msg = ValueError, None
    if case == "x_int":
        x, exc, msg = x.to(torch.int32), TypeError, "x must have dtype"
    elif case == "x_rank":
        x, msg = torch.randn(2, 2, 5, 8, device=DEVICE), "x must have 2 or 3 dimensions"
    elif case == "x_type":
        x, exc, msg = x.tolist(), TypeError, "x must be a torch.Tensor"
    elif case == "x_expanded":
        x = torch.randn(2, 1, 8, device=DEVICE).expand(2, 5, 8)
        if not inplace:  # reading an expanded view is fine
            assert max_err(add_position_embedding(x, table, pos), x + table[pos]) < 1e-6
            return
        msg = "internally overlapping"
    elif case == "table_int":
        table, exc, msg = table.to(torch.int64), TypeError, "table must have dtype"
    elif case == "table_rank":
        table, msg = table[None], "table must have 2 dimensions"
    elif case == "table_dim":
        table, msg = torch.randn(P, 9, device=DEVICE), r"table must be \[P, D\] with D = x.shape\[-1\] = 8"
    elif case == "table_device":
        table, msg = table.to("meta"), "table must be on the same device"
    elif case == "positions_float":
        pos, exc, msg = pos.float(), TypeError, "positions must be an integer tensor"
    elif case == "positions_bool":
        pos, exc, msg = pos > 3, TypeError, "positions must be an integer tensor"
    elif case == "positions_shape":
        pos, msg = rand_pos(5, 2), r"positions must have shape \[S\] = \[5\] or \[B, S\] = \[2, 5\]"
    elif case == "positions_device":
        pos, msg = pos.to("meta"), "positions must be on the same device"
    elif case == "positions_list":
        pos, exc, msg = [0, 1, 2, 3, 4], TypeError, "positions must be an integer torch.Tensor"
    elif case == "positions_high":
        pos[1, 3] = P
        msg = rf"positions must lie in \[0, {P}\)"
    elif case == "positions_negative":
        pos[0, 0] = -1
        msg = rf"positions must lie in \[0, {P}\)"
    elif case == "padding_high":
        kw, msg = dict(padding_idx=P), "padding_idx must lie in"
    elif case == "padding_low":
        kw, msg = dict(padding_idx=-P - 1), "padding_idx must lie in"
    elif case == "padding_bool":
        kw, exc, msg = dict(padding_idx=True), TypeError, "padding_idx must be an int or None"
    elif case == "deterministic_type":
        kw, exc, msg = dict(deterministic=1), TypeError, "deterministic must be a bool or None"
    elif case == "table_overlaps_x":
        storage = torch.randn(2 * 5 * 8 + 40, device=DEVICE)
        x, table = storage[:80].view(2, 5, 8), storage[40:].view(-1, 8)  # table rows 0-4 are x[1]
        pos = rand_pos(2, 5, rows=table.shape[0])
        if not inplace:  # reading both is fine
            assert max_err(add_position_embedding(x, table, pos), x + table[pos]) < 1e-6
            return
        msg = "table must not overlap x"
    before = x.clone() if isinstance(x, torch.Tensor) else None
    fn = add_position_embedding_ if inplace else add_position_embedding
    with pytest.raises(exc, match=msg):
        fn(x, table, pos, **kw)
    if before is not None:
        assert torch.equal(before, x)


@pytest.mark.parametrize(
    "case,exc,msg",
    [
        ("grad_int", TypeError, "grad must have dtype"),
        ("num_rows", ValueError, "num_rows must be an int >= 0"),
        ("dtype", TypeError, "dtype must be a floating dtype"),
        ("padding", ValueError, "padding_idx must lie in"),
    ],
)
def test_backward_op_bad_input(backend, case, exc, msg):
    g, pos, rows, pad, dtype = torch.randn(2, 3, 8, device=DEVICE), rand_pos(3, rows=4), 4, None, torch.float32
    if case == "grad_int":
        g = g.long()
    elif case == "num_rows":
        rows = -1
    elif case == "dtype":
        dtype = torch.int32
    elif case == "padding":
        pad = 4
    with pytest.raises(exc, match=msg):
        torch.ops.posenc.position_embedding_backward(g, pos, rows, pad, False, dtype)


def test_backward_op_ignores_rows_outside_the_table(backend):
    """The position values are checked once, by the forward; the backward op never re-checks them (its
    tensors are forward's, saved and version-checked). Called directly with a row outside the table, it
    stays in bounds: that token's gradient goes nowhere."""
    g, pos = torch.randn(2, 3, 8, device=DEVICE), torch.tensor([0, 4, 2], device=DEVICE)
    for det in (False, True):
        out = torch.ops.posenc.position_embedding_backward(g, pos, 4, None, det, torch.float32)
        ok = pos < 4
        assert max_err(out, ref.position_embedding_grad_reference(g[:, ok], pos[ok], 4)) < 1e-5


def test_inplace_autograd_errors_before_writing(backend):
    table = torch.randn(P, 8, device=DEVICE)
    pos = rand_pos(2, 3)
    leaf = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        add_position_embedding_(leaf, table, pos)
    assert torch.equal(leaf.detach(), before)
    a, _ = (leaf * 1.0).split([3, 5], dim=2)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="multi-output op"):
        add_position_embedding_(a, table[:, :3], pos)
    assert torch.equal(a.detach(), before)
    # x needs no grad but the table does: a split view still cannot join the graph in place.
    a, _ = torch.randn(2, 3, 8, device=DEVICE).split([3, 5], dim=2)
    before = a.clone()
    with pytest.raises(RuntimeError, match="multi-output op"):
        add_position_embedding_(a, table[:, :3].clone().requires_grad_(), pos)
    assert torch.equal(a, before)


def test_table_sharing_x_memory_through_another_dtype_is_refused(backend):
    buf = torch.zeros(1600, device=DEVICE)
    x = buf.view(1, 200, 8)
    table = buf.view(torch.float16)[1600:2000].view(50, 8)  # inside x's bytes, as fp16
    before = x.clone()
    with pytest.raises(ValueError, match="table must not overlap x"):
        add_position_embedding_(x, table, torch.zeros(200, dtype=torch.long, device=DEVICE))
    assert torch.equal(x, before)
