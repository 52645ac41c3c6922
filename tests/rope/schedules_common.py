"""The frequency-schedule cases and their truths: HF's init functions and an mpmath computation.
"""

import math

import pytest
import torch

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
# Errors: each names the key or argument
# ----------------------------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 4096, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
