"""posenc_kernels.schedules.rope_frequencies: every HF rope type against Hugging Face's own init functions
(transformers' ``ROPE_INIT_FUNCTIONS`` and the models' ``compute_default_rope_parameters``) on real model
settings, against 40-digit mpmath evaluations of the published formulas, and its errors.

How close to HF: HF evaluates in fp32, we in float64 rounded once (nearest-to-exact, checked against
mpmath). HF's error budget, in fp32 ulps of the result:

* its exponent ``2i / d`` is rounded to fp32 first: exact when ``d`` is a power of two, else a relative error
  up to ``2**-25`` of ``x = 2i/d`` that ``base ** -x`` amplifies by ``ln(base) * x``: at most ``ln(base) / 2``
  ulps (``ln(base)`` read off the lowest frequency, ``base ** -(d-2)/d``);
* the fp32 operations themselves (pow, reciprocal, ``/ factor``, the YaRN / Llama-3 blends, LongRoPE's
  product with fp32-rounded factors): up to 4 ulps; measured at most 3 (Llama 3.1).

Measured maxima (transformers 5.24, this file's cases), fp32 ulps: power-of-two dims: default / linear /
dynamic / proportional 1, yarn 2, longrope 2, llama3 3; d = 96: linear 3, longrope 4, default (base 1e6) 5;
d = 40 (head 80, partial 0.5): dynamic NTK at 100k tokens 6.
"""

import math
import warnings

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops.rope.schedules import ROPE_TYPES, rope_frequencies

transformers = pytest.importorskip("transformers")
mpmath = pytest.importorskip("mpmath")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Cases: (id, head_dim, max_position_embeddings, rope_parameters, seq_lens)
# ----------------------------------------------------------------------------------------------
_g = torch.Generator().manual_seed(0)
# LongRoPE factor lists shaped like Phi-3's (short ~1..1.1, long rising to ~60); 48 = 96 / 2 entries.
SHORT48 = (1 + 0.1 * torch.rand(48, generator=_g, dtype=torch.float64)).tolist()
LONG48 = (torch.linspace(1.0, 60.0, 48, dtype=torch.float64) * (1 + 0.01 * torch.rand(48, generator=_g, dtype=torch.float64))).tolist()

CASES = [
    ("default-llama2", 128, 4096, dict(rope_type="default", rope_theta=1e4), [None]),
    ("default-llama3", 128, 8192, dict(rope_type="default", rope_theta=5e5), [None]),
    ("default-phi2-partial", 80, 2048, dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.4), [None]),
    ("default-d96-1e6", 96, 4096, dict(rope_type="default", rope_theta=1e6), [None]),
    ("linear-x2", 128, 4096, dict(rope_type="linear", rope_theta=1e4, factor=2.0), [None]),
    ("linear-x10-d96", 96, 4096, dict(rope_type="linear", rope_theta=1e4, factor=10.0), [None]),
    ("dynamic-x2", 128, 2048, dict(rope_type="dynamic", rope_theta=1e4, factor=2.0), [None, 1, 2048, 2049, 16384]),
    ("dynamic-x10-partial", 80, 4096, dict(rope_type="dynamic", rope_theta=1e4, factor=10.0, partial_rotary_factor=0.5), [None, 5000, 100000]),
    ("yarn-qwen2.5", 128, 131072, dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768), [None]),
    ("yarn-deepseek-v3", 64, 163840, dict(rope_type="yarn", rope_theta=1e4, factor=40.0, original_max_position_embeddings=4096,
                                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0), [None]),  # fmt: skip
    ("yarn-deepseek-v2-lite", 64, 163840, dict(rope_type="yarn", rope_theta=1e4, factor=40.0, original_max_position_embeddings=4096,
                                               beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707), [None]),  # fmt: skip
    ("yarn-mscale-ratio", 64, 163840, dict(rope_type="yarn", rope_theta=1e4, factor=40.0, original_max_position_embeddings=4096,
                                           mscale=1.0, mscale_all_dim=0.8), [None]),  # fmt: skip
    ("yarn-gpt-oss-no-truncate", 64, 131072, dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, original_max_position_embeddings=4096,
                                                  beta_fast=32.0, beta_slow=1.0, truncate=False), [None]),  # fmt: skip
    ("yarn-beta1000-af", 128, 2048, dict(rope_type="yarn", rope_theta=1e4, factor=10.0, original_max_position_embeddings=2048,
                                         beta_fast=1000, beta_slow=1, attention_factor=0.5), [None]),  # fmt: skip
    ("yarn-factor-from-lengths", 64, 163840, dict(rope_type="yarn", rope_theta=1e4, factor=None, original_max_position_embeddings=4096), [None]),
    ("longrope-phi3-d96", 96, 131072, dict(rope_type="longrope", rope_theta=1e4, original_max_position_embeddings=4096,
                                           short_factor=SHORT48, long_factor=LONG48), [None, 4096, 4097, 131072]),  # fmt: skip
    ("longrope-phi4mini-partial", 128, 131072, dict(rope_type="longrope", rope_theta=1e4, partial_rotary_factor=0.75, factor=32.0,
                                                    original_max_position_embeddings=4096, short_factor=SHORT48, long_factor=LONG48), [None, 4097]),  # fmt: skip
    ("longrope-hf-test", 128, 2048, dict(rope_type="longrope", rope_theta=1e4, factor=10.0, original_max_position_embeddings=2048, attention_factor=0.9,
                                         short_factor=[2.0] * 64, long_factor=[float(i) for i in range(1, 65)]), [None, 2049]),  # fmt: skip
    ("llama3-3.1-8b", 128, 131072, dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192), [None]),  # fmt: skip
    ("llama3-3.2-1b", 64, 131072, dict(rope_type="llama3", rope_theta=5e5, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8192), [None]),  # fmt: skip
    ("proportional-gemma4", 256, 131072, dict(rope_type="proportional", rope_theta=1e6, partial_rotary_factor=0.25), [None]),
    ("proportional-x8", 128, 131072, dict(rope_type="proportional", rope_theta=1e4, partial_rotary_factor=0.5, factor=8.0), [None]),
]
CASE_PARAMS = [pytest.param(c, sl, id=f"{c[0]}-seq{sl}") for c in CASES for sl in c[4]]


def rotary_dim_of(head_dim, params):
    if params["rope_type"] == "proportional":
        return head_dim  # the schedule spans the head (zeros past the rotated pairs)
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def hf_frequencies(head_dim, max_pos, params, seq_len):
    """HF's own computation: a model config passed to its init function."""
    cfg = LlamaConfig(head_dim=head_dim, hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=max_pos,
                      rope_parameters=dict(params))  # fmt: skip
    if params["rope_type"] == "default":
        # Llama's default ignores partial_rotary_factor; Phi-3's (GPT-NeoX, ...) honours it.
        return Phi3RotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, seq_len=seq_len)


def fp32_ulps(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| in fp32 ulps of ours."""
    ours, theirs = ours.to(torch.float32), theirs.to(torch.float32)
    ulp = (torch.nextafter(ours.abs(), torch.tensor(math.inf)) - ours.abs()).double()
    return ((ours.double() - theirs.double()).abs() / ulp).max().item()


# ----------------------------------------------------------------------------------------------
# 40-digit references of the published formulas (written from the papers / HF's docstrings)
# ----------------------------------------------------------------------------------------------
mp = mpmath.mp


def mp_schedule(d, max_pos, p, seq_len):
    """(list of mpf inverse frequencies, attention factor)."""
    mp.dps = 40
    M = mp.mpf
    theta = M(p["rope_theta"])
    kind = p["rope_type"]

    def powers(base, n=d // 2):
        return [M(base) ** (-M(2 * i) / d) for i in range(n)]

    if kind == "default":
        return powers(theta), 1.0
    if kind == "linear":
        return [v / M(p["factor"]) for v in powers(theta)], 1.0
    if kind == "ntk":
        return powers(theta * M(p["factor"]) ** (M(d) / (d - 2))), 1.0
    if kind == "dynamic":
        L0 = max_pos
        L = max(seq_len or L0, L0)
        f = M(p["factor"])
        return powers(theta * (f * L / L0 - (f - 1)) ** (M(d) / (d - 2))), 1.0
    if kind == "yarn":
        orig = p["original_max_position_embeddings"]
        f = M(p["factor"]) if p.get("factor") is not None else M(max_pos) / orig

        def corr(rot):
            return d * mp.log(M(orig) / (rot * 2 * mp.pi)) / (2 * mp.log(theta))

        lo, hi = corr(M(p.get("beta_fast") or 32)), corr(M(p.get("beta_slow") or 1))
        if p.get("truncate", True):
            lo, hi = mp.floor(lo), mp.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        if lo == hi:
            hi += M("0.001")
        ramps = [min(max((i - lo) / (hi - lo), 0), 1) for i in range(d // 2)]
        inv = [v * (r / f + 1 - r) for v, r in zip(powers(theta), ramps)]

        def ms(scale, m=1):
            return M(1) if scale <= 1 else M("0.1") * M(m) * mp.log(scale) + 1

        if p.get("attention_factor") is not None:
            af = M(p["attention_factor"])
        elif p.get("mscale") and p.get("mscale_all_dim"):
            af = ms(f, p["mscale"]) / ms(f, p["mscale_all_dim"])
        else:
            af = ms(f)
        return inv, float(af)
    if kind == "longrope":
        orig = p["original_max_position_embeddings"]
        ext = p["long_factor"] if (seq_len and seq_len > orig) else p["short_factor"]
        inv = [1 / (M(e) * v) for e, v in zip(ext, [theta ** (M(2 * i) / d) for i in range(d // 2)])]
        f = M(p["factor"]) if p.get("factor") is not None else M(max_pos) / orig
        af = M(p["attention_factor"]) if p.get("attention_factor") is not None else (
            M(1) if f <= 1 else mp.sqrt(1 + mp.log(f) / mp.log(orig)))  # fmt: skip
        return inv, float(af)
    if kind == "llama3":
        f, lo_f, hi_f, orig = (M(p[k]) for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
        out = []
        for v in powers(theta):
            wl = 2 * mp.pi / v
            if wl < orig / hi_f:
                out.append(v)
            elif wl > orig / lo_f:
                out.append(v / f)
            else:
                s = (orig / wl - lo_f) / (hi_f - lo_f)
                out.append((1 - s) * v / f + s * v)
        return out, 1.0
    if kind == "proportional":
        n = int(p.get("partial_rotary_factor", 1.0) * d // 2)
        f = M(p.get("factor", 1.0))
        return [v / f for v in powers(theta, n)] + [M(0)] * (d // 2 - n), 1.0
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------
# Parity with HF
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, seq_len", CASE_PARAMS)
def test_matches_hf_init_functions(case, seq_len):
    name, head_dim, max_pos, params, _ = case
    d = rotary_dim_of(head_dim, params)
    inv_hf, af_hf = hf_frequencies(head_dim, max_pos, params, seq_len)
    inv, af = rope_frequencies(d, scaling=params, seq_len=seq_len, max_position_embeddings=max_pos)
    assert inv.dtype == torch.float32 and inv.shape == inv_hf.shape == (d // 2,)
    assert af == pytest.approx(float(af_hf), rel=1e-15, abs=0)
    # Error budget of HF's fp32 evaluation (module docstring); ln(base) from the lowest nonzero frequency.
    inv64 = rope_frequencies(d, scaling=params, seq_len=seq_len, max_position_embeddings=max_pos, dtype=torch.float64)[0]
    pow2 = d & (d - 1) == 0
    ln_base = -math.log(inv64[inv64 > 0].min().item()) * d / max(d - 2, 1)
    tol = 4 + (0 if pow2 else ln_base / 2)
    got = fp32_ulps(inv, inv_hf)
    assert got <= tol, f"{name}: {got} ulps from HF (budget {tol:.1f})"


@pytest.mark.parametrize("case, seq_len", CASE_PARAMS)
def test_nearest_to_exact(case, seq_len):
    """float64 output within float64 rounding noise of the 40-digit value; fp32 output is that value
    rounded once (the nearest fp32)."""
    name, head_dim, max_pos, params, _ = case
    d = rotary_dim_of(head_dim, params)
    want, af_want = mp_schedule(d, max_pos, params, seq_len)
    want64 = torch.tensor([float(v) for v in want], dtype=torch.float64)
    inv64, af = rope_frequencies(d, scaling=params, seq_len=seq_len, max_position_embeddings=max_pos, dtype=torch.float64)
    rel = ((inv64 - want64).abs() / want64.abs().clamp_min(1e-300)).max().item()
    # A few float64 operations, plus YaRN's untruncated ramp edges, which come from float64 logs (seen: 32
    # float64 ulps for gpt-oss); far below fp32 resolution either way.
    assert rel <= 2.0**-46, f"{name}: float64 relative error {rel:.3g}"
    assert af == pytest.approx(af_want, rel=1e-14)
    inv32, _ = rope_frequencies(d, scaling=params, seq_len=seq_len, max_position_embeddings=max_pos)
    assert torch.equal(inv32, want64.to(torch.float32)), f"{name}: fp32 output is not the nearest fp32"


def test_config_passes_straight_through():
    """A transformers 5 config's rope_parameters (with rope_theta, partial_rotary_factor) is the scaling
    argument as is; base comes from its rope_theta."""
    cfg = LlamaConfig(head_dim=64, hidden_size=256, num_attention_heads=4, max_position_embeddings=131072,
                      rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192))  # fmt: skip
    before = dict(cfg.rope_parameters)
    inv, af = rope_frequencies(64, scaling=cfg.rope_parameters)
    inv_hf, af_hf = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    assert fp32_ulps(inv, inv_hf) <= 4 and af == af_hf
    assert cfg.rope_parameters == before, "the config's dict must not be modified"


# ----------------------------------------------------------------------------------------------
# Semantics
# ----------------------------------------------------------------------------------------------


def test_dynamic_below_at_and_above_the_original_length():
    p = dict(rope_type="dynamic", factor=4.0)
    default = rope_frequencies(64, 1e4)[0]
    for seq_len in (None, 1, 100, 2048):
        assert torch.equal(rope_frequencies(64, 1e4, scaling=p, seq_len=seq_len, max_position_embeddings=2048)[0], default)
    prev = default
    for seq_len in (2049, 4096, 16384):
        inv = rope_frequencies(64, 1e4, scaling=p, seq_len=seq_len, max_position_embeddings=2048)[0]
        assert inv[0] == 1.0 and (inv[1:] < prev[1:]).all(), "longer contexts lower every frequency but the first"
        prev = inv
    # Without max_position_embeddings, original_max_position_embeddings in the dict is the original length.
    with_key = dict(p, original_max_position_embeddings=2048)
    assert torch.equal(rope_frequencies(64, 1e4, scaling=with_key, seq_len=4096)[0],
                       rope_frequencies(64, 1e4, scaling=p, seq_len=4096, max_position_embeddings=2048)[0])  # fmt: skip


def test_longrope_switches_on_the_original_length():
    p = dict(rope_type="longrope", original_max_position_embeddings=4096, short_factor=SHORT48, long_factor=LONG48, factor=32.0)
    base = rope_frequencies(96, 1e4)[0].double()
    short = rope_frequencies(96, 1e4, scaling=p, seq_len=4096)[0]
    long = rope_frequencies(96, 1e4, scaling=p, seq_len=4097)[0]
    assert torch.equal(rope_frequencies(96, 1e4, scaling=p)[0], short)
    assert torch.allclose(short.double(), base / torch.tensor(SHORT48, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(long.double(), base / torch.tensor(LONG48, dtype=torch.float64), rtol=1e-6)
    af = rope_frequencies(96, 1e4, scaling=p, seq_len=4097)[1]
    assert af == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert rope_frequencies(96, 1e4, scaling=dict(p, factor=1.0))[1] == 1.0


def test_ntk_static_is_default_with_a_larger_base():
    for d, factor in ((128, 4.0), (64, 8.0), (80, 2.0)):
        got = rope_frequencies(d, 1e4, scaling={"rope_type": "ntk", "factor": factor})[0]
        assert torch.equal(got, rope_frequencies(d, 1e4 * factor ** (d / (d - 2)))[0])


@pytest.mark.parametrize("kind", ["yarn", "llama3"])
def test_yarn_and_llama3_keep_high_and_divide_low_frequencies(kind):
    p = {"rope_type": kind, "factor": 8.0, "original_max_position_embeddings": 8192}
    if kind == "llama3":
        p.update(low_freq_factor=1.0, high_freq_factor=4.0)
    inv = rope_frequencies(128, 5e5, scaling=p, dtype=torch.float64)[0]
    default = rope_frequencies(128, 5e5, dtype=torch.float64)[0]
    assert inv[0] == default[0]
    assert inv[-1] == pytest.approx(default[-1].item() / 8.0, rel=1e-15)
    assert ((inv <= default) & (inv >= default / 8.0 * (1 - 1e-15))).all()


def test_yarn_attention_factor_variants():
    p = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}
    assert rope_frequencies(64, 1e4, scaling=p)[1] == pytest.approx(0.1 * math.log(40) + 1)
    assert rope_frequencies(64, 1e4, scaling=dict(p, attention_factor=0.5))[1] == 0.5
    m = lambda s: 0.1 * s * math.log(40) + 1  # noqa: E731
    assert rope_frequencies(64, 1e4, scaling=dict(p, mscale=1.0, mscale_all_dim=0.8))[1] == pytest.approx(m(1.0) / m(0.8))
    assert rope_frequencies(64, 1e4, scaling=dict(p, mscale=1.0, mscale_all_dim=0))[1] == pytest.approx(m(1.0))
    assert rope_frequencies(64, 1e4, scaling=dict(p, factor=1.0))[1] == 1.0
    # DeepSeek-V3 style: factor None, derived from the lengths (HF: the key must be there; absent is a KeyError).
    no_factor = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}
    a = rope_frequencies(64, 1e4, scaling=no_factor, max_position_embeddings=163840)
    b = rope_frequencies(64, 1e4, scaling=p)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_proportional_zero_frequencies_past_the_rotated_pairs():
    inv = rope_frequencies(256, 1e6, scaling={"rope_type": "proportional", "partial_rotary_factor": 0.25})[0]
    assert inv.shape == (128,) and (inv[:32] > 0).all() and (inv[32:] == 0).all()
    assert torch.equal(inv[:32], (1e6 ** -(torch.arange(0, 64, 2, dtype=torch.float64) / 256)).float())


def test_float64_output_rounds_to_the_float32_output():
    for case in CASES:
        _, head_dim, max_pos, params, seqs = case
        d = rotary_dim_of(head_dim, params)
        for sl in seqs:
            a = rope_frequencies(d, scaling=params, seq_len=sl, max_position_embeddings=max_pos, dtype=torch.float64)[0]
            b = rope_frequencies(d, scaling=params, seq_len=sl, max_position_embeddings=max_pos)[0]
            assert a.dtype == torch.float64 and torch.equal(a.float(), b)
            c = rope_frequencies(d, scaling=params, seq_len=sl, max_position_embeddings=max_pos, dtype=torch.bfloat16)[0]
            assert c.dtype == torch.bfloat16 and torch.equal(c, a.to(torch.bfloat16))


def test_base_and_rope_theta():
    assert torch.equal(rope_frequencies(16, scaling={"rope_theta": 5e5})[0], rope_frequencies(16, 5e5)[0])
    assert torch.equal(rope_frequencies(16, 5e5, scaling={"rope_theta": 5e5})[0], rope_frequencies(16, 5e5)[0])
    assert torch.equal(rope_frequencies(16)[0], rope_frequencies(16, 10000.0)[0])
    with pytest.raises(ValueError, match=r"base=10000.0 disagrees with scaling\['rope_theta'\]=500000.0"):
        rope_frequencies(16, 10000.0, scaling={"rope_theta": 5e5})


def test_aliases_and_tolerated_keys():
    lin = rope_frequencies(32, 1e4, scaling={"rope_type": "linear", "factor": 2.0})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(rope_frequencies(32, 1e4, scaling={"type": "linear", "factor": 2.0})[0], lin)
        # rope_type wins over the old key, as in HF.
        assert torch.equal(rope_frequencies(32, 1e4, scaling={"rope_type": "linear", "type": "default", "factor": 2.0})[0], lin)
        mrope = {"type": "mrope", "mrope_section": [4, 6, 6], "rope_theta": 1e4, "mrope_interleaved": True,
                 "partial_rotary_factor": 1.0}  # fmt: skip
        assert torch.equal(rope_frequencies(32, scaling=mrope)[0], rope_frequencies(32, 1e4)[0])
        su = {"type": "su", "original_max_position_embeddings": 8, "short_factor": [1.0] * 16, "long_factor": [2.0] * 16, "factor": 4.0}
        assert torch.equal(rope_frequencies(32, 1e4, scaling=su)[0], rope_frequencies(32, 1e4)[0])
    with pytest.warns(UserWarning, match=r"keys \['facotr'\] are not used by rope_type 'linear'"):
        rope_frequencies(32, 1e4, scaling={"rope_type": "linear", "factor": 2.0, "facotr": 3.0})


def test_rope_types_listed():
    assert set(ROPE_TYPES) == {"default", "linear", "dynamic", "ntk", "yarn", "longrope", "llama3", "proportional"}
    assert set(ROPE_INIT_FUNCTIONS) <= set(ROPE_TYPES), "a rope type of this transformers version is missing"


def test_existing_call_form():
    inv, af = pk.rope_frequencies(8, 10000.0)
    assert af == 1.0 and torch.equal(inv, torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64).float())


# ----------------------------------------------------------------------------------------------
# Errors: each names the key or argument
# ----------------------------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 4096, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}


@pytest.mark.parametrize(
    "scaling, kwargs, exc, msg",
    [
        ({"rope_type": "ntk-by-parts"}, {}, ValueError, r"unknown rope_type 'ntk-by-parts': expected one of default, linear"),
        ({"type": "axial"}, {}, ValueError, r"unknown rope_type 'axial'"),
        ({"rope_type": "linear"}, {}, ValueError, r"scaling\['factor'\] is required for rope_type 'linear'"),
        ({"rope_type": "ntk"}, {}, ValueError, r"scaling\['factor'\] is required for rope_type 'ntk'"),
        ({"rope_type": "dynamic", "factor": 2.0}, {}, ValueError, r"scaling\['original_max_position_embeddings'\] is required .* max_position_embeddings="),
        ({"rope_type": "yarn", "factor": 2.0}, {}, ValueError, r"scaling\['original_max_position_embeddings'\] is required for rope_type 'yarn'"),
        ({"rope_type": "yarn", "original_max_position_embeddings": 4096}, {}, KeyError, r"scaling\['factor'\] is required for rope_type 'yarn'"),
        # issue 10: yarn without a factor used to give the default frequencies; HF raises (KeyError)
        ({"rope_type": "yarn"}, {"max_position_embeddings": 2048}, KeyError, r"scaling\['factor'\] is required for rope_type 'yarn'"),
        ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}, {}, ValueError, r"scaling\['factor'\] is None .* pass max_position_embeddings="),
        ({k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}, {}, ValueError, r"scaling\['low_freq_factor'\] is required"),
        ({k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}, {}, ValueError, r"scaling\['high_freq_factor'\] is required"),
        ({k: v for k, v in LONGROPE.items() if k != "long_factor"}, {}, ValueError, r"scaling\['long_factor'\] is required for rope_type 'longrope'"),
        ({k: v for k, v in LONGROPE.items() if k != "short_factor"}, {}, ValueError, r"scaling\['short_factor'\] is required"),
        ({k: v for k, v in LONGROPE.items() if k != "factor"}, {}, ValueError, r"scaling\['factor'\] is required .* max_position_embeddings="),
        ({"rope_type": "linear", "factor": 0.0}, {}, ValueError, r"scaling\['factor'\] must be a positive finite number for rope_type 'linear', got 0.0"),
        ({"rope_type": "linear", "factor": -2}, {}, ValueError, r"scaling\['factor'\] must be a positive finite number"),
        ({"rope_type": "linear", "factor": float("nan")}, {}, ValueError, r"scaling\['factor'\] must be a positive finite number"),
        ({"rope_type": "linear", "factor": "2"}, {}, ValueError, r"scaling\['factor'\] must be a positive finite number .* got '2'"),
        ({"rope_type": "linear", "factor": True}, {}, ValueError, r"scaling\['factor'\] must be"),
        ({**YARN, "beta_fast": 0}, {}, ValueError, r"scaling\['beta_fast'\] must be a positive"),
        ({**YARN, "attention_factor": -1.0}, {}, ValueError, r"scaling\['attention_factor'\] must be a positive"),
        ({**YARN, "original_max_position_embeddings": 0}, {}, ValueError, r"scaling\['original_max_position_embeddings'\] .* must be a positive int"),
        ({**YARN, "original_max_position_embeddings": 4096.5}, {}, ValueError, r"original_max_position_embeddings'\] .* must be a positive int"),
        ({**YARN, "truncate": "no"}, {}, ValueError, r"scaling\['truncate'\] must be a bool"),
        ({**LLAMA3, "high_freq_factor": 1.0}, {}, ValueError, r"scaling\['high_freq_factor'\] must exceed scaling\['low_freq_factor'\]"),
        ({**LONGROPE, "long_factor": [2.0] * 7}, {}, ValueError, r"scaling\['long_factor'\] must have rotary_dim / 2 = 8 entries, got 7"),
        ({**LONGROPE, "short_factor": [1.0] * 7 + [0.0]}, {}, ValueError, r"scaling\['short_factor'\] entries must be positive"),
        ({**LONGROPE, "short_factor": "1,2"}, {}, ValueError, r"scaling\['short_factor'\] must be a list of numbers"),
        ({"rope_type": "proportional", "partial_rotary_factor": 1.5}, {}, ValueError, r"partial_rotary_factor'\] must be in \(0, 1\]"),
        (["linear"], {}, TypeError, r"scaling must be a dict of HF rope_parameters or None, got list"),
        (None, {"dtype": torch.int32}, TypeError, r"dtype must be a floating dtype"),
        (None, {"seq_len": -1}, ValueError, r"seq_len must be an int >= 0, got -1"),
        (None, {"max_position_embeddings": -1}, ValueError, r"max_position_embeddings must be a positive int"),
    ],
)
def test_errors_name_the_key(scaling, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        rope_frequencies(16, 1e4, scaling=scaling, **kwargs)


@pytest.mark.parametrize("kind", ["ntk", "dynamic"])
def test_ntk_exponent_needs_more_than_one_pair(kind):
    with pytest.raises(ValueError, match=rf"rope_type '{kind}' needs rotary_dim > 2"):
        rope_frequencies(2, 1e4, scaling={"rope_type": kind, "factor": 2.0}, max_position_embeddings=16)


def test_yarn_base_one_rejected():
    with pytest.raises(ValueError, match="base must not be 1 for rope_type 'yarn'"):
        rope_frequencies(16, 1.0, scaling=YARN)


# Every required key of every rope type, as HF's own validation decides it (issue 10: yarn without a factor
# silently gave the default schedule). For each type a complete dict loses one key at a time; HF's
# ``validate_rope`` says whether that key is required (KeyError) and ours must then raise a KeyError naming it.
# HF's validation runs before ``standardize_rope_params`` fills ``original_max_position_embeddings`` from
# ``max_position_embeddings``; ours has that fallback only when ``max_position_embeddings=`` is passed, so that
# key is checked without it and every other key with it.
FULL = {
    "linear": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
    "yarn": {**YARN, "rope_theta": 1e4, "attention_factor": 1.1, "beta_fast": 32.0, "beta_slow": 1.0},
    "longrope": {**LONGROPE, "rope_theta": 1e4, "attention_factor": 1.1},
    "llama3": {**LLAMA3, "rope_theta": 1e4},
    "proportional": {"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5},
}
DROPS = [(t, k) for t, d in FULL.items() for k in d if k not in ("rope_type", "rope_theta")]


def _hf_requires(params: dict) -> bool:
    import logging

    cfg = LlamaConfig(head_dim=16, hidden_size=64, num_attention_heads=4, max_position_embeddings=16384)
    cfg.rope_parameters = dict(params)
    logging.getLogger("transformers.modeling_rope_utils").disabled = True
    try:
        cfg.validate_rope()
    except KeyError:
        return True
    finally:
        logging.getLogger("transformers.modeling_rope_utils").disabled = False
    return False


@pytest.mark.parametrize("rope_type, key", DROPS, ids=[f"{t}-without-{k}" for t, k in DROPS])
def test_required_keys_match_hf_validation(rope_type, key):
    params = {k: v for k, v in FULL[rope_type].items() if k != key}
    kwargs = {} if key == "original_max_position_embeddings" else {"max_position_embeddings": 16384}
    if _hf_requires(params):
        with pytest.raises(KeyError, match=rf"scaling\['{key}'\] is required for rope_type '{rope_type}'"):
            rope_frequencies(16, scaling=params, **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inv, af = rope_frequencies(16, scaling=params, **kwargs)
        assert inv.shape == (8,) and math.isfinite(af)


def test_missing_key_error_is_a_value_error_too():
    with pytest.raises(ValueError, match=r"^scaling\['factor'\] is required for rope_type 'yarn'"):
        rope_frequencies(128, 1e4, scaling={"rope_type": "yarn"}, max_position_embeddings=2048)
