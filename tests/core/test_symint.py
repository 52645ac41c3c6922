"""Integer arguments that vary per step are SymInt in the schemas (issue 20, item 5): a compiled decode loop
with Python-int offsets builds at most 2 graphs for 12 values, not one per value, and gives eager's values.

Before the schemas said SymInt, ``int offset`` made dynamo guard ``offset == value``: with ``dynamic=True``
every step recompiled and the 9th value raised FailOnRecompileLimitHit under fullgraph. Graphs are counted
by a counting backend around aot_eager (AOTAutograd traces the ops' fakes with the symbolic offset); the
ops run on the native C++ kernels where the extension is built (their choosers take the SymInt schema),
else on the default backend.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels.ops import registry

OFFSETS = range(3, 15)  # 12 values
BACKEND = "native" if "rope_" in _native.ops_for("CPU") else "auto"


def test_public_op_schemas_have_no_plain_int():
    """Every integer argument of a public op is SymInt (or SymInt?), so no op guards on an int's value."""
    plain = []
    for name, spec in registry._OPS.items():
        for a in spec.overload._schema.arguments:
            t = a.real_type  # .type shows SymInt as int
            t = t.getElementType() if isinstance(t, torch.OptionalType) else t
            if isinstance(t, torch.IntType):
                plain.append(f"{name}.{a.name}")
    assert not plain, plain


def _cos_sin():
    return pk.rope_cos_sin(64, pk.rope_frequencies(8)[0])


def _rope(cos, sin):
    def step(q, k, off):
        return pk.apply_rope(q, k, cos, sin, offsets=off)

    return step, lambda: (torch.randn(2, 1, 3, 8), torch.randn(2, 1, 1, 8))


def _rope_(cos, sin):
    def step(q, k, off):
        pk.apply_rope_(q, k, cos, sin, offsets=off)
        return q, k

    return step, lambda: (torch.randn(2, 1, 3, 8), torch.randn(2, 1, 1, 8))


def _module(cos, sin):
    rot = pk.RotaryEmbedding(8)
    rot(torch.randn(1, 1, 1, 8))  # its cos/sin cache is built here (prefill), not inside the decode loop

    def step(q, k, off):
        return rot(q, k, offsets=off)

    return step, lambda: (torch.randn(2, 1, 3, 8), torch.randn(2, 1, 1, 8))


def _sinusoidal(cos, sin):
    def step(x, off):
        return pk.add_sinusoidal(x, offsets=off)

    return step, lambda: (torch.randn(2, 1, 6),)


LOOPS = {"apply_rope": _rope, "apply_rope_": _rope_, "RotaryEmbedding": _module, "add_sinusoidal": _sinusoidal}


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "default"])
@pytest.mark.parametrize("what", list(LOOPS))
def test_decode_loop_with_int_offsets_builds_at_most_two_graphs(what, dynamic):
    cos, sin = _cos_sin()
    step, make = LOOPS[what](cos, sin)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=dynamic)
    with pk.use_backend(BACKEND):
        for off in OFFSETS:
            args = make()
            expected = step(*(a.clone() for a in args), off)
            got = compiled(*args, off)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert counter.frame_count <= 2, f"{what}: {counter.frame_count} graphs for {len(OFFSETS)} offsets"
    assert counter.frame_count >= 1


def test_symint_offset_stays_symbolic_in_traced_code():
    """make_fx with symbolic ints: the offset reaches the op as a SymInt (a graph input), not a constant."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, cos, sin, off):
        x = pk.add_sinusoidal(q, offsets=off.shape[0])
        return x + pk.apply_rope(q.unsqueeze(2), None, cos, sin, offsets=off.shape[0])[0].squeeze(2)

    q, off = torch.randn(1, 2, 8), torch.empty(5)
    cos, sin = _cos_sin()
    gm = make_fx(f, tracing_mode="symbolic")(q, cos, sin, off)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "posenc" in str(n.target)]
    assert len(calls) == 2
    for n in calls:
        offset = n.args[3] if "add_sinusoidal" in str(n.target) else n.args[7]
        assert isinstance(offset, torch.fx.Node), (n.target, offset)  # symbolic: computed from off.shape[0]
    got, expected = gm(q, cos, sin, torch.empty(9)), f(q, cos, sin, torch.empty(9))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
