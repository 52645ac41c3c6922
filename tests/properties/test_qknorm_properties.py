"""Property-based differential tests of QK-norm + RoPE (hypothesis): drawn norms, weight offsets, absent
weights and k, shapes, layouts, dtypes, position modes, angle sources and backends against the float64
reference; the in-place op against its out-of-place twin, and the fused-QKV form against the in-place op on
the split views. Budgets and profiles: conftest.py here, docs/testing.md."""

from hypothesis import given, settings

from .common import examples, reproduce
from .qknorm_cases import check, qknorm_cases


@settings(max_examples=examples(200))
@given(case=qknorm_cases())
def test_qk_norm_rope_matches_reference_and_its_twins(case):
    reproduce(case, "backend", "norm", "mode", "angles", "layout", "qkv")
    check(case)
