"""The CUDA C++ RoPE kernel's refusals and guards (needs a GPU): rows outside the table, value checks,
empty and bad input, ignored arguments, aliasing, inference tensors and version counters.
"""

import pytest
import torch

import posenc_kernels as pk

from .native_cuda_common import *  # noqa: F401,F403  (the shared helpers: native_cuda_common.__all__)
from .cuda_rope_common import _rows, _args, _native_rope, _check_rope, _qk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu_check.sh)")


def test_rope_rows_outside_the_table_are_nan():
    """The CUDA kernel reads no values: a row outside the table gives NaN, never an out-of-bounds read (the
    value checks are the Python side's; off here)."""
    q, k = _qk(1, 4, 2, 1, 64, torch.float32)
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    positions = torch.tensor([[0, 7, 8, -1]], device=DEV)  # 8 and -1 lie outside the 8-row table
    with value_checks_off():
        qo, ko = _native_rope(q, k, cos, sin, positions=positions)
        for out in (qo, ko):
            assert not out[:, :2].isnan().any()
            assert out[:, 2:].isnan().all()
        # packed with cu_seqlens: the second sequence starts past the table
        qp = torch.randn(7, 2, 64, device=DEV)
        qo, _ = _native_rope(qp, None, cos, sin, cu_seqlens=torch.tensor([0, 3, 7], device=DEV),
                             offsets=torch.tensor([0, 100], device=DEV))  # fmt: skip
        assert not qo[:3].isnan().any() and qo[3:].isnan().all()
        # an axis map naming an axis outside positions: those frequencies NaN
        am = torch.zeros(32, dtype=torch.int64, device=DEV)
        am[5] = 7
        qo, _ = _native_rope(q, None, cos, sin, positions=torch.zeros(2, 1, 4, dtype=torch.int64, device=DEV),
                             axis_map=am)  # fmt: skip
        assert qo[..., [5, 37]].isnan().all() and not qo[..., :5].isnan().any()


def test_public_api_value_checks():
    """With value checks on, the public functions refuse rows outside the table before launching (the CUDA
    kernel itself reads no values)."""
    q, k = _qk(1, 4, 2, 1, 64, torch.float32)
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    q0 = q.clone()
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
        pk.apply_rope_(q, k, cos, sin, positions=torch.tensor([[0, 7, 8, -1]], device=DEV))
    assert torch.equal(q, q0)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        pk.apply_rope(torch.randn(7, 2, 64, device=DEV), None, cos, sin, cu_seqlens=torch.tensor([1, 7], device=DEV))


def test_rope_empty_and_errors():
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    for shape in [(0, 3, 2, 64), (2, 0, 2, 64), (0, 2, 64)]:
        q = torch.randn(shape, device=DEV)
        _native_rope(q, None, cos, sin, inplace=True)  # no tokens: nothing launched, no error
        qo, _ = _native_rope(q, None, cos, sin)
        assert qo.shape == q.shape
    q = torch.randn(1, 3, 2, 64, device=DEV)
    q0 = q.clone()
    strided = q.transpose(2, 3).contiguous().transpose(2, 3)  # channel stride 2: refused on CUDA
    for inplace in (True, False):
        with pytest.raises(RuntimeError, match=r"q must have stride\(-1\) == 1"):
            _native_rope(strided, None, cos, sin, inplace=inplace)
        with pytest.raises(RuntimeError, match=r"k must have stride\(-1\) == 1"):
            _native_rope(q, torch.randn(1, 3, 1, 128, device=DEV)[..., ::2], cos, sin, inplace=inplace)
    with pytest.raises(ValueError, match="exceeds head_dim"):
        _native_rope(q[..., :32], None, cos, sin)
    with pytest.raises(TypeError, match="exact=True needs inv_freq in float64"):
        _native_rope(q, None, inv_freq=torch.ones(32, device=DEV), exact=True)
    with pytest.raises(ValueError, match=r"cos must be on the same device as the input \(cuda:0\), got cpu"):
        _native_rope(q, None, cos.cpu(), sin.cpu())
    with pytest.raises(ValueError, match="cu_seqlens needs packed q/k"):
        _native_rope(q, None, cos, sin, cu_seqlens=torch.tensor([0, 3], device=DEV))
    with pytest.raises(ValueError, match=r"axis_map must have one entry per frequency, \[R/2\] = \[32\]"):
        _native_rope(q, None, cos, sin, positions=torch.zeros(3, 1, 3, dtype=torch.long, device=DEV),
                     axis_map=torch.zeros(4, dtype=torch.long, device=DEV))  # fmt: skip
    with pytest.raises(ValueError, match="axis_map needs positions"):
        _native_rope(q, None, cos, sin, axis_map=torch.zeros(32, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match=r"cu_seqlens must be \[N \+ 1\] with N >= 1"):
        _native_rope(q[0], None, cos, sin, cu_seqlens=torch.tensor([0], device=DEV))
    assert torch.equal(q, q0), "nothing may be written before an error"
    # accepted: a misaligned q (storage offset one element, channel stride 1): the scalar path
    qm = torch.randn(1, 3, 2, 65, device=DEV)[..., 1:]
    qo, _ = _native_rope(qm, None, cos, sin)
    _check_rope(qo, qm, cos, sin, _rows(1, 3, None, None, 0), False, False, "misaligned")


def test_rope_ignored_arguments_are_errors():
    """Arguments the chosen mode would ignore are refused, not silently dropped; nothing is written."""
    q = torch.randn(2, 3, 2, 64, device=DEV)
    q0 = q.clone()
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    offsets = torch.tensor([0, 2], device=DEV)
    positions = torch.zeros(2, 3, device=DEV, dtype=torch.int64)
    for inplace in (True, False):
        with pytest.raises(ValueError, match="attention_factor"):
            _native_rope(q, None, cos, sin, af=0.5, inplace=inplace)
        with pytest.raises(ValueError, match="exact applies to on-the-fly angles"):
            _native_rope(q, None, cos, sin, exact=True, inplace=inplace)
        with pytest.raises(ValueError, match="offset must be 0 when an offsets tensor is given"):
            _native_rope(q, None, cos, sin, offsets=offsets, offset=3, inplace=inplace)
        with pytest.raises(ValueError, match="pass positions or offsets, not both"):
            _native_rope(q, None, cos, sin, positions=positions, offset=3, inplace=inplace)
        with pytest.raises(ValueError, match="positions or offsets, not both"):
            _native_rope(q, None, cos, sin, positions=positions, offsets=offsets, inplace=inplace)
    assert torch.equal(q, q0), "nothing may be written before an error"
    # the accepted forms still run: an offset alone, attention_factor 1.0 with tables
    qo, _ = _native_rope(q, None, cos, sin, offset=3)
    _check_rope(qo, q, cos, sin, _rows(2, 3, None, None, 3), False, False, "offset 3")


def test_rope_aliasing_checks():
    """In place, q and k must not overlap internally nor each other. Checked from metadata before any
    write (the out-of-place op writes fresh tensors only)."""
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    Hq, Hk, D = 4, 2, 64
    q, k = _qk(1, 1, Hq, Hk, D, torch.float32)  # B = S = 1: head slices stay dense, so ATen's overlap test
    q0, k0 = q.clone(), k.clone()  # can prove an overlap
    cases = [
        ("q has internally overlapping memory", lambda: (q[:, :, :1].expand_as(q), k)),
        ("k has internally overlapping memory", lambda: (q, k[:, :, :1].expand_as(k))),
        ("k must not overlap q: they share memory", lambda: (q, q[:, :, :Hk])),  # k inside q
        ("k must not overlap q: shared elements would be rotated twice", lambda: (q, q)),
    ]
    for msg, make in cases:
        a = make()
        with pytest.raises(ValueError, match=msg):  # the Python check's messages (csrc/rope_args.h)
            rope_(*a, *_args(cos, sin))
        assert torch.equal(q, q0) and torch.equal(k, k0), msg
    buf = torch.randn(1, 5, Hq, D, device=DEV)
    buf0 = buf.clone()
    with pytest.raises(ValueError, match="must not overlap"):
        rope_(buf[:, :4], buf[:, 1:], *_args(cos, sin))  # k is q shifted by one token
    assert torch.equal(buf, buf0)
    # out of place reads overlapping inputs fine
    qo, ko = _native_rope(q, q, cos, sin)
    assert torch.equal(qo, ko) and qo.data_ptr() != q.data_ptr()

    # accepted: the heads of one fused qkv buffer (non-dense head slices: disjoint, not provably so, accepted
    # as by ATen); a dense [3, ...] split
    for qkv, split in (
        (torch.randn(2, 5, Hq + 2 * Hk, D, device=DEV), lambda t: (t[:, :, :Hq], t[:, :, Hq:Hq + Hk])),
        (torch.randn(3, 2, 5, Hq, D, device=DEV), lambda t: (t[0], t[1])),
    ):
        q, k = split(qkv)
        q0, k0 = q.clone(), k.clone()
        rope_(q, k, *_args(cos, sin))
        rows = _rows(q.shape[0], q.shape[1], None, None, 0)
        _check_rope(q, q0, cos, sin, rows, False, False, "fused q")
        _check_rope(k, k0, cos, sin, rows, False, False, "fused k")


def test_rope_inference_tensors_and_version_counter():
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(64)[0].to(DEV))
    with torch.inference_mode():
        qi = torch.randn(2, 3, 2, 64, device=DEV)
    q0 = qi.clone()
    with pytest.raises(RuntimeError, match="q is an inference tensor: in-place updates"):
        rope_(qi, None, *_args(cos, sin))
    assert torch.equal(qi, q0)
    want, _ = rope(q0, None, *_args(cos, sin))
    with torch.inference_mode():
        rope_(qi, None, *_args(cos, sin))
    assert torch.equal(qi, want)
    q, k = _qk(2, 3, 2, 1, 64, torch.float32)
    vq, vk = q._version, k._version
    rope_(q, k, *_args(cos, sin))
    assert (q._version, k._version) == (vq + 1, vk + 1)
    rope(q, k, *_args(cos, sin))
    assert (q._version, k._version) == (vq + 1, vk + 1)
