"""Property-based differential tests of the other public ops (hypothesis): sinusoidal tables, adds and
concatenation, learned tables, rope_cos_sin, the fused-QKV RoPE, ALiBi and T5 biases, each backend against
its float64 reference and each in-place op against its out-of-place twin. Budgets: conftest.py here."""

from hypothesis import given, settings
from hypothesis import strategies as st

from .absolute_cases import abs_cases, check, check_compiled
from .common import examples, reproduce


@settings(max_examples=examples(300))
@given(case=abs_cases())
def test_public_ops_match_reference_and_their_twins(case):
    reproduce(case, "op", "backend", "mode", "layout")
    check(case)


@settings(max_examples=examples(8))
@given(
    case=st.sampled_from(["add_sinusoidal", "concat_sinusoidal", "add_position_embedding"])
    .flatmap(abs_cases)
    .filter(lambda c: c.B * c.S > 0)  # few examples: none of them empty
)
def test_compiled_ops_equal_eager(case):
    reproduce(case, "op", "backend", "mode", "layout")
    check_compiled(case)
