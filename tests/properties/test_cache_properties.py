"""Property-based differential tests of RoPE + KV-cache write (hypothesis): drawn shapes, layouts, position
modes, angle sources, cache addressing (paged slots with padding, contiguous positions), cache layouts and
dtypes (FP8 with per-tensor or per-head scales), v's head_dim, the norm stage and backends, against the
unfused sequence on the same backend, bit for bit. Budgets and profiles: conftest.py here, docs/testing.md."""

from hypothesis import given, settings

from .cache_cases import cache_cases, check
from .common import examples, reproduce


@settings(max_examples=examples(80))
@given(case=cache_cases())
def test_rope_and_cache_is_the_unfused_sequence(case):
    reproduce(case, "with_norm", "layout", "fp8", "window")
    check(case)
