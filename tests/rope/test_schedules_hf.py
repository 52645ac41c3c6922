"""rope_frequencies against HF's ROPE_INIT_FUNCTIONS and the exact (mpmath) schedule, and the keys HF
requires per rope type.
"""

import math
import warnings

import pytest
import torch

from posenc_kernels.ops.rope.schedules import rope_frequencies

from .schedules_common import CASE_PARAMS, rotary_dim_of, hf_frequencies, fp32_ulps, mp_schedule, LLAMA3, LONGROPE, YARN

transformers = pytest.importorskip("transformers")
mpmath = pytest.importorskip("mpmath")
from transformers import LlamaConfig  # noqa: E402


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
