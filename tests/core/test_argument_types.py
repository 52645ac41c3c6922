"""Every public function raises a TypeError naming the argument for a non-tensor where a tensor is expected
(a list as q used to raise AttributeError) and for a non-bool flag (``interleaved="yes"`` used to be
accepted), before anything is written (issue 20, must-have 5). One table over the public API."""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.integrations import flash_attn, vllm


def _valid():
    """name -> (function, valid keyword arguments, tensor arguments, flag arguments)."""
    inv = pk.rope_frequencies(4)[0]
    cos, sin = pk.rope_cos_sin(3, inv)
    q, k = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4)
    x, table, pos = torch.randn(1, 3, 4), torch.randn(5, 4), torch.arange(3)
    rope_kw = dict(q=q, k=k, cos=cos, sin=sin, interleaved=False, exact=False)
    sin_kw = dict(x=x, interleaved=True, cos_first=False)
    qkn_kw = dict(rope_kw, q_weight=torch.ones(4), k_weight=torch.ones(4))
    cache_kw = dict(q=torch.randn(3, 2, 4), k=torch.randn(3, 1, 4), v=torch.randn(3, 1, 4), k_cache=torch.zeros(2, 4, 1, 4),
                    v_cache=torch.zeros(2, 4, 1, 4), cos=cos, sin=sin, slot_mapping=pos, positions=pos,
                    interleaved=False, exact=False)  # fmt: skip
    return {
        "apply_rope_": (pk.apply_rope_, rope_kw, ("q", "k", "cos", "sin"), ("interleaved", "exact")),
        "apply_rope": (pk.apply_rope, rope_kw, ("q", "k", "cos", "sin"), ("interleaved", "exact")),
        "apply_rope_qkv_": (
            pk.apply_rope_qkv_, dict(qkv=torch.randn(1, 3, 4, 4), cos=cos, sin=sin, num_heads_q=2, num_heads_kv=1,
                                     interleaved=False, exact=False),
            ("qkv", "cos", "sin"), ("interleaved", "exact"),
        ),  # fmt: skip
        "qk_norm_rope_": (pk.qk_norm_rope_, qkn_kw, ("q", "k", "q_weight", "k_weight", "cos", "sin"),
                          ("interleaved", "exact")),  # fmt: skip
        "qk_norm_rope": (pk.qk_norm_rope, qkn_kw, ("q", "k", "q_weight", "k_weight", "cos", "sin"),
                         ("interleaved", "exact")),  # fmt: skip
        "qk_norm_rope_qkv_": (
            pk.qk_norm_rope_qkv_, dict(qkv=torch.randn(1, 3, 4, 4), q_weight=torch.ones(4), k_weight=torch.ones(4),
                                       cos=cos, sin=sin, num_heads_q=2, num_heads_kv=1, interleaved=False, exact=False),
            ("qkv", "q_weight", "k_weight", "cos", "sin"), ("interleaved", "exact"),
        ),  # fmt: skip
        "rope_and_cache_": (pk.rope_and_cache_, cache_kw, ("q", "k", "v", "k_cache", "v_cache", "cos", "sin",
                                                          "slot_mapping"), ("interleaved", "exact")),  # fmt: skip
        "qk_norm_rope_and_cache_": (
            pk.qk_norm_rope_and_cache_, dict(cache_kw, q_weight=torch.ones(4), k_weight=torch.ones(4)),
            ("q", "k", "v", "k_cache", "v_cache", "q_weight", "k_weight", "cos", "sin", "slot_mapping"),
            ("interleaved", "exact"),
        ),  # fmt: skip
        "mla_rope_and_cache_": (
            pk.mla_rope_and_cache_, dict(q_pe=torch.randn(3, 2, 4), k_pe=torch.randn(3, 4), kv_c=torch.randn(3, 8),
                                         kv_cache=torch.zeros(2, 4, 12), cos=cos, sin=sin, slot_mapping=pos,
                                         positions=pos, interleaved=True),
            ("q_pe", "k_pe", "kv_c", "kv_cache", "cos", "sin", "slot_mapping", "positions"), ("interleaved",),
        ),  # fmt: skip
        "rope_cos_sin": (pk.rope_cos_sin, dict(positions_or_length=pos, inv_freq=inv), ("inv_freq",), ()),
        "mrope_axis_map": (pk.mrope_axis_map, dict(mrope_section=[1, 1], interleaved=False), (), ("interleaved",)),
        "RotaryEmbedding": (pk.RotaryEmbedding, dict(head_dim=8, interleaved=False, cache=True, exact=False), (),
                            ("interleaved", "cache", "exact")),  # fmt: skip
        "sinusoidal_table": (pk.sinusoidal_table, dict(positions_or_length=3, dim=4, interleaved=True,
                                                       cos_first=False), (), ("interleaved", "cos_first")),  # fmt: skip
        "add_sinusoidal_": (pk.add_sinusoidal_, sin_kw, ("x",), ("interleaved", "cos_first")),
        "add_sinusoidal": (pk.add_sinusoidal, sin_kw, ("x",), ("interleaved", "cos_first")),
        "concat_sinusoidal": (pk.concat_sinusoidal, dict(sin_kw, dim_pe=4), ("x",), ("interleaved", "cos_first")),
        "SinusoidalPositionalEncoding": (pk.SinusoidalPositionalEncoding, dict(dim=4, interleaved=True,
                                         cos_first=False, inplace=False), (), ("interleaved", "cos_first", "inplace")),  # fmt: skip
        "add_position_embedding_": (pk.add_position_embedding_, dict(x=x, table=table, positions=pos,
                                    deterministic=True), ("x", "table", "positions"), ("deterministic",)),  # fmt: skip
        "add_position_embedding": (pk.add_position_embedding, dict(x=x, table=table, positions=pos,
                                   deterministic=True), ("x", "table", "positions"), ("deterministic",)),  # fmt: skip
        "alibi_bias": (pk.alibi_bias, dict(slopes=torch.ones(2), Lq=2, Lk=3, causal=True), ("slopes",), ("causal",)),
        "alibi_score_mod": (pk.alibi_score_mod, dict(slopes=torch.ones(2), causal=True), ("slopes",), ("causal",)),
        "t5_bucket_thresholds": (pk.t5_bucket_thresholds, dict(bidirectional=True), (), ("bidirectional",)),
        "t5_relative_bucket": (pk.t5_relative_bucket, dict(relative_position=torch.arange(-2, 3), bidirectional=True),
                               ("relative_position",), ("bidirectional",)),  # fmt: skip
        "t5_relative_bias": (pk.t5_relative_bias, dict(table=torch.randn(32, 2), Lq=2, Lk=3, bidirectional=True),
                             ("table",), ("bidirectional",)),  # fmt: skip
        "t5_score_mod": (pk.t5_score_mod, dict(table=torch.randn(32, 2), bidirectional=True), ("table",),
                         ("bidirectional",)),  # fmt: skip
        "T5RelativePositionBias": (pk.T5RelativePositionBias, dict(num_heads=2, bidirectional=True), (),
                                   ("bidirectional",)),  # fmt: skip
        "position_ids_from_attention_mask": (pk.position_ids_from_attention_mask,
                                             dict(attention_mask=torch.ones(1, 3, dtype=torch.long)),
                                             ("attention_mask",), ()),  # fmt: skip
        "opt_positions": (pk.opt_positions, dict(attention_mask=torch.ones(1, 3, dtype=torch.long)),
                          ("attention_mask",), ()),  # fmt: skip
        "fairseq_positions": (pk.fairseq_positions, dict(tokens=torch.ones(1, 3, dtype=torch.long), padding_idx=0),
                              ("tokens",), ()),  # fmt: skip
        "positions_from_cu_seqlens": (pk.positions_from_cu_seqlens, dict(cu_seqlens=torch.tensor([0, 2, 3])),
                                      ("cu_seqlens",), ()),  # fmt: skip
        "set_value_checks": (pk.set_value_checks, dict(enabled=True), (), ("enabled",)),
        # call-site drop-ins (posenc_kernels.integrations) that write a KV cache
        "vllm.fused_rope_and_reshape_cache_flash": (
            vllm.fused_rope_and_reshape_cache_flash,
            dict(query=torch.randn(3, 2, 4), key=torch.randn(3, 1, 4), value=torch.randn(3, 1, 4), positions=pos,
                 cos_sin_cache=torch.randn(5, 4), is_neox=True, key_cache=torch.zeros(2, 2, 1, 4, dtype=torch.uint8),
                 value_cache=torch.zeros(2, 2, 1, 4, dtype=torch.uint8), slot_mapping=torch.tensor([0, 1, 3]),
                 k_scale=torch.tensor(1.0), v_scale=torch.tensor(1.0), kv_cache_dtype="fp8"),
            ("query", "key", "value", "positions", "cos_sin_cache", "key_cache", "value_cache", "slot_mapping",
             "k_scale", "v_scale"), ("is_neox",),
        ),  # fmt: skip
        "vllm.rotary_embedding_and_cache": (
            vllm.rotary_embedding_and_cache,
            dict(positions=pos, query=torch.randn(3, 2, 4), key=torch.randn(3, 1, 4), value=torch.randn(3, 1, 4),
                 key_cache=torch.zeros(2, 2, 1, 4, dtype=torch.uint8), value_cache=torch.zeros(2, 2, 1, 4, dtype=torch.uint8),
                 slot_mapping=torch.tensor([0, 1, 3]), cos_sin_cache=torch.randn(5, 4), is_neox=True,
                 k_scale=torch.tensor(1.0), v_scale=torch.tensor(1.0), kv_cache_dtype="fp8"),
            ("query", "key", "value", "positions", "cos_sin_cache", "key_cache", "value_cache", "slot_mapping",
             "k_scale", "v_scale"), ("is_neox",),
        ),  # fmt: skip
        "flash_attn.rotary_and_append_kvcache_": (
            flash_attn.rotary_and_append_kvcache_,
            dict(q=q, k_cache=torch.zeros(2, 5, 1, 4), v_cache=torch.zeros(2, 5, 1, 4), k=k, v=torch.randn(1, 3, 1, 4),
                 rotary_cos=cos, rotary_sin=sin, cache_seqlens=torch.tensor([0], dtype=torch.int32),
                 cache_batch_idx=torch.tensor([1], dtype=torch.int32), causal=True, rotary_interleaved=False),
            ("q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx"),
            ("causal", "rotary_interleaved"),
        ),  # fmt: skip
    }


CASES = [(n, "tensor", a) for n, (_, _, ts, _) in _valid().items() for a in ts]
CASES += [(n, "flag", a) for n, (_, _, _, fs) in _valid().items() for a in fs]


def test_the_table_covers_the_public_api():
    """Every public function with a tensor or flag argument is in the table (a new one must be added)."""
    import inspect

    covered = set(_valid())
    for name in pk.__all__:
        obj = getattr(pk, name)
        if not callable(obj) or name in covered:
            continue
        params = inspect.signature(obj).parameters.values()
        typed = [p.name for p in params if "Tensor" in str(p.annotation) or str(p.annotation) in ("bool", "Optional[bool]")]
        assert not typed, f"{name} takes {typed}: add it to _valid()"


@pytest.mark.parametrize("name,kind,arg", CASES, ids=[f"{n}-{a}" for n, _, a in CASES])
def test_type_error_names_the_argument(name, kind, arg):
    fn, kw, _, _ = _valid()[name]
    written = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    bad = dict(kw, **{arg: [1.0, 2.0] if kind == "tensor" else "yes"})
    with pytest.raises(TypeError, match=rf"^{arg} must be"):
        fn(**bad)
    for k, v in written.items():
        assert torch.equal(kw[k], v), f"{k} was written before the error"
