"""rope_frequencies: each schedule's behaviour (dynamic, LongRoPE, YaRN, Llama-3, proportional), the
config forms it accepts and the errors that name the key.
"""

import math
import warnings

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops.rope.schedules import ROPE_TYPES, rope_frequencies

from .schedules_common import SHORT48, LONG48, CASES, rotary_dim_of, fp32_ulps, LLAMA3, LONGROPE, YARN

transformers = pytest.importorskip("transformers")
mpmath = pytest.importorskip("mpmath")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


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
