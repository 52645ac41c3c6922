"""Bad input to rope_and_cache_ raises a clear error naming the argument before anything is written: q, k
and both caches are bitwise unchanged afterwards, on every backend."""

import pytest
import torch

import posenc_kernels as pk

from cache.common import angles, bits, paged
from conftest import DEVICE

NATIVE_OP = "rope_and_cache_"
I = dict(device=DEVICE)


def _kw(**over):
    kw = dict(slot_mapping=torch.tensor([0, 5, 9], **I), positions=torch.tensor([1, 2, 3], **I))
    kw.update(over)
    return {n: x for n, x in kw.items() if x is not None}


CASES = [  # (pattern, exception, change(q, k, v, kc, vc) -> (args, kwargs))
    ("exactly one of slot_mapping .* got both", ValueError,
     lambda a: (a, _kw(cache_positions=torch.tensor([0, 1, 2], **I)))),
    ("exactly one of slot_mapping .* got neither", ValueError, lambda a: (a, _kw(slot_mapping=None))),
    ("slot_mapping\\[2\\] = 16 is out of range", ValueError, lambda a: (a, _kw(slot_mapping=torch.tensor([0, 1, 16], **I)))),
    ("slot_mapping\\[0\\] = -2 is out of range", ValueError, lambda a: (a, _kw(slot_mapping=torch.tensor([-2, 1, 3], **I)))),
    ("slot 5 is written twice", ValueError, lambda a: (a, _kw(slot_mapping=torch.tensor([5, -1, 5], **I)))),
    ("slot_mapping must have at most one slot per token", ValueError,
     lambda a: (a, _kw(slot_mapping=torch.tensor([0, 1, 2, 3], **I)))),
    ("slot_mapping must be int32 or int64", TypeError, lambda a: (a, _kw(slot_mapping=torch.tensor([0., 1., 2.], **I)))),
    ("k_cache must be \\[num_blocks, block_size, Hk, D\\]", ValueError,
     lambda a: ((*a[:3], a[3][..., :8], a[4]), _kw())),
    ("v_cache must be .* and k_cache's blocks", ValueError, lambda a: ((*a[:4], a[4][:2]), _kw())),
    ("k_cache must be \\[num_blocks, Hk, block_size, D\\]", ValueError, lambda a: (a, _kw(kv_layout="HND"))),
    ("k_cache must have k's dtype", TypeError, lambda a: ((*a[:3], a[3].double(), a[4]), _kw())),
    ("v_cache must have k_cache's dtype", TypeError,
     lambda a: ((*a[:3], a[3].to(torch.float8_e4m3fn), a[4]), _kw(k_scale=1.0))),
    ("an FP8 cache .* needs k_scale", ValueError,
     lambda a: ((*a[:3], a[3].to(torch.float8_e4m3fn), a[4].to(torch.float8_e4m3fn)), _kw(v_scale=1.0))),
    ("k_scale applies to FP8 caches only", ValueError, lambda a: (a, _kw(k_scale=0.5))),
    ("v must have k's tokens and heads .* \\(v has 1 heads, k 2\\)", ValueError,
     lambda a: ((a[0], a[1], a[2][:, :1], a[3], a[4]), _kw())),
    ("pass v and v_cache together", ValueError, lambda a: ((*a[:4], None), _kw())),
    ("kv_layout must be 'NHD' or 'HND'", ValueError, lambda a: (a, _kw(kv_layout="BHSD"))),
    ("with slot_mapping .* must be packed", ValueError, lambda a: ((a[0][None], a[1][None], a[2][None], a[3], a[4]), _kw())),
    ("q_fp8 needs q_scale", ValueError,
     lambda a: (a, _kw(q_fp8=torch.empty(a[0].shape, dtype=torch.float8_e4m3fn, device=DEVICE)))),
    ("k_scale must be a normal fp32 number", ValueError,
     lambda a: ((*a[:3], a[3].to(torch.float8_e5m2), a[4].to(torch.float8_e5m2)), _kw(k_scale=0.0, v_scale=1.0))),
    ("k_scale must be a normal fp32 number", ValueError,
     lambda a: ((*a[:3], a[3].to(torch.float8_e5m2), a[4].to(torch.float8_e5m2)), _kw(k_scale=1e39, v_scale=1.0))),
    ("v_scale must hold normal fp32 numbers .* got min 1e-40", ValueError,
     lambda a: ((*a[:3], a[3].to(torch.float8_e5m2), a[4].to(torch.float8_e5m2)),
                _kw(k_scale=1.0, v_scale=torch.tensor([1e-40, 1.0], dtype=torch.float64, device=DEVICE)))),
    ("k_cache must not overlap k|k must not overlap", ValueError, lambda a: ((a[0], a[3][0, :3], a[2], a[3], a[4]), _kw())),
    ("positions must have shape", ValueError, lambda a: (a, _kw(positions=torch.tensor([1, 2], **I)))),
    ("k_scale must be a float, a tensor or None", TypeError, lambda a: (a, _kw(k_scale="1"))),
]  # fmt: skip


def test_errors_before_any_write(backend):
    for pattern, exc, change in CASES:
        base = paged(T=3, blocks=4, bs=4)
        cos, sin = angles(16)
        args, kw = change(base)
        before = [bits(t.clone()) for t in args if t is not None]
        with pytest.raises(exc, match=pattern):
            pk.rope_and_cache_(*args, cos, sin, **kw)
        after = [bits(t) for t in args if t is not None]
        assert all(torch.equal(x, y) for x, y in zip(before, after)), f"written before the error: {pattern}"


def test_contiguous_errors():
    q = torch.randn(2, 3, 4, 16, **I)
    k, v = torch.randn(2, 3, 2, 16, **I), torch.randn(2, 3, 2, 16, **I)
    kc, vc = torch.zeros(2, 2, 8, 16, **I), torch.zeros(2, 2, 8, 16, **I)
    cos, sin = angles(16)
    with pytest.raises(ValueError, match="cache position 4 is written twice"):
        pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, cache_positions=torch.tensor([4, 4, 5], **I), kv_layout="HND")
    with pytest.raises(ValueError, match="cache_positions\\[1\\] = 8 is out of range"):
        pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, cache_positions=torch.tensor([7, 8, 0], **I), kv_layout="HND")
    with pytest.raises(ValueError, match="cache_positions must be \\[S\\] = \\[3\\] or \\[B, S\\]"):
        pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, cache_positions=torch.tensor([1, 2], **I), kv_layout="HND")
    with pytest.raises(ValueError, match="k_cache must be \\[B, S_max, Hk, D\\] .* and B = 2"):
        pk.rope_and_cache_(q, k, v, kc[:1], vc, cos, sin, cache_positions=torch.tensor([0, 1, 2], **I))
    assert not kc.any() and not vc.any()
