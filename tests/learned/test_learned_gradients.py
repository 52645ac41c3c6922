"""add_position_embedding(_): gradients (nn.Embedding's rule, deterministic mode), gradcheck, opcheck,
torch.compile.
"""

import pytest
import torch

from posenc_kernels import add_position_embedding, add_position_embedding_
from posenc_kernels import reference as ref
from posenc_kernels.ops import registry
from posenc_kernels.ops.learned import op as learned_op

from conftest import DEVICE, assert_dtype_tolerance, gradcheck_kw, max_err
from .common import P, rand_pos, _grad_backend

NATIVE_OP = "add_position_embedding_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_grad_launcher_writes_every_element(backend, deterministic):
    """Table-gradient launcher into a NaN-poisoned [P, D] output: every row written, untouched rows zero."""
    _grad_table_launch = learned_op.GRAD_LAUNCHERS[_grad_backend(backend)]
    for D, pos, pad in [(17, rand_pos(2, 5), 3), (32, rand_pos(5), -1), (8, torch.tensor([2, 2, 2], device=DEVICE), 2)]:
        g = torch.randn(2, pos.shape[-1], D, device=DEVICE)
        out = torch.full((P, D), float("nan"), device=DEVICE, dtype=torch.bfloat16)
        _grad_table_launch(g, pos, out, pad, deterministic)
        truth = ref.position_embedding_grad_reference(g, pos, P, padding_idx=None if pad < 0 else pad)
        assert not torch.isnan(out).any()
        assert max_err(out, truth) <= 0.02 * truth.abs().max().item() + 1e-6


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def reference_grads(x, table, pos, g, padding_idx):
    x64 = x.detach().double().requires_grad_()
    t64 = table.detach().double().requires_grad_()
    out = ref.add_position_embedding_reference(x64, t64, pos, padding_idx=padding_idx)
    return torch.autograd.grad(out, (x64, t64), g.double())


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize(
    "dtype,table_dtype,pos_kind,padding_idx",
    [
        (torch.float32, torch.float32, "2d", None),
        (torch.bfloat16, torch.float32, "1d", 4),
        (torch.float16, torch.float16, "2d", -1),
        (torch.float32, torch.bfloat16, "td", 0),
    ],
    ids=["fp32", "bf16_x_fp32_table_shared_pos", "fp16", "bf16_table_tokens"],
)
def test_gradients(backend, dtype, table_dtype, pos_kind, padding_idx, inplace, deterministic):
    B, S, D = 3, 10, 24
    xw = torch.randn(B, S, D, device=DEVICE, dtype=dtype, requires_grad=True)
    table = torch.randn(6, D, device=DEVICE, dtype=table_dtype, requires_grad=True)  # 6 rows: many repeats
    pos = {"2d": rand_pos(B, S, rows=6), "1d": rand_pos(S, rows=6), "td": rand_pos(B * S, rows=6)}[pos_kind]
    pos[..., 0] = 4  # the padding row (4, or -1 == 5, or 0) is read by some token
    pos[..., 1] = 5
    pos[..., 2] = 0
    x = xw * 1.0 if pos_kind != "td" else (xw * 1.0).reshape(B * S, D)
    fn = add_position_embedding_ if inplace else add_position_embedding
    out = fn(x, table, pos, padding_idx=padding_idx, deterministic=deterministic)
    g = torch.randn_like(out)
    gx, gt = torch.autograd.grad(out, (xw, table), g)
    assert gx.dtype == dtype and gt.dtype == table_dtype
    tx, tt = reference_grads(x, table, pos, g, padding_idx)
    assert torch.equal(gx.reshape(g.shape), g), "the gradient w.r.t. x is the upstream gradient"
    if padding_idx is not None:
        assert (gt[padding_idx] == 0).all(), "the padding row gets no gradient"
    # Torch in the table's dtype with the accumulation in fp32 (the best a table-dtype result can be).
    same_in_torch = ref.position_embedding_grad_reference(g, pos, 6, padding_idx=padding_idx, dtype=torch.float32)
    assert_dtype_tolerance(gt, tt, same_in_torch.to(table_dtype), what="table grad")


def test_inplace_with_only_table_requiring_grad(backend):
    """x a plain activation buffer (no grad), the table a parameter: x joins the graph, the table gets grad."""
    x = torch.randn(2, 5, 8, device=DEVICE)
    table = torch.randn(P, 8, device=DEVICE, requires_grad=True)
    pos = rand_pos(2, 5)
    v = x._version
    y = add_position_embedding_(x, table, pos)
    assert y is x and x.requires_grad and x._version > v
    g = torch.randn_like(x)
    (gt,) = torch.autograd.grad(y, table, g)
    assert max_err(gt, ref.position_embedding_grad_reference(g, pos, P)) < 1e-5


@pytest.mark.parametrize("shared", [False, True], ids=["pos2d", "pos1d"])
def test_deterministic_is_bitwise_reproducible(backend, shared):
    """Many tokens on few rows (the order matters in fp32): two runs give the same bits, close to the truth."""
    B, S, D, rows = 4, 64, 40, 3
    g = torch.randn(B, S, D, device=DEVICE) * torch.logspace(-3, 3, S, device=DEVICE)[:, None]
    pos = rand_pos(S, rows=rows) if shared else rand_pos(B, S, rows=rows)
    runs = [torch.ops.posenc.position_embedding_backward(g, pos, rows, 1, True, torch.float32) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    truth = ref.position_embedding_grad_reference(g, pos, rows, padding_idx=1)
    same_in_torch = ref.position_embedding_grad_reference(g, pos, rows, padding_idx=1, dtype=torch.float32)
    assert_dtype_tolerance(runs[0], truth, same_in_torch, what="deterministic table grad")
    assert torch.equal(runs[0][1], torch.zeros(D, device=DEVICE))


def test_deterministic_none_follows_torch_setting(backend, monkeypatch):
    seen = []
    spec = registry.spec("position_embedding_backward")
    name = _grad_backend(backend)
    real = spec.impls[name]
    monkeypatch.setitem(spec.impls, name, lambda *a: (seen.append(a[4]), real(*a))[1])
    x = torch.randn(2, 3, 8, device=DEVICE)
    table = torch.randn(P, 8, device=DEVICE, requires_grad=True)
    pos = rand_pos(2, 3)
    add_position_embedding(x, table, pos).sum().backward()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        add_position_embedding(x, table, pos).sum().backward()
        add_position_embedding(x, table, pos, deterministic=False).sum().backward()
    finally:
        torch.use_deterministic_algorithms(prev)
    add_position_embedding(x, table, pos, deterministic=True).sum().backward()
    assert seen == [False, True, False, True]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gradcheck_float64(backend, deterministic):
    x = torch.randn(2, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    table = torch.randn(5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    # Repeated rows; padding row 2 is never read, so its true (zero) gradient is also the padding rule's.
    pos = torch.tensor([[1, 3, 1, 0], [4, 1, 0, 3]], device=DEVICE)
    kw = dict(padding_idx=2, deterministic=deterministic)
    assert torch.autograd.gradcheck(lambda x, t: add_position_embedding(x, t, pos, **kw), (x, table), **gradcheck_kw(backend))
    assert torch.autograd.gradcheck(lambda x, t: add_position_embedding_(x * 1.0, t, pos[1], **kw), (x, table), **gradcheck_kw(backend))
    tokens = pos.reshape(-1)
    assert torch.autograd.gradcheck(lambda x, t: add_position_embedding(x, t, tokens), (x.reshape(8, 5), table), **gradcheck_kw(backend))


def test_opcheck(backend):
    x = torch.randn(2, 5, 12, device=DEVICE)
    table = torch.randn(P, 12, device=DEVICE, dtype=torch.bfloat16)
    pos = rand_pos(2, 5)
    ops = torch.ops.posenc
    torch.library.opcheck(ops.add_position_embedding_.default, (x.clone(), table, pos, None))
    torch.library.opcheck(ops.add_position_embedding_.default, (x.clone().reshape(10, 12), table, pos.reshape(-1), 2))
    for det in (False, True):
        args = (x.clone().requires_grad_(), table.clone().requires_grad_(), pos[0], 3, det)
        torch.library.opcheck(ops.add_position_embedding.default, args)
        torch.library.opcheck(ops.position_embedding_backward.default, (x, pos, P, -2, det, torch.float32))
        torch.library.opcheck(ops.position_embedding_backward.default, (x[0], pos[1], P, None, det, torch.bfloat16))


def _model(x, table, pos):
    h = add_position_embedding(x, table, pos, padding_idx=0)
    h = h * 2.0
    add_position_embedding_(h, table, pos[0], deterministic=True)
    return h


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    x = torch.randn(2, 4, 16, device=DEVICE, requires_grad=True)
    table = torch.randn(P, 16, device=DEVICE, requires_grad=True)
    pos = rand_pos(2, 4)
    eager = _model(x, table, pos)
    g = torch.randn_like(eager)
    ge = torch.autograd.grad(eager, (x, table), g)
    out = torch.compile(_model, fullgraph=True, backend=compile_backend)(x, table, pos)
    gc = torch.autograd.grad(out, (x, table), g)
    assert max_err(out, eager) < 1e-5
    assert max_err(gc[0], ge[0]) < 1e-6 and max_err(gc[1], ge[1]) < 1e-5


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_inplace_on_a_leaf_clone_matches_eager(backend, dynamic):
    """``f(x): add_position_embedding_(x, table, pos); return x`` on ``leaf.clone()`` compiled (aot_eager,
    fullgraph): values and the gradients of the leaf and the table as in eager."""

    def f(x, table, pos):
        add_position_embedding_(x, table, pos, padding_idx=1)
        return x

    leaf = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    table = torch.randn(P, 8, device=DEVICE, requires_grad=True)
    pos = rand_pos(2, 5)
    g = torch.randn(2, 5, 8, device=DEVICE)
    leaf_e, table_e = leaf.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()
    want = f(leaf_e.clone(), table_e, pos)
    want.backward(g)
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)(leaf.clone(), table, pos)
    got.backward(g)
    assert max_err(got, want) < 1e-6
    assert torch.equal(leaf.grad, leaf_e.grad) and torch.equal(leaf.grad, g)
    assert max_err(table.grad, table_e.grad) < 1e-6 and max_err(table.grad, ref.position_embedding_grad_reference(g, pos, P, padding_idx=1)) < 1e-5
