"""Learned absolute position embeddings: fused gather + add, both table-gradient paths, ops, compile, errors."""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import LearnedPositionEmbedding, add_position_embedding, add_position_embedding_
from posenc_kernels import reference as ref
from posenc_kernels.ops import registry
from posenc_kernels.ops.learned import op as learned_op

from conftest import DEVICE, DTYPES, INTERPRET, assert_dtype_tolerance, max_err, ulp_err
from posenc_kernels import get_backend

NATIVE_OP = "add_position_embedding_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)

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


# ---------------------------------------------------------------------------------------------
# Forward values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("table_dtype", ["same", torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_dtypes(backend, dtype, table_dtype, inplace):
    table_dtype = dtype if table_dtype == "same" else table_dtype
    x = torch.randn(2, 7, 40, device=DEVICE, dtype=dtype)
    table = torch.randn(P, 40, device=DEVICE, dtype=table_dtype)
    check_forward(x, table, rand_pos(2, 7), inplace=inplace, what=f"{dtype} + {table_dtype}")


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("layout", ["bsd_pos2d", "bsd_pos1d", "td_pos1d", "odd_dim", "int32_pos", "uint8_pos", "seq1"])
def test_values_layouts(backend, layout, inplace):
    D = 24
    x = torch.randn(3, 5, D, device=DEVICE, dtype=torch.float16)
    pos = rand_pos(3, 5)
    if layout == "bsd_pos1d":
        pos = rand_pos(5)
    elif layout == "td_pos1d":
        x, pos = torch.randn(11, D, device=DEVICE, dtype=torch.float16), rand_pos(11)
    elif layout == "odd_dim":
        D = 33
        x = torch.randn(3, 5, D, device=DEVICE, dtype=torch.float16)
    elif layout == "int32_pos":
        pos = rand_pos(3, 5, dtype=torch.int32)
    elif layout == "uint8_pos":
        pos = rand_pos(5, dtype=torch.uint8)
    elif layout == "seq1":
        x, pos = torch.randn(4, 1, D, device=DEVICE, dtype=torch.float16), rand_pos(4, 1)
    table = torch.randn(P, D, device=DEVICE, dtype=torch.float32)
    check_forward(x, table, pos, inplace=inplace, what=layout)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
def test_float64_is_computed_in_float64(backend, inplace):
    """fp64 x, or an fp64 table, gets fp64 math: the result is the correctly rounded sum."""
    x = torch.randn(2, 5, 16, dtype=torch.float64, device=DEVICE)
    table = torch.randn(P, 16, dtype=torch.float64, device=DEVICE)
    pos = rand_pos(2, 5)
    fn = add_position_embedding_ if inplace else add_position_embedding
    assert torch.equal(fn(x.clone(), table, pos), x + table[pos])
    x32 = x.float()
    assert torch.equal(fn(x32.clone(), table, pos), (x32.double() + table[pos]).float())


def test_non_contiguous_in_place(backend):
    """x as a transposed [S, B, D] buffer and as a token-strided channel slice; a transposed table and
    strided positions: written where x lives, everything else untouched."""
    base = torch.randn(9, 2, 16, device=DEVICE)
    x = base.transpose(0, 1)
    table = torch.randn(16, P, device=DEVICE).t()  # stride(-1) != 1: the table may have any strides
    pos = rand_pos(2, 18)[:, ::2]
    expect = ref.add_position_embedding_reference(x, table, pos)
    add_position_embedding_(x, table, pos)
    assert max_err(base.transpose(0, 1), expect) < 1e-6
    buf = torch.randn(2, 10, 40, device=DEVICE)
    before = buf.clone()
    view = buf[:, ::3, 8:32]
    table = torch.randn(P, 24, device=DEVICE)
    pos = rand_pos(view.shape[1])
    expect = ref.add_position_embedding_reference(view, table, pos)
    add_position_embedding_(view, table, pos)
    assert max_err(view, expect) < 1e-6
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[:, ::3, 8:32] = False
    assert torch.equal(buf[mask], before[mask])


def _grad_backend(backend):
    """The backend the table-gradient op runs under ``backend`` (it has no native kernel: "native" runs it
    as "auto" does)."""
    return registry.backend_for(registry.spec("position_embedding_backward"), DEVICE.type)


def test_launcher_writes_every_element(backend):
    if backend not in learned_op.ADD_LAUNCHERS:
        pytest.skip("the native kernels write outputs they allocate themselves")
    _pe_add_launch = learned_op.ADD_LAUNCHERS[backend]
    for D, pos in [(17, rand_pos(2, 5)), (32, rand_pos(5)), (1, rand_pos(2, 5))]:
        x = torch.randn(2, 5, D, device=DEVICE)
        table = torch.randn(P, D, device=DEVICE, dtype=torch.bfloat16)
        out = torch.full_like(x, float("nan"))
        _pe_add_launch(x, out, table, pos)
        assert not torch.isnan(out).any()
        assert max_err(out, ref.add_position_embedding_reference(x, table, pos)) < 1e-6


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


def test_empty_inputs(backend):
    table = torch.randn(P, 8, device=DEVICE, requires_grad=True)
    for shape, pos in [((0, 4, 8), rand_pos(0, 4)), ((2, 0, 8), rand_pos(0)), ((0, 8), rand_pos(0))]:
        x = torch.randn(*shape, device=DEVICE)
        assert add_position_embedding_(x.clone(), table.detach(), pos).shape == shape
        y = add_position_embedding(x, table, pos)
        assert y.shape == shape
        (gt,) = torch.autograd.grad(y.sum(), table)
        assert gt.shape == (P, 8) and torch.equal(gt, torch.zeros_like(gt))
    x, t0 = torch.randn(2, 3, 0, device=DEVICE), torch.randn(P, 0, device=DEVICE)  # zero channels
    assert add_position_embedding(x, t0, rand_pos(2, 3)).shape == (2, 3, 0)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_unchecked_out_of_table_rows_become_nan(backend, deterministic):
    """With value checks off nothing reads outside the table: tokens whose row is outside it get NaN, the
    others are correct, and the backward (either path) gives such rows nothing."""
    x = torch.randn(2, 4, 8, device=DEVICE)
    table = torch.randn(P, 8, device=DEVICE, requires_grad=True)
    pos = torch.tensor([[0, P, 5, -1], [P + 100, 2, 2, 1]], device=DEVICE)
    ok = (pos >= 0) & (pos < P)
    pk.set_value_checks(False)
    try:
        y = add_position_embedding(x, table, pos, deterministic=deterministic)
        g = torch.randn_like(y)
        (gt,) = torch.autograd.grad(y, table, g)
        y_in = add_position_embedding_(x.clone(), table.detach(), pos)
    finally:
        pk.set_value_checks(True)
    for out in (y.detach(), y_in):
        assert torch.isnan(out[~ok]).all()
        assert max_err(out[ok], x[ok] + table.detach()[pos[ok]]) < 1e-6
    assert max_err(gt, ref.position_embedding_grad_reference(g[ok], pos[ok], P)) < 1e-6


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
    assert torch.autograd.gradcheck(lambda x, t: add_position_embedding(x, t, pos, **kw), (x, table))
    assert torch.autograd.gradcheck(lambda x, t: add_position_embedding_(x * 1.0, t, pos[1], **kw), (x, table))
    tokens = pos.reshape(-1)
    assert torch.autograd.gradcheck(lambda x, t: add_position_embedding(x, t, tokens), (x.reshape(8, 5), table))


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


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------


def test_module(backend):
    torch.manual_seed(1)
    wpe = LearnedPositionEmbedding(512, 64, padding_idx=-1, device=DEVICE)
    w = wpe.weight.detach()
    assert isinstance(wpe.weight, torch.nn.Parameter) and w.shape == (512, 64)
    assert wpe.padding_idx == 511 and torch.equal(w[511], torch.zeros(64, device=DEVICE))
    assert abs(w[:511].std().item() - 0.02) < 0.002 and abs(w[:511].mean().item()) < 0.002
    x = torch.randn(2, 7, 64, device=DEVICE)
    pos = torch.tensor([3, 511, 0, 3, 9, 1, 2], device=DEVICE)
    y = wpe(x, pos)
    assert max_err(y, ref.add_position_embedding_reference(x, w, pos)) < 1e-6
    assert max_err(wpe(x), x + w[:7]) < 1e-6  # positions default to 0..S-1
    y.sum().backward()
    assert torch.equal(wpe.weight.grad[511], torch.zeros(64, device=DEVICE))
    assert wpe.weight.grad[3].eq(4.0).all()  # position 3 twice in each of 2 sequences
    assert "512, 64, padding_idx=511" in repr(wpe)
    half = LearnedPositionEmbedding(8, 4, dtype=torch.bfloat16, device=DEVICE)
    assert half.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="padding_idx must lie in"):
        LearnedPositionEmbedding(8, 4, padding_idx=8)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        LearnedPositionEmbedding(8, 0)


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


def test_module_offsets_for_decode(backend):
    emb = pk.LearnedPositionEmbedding(16, 8).to(DEVICE)
    x = torch.randn(2, 1, 8, device=DEVICE)
    with torch.no_grad():
        assert torch.allclose(emb(x, offsets=5), x + emb.weight[5])
        per_seq = torch.tensor([3, 9], device=DEVICE)  # per-sequence cache lengths
        assert torch.allclose(emb(x, offsets=per_seq), x + emb.weight[per_seq][:, None])
        assert torch.allclose(emb(x[0], offsets=2), x[0] + emb.weight[2])  # [T, D] tokens
        with pytest.raises(ValueError, match="not both"):
            emb(x, torch.zeros(1, dtype=torch.long, device=DEVICE), offsets=1)
        with pytest.raises(TypeError):
            emb(x, offset=5)  # one name per concept: offsets
        with pytest.raises(ValueError, match=r"offsets must have shape \[B\]"):
            emb(x, offsets=torch.tensor([1, 2, 3], device=DEVICE))
        with pytest.raises(ValueError, match="positions must lie in"):
            emb(x, offsets=16)  # past the table


def _close(out, truth):
    """Within one ulp of out's dtype (relative) of the float64 truth: one rounding on store."""
    return torch.allclose(out.double(), truth.double(), rtol=torch.finfo(out.dtype).eps, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_strided_in_place(backend, dtype):
    """x with a non-unit channel stride (every other channel of a wider buffer, odd D too), and a table
    with one: written where x lives (no copy), the channels in between untouched; out of place too, and
    the backward of a channel-strided upstream gradient."""
    for D in (12, 9):
        buf = torch.randn(2, 6, 2 * D, device=DEVICE, dtype=dtype)
        before = buf.clone()
        view = buf[..., ::2]
        table = torch.randn(P, 2 * D, device=DEVICE)[:, 1::2]
        pos = rand_pos(2, 6)
        expect = ref.add_position_embedding_reference(view, table, pos)
        assert _close(add_position_embedding(view, table, pos), expect)
        ptr = view.data_ptr()
        assert add_position_embedding_(view, table, pos) is view and view.data_ptr() == ptr
        assert _close(view, expect)
        assert torch.equal(buf[..., 1::2], before[..., 1::2]), "channels between the view's were written"
    tw = torch.randn(P, 8, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 5, 16, device=DEVICE)[..., ::2]
    pos = rand_pos(2, 5)
    for det in (False, True):
        (gt,) = torch.autograd.grad(add_position_embedding(torch.randn(2, 5, 8, device=DEVICE), tw, pos, deterministic=det), tw, g)
        assert max_err(gt, ref.position_embedding_grad_reference(g, pos, P)) < 1e-5


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
