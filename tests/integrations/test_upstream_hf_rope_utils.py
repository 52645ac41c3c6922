"""Hugging Face's rope-utils tests, ported and run against :func:`posenc_kernels.rope_frequencies` and
:meth:`posenc_kernels.RotaryEmbedding.from_config`.

Upstream: github.com/huggingface/transformers, ``tests/utils/test_modeling_rope_utils.py``, the
transformers-5 version (``config.rope_parameters``, ``validate_rope``, nested Gemma3 cases) matching the
installed transformers 5.24; the search index holding it records no commit (its stored copy is 81,176
characters; the 4.x version at commit e42e4a43c16b458045aa7b0f721cfe4015680880 has the same numeric
snapshots for Llama). The code here is ours; kept from upstream: the configs (Llama: head_dim 128, theta 1e4,
max_position 2048; Gemma3 text: head_dim 256, max_position 131072), each check and numeric snapshot, and
torch's default ``assert_close`` tolerances.

Not ported: what tests HF's config machinery rather than the schedule (``convert_rope_params_to_dict``,
``ignore_keys_at_rope_validation``, log-warning counts, per-layer module attributes, the dynamic module's
reset after a long sequence, which tests/rope/test_rotary_module.py covers for ours). Nested (per-layer) configs
are ported as the Gemma3 head/length they use: ``rope_frequencies`` takes one layer type's parameters.

Where we deliberately differ: HF evaluates in fp32; ours are float64 rounded once, so our fp32 frequencies
are the nearest to the exact values. Upstream's snapshots have 5 significant digits and pass either way;
``test_nearest_to_float64`` checks our accuracy against float64 for every rope type.
"""

import math
import warnings

import pytest
import torch

import posenc_kernels as pk

pytest.importorskip("transformers")

LLAMA_D, LLAMA_MAX = 128, 2048  # LlamaConfig(): hidden 4096 / 32 heads, max_position_embeddings 2048
GEMMA_D, GEMMA_MAX = 256, 131072  # Gemma3TextConfig(): head_dim 256, max_position_embeddings 131072
ALL_TYPES = ["default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional"]


def freqs(params, d=LLAMA_D, max_pos=LLAMA_MAX, **kw):
    return pk.rope_frequencies(d, scaling=params, max_position_embeddings=max_pos, **kw)


def default_inv(d=LLAMA_D):
    return freqs({"rope_type": "default", "rope_theta": 10000.0}, d)[0]


# fmt: off
EXPECTED_DEFAULT = torch.tensor([
    1.0000e+00, 8.6596e-01, 7.4989e-01, 6.4938e-01, 5.6234e-01, 4.8697e-01, 4.2170e-01, 3.6517e-01, 3.1623e-01,
    2.7384e-01, 2.3714e-01, 2.0535e-01, 1.7783e-01, 1.5399e-01, 1.3335e-01, 1.1548e-01, 1.0000e-01, 8.6596e-02,
    7.4989e-02, 6.4938e-02, 5.6234e-02, 4.8697e-02, 4.2170e-02, 3.6517e-02, 3.1623e-02, 2.7384e-02, 2.3714e-02,
    2.0535e-02, 1.7783e-02, 1.5399e-02, 1.3335e-02, 1.1548e-02, 1.0000e-02, 8.6596e-03, 7.4989e-03, 6.4938e-03,
    5.6234e-03, 4.8697e-03, 4.2170e-03, 3.6517e-03, 3.1623e-03, 2.7384e-03, 2.3714e-03, 2.0535e-03, 1.7783e-03,
    1.5399e-03, 1.3335e-03, 1.1548e-03, 1.0000e-03, 8.6596e-04, 7.4989e-04, 6.4938e-04, 5.6234e-04, 4.8697e-04,
    4.2170e-04, 3.6517e-04, 3.1623e-04, 2.7384e-04, 2.3714e-04, 2.0535e-04, 1.7783e-04, 1.5399e-04, 1.3335e-04,
    1.1548e-04])
EXPECTED_DYNAMIC = torch.tensor([
    1.0000e+00, 8.0931e-01, 6.5498e-01, 5.3008e-01, 4.2900e-01, 3.4720e-01, 2.8099e-01, 2.2741e-01, 1.8404e-01,
    1.4895e-01, 1.2055e-01, 9.7558e-02, 7.8955e-02, 6.3899e-02, 5.1714e-02, 4.1853e-02, 3.3872e-02, 2.7413e-02,
    2.2185e-02, 1.7955e-02, 1.4531e-02, 1.1760e-02, 9.5176e-03, 7.7027e-03, 6.2339e-03, 5.0451e-03, 4.0831e-03,
    3.3045e-03, 2.6744e-03, 2.1644e-03, 1.7517e-03, 1.4176e-03, 1.1473e-03, 9.2852e-04, 7.5146e-04, 6.0817e-04,
    4.9220e-04, 3.9834e-04, 3.2238e-04, 2.6091e-04, 2.1115e-04, 1.7089e-04, 1.3830e-04, 1.1193e-04, 9.0585e-05,
    7.3312e-05, 5.9332e-05, 4.8018e-05, 3.8861e-05, 3.1451e-05, 2.5453e-05, 2.0600e-05, 1.6672e-05, 1.3492e-05,
    1.0920e-05, 8.8374e-06, 7.1522e-06, 5.7883e-06, 4.6845e-06, 3.7912e-06, 3.0683e-06, 2.4832e-06, 2.0097e-06,
    1.6265e-06])
EXPECTED_YARN = torch.tensor([
    1.0000e+00, 8.6596e-01, 7.4989e-01, 6.4938e-01, 5.6234e-01, 4.8697e-01, 4.2170e-01, 3.6517e-01, 3.1623e-01,
    2.7384e-01, 2.3714e-01, 2.0535e-01, 1.7783e-01, 1.5399e-01, 1.3335e-01, 1.1548e-01, 1.0000e-01, 8.3479e-02,
    6.9590e-02, 5.7925e-02, 4.8136e-02, 3.9931e-02, 3.3061e-02, 2.7315e-02, 2.2515e-02, 1.8512e-02, 1.5177e-02,
    1.2403e-02, 1.0101e-02, 8.1924e-03, 6.6143e-03, 5.3120e-03, 4.2400e-03, 3.3599e-03, 2.6396e-03, 2.0520e-03,
    1.5746e-03, 1.1882e-03, 8.7713e-04, 6.2810e-04, 4.3007e-04, 2.7384e-04, 2.3714e-04, 2.0535e-04, 1.7783e-04,
    1.5399e-04, 1.3335e-04, 1.1548e-04, 1.0000e-04, 8.6596e-05, 7.4989e-05, 6.4938e-05, 5.6234e-05, 4.8697e-05,
    4.2170e-05, 3.6517e-05, 3.1623e-05, 2.7384e-05, 2.3714e-05, 2.0535e-05, 1.7783e-05, 1.5399e-05, 1.3335e-05,
    1.1548e-05])
EXPECTED_LLAMA3 = torch.tensor([
    1.0000e+00, 8.6596e-01, 7.4989e-01, 6.4938e-01, 5.6234e-01, 4.8697e-01, 4.2170e-01, 3.6517e-01, 3.1623e-01,
    2.7384e-01, 2.3714e-01, 2.0535e-01, 1.7783e-01, 1.5399e-01, 1.3335e-01, 1.1548e-01, 1.0000e-01, 8.6596e-02,
    7.4989e-02, 6.4938e-02, 5.6234e-02, 4.8697e-02, 4.2170e-02, 3.6517e-02, 3.1623e-02, 2.7384e-02, 2.3714e-02,
    2.0535e-02, 1.7783e-02, 1.5399e-02, 1.3335e-02, 1.0730e-02, 7.7785e-03, 5.6009e-03, 3.9991e-03, 2.8248e-03,
    1.9675e-03, 1.3449e-03, 8.9549e-04, 5.7363e-04, 3.4539e-04, 2.7384e-04, 2.3714e-04, 2.0535e-04, 1.7783e-04,
    1.5399e-04, 1.3335e-04, 1.1548e-04, 1.0000e-04, 8.6596e-05, 7.4989e-05, 6.4938e-05, 5.6234e-05, 4.8697e-05,
    4.2170e-05, 3.6517e-05, 3.1623e-05, 2.7384e-05, 2.3714e-05, 2.0535e-05, 1.7783e-05, 1.5399e-05, 1.3335e-05,
    1.1548e-05])
# Gemma3 (nested upstream): dynamic, head_dim 256, factor 10, seq_len 200000 > 131072: the first and last 6.
EXPECTED_DYNAMIC_GEMMA_HEAD = torch.tensor([1.0000e+00, 9.1723e-01, 8.4131e-01, 7.7168e-01, 7.0781e-01, 6.4922e-01])
EXPECTED_DYNAMIC_GEMMA_TAIL = torch.tensor([2.4257e-05, 2.2250e-05, 2.0408e-05, 1.8719e-05, 1.7170e-05])
# fmt: on


# ----------------------------------------------------------------------------------------------
# test_rope_validation (non-nested and nested use the same dict per layer: one case here)
# ----------------------------------------------------------------------------------------------


def test_rope_validation():
    freqs({"rope_type": "default", "rope_theta": 10000.0})  # the base config is valid
    # Every other type with only rope_theta lacks a required key (proportional needs none).
    for rope_type in ALL_TYPES:
        if rope_type in ("default", "proportional"):
            continue
        with pytest.raises(KeyError):
            pk.rope_frequencies(LLAMA_D, scaling={"rope_type": rope_type, "rope_theta": 10000.0})
    valid_param_mapping = {
        "factor": ["linear", "dynamic", "yarn", "longrope"],
        "attention_factor": ["yarn", "longrope"],
        "beta_fast": ["yarn"],
        "beta_slow": ["yarn"],
        "short_factor": ["longrope"],
        "long_factor": ["longrope"],
    }
    for rope_type in ALL_TYPES:
        if rope_type in ("default", "proportional"):
            continue
        for param, valid in valid_param_mapping.items():
            if rope_type in valid:
                continue
            with pytest.raises(KeyError), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a key the type does not read warns (HF logs a warning)
                pk.rope_frequencies(LLAMA_D, scaling={"rope_type": rope_type, "rope_theta": 10000.0, param: True})


def test_yarn_original_max_position_embeddings_validation():
    ok = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": LLAMA_MAX // 2}
    pk.rope_frequencies(LLAMA_D, scaling=ok)
    with pytest.raises(KeyError, match="original_max_position_embeddings"):  # HF's validate_rope raises
        pk.rope_frequencies(LLAMA_D, scaling={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})


# ----------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------


def test_default_rope_numerically():
    inv, scale = freqs({"rope_type": "default", "rope_theta": 10000.0})
    assert scale == 1.0
    torch.testing.assert_close(inv, EXPECTED_DEFAULT)
    cfg = _llama_config({"rope_type": "default", "rope_theta": 10000.0})
    rope = pk.RotaryEmbedding.from_config(cfg)
    assert rope.attention_factor == scale
    torch.testing.assert_close(rope.inv_freq, inv)


def test_linear_rope_numerically():
    default = default_inv()
    for factor in (2.0, 10.0, 20.0):
        params = {"rope_type": "linear", "rope_theta": 10000.0, "factor": factor}
        inv, scale = freqs(params)
        assert scale == 1.0
        torch.testing.assert_close(inv, default / factor)
        rope = pk.RotaryEmbedding.from_config(_llama_config(params))
        assert rope.attention_factor == scale
        torch.testing.assert_close(rope.inv_freq, inv)


@pytest.mark.parametrize("d, max_pos", [(LLAMA_D, LLAMA_MAX), (GEMMA_D, GEMMA_MAX)], ids=["llama", "gemma3"])
def test_dynamic_rope_numerically(d, max_pos):
    default = default_inv(d)
    for factor in (2.0, 10.0, 20.0):
        params = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": factor}
        inv, scale = freqs(params, d, max_pos)
        assert scale == 1.0
        torch.testing.assert_close(inv, default)
        torch.testing.assert_close(freqs(params, d, max_pos, seq_len=1)[0], default)
        torch.testing.assert_close(freqs(params, d, max_pos, seq_len=torch.tensor(1, dtype=torch.int64))[0], default)
    params = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 10.0}
    inv, _ = freqs(params, d, max_pos, seq_len=16384 if d == LLAMA_D else 200000)
    with pytest.raises(AssertionError):  # not a linear factor
        torch.testing.assert_close(inv, default / 10.0)
    if d == LLAMA_D:
        torch.testing.assert_close(inv, EXPECTED_DYNAMIC)
    else:
        torch.testing.assert_close(inv[:6], EXPECTED_DYNAMIC_GEMMA_HEAD)
        torch.testing.assert_close(inv[-5:], EXPECTED_DYNAMIC_GEMMA_TAIL)


def test_yarn_rope_numerically():
    default = default_inv()
    for factor in (2.0, 10.0, 20.0):
        _, scale = freqs({"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor})
        assert scale == 0.1 * math.log(factor) + 1.0
        params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "attention_factor": 0.5}
        assert freqs(params, seq_len=1)[1] == 0.5
    factor, margin = 10.0, 1e-8
    inv, _ = freqs({"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "beta_fast": 32, "beta_slow": 1})
    assert all(default[i] / factor - margin <= v <= default[i] + margin for i, v in enumerate(inv))
    inv, _ = freqs({"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "beta_fast": 1000, "beta_slow": 1})
    interpolating = [v < default[i] + margin for i, v in enumerate(inv)]
    assert not interpolating[0] and all(interpolating[1:])
    torch.testing.assert_close(inv[-20:], default[-20:] / factor)
    inv, _ = freqs({"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "beta_fast": 32, "beta_slow": 1})
    torch.testing.assert_close(inv, EXPECTED_YARN)


def test_longrope_rope_numerically():
    short_factor = [2.0] * (LLAMA_D // 2)
    long_factor = torch.ones(LLAMA_D // 2).cumsum(0).tolist()
    default = default_inv()
    base = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short_factor, "long_factor": long_factor}
    for factor in (2.0, 10.0, 20.0):
        _, scale = freqs({**base, "factor": factor})
        assert scale == math.sqrt(1 + math.log(factor) / math.log(LLAMA_MAX))
        assert freqs({**base, "factor": factor, "attention_factor": 0.5}, seq_len=1)[1] == 0.5
    inv, _ = freqs({**base, "factor": 1.0}, seq_len=0)
    torch.testing.assert_close(inv, default / torch.tensor(short_factor))
    inv, _ = freqs({**base, "factor": 1.0}, seq_len=LLAMA_MAX + 1)
    torch.testing.assert_close(inv, default / torch.tensor(long_factor))


def test_llama3_rope_numerically():
    default = default_inv()
    base = {"rope_type": "llama3", "rope_theta": 10000.0, "original_max_position_embeddings": 2048,
            "low_freq_factor": 1, "high_freq_factor": 4}  # fmt: skip
    for factor in (2.0, 10.0, 20.0):
        assert freqs({**base, "factor": factor})[1] == 1.0
    # The bounds are checked in float64: upstream's fp32 bound ``default / factor`` is itself rounded, and our
    # fp32 values (the exact ``inv / factor`` rounded once) sit up to an ulp on either side of it.
    d64 = freqs({"rope_type": "default", "rope_theta": 10000.0}, dtype=torch.float64)[0]
    inv64, _ = freqs({**base, "factor": 10.0}, dtype=torch.float64)
    assert all(d64[i] / 10.0 <= v <= d64[i] for i, v in enumerate(inv64))
    inv_all, _ = freqs({**base, "factor": 10.0, "high_freq_factor": 1000})
    assert all(v < default[i] for i, v in enumerate(inv_all))
    inv, _ = freqs({**base, "factor": 10.0})
    torch.testing.assert_close(inv, EXPECTED_LLAMA3)


def test_proportional_rope_numerically():
    head_dim = LLAMA_D
    base = {"rope_type": "proportional", "rope_theta": 10000.0}
    for prf in (1.0, 0.5, 0.25):
        inv, scale = freqs({**base, "partial_rotary_factor": prf}, head_dim)
        assert scale == 1.0 and inv.shape[0] == head_dim // 2
    for prf, angles in ((0.5, 32), (0.25, 16)):
        inv, _ = freqs({**base, "partial_rotary_factor": prf}, head_dim)
        assert torch.all(inv[:angles] != 0)
        torch.testing.assert_close(inv[angles:], torch.zeros(head_dim // 2 - angles))
    assert torch.all(freqs({**base, "partial_rotary_factor": 1.0}, head_dim)[0] != 0)
    torch.testing.assert_close(freqs({**base, "partial_rotary_factor": 1.0, "factor": 1.0})[0], default_inv())
    for factor in (2.0, 10.0):
        prop = freqs({**base, "partial_rotary_factor": 1.0, "factor": factor})[0]
        torch.testing.assert_close(prop, freqs({"rope_type": "linear", "rope_theta": 10000.0, "factor": factor})[0])
    scaled = freqs({**base, "partial_rotary_factor": 0.5, "factor": 2.0})[0]
    torch.testing.assert_close(scaled, freqs({**base, "partial_rotary_factor": 0.5, "factor": 1.0})[0] / 2.0)
    expected = torch.cat((EXPECTED_DEFAULT[:16], torch.zeros(48)))
    torch.testing.assert_close(freqs({**base, "partial_rotary_factor": 0.25})[0], expected)


# ----------------------------------------------------------------------------------------------
# Where we deliberately differ: fp32 frequencies nearest to the exact value (HF's are fp32 arithmetic)
# ----------------------------------------------------------------------------------------------

NEAREST_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 10.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 10.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 10.0, "beta_fast": 32, "beta_slow": 1},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 10.0, "short_factor": [2.0] * 64,
                 "long_factor": torch.ones(64).cumsum(0).tolist()},  # fmt: skip
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 10.0, "original_max_position_embeddings": 2048,
               "low_freq_factor": 1, "high_freq_factor": 4},  # fmt: skip
    "proportional": {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
}


@pytest.mark.parametrize("rope_type", ALL_TYPES)
def test_nearest_to_float64(rope_type):
    """Ours in fp32 is the float64 schedule rounded once (so within half an fp32 ulp of it, and no farther
    from it than HF's fp32 arithmetic, which the HF-parity tests in tests/rope/test_schedules_hf.py measure)."""
    params = NEAREST_CASES[rope_type]
    inv32, af = freqs(params, seq_len=16384)
    inv64, af64 = freqs(params, seq_len=16384, dtype=torch.float64)
    assert af == af64
    assert torch.equal(inv32, inv64.to(torch.float32))
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(rope_parameters=dict(params))
    if rope_type == "default":
        hf, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        hf, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, seq_len=16384)
    err = lambda t: (t.double() - inv64).abs()  # noqa: E731
    assert torch.all(err(inv32) <= err(hf)), "an fp32 value farther from the exact one than HF's"


def _llama_config(params):
    from transformers import LlamaConfig

    return LlamaConfig(rope_parameters=dict(params))
