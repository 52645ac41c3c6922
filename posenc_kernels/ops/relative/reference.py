"""Relative position bias references (ALiBi, T5 buckets), written for clarity; re-exported by
``posenc_kernels.reference``.

Two kinds, as in ``reference.py``:

* ``*_reference``: the definition, computed in float64 - the truth the kernels are measured against.
* Transcriptions of published code, computed as the source computes them: the ALiBi paper's
  ``get_slopes`` (ofirpress/attention_with_linear_biases, Python floats), BLOOM's slope computation in
  HF transformers' ``build_alibi_tensor`` (float32 ``torch.pow``), HF T5's ``_relative_position_bucket``
  (float32 log, truncation) and ``compute_bias`` (``nn.Embedding`` lookup, permuted to heads first). The
  ``*_eager`` functions are the eager providers of the benchmarks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def alibi_slopes_paper(n: int) -> list:
    """The ALiBi paper's ``get_slopes`` (Press et al., fairseq ``transformer.py``), transcribed: a geometric
    sequence starting at ``2 ** (-8 / n)`` for a power of two ``n``; otherwise the slopes of the closest
    smaller power of two followed by every other slope of twice that power. Python floats (float64)."""

    def power_of_2(p):
        first = 2 ** (-(2 ** -(math.log2(p) - 3)))
        ratio = first
        return [first * ratio**i for i in range(p)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes_paper(2 * closest)[0::2][: n - closest]


def alibi_slopes_bloom(num_heads: int) -> torch.Tensor:
    """The slope computation of HF transformers' BLOOM ``build_alibi_tensor``, transcribed: float32 base
    ``2 ** (-8 / p)`` raised to integer powers with ``torch.pow`` in float32 (p the closest power of two
    <= num_heads), then odd powers of the base of ``2p`` for the remaining heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra_powers = torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)], dim=0)
    return slopes


def alibi_slopes_reference(num_heads: int) -> torch.Tensor:
    """float64 slopes by the definition: ``2 ** (-8 (i + 1) / n)`` for the ``n = 2 ** floor(log2 H)`` first
    heads, then ``2 ** (-8 (2i + 1) / (2n))`` for ``i < H - n``."""
    n = 1 << (num_heads.bit_length() - 1)
    exps = [8.0 * (i + 1) / n for i in range(n)] + [8.0 * (2 * i + 1) / (2 * n) for i in range(num_heads - n)]
    return torch.exp2(-torch.tensor(exps, dtype=torch.float64))


def _query_key_offsets(Lq: int, Lk: int, q_offset: int, device) -> torch.Tensor:
    """``[Lq, Lk]`` int64 ``key_pos - query_pos`` with query ``i`` at ``q_offset + i`` and key ``j`` at ``j``."""
    q = torch.arange(Lq, device=device, dtype=torch.int64)[:, None] + q_offset
    k = torch.arange(Lk, device=device, dtype=torch.int64)[None, :]
    return k - q


def alibi_bias_reference(
    slopes: torch.Tensor, Lq: int, Lk: int, *, causal: bool = True, q_offset: int = 0, dtype=torch.float64
) -> torch.Tensor:
    """``[H, Lq, Lk]``: ``slope * (j - (q_offset + i))`` (causal) or ``-slope * |j - (q_offset + i)|``
    (symmetric), computed in float64 from the slopes as given, returned in ``dtype``."""
    rel = _query_key_offsets(Lq, Lk, q_offset, slopes.device).to(torch.float64)
    dist = rel if causal else -rel.abs()
    return (slopes.to(torch.float64)[:, None, None] * dist).to(dtype)


def alibi_bias_eager(
    slopes: torch.Tensor, Lq: int, Lk: int, *, causal: bool = True, q_offset: int = 0, dtype=torch.float32
) -> torch.Tensor:
    """The same bias as the field writes it in eager PyTorch: float32 aranges, broadcast multiply, cast
    (the benchmarks' ``eager`` provider and the tolerance rule's "same computation in torch")."""
    rel = (
        torch.arange(Lk, device=slopes.device, dtype=torch.float32)[None, :]
        - torch.arange(q_offset, q_offset + Lq, device=slopes.device, dtype=torch.float32)[:, None]
    )
    dist = rel if causal else -rel.abs()
    return (slopes.float()[:, None, None] * dist).to(dtype)


def bloom_alibi_row_bias(slopes: torch.Tensor, Lk: int) -> torch.Tensor:
    """BLOOM's form of the causal bias, ``slope * j`` for every query (``[H, 1, Lk]``): it differs from the
    causal ALiBi bias by ``slope * query_pos`` in each row, which softmax ignores."""
    return slopes.float()[:, None, None] * torch.arange(Lk, device=slopes.device, dtype=torch.float32)


def t5_relative_bucket_hf(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """HF transformers' ``T5Attention._relative_position_bucket`` (from Mesh TensorFlow), transcribed:
    half the buckets exact, the other half logarithmic up to ``max_distance`` computed with a float32 log
    and truncated; bidirectional puts positive offsets (keys after the query) in the upper half."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    buckets += torch.where(is_small, relative_position, if_large)
    return buckets


def t5_relative_bias_hf_eager(
    table: torch.Tensor, Lq: int, Lk: int, *, bidirectional: bool = True, max_distance: int = 128, q_offset: int = 0
) -> torch.Tensor:
    """HF T5's ``compute_bias`` for a ``[num_buckets, H]`` embedding weight: buckets of
    ``memory_position - context_position`` looked up with ``F.embedding``, permuted to ``[H, Lq, Lk]``.
    Differentiable w.r.t. ``table`` (the gradient reference) and the benchmarks' ``eager`` provider."""
    context = torch.arange(Lq, dtype=torch.long, device=table.device)[:, None] + q_offset
    memory = torch.arange(Lk, dtype=torch.long, device=table.device)[None, :]
    buckets = t5_relative_bucket_hf(
        memory - context, bidirectional=bidirectional, num_buckets=table.shape[0], max_distance=max_distance
    )
    return F.embedding(buckets, table).permute(2, 0, 1)


def t5_relative_bias_reference(
    table: torch.Tensor, Lq: int, Lk: int, *, bidirectional: bool = True, max_distance: int = 128, q_offset: int = 0
) -> torch.Tensor:
    """float64 ``[H, Lq, Lk]`` (a lookup: exact in any dtype; float64 so gradients accumulate exactly)."""
    return t5_relative_bias_hf_eager(
        table.to(torch.float64), Lq, Lk, bidirectional=bidirectional, max_distance=max_distance, q_offset=q_offset
    )


def attention_reference(q, k, v, bias=None, mask=None) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(d) + bias) v, ``mask`` (bool, True = keep) applied as -inf."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.to(torch.float64)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
