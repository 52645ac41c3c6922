"""Bad input to qk_norm_rope(_) / qk_norm_rope_qkv_ raises a clear error naming the argument, before
anything is written (the in-place inputs are unchanged afterwards), on every backend."""

import pytest
import torch

import posenc_kernels as pk

from conftest import DEVICE
from rope.common import make_qk, tables

NATIVE_OP = "qk_norm_rope_"


def _inputs():
    q, k = make_qk(1, 3, 4, 2, 16, torch.float32)
    cos, sin = tables(8, 16)
    return q, k, torch.rand(16, device=DEVICE), torch.rand(16, device=DEVICE), cos, sin


CASES = [
    ("q_weight must be \\[D\\]", lambda q, k, qw, kw: dict(q_weight=torch.rand(15, device=DEVICE))),
    ("k_weight must have k's dtype", lambda q, k, qw, kw: dict(k_weight=kw.double())),
    ("q_weight must be \\[H\\*D\\].*per-head weight", lambda q, k, qw, kw: dict(norm="heads")),
    ("k_weight must be \\[H\\*D\\] = \\[2\\*16\\]",
     lambda q, k, qw, kw: dict(norm="heads", q_weight=torch.rand(64, device=DEVICE))),
    ("norm must be 'head' or 'heads'", lambda q, k, qw, kw: dict(norm="layer")),
    ("eps must be a finite float >= 0", lambda q, k, qw, kw: dict(eps=-1e-6)),
    ("weight_offset must be a finite float", lambda q, k, qw, kw: dict(weight_offset=float("nan"))),
    ("k_weight was given without k", lambda q, k, qw, kw: dict(k=None)),
    ("q_weight must be on the same device|q_weight must have 1 dimensions",
     lambda q, k, qw, kw: dict(q_weight=qw.view(2, 8))),
    ("positions must have shape", lambda q, k, qw, kw: dict(positions=torch.zeros(5, dtype=torch.long, device=DEVICE))),
]  # fmt: skip


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
def test_errors_before_any_write(backend, inplace):
    for pattern, change in CASES:
        q, k, qw, kw, cos, sin = _inputs()
        args = dict(q=q, k=k, q_weight=qw, k_weight=kw, cos=cos, sin=sin)
        args.update(change(q, k, qw, kw))
        q0, k0 = q.clone(), k.clone()
        fn = pk.qk_norm_rope_ if inplace else pk.qk_norm_rope
        with pytest.raises((ValueError, TypeError), match=pattern):
            fn(args.pop("q"), args.pop("k"), args.pop("q_weight"), args.pop("k_weight"), args.pop("cos"),
               args.pop("sin"), **args)  # fmt: skip
        assert torch.equal(q, q0) and torch.equal(k, k0), pattern


def test_qkv_errors():
    cos, sin = tables(8, 16)
    qkv = torch.randn(3, 8 * 16, device=DEVICE)
    qkv0 = qkv.clone()
    w = torch.rand(16, device=DEVICE)
    kw = dict(num_heads_q=4, num_heads_kv=2)
    with pytest.raises(ValueError, match="qkv's last dim must be .* = 128, got 120 \\(not a multiple of head_dim 16\\)"):
        pk.qk_norm_rope_qkv_(qkv[:, :120], w, w, cos, sin, head_dim=16, **kw)
    with pytest.raises(ValueError, match="qkv's last dim must be"):
        pk.qk_norm_rope_qkv_(qkv, w, w, cos, sin, head_dim=16, num_heads_q=4, num_heads_kv=3)
    with pytest.raises(ValueError, match="num_heads_kv must be a positive int"):
        pk.qk_norm_rope_qkv_(qkv, w, w, cos, sin, head_dim=16, num_heads_q=4, num_heads_kv=0)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        pk.qk_norm_rope_qkv_(qkv, w, w, cos, sin, head_dim=0, **kw)
    with pytest.raises(ValueError, match="qkv must have Hq \\+ 2\\*Hkv"):
        pk.qk_norm_rope_qkv_(qkv.view(3, 8, 16)[:, :7], w, w, cos, sin, **kw)
    with pytest.raises(ValueError, match="k_weight must be \\[D\\]"):
        pk.qk_norm_rope_qkv_(qkv, w, w[:8], cos, sin, head_dim=16, **kw)
    assert torch.equal(qkv, qkv0)
