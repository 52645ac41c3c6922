"""apply_rope(_) refusals: bad arguments named before any write, overlapping q/k, in-place autograd
errors, out-of-table rows with the value checks off.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref

from conftest import DEVICE, max_err
from .common import make_qk, tables

NATIVE_OP = "rope_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, raised before anything is written
# ---------------------------------------------------------------------------------------------


def _bad_cases():
    q = lambda: torch.randn(2, 4, 3, 16, device=DEVICE)  # noqa: E731
    k = lambda: torch.randn(2, 4, 1, 16, device=DEVICE)  # noqa: E731
    cos, sin = tables(6, 16)
    other = torch.device("meta")
    return {
        "q_int": (lambda: dict(q=q().to(torch.int32)), TypeError, "q must have dtype"),
        "q_rank": (lambda: dict(q=torch.randn(4, 16, device=DEVICE)), ValueError, "q must have 3 or 4 dimensions"),
        "k_dtype": (lambda: dict(k=k().half()), TypeError, "k must have the same dtype as q"),
        "k_shape": (lambda: dict(k=torch.randn(2, 5, 1, 16, device=DEVICE)), ValueError, "k must be"),
        "k_device": (lambda: dict(k=torch.randn(2, 4, 1, 16, device=other)), ValueError, "k must be on the same device"),
        "k_alias": (lambda: {"alias": True}, ValueError, "k must not overlap q"),
        "q_expanded": (
            lambda: dict(q=torch.randn(2, 4, 1, 16, device=DEVICE).expand(2, 4, 3, 16)),
            ValueError,
            "q has internally overlapping memory",
        ),
        "cos_int": (lambda: dict(cos=cos.to(torch.int64)), TypeError, "cos must have dtype"),
        "cos_rank": (lambda: dict(cos=cos[None]), ValueError, "cos must have 2 dimensions"),
        "sin_shape": (lambda: dict(sin=sin[:, :4]), ValueError, "cos and sin must have the same shape"),
        "cos_device": (lambda: dict(cos=cos.to(other), sin=sin.to(other)), ValueError, "cos must be on the same device"),
        "R_gt_D": (lambda: dict(cos=tables(6, 32)[0], sin=tables(6, 32)[1]), ValueError, "exceeds head_dim"),
        "R_zero": (lambda: dict(cos=cos[:, :0], sin=sin[:, :0]), ValueError, "R/2 >= 1"),
        "positions_float": (lambda: dict(positions=torch.zeros(2, 4, device=DEVICE)), TypeError, "positions must be an integer"),
        "positions_bool": (
            lambda: dict(positions=torch.zeros(2, 4, device=DEVICE, dtype=torch.bool)),
            TypeError,
            "positions must be an integer",
        ),
        "positions_shape": (
            lambda: dict(positions=torch.zeros(4, 2, device=DEVICE, dtype=torch.long)),
            ValueError,
            r"positions must have shape \[S\]",
        ),
        "positions_range_hi": (
            lambda: dict(positions=torch.tensor([0, 1, 2, 6], device=DEVICE)),
            ValueError,
            r"positions must lie in \[0, 6\)",
        ),
        "positions_range_lo": (
            lambda: dict(positions=torch.tensor([[0, 1, 2, 3], [0, -1, 0, 0]], device=DEVICE)),
            ValueError,
            r"positions must lie in",
        ),
        "offset_range": (lambda: dict(offsets=3), ValueError, "offsets=3 with seqlen 4"),
        "offset_negative": (lambda: dict(offsets=-1), ValueError, "offsets=-1"),
        "offsets_tensor_range": (
            lambda: dict(offsets=torch.tensor([0, 3], device=DEVICE)),
            ValueError,
            "offsets \\+ seqlen must stay within",
        ),
        "offsets_float": (lambda: dict(offsets=torch.zeros(2, device=DEVICE)), TypeError, "offsets must be an int"),
        "offsets_shape": (lambda: dict(offsets=torch.zeros(3, device=DEVICE, dtype=torch.long)), ValueError, r"offsets must have shape \[B\]"),
        "offsets_py_float": (lambda: dict(offsets=1.5), TypeError, "offsets must be an int"),
        "both": (
            lambda: dict(positions=torch.zeros(4, device=DEVICE, dtype=torch.long), offsets=1),
            ValueError,
            "pass positions or offsets, not both",
        ),
    }, q, k, cos, sin


INPLACE_ONLY = {"k_alias", "q_expanded"}  # reading through aliased or expanded views is fine
BAD = [(c, True) for c in _bad_cases()[0]] + [(c, False) for c in _bad_cases()[0] if c not in INPLACE_ONLY]


@pytest.mark.parametrize("case,inplace", BAD, ids=[f"{c}-{'inplace' if i else 'outofplace'}" for c, i in BAD])
def test_bad_input(backend, case, inplace):
    cases, mk_q, mk_k, cos, sin = _bad_cases()
    make, exc, msg = cases[case]
    over = make()
    args = dict(q=mk_q(), k=mk_k(), cos=cos, sin=sin)
    kw = {}
    for name in ("positions", "offsets"):
        if name in over:
            kw[name] = over.pop(name)
    if over.pop("alias", False):
        args["k"] = args["q"]
    args.update(over)
    snapshot = [t.clone() if isinstance(t, torch.Tensor) and t.device.type != "meta" else None for t in (args["q"], args["k"])]
    fn = pk.apply_rope_ if inplace else pk.apply_rope
    with pytest.raises(exc, match=msg):
        fn(args["q"], args["k"], args["cos"], args["sin"], **kw)
    for before, t in zip(snapshot, (args["q"], args["k"])):
        if before is not None:
            assert torch.equal(before, t), "input changed although the call raised"


def test_rope_frequencies_bad_input():
    with pytest.raises(ValueError, match="rotary_dim must be a positive even int"):
        pk.rope_frequencies(7)[0]
    with pytest.raises(ValueError, match="rotary_dim must be a positive even int"):
        pk.rope_frequencies(0)[0]
    with pytest.raises(TypeError, match="rotary_dim must be an int"):
        pk.rope_frequencies(8.0)[0]
    with pytest.raises(ValueError, match="base must be a positive finite"):
        pk.rope_frequencies(8, base=-1.0)[0]


def test_rope_cos_sin_bad_input():
    inv = pk.rope_frequencies(8)[0].to(DEVICE)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        pk.rope_cos_sin(4, inv, dtype=torch.int32)
    with pytest.raises(ValueError, match="inv_freq must have 1 dimensions"):
        pk.rope_cos_sin(4, inv[None])
    with pytest.raises(TypeError, match="positions_or_length must be an int or a tensor"):
        pk.rope_cos_sin(4.0, inv)
    with pytest.raises(ValueError, match="positions_or_length must be >= 0"):
        pk.rope_cos_sin(-1, inv)


def test_unchecked_out_of_table_rows_become_nan():
    """With value checks off (as under CUDA graph capture) the kernel never reads outside the table: a
    token whose row is out of range gets NaN, the others are rotated correctly."""
    from conftest import TRITON_RUNS

    if not TRITON_RUNS:
        pytest.skip("needs the Triton kernels (CUDA or TRITON_INTERPRET=1)")
    q, k = make_qk(1, 4, 2, 1, 16, torch.float32)
    cos, sin = tables(6, 16)
    pos = torch.tensor([0, 9, 5, -1], device=DEVICE)
    good = torch.tensor([0, 0, 5, 0], device=DEVICE)
    truth_q, _ = ref.rope_reference(q, k, cos, sin, positions=good)
    pk.set_value_checks(False)
    try:
        with pk.use_backend("triton"):
            pk.apply_rope_(q, k, cos, sin, positions=pos)
    finally:
        pk.set_value_checks(True)
    assert torch.isnan(q[:, [1, 3]]).all() and torch.isnan(k[:, [1, 3]]).all()
    assert max_err(q[:, [0, 2]], truth_q[:, [0, 2]]) < 1e-5


def _q_k_pairs_sharing_memory():
    buf = torch.randn(2, 5, 6, 16, device=DEVICE)
    yield "partial head overlap", buf[:, :, 0:3], buf[:, :, 2:4]
    buf = torch.randn(2, 5, 6, 16, device=DEVICE)
    yield "k a slice of q", buf, buf[:, :, :1]
    buf = torch.randn(2, 5, 6, 16, device=DEVICE)
    yield "different strides", buf[:, :, 0:4], buf[:, :, 1::2][:, :, :2]  # heads 1 and 3 in both


def test_overlapping_q_k_refused_before_writing(backend):
    cos, sin = tables(8, 16)
    for what, q, k in _q_k_pairs_sharing_memory():
        base = q._base if q._base is not None else q
        before = base.clone()
        with pytest.raises(ValueError, match="k must not overlap q"):
            pk.apply_rope_(q, k, cos, sin)
        assert torch.equal(base, before), what


def test_overlapping_q_k_refused_before_writing_under_grad(backend):
    cos, sin = tables(8, 16)
    x = torch.randn(2, 5, 6, 16, device=DEVICE, requires_grad=True)
    y = x * 1.0
    before = y.detach().clone()
    with pytest.raises(ValueError, match="k must not overlap q"):
        pk.apply_rope_(y[:, :, 0:3], y[:, :, 2:4], cos, sin)
    assert torch.equal(y.detach(), before)


def test_packed_qkv_slices_are_not_overlap(backend):
    """Disjoint head ranges (q, k, v of one projection) and disjoint channel ranges of one buffer are not
    an overlap: accepted, each slice rotated as a copy of it would be, the rest of the buffer untouched."""
    cos, sin = tables(5, 16)
    qkv = torch.randn(2, 5, 8, 16, device=DEVICE)
    x = torch.randn(2, 5, 4, 48, device=DEVICE)
    for buf, q_of, k_of, rest_of in (
        (qkv, lambda b: b[:, :, 0:4], lambda b: b[:, :, 4:6], lambda b: b[:, :, 6:]),  # disjoint heads
        (x, lambda b: b[..., 0:16], lambda b: b[..., 16:32], lambda b: b[..., 32:]),  # disjoint channels
    ):
        want_q, want_k = pk.apply_rope(q_of(buf).clone(), k_of(buf).clone(), cos, sin)
        q_before, rest = q_of(buf).clone(), rest_of(buf).clone()
        pk.apply_rope_(q_of(buf), k_of(buf), cos, sin)
        assert torch.equal(q_of(buf), want_q) and torch.equal(k_of(buf), want_k)
        assert not torch.equal(q_of(buf), q_before), "nothing was rotated"
        assert torch.equal(rest_of(buf), rest), "a write outside q and k"


@pytest.mark.parametrize(
    "case", ["leaf_q", "leaf_k", "view_of_leaf", "split_views", "expanded_k"]
)
def test_inplace_autograd_errors_raised_before_writing(backend, case):
    cos, sin = tables(8, 16)
    x = torch.randn(2, 5, 6, 16, device=DEVICE, requires_grad=True)
    if case == "leaf_q":
        q, k = torch.randn(2, 5, 2, 16, device=DEVICE, requires_grad=True), None
        exc, msg = RuntimeError, "leaf Variable that requires grad"
    elif case == "leaf_k":
        q, k = x * 1.0, torch.randn(2, 5, 1, 16, device=DEVICE, requires_grad=True)
        exc, msg = RuntimeError, "k: a leaf Variable"
    elif case == "view_of_leaf":
        q, k = x[:, :, :2], None
        exc, msg = RuntimeError, "view of a leaf Variable"
    elif case == "split_views":
        q, k, _ = (x * 1.0).split([3, 2, 1], dim=2)
        exc, msg = RuntimeError, "multi-output op"
    else:
        q, k = x * 1.0, (torch.randn(2, 5, 1, 16, device=DEVICE) * 1.0).expand(2, 5, 3, 16)
        exc, msg = ValueError, "k has internally overlapping memory"
    snapshot = [t.detach().clone() for t in (q, k) if t is not None]
    with pytest.raises(exc, match=msg):
        pk.apply_rope_(q, k, cos, sin)
    for before, t in zip(snapshot, [t for t in (q, k) if t is not None]):
        assert torch.equal(before, t.detach()), "written although the call raised"


def test_bad_positions_under_grad_write_nothing(backend):
    """Under autograd q and k take one launch each; q's launch checks the shared positions before writing
    anything, so a bad position leaves both untouched."""
    cos, sin = tables(6, 16)
    x = torch.randn(2, 4, 3, 16, device=DEVICE, requires_grad=True)
    q, k = x[:, :, :2] * 1.0, x[:, :, 2:] * 1.0
    before = (q.detach().clone(), k.detach().clone())
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 6\)"):
        pk.apply_rope_(q, k, cos, sin, positions=torch.tensor([0, 1, 2, 6], device=DEVICE))
    assert torch.equal(q.detach(), before[0]) and torch.equal(k.detach(), before[1])
