"""T5 buckets as exact integer thresholds, shared by the Triton kernels, the torch code, the public
functions and the score_mods; and the argument checks of the relative-bias family."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch


def is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def check_bucket_args(num_buckets, max_distance, bidirectional) -> None:
    if not is_int(num_buckets):
        raise TypeError(f"num_buckets must be an int, got {type(num_buckets).__name__}")
    if not is_int(max_distance):
        raise TypeError(f"max_distance must be an int, got {type(max_distance).__name__}")
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
    if bidirectional and num_buckets % 2:
        raise ValueError(
            f"num_buckets must be even when bidirectional=True (half for keys before the query, half after), "
            f"got {num_buckets}"
        )
    half = num_buckets // 2 if bidirectional else num_buckets
    if half < 2:
        need = 4 if bidirectional else 2
        raise ValueError(f"num_buckets must be >= {need} with bidirectional={bidirectional}, got {num_buckets}")
    max_exact = half // 2
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance must be > max_exact = {max_exact} (half of the {half} buckets per direction are exact "
            f"offsets; the log buckets span max_exact..max_distance), got {max_distance}"
        )


@functools.lru_cache(maxsize=128)
def bucket_layout(num_buckets: int, max_distance: int, bidirectional: bool):
    """(buckets per direction, max_exact, thresholds): ``thresholds[k-1]`` is the smallest distance ``n``
    that reaches log bucket ``k`` (``1 <= k < half - max_exact``), found with exact integer arithmetic.

    HF's bucket of a distance ``n >= m = max_exact`` is ``m + floor(log(n / m) / log(D / m) * R)`` (``R =
    half - m``, ``D = max_distance``, clamped to ``half - 1``). ``floor(...) >= k`` holds exactly when
    ``(n / m) ** R >= (D / m) ** k``, i.e. ``n ** R * m ** k >= D ** k * m ** R`` in integers. So the bucket
    is ``m + (number of thresholds <= n)``, with no float log that could land one bucket low at the distances
    where the log is an exact integer (16, 32 and 64 for T5's defaults)."""
    half = num_buckets // 2 if bidirectional else num_buckets
    m = half // 2
    R = half - m
    thresholds = []
    for k in range(1, R):
        rhs = max_distance**k * m**R
        n = max(m, math.ceil(m * (max_distance / m) ** (k / R)))  # float guess, then made exact
        while n > m and (n - 1) ** R * m**k >= rhs:
            n -= 1
        while n**R * m**k < rhs:
            n += 1
        thresholds.append(n)
    return half, m, tuple(thresholds)


def t5_bucket_thresholds(num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True) -> tuple:
    """The smallest distance reaching each logarithmic T5 bucket, as exact ints (see :func:`t5_relative_bucket`).

    A distance ``n >= max_exact`` falls in bucket ``max_exact + (number of thresholds <= n)`` (plus the
    direction offset when bidirectional). Triton kernels load the same values (``t5_bucket_tl``).

    >>> import posenc_kernels as rel
    >>> rel.t5_bucket_thresholds(32, 128, True)                 # T5 defaults: 16 buckets per direction
    (12, 16, 23, 32, 46, 64, 91)
    """
    check_bucket_args(num_buckets, max_distance, bidirectional)
    return bucket_layout(int(num_buckets), int(max_distance), bool(bidirectional))[2]


@functools.lru_cache(maxsize=64)
def thresholds_tensor(num_buckets: int, max_distance: int, bidirectional: bool, device: torch.device) -> torch.Tensor:
    """The thresholds as an int64 tensor on ``device`` (cached: a few bytes per setting and device)."""
    thr = bucket_layout(num_buckets, max_distance, bidirectional)[2]
    return torch.tensor(thr, dtype=torch.int64, device=device)


def bucket_torch(rel, half: int, max_exact: int, thresholds: Sequence[int], bidirectional: bool, thr_tensor=None):
    """Bucket of int tensor ``rel`` (key_pos - query_pos). With ``thr_tensor`` (the thresholds as a tensor)
    the thresholds passed are counted by one ``bucketize``; without, by elementwise comparisons, which run
    the same eagerly, under vmap (FlexAttention score_mods) and in compiled graphs."""
    if bidirectional:
        base = (rel > 0).to(rel.dtype) * half
        n = rel.abs()
    else:
        base = torch.zeros_like(rel)
        n = (-rel).clamp_min(0)
    if thr_tensor is not None:
        count = torch.bucketize(n, thr_tensor, out_int32=rel.dtype == torch.int32, right=True)
    else:
        count = torch.zeros_like(rel)
        for t in thresholds:
            count = count + (n >= t).to(rel.dtype)
    return base + torch.where(n < max_exact, n, max_exact + count)


def check_lengths(Lq, Lk, q_offset) -> None:
    for name, v in (("Lq", Lq), ("Lk", Lk), ("q_offset", q_offset)):
        if not is_int(v):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")

