"""Relative position biases added to attention scores: ALiBi and T5's bucketed learned biases. The public
functions (dense ``[H, Lq, Lk]`` biases and FlexAttention ``score_mod`` factories) and the module; the ops
(:mod:`.op`) validate and dispatch.

Positions (the public contract): query ``i`` sits at position ``q_offset + i`` (decode: ``q_offset`` is the
number of cached tokens), key ``j`` at ``j``; the relative position is ``key_pos - query_pos`` (HF T5's
``memory_position - context_position``).

* ALiBi (Press et al. 2022): causal form ``slope_h * (j - (q_offset + i))``, zero on the diagonal and
  negative for past keys; future keys get a *positive* value and must be removed by the attention mask
  (as every causal model does). Symmetric form (encoders): ``-slope_h * |j - (q_offset + i)|``.
* T5 (Raffel et al. 2020): ``table[bucket(j - (q_offset + i)), h]`` with ``table`` the ``[num_buckets, H]``
  weight of HF's ``relative_attention_bias`` embedding and ``bucket`` HF's ``_relative_position_bucket``,
  reproduced with integer thresholds (no float log, :mod:`.buckets`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..checks import FLOAT_DTYPES, INT_DTYPES, check_tensor, reraise_with_check
from .buckets import bucket_layout, bucket_torch, check_bucket_args, check_lengths, is_int, t5_bucket_thresholds
from .op import alibi_bias_op, check_alibi, check_t5, t5_relative_bias_op

__all__ = ["alibi_slopes", "alibi_bias", "alibi_score_mod", "t5_bucket_thresholds", "t5_relative_bucket",
           "t5_relative_bias", "t5_score_mod", "T5RelativePositionBias"]  # fmt: skip


def alibi_slopes(num_heads: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """ALiBi head slopes ``[num_heads]``, the paper's recipe for any head count.

    With ``n = 2 ** floor(log2(H))``: head ``i < n`` gets ``2 ** (-8 (i + 1) / n)``; when H is not a power
    of two, the remaining ``H - n`` heads get every other slope of ``2n`` heads, ``2 ** (-8 (2i + 1) / (2n))``
    (the ALiBi repository's ``get_slopes``, BLOOM's and MPT's code). Computed in float64 and rounded once
    to ``dtype``.

    >>> import posenc_kernels as rel
    >>> rel.alibi_slopes(8)
    tensor([0.5000, 0.2500, 0.1250, 0.0625, 0.0312, 0.0156, 0.0078, 0.0039])
    >>> rel.alibi_slopes(12)[8:]                                 # the extra heads of a 12-head model
    tensor([0.7071, 0.3536, 0.1768, 0.0884])
    """
    if not is_int(num_heads):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads <= 0:
        raise ValueError(f"num_heads must be > 0, got {num_heads}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    n = 1 << (int(num_heads).bit_length() - 1)
    exps = [8.0 * (i + 1) / n for i in range(n)] + [8.0 * (2 * i + 1) / (2 * n) for i in range(num_heads - n)]
    # Exponents are exact binary fractions; exp2 of them in float64, rounded once to dtype.
    return torch.exp2(-torch.tensor(exps, dtype=torch.float64)).to(dtype=dtype, device=device)


def alibi_bias(
    slopes: torch.Tensor,
    Lq: int,
    Lk: int,
    *,
    causal: bool = True,
    q_offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ALiBi attention bias ``[H, Lq, Lk]`` (add it to the scores; it broadcasts over the batch).

    Query ``i`` sits at position ``q_offset + i`` (decode: the cache length), key ``j`` at ``j``.
    ``causal=True``: ``slopes[h] * (j - (q_offset + i))`` - zero on the diagonal, negative for past keys,
    and **positive for future keys**, which the causal mask is expected to remove (the bias is not a mask).
    It differs from BLOOM's ``slope * j`` only by a per-row constant, which softmax ignores.
    ``causal=False``: the symmetric ``-slopes[h] * |j - (q_offset + i)|`` (encoders). Math in fp32 (fp64 for
    ``dtype=torch.float64``), one rounding to ``dtype``. Differentiable w.r.t. ``slopes``.

    >>> import torch, posenc_kernels as rel
    >>> bias = rel.alibi_bias(rel.alibi_slopes(4), 3, 3)
    >>> bias[0]
    tensor([[ 0.0000,  0.2500,  0.5000],
            [-0.2500,  0.0000,  0.2500],
            [-0.5000, -0.2500,  0.0000]])
    >>> rel.alibi_bias(rel.alibi_slopes(4), 1, 5, q_offset=4)[1]    # decode step: one query at position 4
    tensor([[-0.2500, -0.1875, -0.1250, -0.0625,  0.0000]])
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    try:
        return alibi_bias_op(slopes, Lq, Lk, causal, q_offset, dtype)
    except (RuntimeError, ValueError, TypeError) as e:  # the schema's message for a list or a float: ours
        reraise_with_check(e, check_alibi, slopes, Lq, Lk, causal, q_offset, dtype)


def alibi_score_mod(slopes: torch.Tensor, *, causal: bool = True, q_offset: int = 0):
    """FlexAttention ``score_mod`` adding the ALiBi bias of :func:`alibi_bias` to each score.

    Returns ``score_mod(score, b, h, q_idx, kv_idx) -> score + bias``; pair the causal form with a causal
    ``block_mask`` (or mask_mod) as with the dense bias. Compile ``flex_attention`` for a fused kernel.

    >>> import torch, posenc_kernels as rel
    >>> mod = rel.alibi_score_mod(rel.alibi_slopes(4))
    >>> mod(torch.tensor(0.0), 0, torch.tensor(1), torch.tensor(5), torch.tensor(2))
    tensor(-0.1875)
    """
    check_tensor("slopes", slopes, dtypes=FLOAT_DTYPES, ndim=1)
    check_lengths(0, 0, q_offset)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")

    def score_mod(score, b, h, q_idx, kv_idx):
        rel = kv_idx - (q_idx + q_offset)
        dist = rel if causal else -rel.abs()
        return score + (slopes[h] * dist).to(score.dtype)

    return score_mod


def t5_relative_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5 bucket of every ``key_pos - query_pos`` in an int tensor of any shape (same shape, same dtype).

    The exact value of T5's bucket formula (HF transformers' ``T5Attention._relative_position_bucket``):
    ``bidirectional`` gives keys after the query the upper ``num_buckets / 2`` buckets; per direction, half
    the buckets are exact distances and the rest logarithmic up to ``max_distance`` (farther keys share the
    last bucket); unidirectional maps every key after the query to bucket 0. Computed with the exact integer
    thresholds of :func:`t5_bucket_thresholds` (comparisons only: usable in score_mods and compiled graphs);
    where the log ratio is exactly a bucket boundary, HF's fp32 ``log`` may land one bucket low.

    >>> import torch, posenc_kernels as rel
    >>> rel.t5_relative_bucket(torch.tensor([-200, -16, -1, 0, 1, 15, 16, 1000]))
    tensor([15, 10,  1,  0, 17, 25, 26, 31])
    >>> rel.t5_relative_bucket(torch.tensor([-20, 0, 5]), bidirectional=False)
    tensor([17,  0,  0])
    """
    check_tensor("relative_position", relative_position)
    if relative_position.dtype == torch.bool or relative_position.dtype not in INT_DTYPES:
        raise TypeError(f"relative_position must be an integer tensor, got dtype {relative_position.dtype}")
    check_bucket_args(num_buckets, max_distance, bidirectional)
    half, m, thr = bucket_layout(int(num_buckets), int(max_distance), bidirectional)
    if torch.iinfo(relative_position.dtype).max < int(num_buckets) - 1:
        raise ValueError(f"relative_position's dtype {relative_position.dtype} cannot hold buckets up to "
                         f"{int(num_buckets) - 1}; pass a wider integer tensor")  # fmt: skip
    # Computed in int64 whatever the input dtype (|int8(-128)| and friends overflow in their own dtype).
    return bucket_torch(relative_position.to(torch.int64), half, m, thr, bidirectional).to(relative_position.dtype)


def _resolve_num_buckets(table, num_buckets):
    check_tensor("table", table, dtypes=FLOAT_DTYPES, ndim=2)
    if num_buckets is not None and not is_int(num_buckets):
        raise TypeError(f"num_buckets must be an int or None, got {type(num_buckets).__name__}")
    return table.shape[0] if num_buckets is None else num_buckets


def t5_relative_bias(
    table: torch.Tensor,
    Lq: int,
    Lk: int,
    *,
    bidirectional: bool = True,
    num_buckets: Optional[int] = None,
    max_distance: int = 128,
    q_offset: int = 0,
) -> torch.Tensor:
    """T5 relative attention bias ``[H, Lq, Lk]`` from the ``[num_buckets, H]`` bucket table.

    ``table`` is the weight of HF's ``relative_attention_bias`` embedding; ``out[h, i, j] =
    table[bucket(j - (q_offset + i)), h]`` (query ``i`` at position ``q_offset + i``: decoding with a cache
    passes the cache length). Encoders use ``bidirectional=True``, decoders ``False``. Output in the table's
    dtype (a lookup: exact). Differentiable w.r.t. ``table`` with a deterministic two-kernel backward.

    >>> import torch, posenc_kernels as rel
    >>> table = torch.arange(32.0)[:, None] * torch.tensor([1.0, -1.0])   # 32 buckets, 2 heads
    >>> rel.t5_relative_bias(table, 3, 4)[0]
    tensor([[ 0., 17., 18., 19.],
            [ 1.,  0., 17., 18.],
            [ 2.,  1.,  0., 17.]])
    >>> rel.t5_relative_bias(table, 1, 4, bidirectional=False, q_offset=3)[1]
    tensor([[-3., -2., -1., -0.]])
    """
    nb = _resolve_num_buckets(table, num_buckets)
    args = (table, Lq, Lk, bidirectional, max_distance, q_offset)
    check_t5(*args, num_buckets=nb)  # num_buckets is not an op argument: checked here
    try:
        return t5_relative_bias_op(*args)
    except (RuntimeError, ValueError, TypeError) as e:
        reraise_with_check(e, check_t5, *args)


def t5_score_mod(table: torch.Tensor, *, bidirectional: bool = True, max_distance: int = 128, q_offset: int = 0):
    """FlexAttention ``score_mod`` adding the T5 bias of :func:`t5_relative_bias` (same bucket thresholds).

    >>> import torch, posenc_kernels as rel
    >>> table = torch.arange(32.0)[:, None].repeat(1, 2)
    >>> mod = rel.t5_score_mod(table)
    >>> mod(torch.tensor(0.5), 0, torch.tensor(0), torch.tensor(2), torch.tensor(0))   # key 2 before the query
    tensor(2.5000)
    """
    check_t5(table, 0, 0, bidirectional, max_distance, q_offset)
    half, m, thr = bucket_layout(table.shape[0], int(max_distance), bidirectional)

    def score_mod(score, b, h, q_idx, kv_idx):
        bucket = bucket_torch(kv_idx - (q_idx + q_offset), half, m, thr, bidirectional)
        return score + table[bucket, h].to(score.dtype)

    return score_mod


class T5RelativePositionBias(torch.nn.Module):
    """The learned T5 bias as a module; ``relative_attention_bias.weight`` has HF's name and layout, so an
    HF T5 attention layer's weights load directly.

    >>> import torch, posenc_kernels as rel
    >>> mod = rel.T5RelativePositionBias(num_heads=8)
    >>> mod(5, 7).shape
    torch.Size([8, 5, 7])
    """

    def __init__(self, num_heads: int, *, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        check_bucket_args(num_buckets, max_distance, bidirectional)
        if not is_int(num_heads) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.relative_attention_bias = torch.nn.Embedding(num_buckets, num_heads)

    def forward(self, Lq: int, Lk: int, q_offset: int = 0) -> torch.Tensor:
        return t5_relative_bias(
            self.relative_attention_bias.weight, Lq, Lk,
            bidirectional=self.bidirectional, max_distance=self.max_distance, q_offset=q_offset,
        )  # fmt: skip

    def score_mod(self, q_offset: int = 0):
        return t5_score_mod(
            self.relative_attention_bias.weight, bidirectional=self.bidirectional, max_distance=self.max_distance,
            q_offset=q_offset,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"
