"""RoPE test helpers: q/k in both layouts, cos/sin tables, and the value check against the float64
truth at oracle positions (tests/positions_oracle.py).
"""

import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref

import positions_oracle as po
from conftest import DEVICE, assert_dtype_tolerance


def make_qk(B, S, Hq, Hk, D, dtype, *, hf_layout=False, device=DEVICE):
    """q/k as [B, S, H, D]; with hf_layout they are transposed views of [B, H, S, D] storage."""
    if hf_layout:
        q = torch.randn(B, Hq, S, D, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Hk, S, D, device=device, dtype=dtype).transpose(1, 2) if Hk else None
    else:
        q = torch.randn(B, S, Hq, D, device=device, dtype=dtype)
        k = torch.randn(B, S, Hk, D, device=device, dtype=dtype) if Hk else None
    return q, k


def tables(P, R, *, base=10000.0, dtype=torch.float32, device=DEVICE):
    inv = pk.rope_frequencies(R, base)[0].to(device)
    return pk.rope_cos_sin(P, inv, dtype=dtype)


def oracle_rows(q, positions=None, offsets=0):
    """``[B, S]`` int64 table rows of q's tokens from tests/positions_oracle.py (not the package's resolver)."""
    return po.as_tensor(po.token_positions(q.shape[0], q.shape[1], positions=positions, offsets=offsets),
                        device=q.device, dtype=torch.int64)  # fmt: skip


def check_rope(q, k, cos, sin, *, inplace, what="", **kw):
    """Run apply_rope(_) and compare with the float64 truth under the dtype-tied rule. The truth and the
    torch-in-dtype computation rotate by the table rows the position oracle gives for ``positions`` /
    ``offsets``, so a wrong position in the package's resolution cannot be in the expected values too."""
    rows = oracle_rows(q, kw.get("positions"), kw.get("offsets", 0))
    rot = dict(interleaved=kw.get("interleaved", False), conjugate=kw.get("conjugate", False))
    truth_q = ref.rotate_reference(q, cos, sin, rows, **rot)
    truth_k = ref.rotate_reference(k, cos, sin, rows, **rot) if k is not None else None
    eager_q = ref.rotate_reference(q, cos.to(q.dtype), sin.to(q.dtype), rows, dtype=q.dtype, **rot)
    eager_k = ref.rotate_reference(k, cos.to(k.dtype), sin.to(k.dtype), rows, dtype=k.dtype, **rot) if k is not None else None
    q0 = q.clone()
    k0 = k.clone() if k is not None else None
    if inplace:
        out_q, out_k = pk.apply_rope_(q, k, cos, sin, **kw)
        assert out_q is q and out_k is k
    else:
        out_q, out_k = pk.apply_rope(q, k, cos, sin, **kw)
        assert torch.equal(q, q0) and (k is None or torch.equal(k, k0)), "out-of-place op modified its inputs"
    assert out_q.dtype == q0.dtype
    assert_dtype_tolerance(out_q, truth_q, eager_q, what=f"{what} q")
    if k is not None:
        assert_dtype_tolerance(out_k, truth_k, eager_k, what=f"{what} k")
    else:
        assert out_k is None
    R = 2 * cos.shape[-1]
    assert torch.equal(out_q[..., R:], q0[..., R:]), "pass-through channels changed"
