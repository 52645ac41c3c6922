"""The C++ extension (csrc/) itself: where it loads from, its registration for the public ops (the kernel in
force is the C++ one, the enable/disable cycle), bad input and aliasing (memory-safety checks, nothing
written), inference tensors, version counters, opcheck, and the ISA variants agreeing. Values are in
test_cpu_rope*.py and test_cpu_absolute.py; helpers in native_common.py."""

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels.ops import registry

from conftest import max_err
from .native_common import *  # noqa: F401,F403  (the shared helpers: native_common.__all__)

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"native extension unavailable: {_native.load_error()}")


# ---------------------------------------------------------------------------------------------
# The extension itself, and its registration
# ---------------------------------------------------------------------------------------------


def test_loaded_from_expected_source():
    """CI builds ahead of time (POSENC_BUILD_EXT=1) in one pass and just in time in the other: each must
    load what it built, not fall back to the other silently."""
    assert _native.source() in ("aot", "jit")
    if os.environ.get("POSENC_NATIVE") == "jit":
        assert _native.source() == "jit"
    elif os.environ.get("POSENC_BUILD_EXT") == "1":
        assert _native.source() == "aot", _native.load_error()
    assert _native.has_op("rope", "cpu") and _native.has_op("rope_", "cpu")
    assert {"rope_", "rope"} <= _native.ops_for("CPU")
    assert not _native.has_op("no_such_op", "cpu")
    assert not _native.has_op("rope", "xpu")
    assert set(torch.ops.posenc._native_ops("CPU")) == set(_native.ops_for("CPU"))
    assert {"rope_"} <= set(torch.ops.posenc._native_ops("ADInplaceOrView"))
    with pytest.raises(ValueError, match='key must be "CPU"'):
        torch.ops.posenc._native_ops("XPU")
    assert not hasattr(torch.ops.posenc, "_native_register"), "registration is static now (issue 17)"
    # The old internal ops are gone: the public ops are the only entry points.
    assert not hasattr(torch.ops.posenc, "native_rope")
    assert not hasattr(torch.ops.posenc, "native_sinusoidal")


def test_native_kernel_is_the_one_that_runs(no_python_kernels):
    """Under the process default "native" the chooser runs the C++ kernel: no Python kernel is reached, and
    a bad input gets the Python check's message from the C++ glue itself."""
    q = torch.randint(0, 3, (2, 3, 4, 16))
    cos, sin = tables(8, 16)
    msg = r"^q must have dtype in \(float16, bfloat16, float32, float64\), got torch.int64"
    with pytest.raises(TypeError, match=msg):
        rope_(q, None, *op_args(cos, sin))
    with pytest.raises(TypeError, match=msg):
        rope(q, None, *op_args(cos, sin))
    q, k = make(2, 3, 4, 2, 16, torch.float32)
    check(q, k, cos, sin, inplace=True)


def test_router_redispatches_to_native(native_backend, no_python_kernels):
    """Under use_backend("native") the BackendSelect chooser calls the C++ kernel."""
    q, k = make(2, 3, 4, 2, 16, torch.float32)
    cos, sin = tables(8, 16)
    check(q, k, cos, sin, inplace=True)
    check(q, k, cos, sin, inplace=False, offsets=2)
    with pytest.raises(TypeError, match="^q must have dtype in"):
        rope_(torch.randint(0, 3, (2, 3, 4, 16)), None, *op_args(cos, sin))


def test_registration_is_static():
    """Issue 17: kernels are registered once at import and never swapped. Switching the backend (process
    default or thread override) leaves the dispatch table of every op unchanged; the choice is made per call
    by the C++ chooser on BackendSelect, registered by csrc/bindings.cpp; Python's kernels sit on CPU/CUDA."""
    names = sorted(registry._OPS)
    before = {n: torch._C._dispatch_dump(f"posenc::{n}") for n in names}
    for name in sorted(set(_native.ops_for("CPU")) & set(names)):
        assert "bindings.cpp" in backend_select_source(name), backend_select_source(name)
        assert "bindings.cpp" not in cpu_kernel_source(name), cpu_kernel_source(name)
    q, k = make(1, 3, 2, 1, 16, torch.float32)
    cos, sin = tables(3, 16)
    want_q, want_k = pk.apply_rope(q, k, cos, sin)
    for backend in ("torch", "native", "auto"):
        pk.set_backend(backend)
        with pk.use_backend("torch"), pk.use_backend("native"):
            q2, k2 = q.clone(), k.clone()
            rope_(q2, k2, *op_args(cos, sin))
            assert max_err(q2, want_q) < 1e-6 and max_err(k2, want_k) < 1e-6
        assert {n: torch._C._dispatch_dump(f"posenc::{n}") for n in names} == before
    pk.set_backend("native")
    v = q2._version
    rope_(q2, None, *op_args(cos, sin))
    assert q2._version == v + 1, "the ADInplaceOrView kernel bumps the version of what it writes"
    with pytest.raises(ValueError, match="backend code"):
        torch.ops.posenc._native_set_backend(7)
    with pytest.raises(ValueError, match="backend code"):
        torch.ops.posenc._native_set_thread_backend(-2)


# ---------------------------------------------------------------------------------------------
# Bad input: the C++ kernel's memory-safety checks, naming the argument, nothing written
# ---------------------------------------------------------------------------------------------



def _bad_cases():
    cos, sin = tables(8, 16)
    inv = pk.rope_frequencies(16)[0]
    pos = torch.zeros(2, 3, dtype=torch.long)
    E, T, R = RuntimeError, TypeError, ValueError
    yield E, r"rope: q must be \[B, S, Hq, D\] or packed \[T, Hq, D\]", dict(q=torch.randn(4, 16))
    yield T, "rope: q must be float16/bfloat16/float32/float64", dict(q=torch.randint(0, 3, (2, 3, 4, 16)))
    yield E, r"rope: k must be \[B, S, Hk, D\] matching q", dict(k=torch.randn(2, 4, 2, 16))
    yield E, r"rope: k must be \[B, S, Hk, D\] matching q", dict(k=torch.randn(3, 2, 16))
    yield T, "rope: k must have q's dtype", dict(k=torch.randn(2, 3, 2, 16, dtype=torch.float64))
    yield E, "rope: pass either cos/sin tables or inv_freq", dict(inv_freq=inv)
    yield E, "rope: pass either cos/sin tables or inv_freq", dict(cos=None, sin=None)
    yield E, "rope: pass cos and sin together", dict(sin=None)
    yield E, "rope: cos and sin must have the same shape", dict(sin=sin[:, :4])
    yield T, "rope: cos and sin must have the same dtype", dict(sin=sin.double())
    yield T, "rope: cos must be a floating tensor", dict(cos=cos.int(), sin=sin.int())
    yield E, "exceeds head_dim D = 16", dict(cos=tables(8, 64)[0], sin=tables(8, 64)[1])
    yield E, "R/2 = 0", dict(cos=cos[:, :0], sin=sin[:, :0])
    yield E, r"rope: cos must be \[P, R/2\]", dict(cos=cos[0], sin=sin[0])
    yield E, r"rope: inv_freq must be \[R/2\]", dict(cos=None, sin=None, inv_freq=inv[None])
    yield T, "rope: exact=True needs float64 inv_freq", dict(cos=None, sin=None, inv_freq=inv, exact=True)
    yield E, "attention_factor and exact apply to on-the-fly angles", dict(exact=True)
    yield E, "attention_factor and exact apply to on-the-fly angles", dict(attention_factor=2.0)
    yield T, "rope: positions must be an integer tensor", dict(positions=torch.zeros(2, 3))
    yield E, r"rope: positions must be \[S\] = \[3\] or \[B, S\] = \[2, 3\]", dict(positions=torch.zeros(2, 4, dtype=torch.long))
    yield E, r"rope: offsets must be \[B\] = \[2\]", dict(offsets=torch.zeros(3, dtype=torch.long))
    yield T, "rope: offsets must be an integer tensor", dict(offsets=torch.zeros(2))
    yield E, "rope: pass positions or offsets, not both", dict(positions=pos, offsets=torch.zeros(2, dtype=torch.long))
    yield E, "rope: offset must be 0 when a positions or offsets tensor is given", dict(positions=pos, offset=3)
    yield E, "rope: offset must be 0 when a positions or offsets tensor is given", dict(offsets=torch.zeros(2, dtype=torch.long), offset=3)
    yield E, "rope: cu_seqlens needs packed q/k", dict(cu_seqlens=torch.tensor([0, 3]))
    # meta tables: the dispatcher picks the Meta kernel (the op's fake: the Python check)
    yield (E, R), "must be on|must be a CPU tensor", dict(cos=cos.to("meta"), sin=sin.to("meta"))
    # axis_map
    am = torch.zeros(8, dtype=torch.long)
    pos3 = torch.zeros(3, 2, 3, dtype=torch.long)
    yield E, r"rope: axis_map needs positions \[A, B, S\] or \[A, S\]", dict(axis_map=am)
    yield E, r"rope: axis_map must be \[R/2\] = \[8\]", dict(axis_map=am[:4], positions=pos3)
    yield T, "rope: axis_map must be an integer tensor", dict(axis_map=am.float(), positions=pos3)
    yield E, r"rope: with axis_map, positions must be \[A, S\] = \[A, 3\] or \[A, B, S\] = \[A, 2, 3\]", dict(axis_map=am, positions=pos3[:, :, :2])  # noqa: E501
    yield E, "rope: pass positions or offsets, not both", dict(axis_map=am, positions=pos3, offsets=torch.zeros(2, dtype=torch.long))  # noqa: E501


def _bad_packed_cases():
    cos, sin = tables(8, 16)
    E, T = RuntimeError, TypeError
    cu = torch.tensor([0, 3, 7])
    yield E, r"rope: k must be \[T, Hk, D\] matching q", dict(k=torch.randn(6, 2, 16))
    yield E, "rope: pass positions or cu_seqlens, not both", dict(cu_seqlens=cu, positions=torch.zeros(7, dtype=torch.long))
    yield E, "rope: axis_map cannot be combined with cu_seqlens", dict(cu_seqlens=cu, axis_map=torch.zeros(8, dtype=torch.long))
    yield T, "rope: cu_seqlens must be an integer tensor", dict(cu_seqlens=cu.float())
    yield E, r"rope: cu_seqlens must be \[N \+ 1\] with N >= 1", dict(cu_seqlens=torch.tensor([0]))
    yield E, r"rope: cu_seqlens must be \[N \+ 1\] with N >= 1", dict(cu_seqlens=cu[None])
    yield E, r"rope: offsets must be \[N\] = \[2\] \(one per sequence\)", dict(cu_seqlens=cu, offsets=torch.zeros(3, dtype=torch.long))  # noqa: E501
    yield E, "rope: offset must be 0 when a positions or offsets tensor is given", dict(cu_seqlens=cu, offsets=torch.zeros(2, dtype=torch.long), offset=1)  # noqa: E501


_BAD = [(False,) + c for c in _bad_cases()] + [(True,) + c for c in _bad_packed_cases()]


@pytest.mark.parametrize("inplace", [True, False], ids=["rope_", "rope"])
@pytest.mark.parametrize("packed,exc,match,override", _BAD, ids=[f"{'packed-' if c[0] else ''}{c[2]}" for c in _BAD])
def test_bad_input(packed, exc, match, override, inplace):
    """The C++ kernel refuses each bad input with exactly the Python check's exception and message (the
    torch backend's; ``exc``/``match`` name the case: the rule the old C++-only messages stated), and leaves
    the inputs unchanged. tests/test_native_errors.py covers every op this way."""
    cos, sin = tables(8, 16)
    if packed:
        args = dict(q=torch.randn(7, 4, 16), k=torch.randn(7, 2, 16), cos=cos, sin=sin)
    else:
        args = dict(q=_Q(), k=_K(), cos=cos, sin=sin)
    args.update(override)
    q, k = args.pop("q"), args.pop("k")
    q0, k0 = q.clone(), k.clone()
    op = rope_ if inplace else rope
    with pytest.raises((TypeError, ValueError, RuntimeError)) as native:
        op(q, k, *op_args(**args))
    assert torch.equal(q, q0) and torch.equal(k, k0), "an error must leave the inputs unchanged"
    with pk.use_backend("torch"), pytest.raises((TypeError, ValueError, RuntimeError)) as python:
        op(q, k, *op_args(**args))
    assert type(native.value) is type(python.value)
    assert str(native.value).split("\nException raised from")[0] == str(python.value)


def test_non_unit_channel_stride_is_accepted():
    """Formerly refused (stride(-1) == 1): any channel stride now runs, on the scalar strided path."""
    cos, sin = tables(8, 16)
    q = torch.randn(2, 3, 4, 32)[..., ::2]
    check(q, None, cos, sin, inplace=True)
    check(q, None, cos, sin, inplace=False)


def test_aliasing_and_ignored_arguments_are_errors():
    """The ops check aliasing from metadata before writing: q and k written in place never overlap each
    other, never overlap internally; the out-of-place op's outputs are fresh."""
    cos, sin = tables(8, 16)
    q = torch.randn(1, 4, 4, 16)
    q0 = q.clone()
    with pytest.raises(ValueError, match="k must not overlap q: shared elements would be rotated twice"):
        rope_(q, q, *op_args(cos, sin))  # k is q: every head would be rotated twice
    buf = torch.randn(1, 9, 4, 16)
    buf0 = buf.clone()
    with pytest.raises(ValueError, match="k must not overlap q"):
        rope_(buf[:, :8], buf[:, 1:9], *op_args(cos, sin))  # k is q shifted by one token
    assert torch.equal(buf, buf0)
    with pytest.raises(ValueError, match="internally overlapping"):
        rope_(torch.empty(1, 1, 1, 16).expand(1, 2, 3, 16), None, *op_args(cos, sin))
    with pytest.raises(ValueError, match="attention_factor scales on-the-fly angles"):
        rope_(q, None, *op_args(cos, sin, attention_factor=2.0))
    with pytest.raises(ValueError, match="offset must be 0"):
        rope_(q, None, *op_args(cos, sin, offsets=torch.zeros(1, dtype=torch.long), offset=3))
    assert torch.equal(q, q0), "an error must leave q unchanged"
    # Out of place reads overlapping q and k (and an expanded q) fine: it writes fresh tensors only.
    qo, ko = rope(q, q, *op_args(cos, sin))
    assert qo.data_ptr() not in (q.data_ptr(), ko.data_ptr()) and torch.equal(qo, ko)
    qe = torch.randn(1, 1, 1, 16).expand(1, 2, 3, 16)
    qo, _ = rope(qe, None, *op_args(cos, sin))
    want, _ = rope(qe.contiguous(), None, *op_args(cos, sin))
    assert torch.equal(qo, want)
    # Accepted: in place on head slices of one fused buffer (disjoint q and k).
    qkv = torch.randn(1, 4, 8, 16)
    want_q, want_k = pk.apply_rope(qkv[:, :, :4], qkv[:, :, 4:6], cos[:4], sin[:4])
    rope_(qkv[:, :, :4], qkv[:, :, 4:6], *op_args(cos, sin))
    assert max_err(qkv[:, :, :4], want_q) < 1e-6 and max_err(qkv[:, :, 4:6], want_k) < 1e-6


def test_overlapping_head_slices_are_refused():
    """k made of heads of q (or q and k sharing a head of one qkv buffer): the shared heads would be rotated
    twice. The op layer's Python check refuses these (ValueError); the C++ kernel must too."""
    cos, sin = tables(8, 16)
    q = torch.randn(1, 4, 4, 16)
    with pytest.raises((RuntimeError, ValueError), match="must not overlap"):
        rope_(q, q[:, :, :2], *op_args(cos, sin))
    qkv = torch.randn(1, 4, 8, 16)
    with pytest.raises((RuntimeError, ValueError), match="must not overlap"):
        rope_(qkv[:, :, :4], qkv[:, :, 3:5], *op_args(cos, sin))


def test_inference_tensors():
    """Writing an inference tensor in place outside inference mode raises (PyTorch's rule, checked by the
    kernel before writing); inside inference mode it runs; out of place is fine anywhere."""
    cos, sin = tables(8, 16)
    with torch.inference_mode():
        qi, ki = _Q(), _K()
    q0, k0 = qi.clone(), ki.clone()
    with pytest.raises(RuntimeError, match="^q is an inference tensor: in-place updates to inference tensors outside"):
        rope_(qi, None, *op_args(cos, sin))
    with pytest.raises(RuntimeError, match="^k is an inference tensor"):
        rope_(q0.clone(), ki, *op_args(cos, sin))  # only k is an inference tensor
    assert torch.equal(qi, q0) and torch.equal(ki, k0)
    want_q, want_k = rope(q0, k0, *op_args(cos, sin))
    got_q, got_k = rope(qi, ki, *op_args(cos, sin))  # out of place, outside inference mode
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    with torch.inference_mode():
        rope_(qi, ki, *op_args(cos, sin))  # normal cos/sin, inference q/k
        qn = q0.clone()
        rope_(qn, None, *op_args(cos, sin))  # a normal tensor in inference mode
    assert torch.equal(qi, want_q) and torch.equal(ki, want_k) and torch.equal(qn, want_q)


@pytest.mark.parametrize("router", [False, True], ids=["default_native", "use_backend"])
def test_version_counter(router):
    """Each in-place call bumps the version counter of each tensor it writes exactly once (the C++
    ADInplaceOrView kernel); the out-of-place op bumps none."""
    cos, sin = tables(8, 16)
    q, k = _Q(), _K()
    with pk.use_backend("native") if router else contextlib.nullcontext():
        vq, vk = q._version, k._version
        rope_(q, k, *op_args(cos, sin))
        assert (q._version, k._version) == (vq + 1, vk + 1)
        rope_(q, None, *op_args(cos, sin))
        assert (q._version, k._version) == (vq + 2, vk + 1)
        rope(q, k, *op_args(cos, sin))
        assert (q._version, k._version) == (vq + 2, vk + 1)
        pk.apply_rope_(q, k, cos, sin)
        assert (q._version, k._version) == (vq + 3, vk + 2)
        with pytest.raises(ValueError):
            rope_(q, k, *op_args(cos, sin, offset=7))  # an error before writing: no bump
        assert (q._version, k._version) == (vq + 3, vk + 2)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck (schema, fake/meta kernel, aliasing) on the public ops with the native kernel
# ---------------------------------------------------------------------------------------------


def test_opcheck():
    cos, sin = tables(8, 16)
    inv = pk.rope_frequencies(16)[0]
    q, k = _Q(), _K()
    pos = torch.randint(0, 8, (2, 3))
    qp, kp = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    am = pk.mrope_axis_map([2, 3, 3])
    pos3 = torch.randint(0, 8, (3, 2, 3))
    cases = [
        (q, k, *op_args(cos, sin, offset=2)),
        (q, k, *op_args(cos, sin, positions=pos, interleaved=True, conjugate=True)),
        (q, None, *op_args(inv_freq=inv, offsets=torch.tensor([1, 4]), attention_factor=2.0)),
        (q.double(), None, *op_args(inv_freq=inv.double(), positions=pos, exact=True)),
        (qp, kp, *op_args(cos, sin, cu_seqlens=cu, offsets=torch.tensor([0, 1]))),
        (q, k, *op_args(cos, sin, positions=pos3, axis_map=am)),
        (torch.randn(2, 3, 4, 32)[..., ::2], None, *op_args(cos, sin)),
    ]
    for args in cases:
        torch.library.opcheck(rope_, args)
        torch.library.opcheck(rope, args)


# ---------------------------------------------------------------------------------------------
# ISA variants: the same results from the baseline, AVX2 and AVX512 builds
# ---------------------------------------------------------------------------------------------

# Inputs come from the parent (torch's own randn/cos depend on the CPU capability too). The child calls the
# public ops with the native kernel registered for CPU (default "auto" without TRITON_INTERPRET, forced
# "native" here all the same), and checks it is that kernel.
_VARIANT_SCRIPT = textwrap.dedent(
    """
    import torch
    import posenc_kernels as pk
    from posenc_kernels.ops import registry
    pk.set_backend("native")
    assert registry.registered_kernels("rope")["CPU"] == "native", registry.registered_kernels("rope")
    assert registry.registered_kernels("rope_")["CPU"] == "native", registry.registered_kernels("rope_")
    outs = []
    for q, k, cos, sin, inv, inter in torch.load(IN):
        tail = (None, None, None, 2, None, None, 1.0, inter, False, False)
        qo, ko = torch.ops.posenc.rope.default(q, k, cos, sin, *tail)
        q2, k2 = q.clone(), k.clone()
        torch.ops.posenc.rope_.default(q2, k2, cos, sin, *tail)  # in place: the vector path
        qs = torch.empty(q.shape[:-1] + (2 * q.shape[-1],), dtype=q.dtype)[..., ::2].copy_(q)
        torch.ops.posenc.rope_.default(qs, None, cos, sin, *tail)  # channel stride 2: the scalar path
        qf, _ = torch.ops.posenc.rope.default(q, None, None, None, inv, None, None, 2, None, None, 1.5, inter,
                                              False, False)  # on-the-fly angles
        outs += [qo, ko, q2, k2, qs, qf]
    torch.save(outs, OUT)
    """
)


@pytest.mark.parametrize("variant", ["default", "avx2"])
def test_isa_variants_agree(variant, tmp_path):
    """ATEN_CPU_CAPABILITY forces a narrower build: every variant computes bit-for-bit the values of the
    one this machine picks (the build disables FMA contraction, conversions round to nearest even)."""
    if variant == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2 here")
    cases = []
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for inter in (False, True):
            q, k = torch.randn(2, 5, 3, 80).to(dt), torch.randn(2, 5, 1, 80).to(dt)
            inv = torch.rand(36)
            cases.append((q, k, torch.randn(8, 36), torch.randn(8, 36), inv, inter))  # D 80, R 72: vector tails
    torch.save(cases, tmp_path / "in.pt")
    outs = {}
    for cap in (variant, None):
        out = tmp_path / f"{cap}.pt"
        env = dict(os.environ, **({"ATEN_CPU_CAPABILITY": cap} if cap else {}))
        env.pop("TRITON_INTERPRET", None)
        script = f"IN, OUT = {str(tmp_path / 'in.pt')!r}, {str(out)!r}\n" + _VARIANT_SCRIPT
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=600)
        outs[cap] = torch.load(out)
    assert len(outs[variant]) == 6 * 8
    for a, b in zip(outs[variant], outs[None]):
        assert torch.equal(a, b)
    # and the in-place / strided results are those of the out-of-place op
    o = outs[None]
    for i in range(0, len(o), 6):
        assert torch.equal(o[i], o[i + 2]) and torch.equal(o[i + 1], o[i + 3]) and torch.equal(o[i], o[i + 4])


def test_wider_isa_code_stays_in_its_variants():
    """Every instruction needing more than baseline x86-64 (VEX/EVEX encodings, BMI) lies in a function of
    the AVX2/AVX512 variants: the linker kept the baseline copy of every inline function shared with them,
    so the DEFAULT path cannot fault on an older CPU."""
    import platform
    import re
    import shutil

    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("needs x86-64 and objdump")
    ours = re.compile(r"(posenc_native_[0-9a-f]+|/posenc_kernels/_C\.[^/]*)\.so$")  # JIT or AOT build
    libs = [p for p in torch.ops.loaded_libraries if ours.search(p)]
    assert libs, torch.ops.loaded_libraries
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", libs[0]], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    wide = re.compile(r"^\s*[0-9a-f]+:\t(v[a-z0-9]+|kmov[a-z]*|shlx|sarx|shrx|andn|tzcnt|lzcnt)\s")
    fn, offenders, n_variant = None, set(), 0
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        if wide.match(line):
            if "AVX2::" in fn or "AVX512::" in fn:
                n_variant += 1
            else:
                offenders.add(fn)
    assert not offenders, sorted(offenders)[:5]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert n_variant > 0, "the AVX2/AVX512 variants were not built"
