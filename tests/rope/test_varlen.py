"""RoPE on packed variable-length batches (cu_seqlens): per-sequence restarts and offsets against the
position oracle, many sequences, bad input.
"""

import pytest
import torch

import posenc_kernels as pk

from conftest import DEVICE, DTYPES, assert_dtype_tolerance
from positions_oracle import cu_positions
from .common_modes import qk, rotate_with_rows

NATIVE_OP = "rope_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


# ---------------------------------------------------------------------------------------------
# Packed varlen
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offsets", ["int", "tensor", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_cu_seqlens(backend, dtype, offsets):
    cu_list = [0, 5, 5, 6, 13, 20]  # an empty sequence and a single-token one
    T = cu_list[-1] + 3  # three padded tokens past the last sequence: position 0
    off_list = [2, 0, 7, 1, 30]
    off = {"int": 4, "tensor": torch.tensor(off_list, device=DEVICE, dtype=torch.int32), "none": 0}[offsets]
    rows = cu_positions(cu_list, off_list if offsets == "tensor" else None, 0 if offsets == "tensor" else off, T)
    cos, sin = pk.rope_cos_sin(40, pk.rope_frequencies(48)[0].to(DEVICE))
    q, k = qk(1, T, 4, 2, 64, dtype)
    cu = torch.tensor(cu_list, device=DEVICE, dtype=torch.int32)
    truth_q = rotate_with_rows(q, cos, sin, rows[None].to(DEVICE))
    eager_q = rotate_with_rows(q, cos, sin, rows[None].to(DEVICE), dtype=dtype)
    truth_k = rotate_with_rows(k, cos, sin, rows[None].to(DEVICE))
    eager_k = rotate_with_rows(k, cos, sin, rows[None].to(DEVICE), dtype=dtype)
    out_q, out_k = pk.apply_rope(q[0], k[0], cos, sin, cu_seqlens=cu, offsets=off)
    assert out_q.shape == q[0].shape
    assert_dtype_tolerance(out_q, truth_q[0], eager_q[0], what="varlen q")
    assert_dtype_tolerance(out_k, truth_k[0], eager_k[0], what="varlen k")
    q3, k3 = q[0].clone(), k[0].clone()
    pk.apply_rope_(q3, k3, cos, sin, cu_seqlens=cu, offsets=off)
    assert torch.equal(q3, out_q) and torch.equal(k3, out_k)
    # Same as per-token positions.
    q4, _ = pk.apply_rope(q[0], None, cos, sin, positions=rows.to(DEVICE))
    assert torch.equal(q4, out_q)


def test_varlen_on_the_fly_and_int64(backend):
    inv, _ = pk.rope_frequencies(32)
    inv = inv.to(DEVICE)
    cu = torch.tensor([0, 3, 10, 11], device=DEVICE)  # int64
    x = torch.randn(11, 3, 32, device=DEVICE)
    rows = cu_positions([0, 3, 10, 11], None, 100, 11)
    out, _ = pk.apply_rope(x, None, inv_freq=inv, cu_seqlens=cu, offsets=100)
    want, _ = pk.apply_rope(x, None, inv_freq=inv, positions=rows.to(DEVICE))
    assert torch.equal(out, want)


@pytest.mark.parametrize("n_seqs", [255, 256, 257, 600])
def test_varlen_many_sequences(backend, n_seqs):
    """More sequences than one read of cu_seqlens covers (256 at a time in the kernel): every chunk
    boundary, empty sequences, per-sequence offsets and padded tokens, against per-token positions."""
    g = torch.Generator().manual_seed(n_seqs)
    lengths = torch.randint(0, 3, (n_seqs,), generator=g)  # a third of them empty
    cu_list = [0] + torch.cumsum(lengths, 0).tolist()
    T = cu_list[-1] + 2
    off_list = torch.randint(0, 50, (n_seqs,), generator=g).tolist()
    rows = cu_positions(cu_list, off_list, 0, T)
    inv, _ = pk.rope_frequencies(32)
    cos, sin = pk.rope_cos_sin(64, inv.to(DEVICE))
    x = torch.randn(T, 2, 32, generator=g).to(DEVICE)
    for cu_dtype in (torch.int32, torch.int64):
        cu = torch.tensor(cu_list, device=DEVICE, dtype=cu_dtype)
        out, _ = pk.apply_rope(x, None, cos, sin, cu_seqlens=cu, offsets=torch.tensor(off_list, device=DEVICE))
        want, _ = pk.apply_rope(x, None, cos, sin, positions=rows.to(DEVICE))
        assert torch.equal(out, want), cu_dtype


def test_varlen_bad_input():
    cos, sin = pk.rope_cos_sin(16, pk.rope_frequencies(16)[0].to(DEVICE))
    x = torch.randn(8, 2, 16, device=DEVICE)
    x0 = x.clone()
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and never decrease"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0, 5, 3, 8], device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([1, 5, 8], device=DEVICE))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 9 exceeds the 8 packed tokens"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0, 5, 9], device=DEVICE))
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0.0, 8.0], device=DEVICE))
    with pytest.raises(ValueError, match=r"cu_seqlens must be \[N \+ 1\]"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match=r"offsets must have shape \[B\] = \[2\]"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0, 4, 8], device=DEVICE), offsets=torch.tensor([1]))
    with pytest.raises(ValueError, match="the table's rows"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0, 4, 8], device=DEVICE), offsets=13)
    with pytest.raises(ValueError, match="cu_seqlens needs packed q/k"):
        pk.apply_rope_(x[None], None, cos, sin, cu_seqlens=torch.tensor([0, 8], device=DEVICE))
    with pytest.raises(ValueError, match="pass positions or cu_seqlens, not both"):
        pk.apply_rope_(x, None, cos, sin, cu_seqlens=torch.tensor([0, 8]), positions=torch.arange(8))
    assert torch.equal(x, x0), "input changed although the call raised"
