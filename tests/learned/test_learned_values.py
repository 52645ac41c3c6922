"""add_position_embedding(_): values against the float64 reference for dtypes and layouts, strided views,
every element written, out-of-table rows, the module (offsets for decode against the position oracle).
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import LearnedPositionEmbedding, add_position_embedding, add_position_embedding_
from posenc_kernels import reference as ref
from posenc_kernels.ops.learned import op as learned_op

import positions_oracle as po
from conftest import DEVICE, DTYPES, max_err
from .common import P, rand_pos, check_forward, _close


NATIVE_OP = "add_position_embedding_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


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


def test_module_offsets_for_decode(backend):
    emb = pk.LearnedPositionEmbedding(16, 8).to(DEVICE)
    x = torch.randn(2, 1, 8, device=DEVICE)
    with torch.no_grad():
        assert torch.allclose(emb(x, offsets=5), x + emb.weight[5])
        per_seq = torch.tensor([3, 9], device=DEVICE)  # per-sequence cache lengths
        assert torch.allclose(emb(x, offsets=per_seq), x + emb.weight[per_seq][:, None])
        # a chunk of 3 tokens per sequence: rows from the position oracle, not the package's resolver
        x3 = torch.randn(2, 3, 8, device=DEVICE)
        for offsets in (4, per_seq):
            rows = po.as_tensor(po.token_positions(2, 3, offsets=offsets), device=DEVICE)
            assert torch.allclose(emb(x3, offsets=offsets), x3 + emb.weight[rows]), offsets
        assert torch.allclose(emb(x[0], offsets=2), x[0] + emb.weight[2])  # [T, D] tokens
        with pytest.raises(ValueError, match="not both"):
            emb(x, torch.zeros(1, dtype=torch.long, device=DEVICE), offsets=1)
        with pytest.raises(TypeError):
            emb(x, offset=5)  # one name per concept: offsets
        with pytest.raises(ValueError, match=r"offsets must have shape \[B\]"):
            emb(x, offsets=torch.tensor([1, 2, 3], device=DEVICE))
        with pytest.raises(ValueError, match="positions must lie in"):
            emb(x, offsets=16)  # past the table


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
