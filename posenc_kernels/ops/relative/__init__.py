"""Relative position biases (ALiBi, T5 buckets): ``buckets`` (exact integer T5 thresholds), ``kernel``
(Triton), ``torch_impl``, ``reference``, ``op`` (schemas, checks, registration, autograd) and ``api`` (the
public functions, score_mods and the module)."""

from .api import (
    T5RelativePositionBias,
    alibi_bias,
    alibi_score_mod,
    alibi_slopes,
    t5_bucket_thresholds,
    t5_relative_bias,
    t5_relative_bucket,
    t5_score_mod,
)

__all__ = [
    "T5RelativePositionBias",
    "alibi_bias",
    "alibi_score_mod",
    "alibi_slopes",
    "t5_bucket_thresholds",
    "t5_relative_bias",
    "t5_relative_bucket",
    "t5_score_mod",
]
