"""The C++ extension (csrc/): posenc::native_rope and native_sinusoidal on CPU against the references.

Values (fp32/fp16/bf16/fp64, NeoX/GPT-J, partial rotary, GQA, positions/offsets, HF-transposed strides, in
place and out of place, tables and on-the-fly/exact angles), NaN for rows outside the table, errors for bad
input, opcheck, the ISA variants, and the public API under ``use_backend("native")`` (values, gradients,
torch.compile); the sinusoidal table/add kernel through the public API. Skipped when the extension cannot
be built here - except in CI (``CI`` set), where a missing extension fails the run.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels import reference as ref
from posenc_kernels.configs import MODEL_CONFIGS

from conftest import DTYPES, assert_dtype_tolerance, max_err

AVAILABLE = _native.has_op("rope", "cpu")
if not AVAILABLE and os.environ.get("CI"):
    raise RuntimeError(f"CI must build and test the native CPU extension; it is unavailable: {_native.load_error()}")
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"native extension unavailable: {_native.load_error()}")

ALL_DTYPES = DTYPES + [torch.float64]
native_rope = torch.ops.posenc.native_rope.default if AVAILABLE else None


def tables(P, R, dtype=torch.float32, base=10000.0):
    return pk.rope_cos_sin(P, pk.rope_frequencies(R, base)[0], dtype=dtype)


def make(B, S, Hq, Hk, D, dtype, hf_layout=False):
    if hf_layout:  # [B, H, S, D] storage seen as [B, S, H, D]
        return (torch.randn(B, Hq, S, D, dtype=dtype).transpose(1, 2),
                torch.randn(B, Hk, S, D, dtype=dtype).transpose(1, 2) if Hk else None)  # fmt: skip
    return torch.randn(B, S, Hq, D, dtype=dtype), (torch.randn(B, S, Hk, D, dtype=dtype) if Hk else None)


def run_native(q, k, *, cos=None, sin=None, inv_freq=None, positions=None, offsets=None, offset=0,
               attention_factor=1.0, interleaved=False, conjugate=False, exact=False, inplace=True):  # fmt: skip
    """Call the op; out of place the outputs are NaN-poisoned first, so an unwritten element fails."""
    if inplace:
        q_out, k_out = q, k
    else:
        q_out = torch.full_like(q, float("nan"))
        k_out = torch.full_like(k, float("nan")) if k is not None else None
    native_rope(q, k, q_out, k_out, cos, sin, inv_freq, positions, offsets, offset, attention_factor, interleaved,
                conjugate, exact)  # fmt: skip
    return q_out, k_out


def check(q, k, cos, sin, *, inplace, what="", positions=None, offsets=0, interleaved=False, conjugate=False):
    kw = dict(positions=positions, offsets=offsets, interleaved=interleaved)
    truth_q, truth_k = ref.rope_reference(q, k, cos, sin, conjugate=conjugate, **kw)
    sin_e = -sin if conjugate else sin
    eager_q, eager_k = ref.rope_hf_eager(q, k, cos, sin_e, **kw)
    q0, k0 = q.clone(), (k.clone() if k is not None else None)
    off_t = offsets if isinstance(offsets, torch.Tensor) else None
    off_i = 0 if isinstance(offsets, torch.Tensor) else offsets
    out_q, out_k = run_native(q, k, cos=cos, sin=sin, positions=positions, offsets=off_t, offset=off_i,
                              interleaved=interleaved, conjugate=conjugate, inplace=inplace)  # fmt: skip
    if not inplace:
        assert torch.equal(q, q0) and (k is None or torch.equal(k, k0)), "out of place modified the inputs"
    else:
        assert out_q is q
    assert_dtype_tolerance(out_q, truth_q, eager_q, what=f"{what} q")
    R = 2 * cos.shape[-1]
    assert torch.equal(out_q[..., R:], q0[..., R:]), "pass-through channels changed"
    if k is not None:
        assert_dtype_tolerance(out_k, truth_k, eager_k, what=f"{what} k")
        assert torch.equal(out_k[..., R:], k0[..., R:])


# ---------------------------------------------------------------------------------------------
# The extension itself
# ---------------------------------------------------------------------------------------------


def test_loaded_from_expected_source():
    """CI builds ahead of time (POSENC_BUILD_EXT=1) in one pass and just in time in the other: each must
    load what it built, not fall back to the other silently."""
    assert _native.source() in ("aot", "jit")
    if os.environ.get("POSENC_NATIVE") == "jit":
        assert _native.source() == "jit"
    elif os.environ.get("POSENC_BUILD_EXT") == "1":
        assert _native.source() == "aot", _native.load_error()
    assert _native.has_op("rope", "cpu")
    assert not _native.has_op("no_such_op", "cpu")
    assert not _native.has_op("rope", "xpu")


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("config", list(MODEL_CONFIGS.values()), ids=lambda c: c.name)
def test_model_configs(config, dtype):
    q, k = make(2, 13, config.num_heads_q, config.num_heads_kv, config.head_dim, dtype)
    cos, sin = tables(20, config.rotary_dim)
    check(q, k, cos, sin, inplace=True, offsets=3, interleaved=config.interleaved, what=config.name)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("D,R", [(128, 128), (80, 80), (96, 64), (64, 6), (130, 34)])
def test_layouts(D, R, dtype, interleaved, inplace):
    """Head dims around the vector width (tails), partial rotary (pass-through copied out of place), GQA,
    an HF-transposed q and a contiguous k."""
    q, _ = make(2, 7, 5, 0, D, dtype, hf_layout=True)
    _, k = make(2, 7, 0, 2, D, dtype)
    cos, sin = tables(16, R)
    check(q, k, cos, sin, inplace=inplace, offsets=4, interleaved=interleaved, what=f"D={D} R={R}")


@pytest.mark.parametrize("idx", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("mode", ["positions_bs", "positions_s", "offsets", "strided_positions"])
def test_position_sources(mode, idx):
    B, S = 3, 9
    q, k = make(B, S, 4, 2, 64, torch.float32)
    cos, sin = tables(40, 64)
    positions, offsets = None, 0
    if mode == "positions_bs":
        positions = torch.randint(0, 40, (B, S), dtype=idx)
    elif mode == "positions_s":
        positions = torch.randint(0, 40, (S,), dtype=idx)
    elif mode == "strided_positions":
        positions = torch.randint(0, 40, (S, B), dtype=idx).t()  # [B, S] with strides (1, B)
    else:
        offsets = torch.tensor([0, 5, 31], dtype=idx)
    check(q, k, cos, sin, inplace=True, positions=positions, offsets=offsets, what=mode)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_conjugate_inverts(interleaved):
    q, k = make(2, 5, 3, 1, 32, torch.float64)
    cos, sin = ref.rope_cos_sin_reference(torch.arange(8), ref.rope_frequencies_reference(32))  # cos^2+sin^2=1
    check(q.clone(), k.clone(), cos, sin, inplace=False, conjugate=True, interleaved=interleaved)
    q2, k2 = run_native(q.clone(), k.clone(), cos=cos, sin=sin, interleaved=interleaved)
    run_native(q2, k2, cos=cos, sin=sin, interleaved=interleaved, conjugate=True)
    assert max_err(q2, q) < 1e-12 and max_err(k2, k) < 1e-12


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_table_dtypes_and_row_stride(table_dtype):
    """Tables of any float dtype are used as they are; a row stride other than R/2 (a column slice)."""
    q, k = make(1, 6, 2, 1, 32, torch.float32)
    wide_c, wide_s = tables(10, 64, dtype=table_dtype)
    cos, sin = wide_c[:, :16], wide_s[:, :16]  # row stride 32, R/2 = 16
    assert cos.stride() == (32, 1)
    check(q, k, cos, sin, inplace=False)


def test_qk_in_one_buffer():
    """q and k as head slices of one packed QKV buffer, rotated in place."""
    qkv = torch.randn(2, 5, 4 + 2 + 2, 64)
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]
    v0 = qkv[:, :, 6:].clone()
    cos, sin = tables(5, 64)
    check(q, k, cos, sin, inplace=True)
    assert torch.equal(qkv[:, :, 6:], v0)


@pytest.mark.parametrize("exact", [False, True], ids=["fp32_angles", "exact"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_on_the_fly_angles(exact, interleaved):
    """inv_freq instead of tables: default = fp32(pos) * fp32(inv_freq) then fp32 cos/sin (bit-for-bit the
    rope_cos_sin tables); exact = fp64 angle reduced mod 2 pi, within 1e-6 rad of the truth at large positions."""
    B, S, D = 2, 5, 64
    q, k = make(B, S, 4, 2, D, torch.float32)
    inv64 = pk.rope_frequencies(D, 500000.0)[0].to(torch.float64)
    positions = torch.tensor([[0, 1, 77, 4095, 70000], [2**20, 2**21 + 3, 2**22 - 1, 12345, 5]])
    af = 1.25
    if exact:
        out_q, out_k = run_native(q, k, inv_freq=inv64, positions=positions, attention_factor=af,
                                  interleaved=interleaved, exact=True, inplace=False)  # fmt: skip
        c64, s64 = ref.rope_cos_sin_reference(positions, inv64, af)  # [B, S, R/2] float64
        rows = torch.arange(B * S).view(B, S)
        truth_q, truth_k = ref.rope_reference(q, k, c64.flatten(0, 1), s64.flatten(0, 1), positions=rows,
                                              interleaved=interleaved)  # fmt: skip
        # 1e-6 rad of angle error on |x| <= ~5 and a factor 1.25: well under 1e-4, plus fp32 rounding.
        assert max_err(out_q, truth_q) < 1e-4 and max_err(out_k, truth_k) < 1e-4
    else:
        inv = pk.rope_frequencies(D, 500000.0)[0]
        out_q, out_k = run_native(q, k, inv_freq=inv, positions=positions, attention_factor=af,
                                  interleaved=interleaved, inplace=False)  # fmt: skip
        # The truth of HF numerics: the fp32 angle (one fp32 product), its cos/sin in float64.
        angle = (positions.flatten().float()[:, None] * inv.float()[None, :]).double()
        rows = torch.arange(B * S).view(B, S)
        truth_q, truth_k = ref.rope_reference(q, k, angle.cos() * af, angle.sin() * af, positions=rows,
                                              interleaved=interleaved)  # fmt: skip
        assert max_err(out_q, truth_q) < 5e-6 and max_err(out_k, truth_k) < 5e-6


def test_exact_angles_precise():
    """At position 2**22 - 1 the fp32 product is off by radians; the exact mode is within 1e-6 rad."""
    inv64 = pk.rope_frequencies(2, 10000.0)[0].to(torch.float64)  # inv_freq = [1.0]: angle = position
    pos = torch.tensor([2**22 - 1, 3_000_001, 123_457])
    q = torch.zeros(1, 3, 1, 2, dtype=torch.float64)
    q[..., 0] = 1.0  # (1, 0) rotated by theta = (cos theta, sin theta)
    out, _ = run_native(q, None, inv_freq=inv64, positions=pos, exact=True, inplace=False)
    theta = torch.atan2(out[0, :, 0, 1], out[0, :, 0, 0])
    want = torch.remainder(pos.double() + torch.pi, 2 * torch.pi) - torch.pi
    assert (theta - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parallel_large(dtype):
    """Enough items for several threads' chunks, cos/sin rows changing inside a chunk."""
    q, k = make(2, 300, 6, 2, 64, dtype)
    cos, sin = tables(512, 64)
    check(q, k, cos, sin, inplace=True, positions=torch.randint(0, 512, (2, 300)))


def test_out_of_table_rows_are_nan():
    """The kernel never reads outside the table: such tokens come out NaN (the Python ops refuse these
    values before the call; this is the last line of defence)."""
    q, k = make(1, 4, 2, 1, 16, torch.float32)
    cos, sin = tables(8, 8)  # partial: pass-through channels stay finite
    positions = torch.tensor([[0, 8, -1, 7]])
    out_q, out_k = run_native(q, k, cos=cos, sin=sin, positions=positions, inplace=False)
    bad = torch.tensor([False, True, True, False])
    for out, x in ((out_q, q), (out_k, k)):
        assert torch.isnan(out[0, bad, :, :8]).all()
        assert not torch.isnan(out[0, ~bad]).any()
        assert torch.equal(out[..., 8:], x[..., 8:])
    out_q, _ = run_native(q, None, cos=cos, sin=sin, offset=6, inplace=False)  # rows 6..9
    assert torch.isnan(out_q[0, 2:, :, :8]).all() and not torch.isnan(out_q[0, :2]).any()


def test_empty():
    for shape in [(0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 0, 8)]:
        q = torch.randn(shape)
        cos, sin = tables(4, 8)
        run_native(q, None, cos=cos, sin=sin, inplace=True)


# ---------------------------------------------------------------------------------------------
# Bad input: a RuntimeError naming the argument, nothing written
# ---------------------------------------------------------------------------------------------

_Q = lambda: torch.randn(2, 3, 4, 16)  # noqa: E731
_K = lambda: torch.randn(2, 3, 2, 16)  # noqa: E731


def _bad_cases():
    cos, sin = tables(8, 16)
    inv = pk.rope_frequencies(16)[0]
    yield "q must be", dict(q=torch.randn(3, 4, 16))
    yield "q must be float16", dict(q=torch.randint(0, 3, (2, 3, 4, 16)))
    yield "stride\\(-1\\) == 1", dict(q=torch.randn(2, 3, 4, 32)[..., ::2])
    yield "k must be", dict(k=torch.randn(2, 4, 2, 16))
    yield "k must have q's dtype", dict(k=torch.randn(2, 3, 2, 16, dtype=torch.float64))
    yield "q_out must have q's shape", dict(q_out=torch.randn(2, 3, 4, 8))
    yield "pass k and k_out together", dict(k_out=None)
    yield "either cos/sin tables or inv_freq", dict(inv_freq=inv)
    yield "either cos/sin tables or inv_freq", dict(cos=None, sin=None)
    yield "cos and sin together", dict(sin=None)
    yield "same shape", dict(sin=sin[:, :4])
    yield "exceeds head_dim", dict(cos=tables(8, 64)[0], sin=tables(8, 64)[1])
    yield "R/2 = 0", dict(cos=cos[:, :0], sin=sin[:, :0])
    yield "cos must be \\[P, R/2\\]", dict(cos=cos[0], sin=sin[0])
    yield "exact=True needs float64", dict(cos=None, sin=None, inv_freq=inv, exact=True)
    yield "positions must be int32/int64", dict(positions=torch.zeros(2, 3))
    yield "positions must be \\[S\\]", dict(positions=torch.zeros(2, 4, dtype=torch.long))
    yield "offsets must be \\[B\\]", dict(offsets=torch.zeros(3, dtype=torch.long))
    yield "positions or offsets, not both", dict(positions=torch.zeros(3, dtype=torch.long),
                                                 offsets=torch.zeros(2, dtype=torch.long))  # fmt: skip
    yield "must be on", dict(cos=cos.to("meta"), sin=sin.to("meta"))


@pytest.mark.parametrize("match,override", list(_bad_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(match, override):
    cos, sin = tables(8, 16)
    args = dict(q=_Q(), k=_K(), cos=cos, sin=sin, inv_freq=None, positions=None, offsets=None, exact=False)
    args.update(q_out=args["q"], k_out=args["k"])
    args.update(override)
    q0 = args["q"].clone()
    with pytest.raises(RuntimeError, match=match):
        native_rope(args["q"], args["k"], args["q_out"], args["k_out"], args["cos"], args["sin"], args["inv_freq"],
                    args["positions"], args["offsets"], 0, 1.0, False, False, args["exact"])  # fmt: skip
    assert torch.equal(args["q"], q0), "an error must leave the input unchanged"


def test_aliasing_and_ignored_arguments_are_errors():
    """The raw ops check aliasing from metadata before writing: an output is exactly its input (in place)
    or disjoint from it, never internally overlapping, and q's and k's tensors never overlap each other."""
    cos, sin = tables(8, 16)
    q = torch.randn(1, 4, 4, 16)

    def call(q, k, q_out, k_out, **kw):
        args = dict(cos=cos, sin=sin, inv_freq=None, positions=None, offsets=None, offset=0, af=1.0, exact=False)
        args.update(kw)
        native_rope(q, k, q_out, k_out, args["cos"], args["sin"], args["inv_freq"], args["positions"],
                    args["offsets"], args["offset"], args["af"], False, False, args["exact"])  # fmt: skip

    q0 = q.clone()
    with pytest.raises(RuntimeError, match="q_out overlaps q without being exactly q"):
        call(q, None, q.transpose(1, 2), None)  # same shape, other strides: would race
    buf = torch.randn(1, 9, 4, 16)
    with pytest.raises(RuntimeError, match="q_out overlaps q"):
        call(buf[:, :8], None, buf[:, 1:9], None)  # shifted by one token
    with pytest.raises(RuntimeError, match="must not overlap"):
        call(q, q, q, q)  # k is q: every head would be rotated twice
    with pytest.raises(RuntimeError, match="internally overlapping"):
        call(q[:, :2, :3], None, torch.empty(1, 1, 1, 16).expand(1, 2, 3, 16), None)
    with pytest.raises(RuntimeError, match="attention_factor and exact apply to inv_freq"):
        call(q, None, q, None, af=2.0)
    with pytest.raises(RuntimeError, match="offset must be 0"):
        call(q, None, q, None, offsets=torch.zeros(1, dtype=torch.long), offset=3)
    assert torch.equal(q, q0), "an error must leave q unchanged"
    x = torch.randn(2, 5, 16)
    inv = pk.rope_frequencies(16)[0]
    with pytest.raises(RuntimeError, match="out overlaps x"):
        torch.ops.posenc.native_sinusoidal(x, x.transpose(0, 0)[:, :, :].as_strided((2, 5, 16), (16, 32, 1)),
                                           None, None, 0, 1.0, inv[:8], 1.0, False, False)  # fmt: skip
    # Accepted: in place, and head slices of one fused buffer (disjoint q and k).
    qkv = torch.randn(1, 4, 8, 16)
    want_q, want_k = pk.apply_rope(qkv[:, :, :4], qkv[:, :, 4:6], cos[:4], sin[:4])
    call(qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, :4], qkv[:, :, 4:6])
    assert max_err(qkv[:, :, :4], want_q) < 1e-6 and max_err(qkv[:, :, 4:6], want_k) < 1e-6


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck (schema, fake/meta kernel, aliasing)
# ---------------------------------------------------------------------------------------------


def test_opcheck():
    cos, sin = tables(8, 16)
    inv = pk.rope_frequencies(16)[0]
    q, k = _Q(), _K()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    pos = torch.randint(0, 8, (2, 3))
    torch.library.opcheck(native_rope, (q, k, q, k, cos, sin, None, None, None, 2, 1.0, False, False, False))
    torch.library.opcheck(native_rope, (q, k, qo, ko, cos, sin, None, pos, None, 0, 1.0, True, True, False))
    torch.library.opcheck(native_rope, (q, None, qo, None, None, None, inv, None, torch.tensor([1, 4]), 0, 2.0,
                                        False, False, False))  # fmt: skip
    torch.library.opcheck(native_rope, (q.double(), None, q.double(), None, None, None, inv.double(), pos, None,
                                        0, 1.0, False, False, True))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# ISA variants: the same results from the baseline, AVX2 and AVX512 builds
# ---------------------------------------------------------------------------------------------

# Inputs come from the parent (torch's own randn/cos depend on the CPU capability too).
_VARIANT_SCRIPT = textwrap.dedent(
    """
    import torch
    from posenc_kernels import _native
    assert _native.has_op("rope", "cpu"), _native.load_error()
    outs = []
    for q, k, cos, sin, inter in torch.load(IN):
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        torch.ops.posenc.native_rope(q, k, qo, ko, cos, sin, None, None, None, 2, 1.0, inter, False, False)
        outs += [qo, ko]
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
            cases.append((q, k, torch.randn(8, 36), torch.randn(8, 36), inter))  # D 80, R 72: vector tails
    torch.save(cases, tmp_path / "in.pt")
    outs = {}
    for cap in (variant, None):
        out = tmp_path / f"{cap}.pt"
        env = dict(os.environ, **({"ATEN_CPU_CAPABILITY": cap} if cap else {}))
        env.pop("TRITON_INTERPRET", None)
        script = f"IN, OUT = {str(tmp_path / 'in.pt')!r}, {str(out)!r}\n" + _VARIANT_SCRIPT
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=600)
        outs[cap] = torch.load(out)
    assert len(outs[variant]) == 16
    for a, b in zip(outs[variant], outs[None]):
        assert torch.equal(a, b)


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


# ---------------------------------------------------------------------------------------------
# The public API on the native backend: values, gradients, compile
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def native_backend():
    with pk.use_backend("native"):
        yield


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_apply_rope_native_backend(native_backend, dtype, interleaved):
    q, k = make(2, 6, 4, 2, 48, dtype, hf_layout=True)
    cos, sin = tables(10, 32)
    offsets = torch.tensor([0, 4])
    truth_q, truth_k = ref.rope_reference(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    eager_q, eager_k = ref.rope_hf_eager(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    out_q, out_k = pk.apply_rope(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    assert_dtype_tolerance(out_q, truth_q, eager_q, what="apply_rope q")
    assert_dtype_tolerance(out_k, truth_k, eager_k, what="apply_rope k")
    q2, k2 = pk.apply_rope_(q, k, cos, sin, offsets=offsets, interleaved=interleaved)
    assert q2 is q and torch.equal(q, out_q) and torch.equal(k, out_k)


def test_native_backend_is_used(native_backend, monkeypatch):
    """The public op reaches posenc::native_rope (not a silent fallback)."""
    calls = []
    real = _native.rope
    monkeypatch.setattr(_native, "rope", lambda *a: calls.append(1) or real(*a))
    q, k = make(1, 3, 2, 1, 16, torch.float32)
    cos, sin = tables(3, 16)
    pk.apply_rope_(q, k, cos, sin)
    assert calls


def test_gradients_native_backend(native_backend):
    q, k = make(2, 5, 4, 2, 32, torch.float32)
    cos, sin = tables(8, 24)
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    go_q, go_k = torch.randn_like(q), torch.randn_like(k)
    qa, ka = qr * 1.0, kr * 1.0  # non-leaf: in place is allowed
    pk.apply_rope_(qa, ka, cos, sin, offsets=2)
    torch.autograd.backward((qa, ka), (go_q, go_k))
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    tq, tk = ref.rope_reference(q64, k64, cos, sin, offsets=2)
    torch.autograd.backward((tq, tk), (go_q.double(), go_k.double()))
    assert max_err(qr.grad, q64.grad) < 1e-5 and max_err(kr.grad, k64.grad) < 1e-5
    qd = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    c64, s64 = tables(3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: pk.apply_rope(x, None, c64, s64)[0], (qd,))
    assert torch.autograd.gradcheck(lambda x: pk.apply_rope_(x * 1.0, None, c64, s64)[0], (qd,))


@pytest.mark.slow
def test_compile_native_backend(native_backend):
    q, k = make(1, 7, 4, 2, 32, torch.float32)
    cos, sin = tables(7, 32)

    def f(q, k):
        q = q * 2.0
        k = k + 1.0
        pk.apply_rope_(q, k, cos, sin)
        return q, k

    want = f(q, k)
    got = torch.compile(f, fullgraph=True)(q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# Sinusoidal (table / add): the public ops on the native backend against the float64 references
# ---------------------------------------------------------------------------------------------

SIN_AVAILABLE = AVAILABLE and _native.has_op("sinusoidal", "cpu")


@pytest.mark.skipif(not SIN_AVAILABLE, reason="no native CPU sinusoidal kernel")
@pytest.mark.parametrize("dim", [1, 7, 64, 130])
@pytest.mark.parametrize("interleaved,cos_first", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sinusoidal_table_native(native_backend, dim, interleaved, cos_first, dtype):
    conv = dict(interleaved=interleaved, cos_first=cos_first, freq_shift=1.0 if dim >= 4 else 0.0, scale=1.5)
    pos = torch.arange(300)
    table = pk.sinusoidal_table(300, dim, dtype=dtype, **conv)
    math = torch.float64 if dtype == torch.float64 else torch.float32
    truth = ref.sinusoidal_table_reference(pos.to(math), dim, **conv)
    same_in_torch = ref.sinusoidal_table_reference(pos.to(math), dim, dtype=math, **conv).to(dtype)
    if dtype == torch.float64:  # torch in fp64 *is* the truth here: allow fp64 sin/cos's last-bit differences
        assert max_err(table, truth) < 1e-12
    else:
        assert_dtype_tolerance(table, truth, same_in_torch, what="table")
    if dim % 2:
        assert torch.equal(table[:, -1], torch.zeros_like(table[:, -1]))


@pytest.mark.skipif(not SIN_AVAILABLE, reason="no native CPU sinusoidal kernel")
@pytest.mark.parametrize("mode", ["offset", "offsets", "positions_int", "positions_float"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_add_sinusoidal_native(native_backend, mode, inplace, dtype, monkeypatch):
    calls = []
    real = _native.sinusoidal
    monkeypatch.setattr(_native, "sinusoidal", lambda *a: calls.append(1) or real(*a))
    B, S, D = 3, 11, 48
    x = torch.randn(B, S, D, dtype=dtype)
    kw = {}
    if mode == "offset":
        kw["offset"] = 5
    elif mode == "offsets":
        kw["offset"] = torch.tensor([0, 7, 100])
    elif mode == "positions_int":
        kw["positions"] = torch.randint(0, 1000, (B, S))
    else:
        kw["positions"] = torch.rand(S) * 50  # float positions (diffusion timesteps)
    truth = ref.add_sinusoidal_reference(x, x_scale=2.0, **kw)
    same_in_torch = ref.add_sinusoidal_reference(x, x_scale=2.0, dtype=dtype, **kw).to(dtype)
    x0 = x.clone()
    out = pk.add_sinusoidal_(x, x_scale=2.0, **kw) if inplace else pk.add_sinusoidal(x, x_scale=2.0, **kw)
    assert calls, "the native kernel did not run"
    if inplace:
        assert out is x
    else:
        assert torch.equal(x, x0)
    if dtype == torch.float64:
        assert max_err(out, truth) < 1e-11
    else:
        assert_dtype_tolerance(out, truth, same_in_torch, what=mode)


@pytest.mark.skipif(not SIN_AVAILABLE, reason="no native CPU sinusoidal kernel")
def test_sinusoidal_op_checks_and_opcheck():
    op = torch.ops.posenc.native_sinusoidal.default
    out = torch.empty(2, 3, 8)
    inv = torch.rand(4)
    with pytest.raises(RuntimeError, match="inv_freq must be \\[D // 2\\]"):
        op(None, out, None, None, 0, 1.0, torch.rand(3), 1.0, True, False)
    with pytest.raises(RuntimeError, match="x must have out's shape"):
        op(torch.randn(2, 3, 4), out, None, None, 0, 1.0, inv, 1.0, True, False)
    with pytest.raises(RuntimeError, match="stride\\(-1\\) == 1"):
        op(None, torch.empty(2, 3, 16)[..., ::2], None, None, 0, 1.0, inv, 1.0, True, False)
    with pytest.raises(RuntimeError, match="positions or offsets, not both"):
        op(None, out, torch.zeros(3), torch.zeros(2, dtype=torch.long), 0, 1.0, inv, 1.0, True, False)
    x = torch.randn(2, 3, 8)
    torch.library.opcheck(op, (x, x, None, torch.tensor([1, 2]), 0, 2.0, inv, 1.0, True, False))
    torch.library.opcheck(op, (None, out, torch.rand(2, 3), None, 0, 1.0, inv, 0.5, False, True))
