"""Relative position bias benchmarks: dense [H, Lq, Lk] ALiBi and T5 biases vs eager PyTorch and
torch.compile of it, and the T5 forward + table-gradient backward vs HF's embedding autograd.

Bytes are the minimal traffic: the bias written once (+ the T5 table read once); for the T5 forward +
backward also the upstream gradient read once and the table gradient written once. On CPU the posenc
provider is the package's pure-torch path (benchmarks never time the Triton interpreter).
"""

import pytest
import torch

import posenc_kernels.reference as ref
from posenc_kernels import alibi_bias, alibi_slopes, t5_relative_bias

from _harness import DEVICE, IS_CUDA, run

if IS_CUDA:
    # (H, Lq, Lk): a 4k prefill, a 2k prefill, and one decode step over a 32k cache.
    SHAPES = [(32, 4096, 4096), (16, 2048, 2048), (32, 1, 32768)]
    DTYPES = [torch.bfloat16, torch.float32]
else:  # 2-core CPU: few, small shapes
    SHAPES = [(16, 1024, 1024), (16, 1, 8192)]
    DTYPES = [torch.float32, torch.bfloat16]

CASES = [(s, dt) for s in SHAPES for dt in DTYPES]
PROVIDERS = ["posenc", "eager", "eager_compiled"]

_compiled = {}


def _compiled_fn(name, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def _case_id(c):
    (H, Lq, Lk), dt = c
    return f"H{H}-{Lq}x{Lk}-{str(dt).replace('torch.', '')}"


def _shape_str(H, Lq, Lk, dtype):
    return f"H{H} {Lq}x{Lk} {str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_alibi_bias(benchmark, case, provider):
    (H, Lq, Lk), dtype = case
    slopes = alibi_slopes(H, device=DEVICE)
    q_offset = Lk - Lq  # queries are the last Lq positions (decode: one query after the cache)
    if provider == "posenc":
        fn = lambda: alibi_bias(slopes, Lq, Lk, q_offset=q_offset, dtype=dtype)  # noqa: E731
    else:
        eager = ref.alibi_bias_eager if provider == "eager" else _compiled_fn("alibi", ref.alibi_bias_eager)
        fn = lambda: eager(slopes, Lq, Lk, q_offset=q_offset, dtype=dtype)  # noqa: E731
    nbytes = H * Lq * Lk * dtype.itemsize + slopes.nbytes
    run(benchmark, fn, op="alibi_bias", shape=_shape_str(H, Lq, Lk, dtype), provider=provider, nbytes=nbytes)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_t5_relative_bias(benchmark, case, provider):
    (H, Lq, Lk), dtype = case
    table = torch.randn(32, H, device=DEVICE, dtype=dtype)
    q_offset = Lk - Lq
    kw = dict(bidirectional=False, max_distance=128, q_offset=q_offset)  # the decoder's setting
    if provider == "posenc":
        fn = lambda: t5_relative_bias(table, Lq, Lk, **kw)  # noqa: E731
    else:
        # HF compute_bias: bucket matrix, embedding lookup into [Lq, Lk, H], permuted view [H, Lq, Lk].
        eager = ref.t5_relative_bias_hf_eager
        if provider == "eager_compiled":
            eager = _compiled_fn("t5", eager)
        fn = lambda: eager(table, Lq, Lk, **kw)  # noqa: E731
    nbytes = H * Lq * Lk * dtype.itemsize + table.nbytes
    run(benchmark, fn, op="t5_relative_bias", shape=_shape_str(H, Lq, Lk, dtype), provider=provider, nbytes=nbytes)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", [c for c in CASES if c[0][1] > 1], ids=_case_id)
def test_t5_relative_bias_fwd_bwd(benchmark, case, provider):
    (H, Lq, Lk), dtype = case
    table = torch.randn(32, H, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn(H, Lq, Lk, device=DEVICE, dtype=dtype)
    kw = dict(bidirectional=True, max_distance=128)  # the encoder's setting

    def fwd_bwd(make):
        return lambda: torch.autograd.grad(make(table, Lq, Lk, **kw), table, grad)

    if provider == "posenc":
        fn = fwd_bwd(t5_relative_bias)
    elif provider == "eager":
        fn = fwd_bwd(ref.t5_relative_bias_hf_eager)
    else:
        fn = fwd_bwd(_compiled_fn("t5", ref.t5_relative_bias_hf_eager))
    nbytes = 2 * H * Lq * Lk * dtype.itemsize + 2 * table.nbytes  # bias written, grad read, table read + grad
    run(benchmark, fn, op="t5_relative_bias_fwd_bwd", shape=_shape_str(H, Lq, Lk, dtype), provider=provider,
        nbytes=nbytes)  # fmt: skip
