"""Property-based differential tests of RoPE (hypothesis): drawn shapes, layouts, dtypes, position modes,
angle sources and backends against the float64 truth, and the in-place op against its out-of-place twin.
Budgets and profiles: conftest.py here, docs/testing.md."""

from hypothesis import given, settings

from .common import examples, reproduce
from .rope_cases import check, check_compiled, rope_cases


@settings(max_examples=examples(250))
@given(case=rope_cases())
def test_apply_rope_matches_reference_and_its_twin(case):
    reproduce(case, "backend", "mode", "angles", "layout")
    check(case)


@settings(max_examples=examples(8))
@given(case=rope_cases().filter(lambda c: c.B * c.S > 0))  # few examples: none of them empty
def test_compiled_apply_rope_equals_eager(case):
    reproduce(case, "backend", "mode", "angles", "layout")
    check_compiled(case)
