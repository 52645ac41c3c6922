"""RotaryEmbedding against HF transformers' rotary modules and apply functions: every Llama rope type,
dynamic state, LongRoPE partial, M-RoPE, GPT-J, bf16, gradients, from_config.
"""

import pytest
import torch

from posenc_kernels.ops.rope import mrope_axis_map
from posenc_kernels.ops.rope.module import RotaryEmbedding
from posenc_kernels.ops.rope.schedules import rope_frequencies

from .rotary_common import truth_rotate, truth_angles, hf_apply, check_vs_truth, llama_config, LLAMA_TYPES, qk

transformers = pytest.importorskip("transformers")
from transformers import GPTJConfig, GPTNeoXConfig, Phi3Config  # noqa: E402
from transformers.models.gptj import modeling_gptj  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402
from transformers.models.qwen2_vl import modeling_qwen2_vl  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig  # noqa: E402
from transformers.models.qwen3_vl import modeling_qwen3_vl  # noqa: E402
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Values against HF, every rope type, tables and on-the-fly angles
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("kind", list(LLAMA_TYPES))
def test_llama_types_match_hf(backend, kind, cache):
    cfg = llama_config(max_pos=256 if kind != "dynamic" else 64, **LLAMA_TYPES[kind])
    hf = modeling_llama.LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding.from_config(cfg, cache=cache)
    q, k = qk()
    position_ids = torch.arange(13)[None, :] + torch.tensor([[5], [290]])  # second sequence past every length
    want_q, want_k = hf_apply(hf, modeling_llama.apply_rotary_pos_emb, q, k, position_ids)
    got_q, got_k = ours(q.clone(), k.clone(), positions=position_ids)
    seq_len = int(position_ids.max()) + 1
    inv64, af = rope_frequencies(64, scaling=cfg.rope_parameters, seq_len=seq_len, max_position_embeddings=cfg.max_position_embeddings,
                                 dtype=torch.float64)  # fmt: skip
    assert af == pytest.approx(hf.attention_scaling, rel=1e-15)
    angle = truth_angles(position_ids, inv64)
    check_vs_truth(got_q, want_q, truth_rotate(q, angle, af), q, af, f"{kind} q")
    check_vs_truth(got_k, want_k, truth_rotate(k, angle, af), k, af, f"{kind} k")


def test_dynamic_state_follows_hf(backend):
    """HF's dynamic NTK is stateful: grow past the longest length seen, keep those frequencies for shorter
    calls still above the original length, return to the original ones below it."""
    cfg = llama_config(max_pos=64, **LLAMA_TYPES["dynamic"])
    hf = modeling_llama.LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding.from_config(cfg)
    original = ours.inv_freq.clone()
    steps = [(0, 10), (100, 5), (70, 5), (200, 3), (0, 20), (64, 1), (0, 64)]  # (first position, tokens)
    for i, (start, n) in enumerate(steps):
        q, k = qk(B=1, S=n)
        pos = torch.arange(start, start + n)[None, :]
        want_q, want_k = hf_apply(hf, modeling_llama.apply_rotary_pos_emb, q, k, pos)
        got_q, got_k = ours(q.clone(), k.clone(), offsets=start)  # int offsets: no host sync
        assert ours._dynamic_cached == hf.max_seq_len_cached, f"step {i}"
        inv64, _ = rope_frequencies(64, scaling=cfg.rope_parameters, seq_len=hf.max_seq_len_cached, max_position_embeddings=64,
                                    dtype=torch.float64)  # fmt: skip
        angle = truth_angles(pos, inv64)
        check_vs_truth(got_q, want_q, truth_rotate(q, angle, 1.0), q, 1.0, f"step {i} q")
        check_vs_truth(got_k, want_k, truth_rotate(k, angle, 1.0), k, 1.0, f"step {i} k")
        if hf.max_seq_len_cached <= 64:
            assert torch.equal(ours.inv_freq, original), f"step {i}: original frequencies at or below the original length"
        else:
            assert not torch.equal(ours.inv_freq, original)
            assert ours.cos_cached.shape[0] <= 256, "scaled frequencies run on the fly, not in a rebuilt table"


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("last", [63, 64, 100], ids=lambda v: f"maxpos{v}")
def test_longrope_phi3_partial_matches_hf(backend, cache, last):
    """Phi-4-mini style: longrope with partial rotary 0.75; short factors up to the original length (64),
    long ones past it (HF: seq_len = max position + 1 > original)."""
    g = torch.Generator().manual_seed(1)
    half = 24  # head 64 * 0.75 / 2
    params = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75, original_max_position_embeddings=64,
                  short_factor=(1 + 0.1 * torch.rand(half, generator=g)).tolist(),
                  long_factor=torch.linspace(1, 20, half).tolist())  # fmt: skip
    cfg = Phi3Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     original_max_position_embeddings=64, rope_parameters=params, pad_token_id=0)  # fmt: skip
    hf = modeling_phi3.Phi3RotaryEmbedding(cfg)
    ours = RotaryEmbedding.from_config(cfg, cache=cache)
    assert ours.rotary_dim == 48 and ours.attention_factor == pytest.approx(hf.attention_scaling, rel=1e-15)
    q, k = qk(B=1, S=9)
    pos = torch.arange(last - 8, last + 1)[None, :]
    want_q, want_k = hf_apply(hf, modeling_phi3.apply_rotary_pos_emb, q, k, pos)
    got_q, got_k = ours(q.clone(), k.clone(), positions=pos)
    inv64, af = rope_frequencies(48, scaling=cfg.rope_parameters, seq_len=last + 1, max_position_embeddings=2048, dtype=torch.float64)
    angle = truth_angles(pos, inv64)
    check_vs_truth(got_q, want_q, truth_rotate(q, angle, af), q, af, "q")
    check_vs_truth(got_k, want_k, truth_rotate(k, angle, af), k, af, "k")
    assert torch.equal(got_q[..., 48:], q[..., 48:]), "channels past rotary_dim pass through"


@pytest.mark.parametrize("interleaved_sections", [False, True], ids=["qwen2-vl", "qwen3-vl"])
def test_mrope_matches_hf(backend, interleaved_sections):
    section = [4, 6, 6]  # head_dim 32 -> 16 frequencies
    if interleaved_sections:
        cfg = Qwen3VLTextConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                                rope_parameters=dict(rope_type="default", rope_theta=5e5, mrope_section=section, mrope_interleaved=True))  # fmt: skip
        hf, mod = modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding(cfg), modeling_qwen3_vl
    else:
        cfg = Qwen2VLTextConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=section))  # fmt: skip
        hf, mod = modeling_qwen2_vl.Qwen2VLRotaryEmbedding(cfg), modeling_qwen2_vl
    ours = RotaryEmbedding.from_config(cfg)
    assert ours.mrope_section == section and ours.mrope_interleaved == interleaved_sections
    q, k = qk(B=2, S=11, D=32)
    pos = torch.stack([torch.randint(0, 300, (2, 11)) for _ in range(3)])  # [3, B, S]: t, h, w
    want_q, want_k = hf_apply(hf, mod.apply_rotary_pos_emb, q, k, pos)
    got_q, got_k = ours(q.clone(), k.clone(), positions=pos)
    inv64, _ = rope_frequencies(32, scaling=cfg.rope_parameters, dtype=torch.float64)
    angle = truth_angles(pos, inv64, mrope_axis_map(section, interleaved=interleaved_sections))
    check_vs_truth(got_q, want_q, truth_rotate(q, angle, 1.0), q, 1.0, "q")
    check_vs_truth(got_k, want_k, truth_rotate(k, angle, 1.0), k, 1.0, "k")
    # Text-only: [B, S] positions (every axis equal) is plain RoPE, as HF's expand(3, ...).
    p2 = torch.arange(11)[None].expand(2, 11) + 7
    want_q, _ = hf_apply(hf, mod.apply_rotary_pos_emb, q, k, p2)
    got_q, _ = ours(q.clone(), k.clone(), positions=p2)
    angle = truth_angles(p2, inv64)
    check_vs_truth(got_q, want_q, truth_rotate(q, angle, 1.0), q, 1.0, "text-only q")


def test_gptj_interleaved_partial_matches_hf(backend):
    cfg = GPTJConfig(n_embd=256, n_head=4, rotary_dim=16, n_positions=128)
    ours = RotaryEmbedding.from_config(cfg)
    assert (ours.head_dim, ours.rotary_dim, ours.interleaved) == (64, 16, True)
    hf = modeling_gptj.GPTJRotaryEmbedding(cfg)
    q, k = qk(B=2, S=7)
    pos = torch.arange(7)[None] + torch.tensor([[0], [40]])
    sin, cos = hf(q, pos)
    want_q = torch.cat([modeling_gptj.apply_rotary_pos_emb(q[..., :16], sin, cos), q[..., 16:]], -1)
    got_q, _ = ours(q.clone(), k.clone(), positions=pos)
    angle = truth_angles(pos, rope_frequencies(16, dtype=torch.float64)[0])
    check_vs_truth(got_q, want_q, truth_rotate(q, angle, 1.0, interleaved=True), q, 1.0, "gptj q")


def test_bfloat16_matches_hf(backend):
    """bf16 storage: HF rounds cos/sin to bf16 and rotates in bf16; the kernel rotates in fp32, rounds once."""
    cfg = llama_config(max_pos=256, **LLAMA_TYPES["llama3"])
    hf = modeling_llama.LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding.from_config(cfg)
    q, k = qk(dtype=torch.bfloat16)
    pos = torch.arange(13)[None, :] + torch.tensor([[0], [300]])
    want_q, want_k = hf_apply(hf, modeling_llama.apply_rotary_pos_emb, q, k, pos)
    got_q, got_k = ours(q.clone(), k.clone(), positions=pos)
    assert got_q.dtype == torch.bfloat16
    inv64, _ = rope_frequencies(64, scaling=cfg.rope_parameters, dtype=torch.float64)
    angle = truth_angles(pos, inv64)
    for got, want, x in ((got_q, want_q, q), (got_k, want_k, k)):
        truth = truth_rotate(x, angle, 1.0)
        err, err_hf = ((got.double() - truth).abs().max().item(), (want.double() - truth).abs().max().item())
        # One bf16 ulp of the largest output at most: on GPU the fp32 -> bf16 cast rounds to nearest (half an
        # ulp), the Triton interpreter's truncates (up to one ulp: 4.0929 -> 4.0625).
        assert err <= 2 * err_hf and err <= 2.0**-7 * truth.abs().max().item(), (err, err_hf)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_gradients_match_hf_autograd(backend, cache):
    cfg = llama_config(max_pos=256, **LLAMA_TYPES["yarn"])
    hf = modeling_llama.LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding.from_config(cfg, cache=cache)
    x = torch.randn(2, 9, 64)
    wq = torch.randn(64, 4 * 64, requires_grad=True)
    wk = torch.randn(64, 2 * 64, requires_grad=True)
    pos = torch.arange(9)[None] + torch.tensor([[0], [100]])
    gq, gk = torch.randn(2, 9, 4, 64), torch.randn(2, 9, 2, 64)

    q, k = (x @ wq).view(2, 9, 4, 64), (x @ wk).view(2, 9, 2, 64)
    rq, rk = ours(q, k, positions=pos)
    ((rq * gq).sum() + (rk * gk).sum()).backward()
    got = wq.grad.clone(), wk.grad.clone()
    wq.grad = wk.grad = None

    q, k = (x @ wq).view(2, 9, 4, 64), (x @ wk).view(2, 9, 2, 64)
    rq, rk = hf_apply(hf, modeling_llama.apply_rotary_pos_emb, q, k, pos)
    ((rq * gq).sum() + (rk * gk).sum()).backward()
    for a, b in zip(got, (wq.grad, wk.grad)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item()), (a - b).abs().max()


def test_from_config_reads_hf_attributes():
    neox = RotaryEmbedding.from_config(GPTNeoXConfig(hidden_size=256, num_attention_heads=4))
    assert (neox.head_dim, neox.rotary_dim) == (64, 16)  # partial_rotary_factor 0.25 in rope_parameters
    cfg = llama_config(head_dim=32, max_pos=131072, **LLAMA_TYPES["llama3"])
    r = RotaryEmbedding.from_config(cfg, cache=False, exact=True)
    assert (r.rope_type, r.base, r.cache, r.exact, r.max_position_embeddings) == ("llama3", 500000.0, False, True, 131072)
    # Phi-3: the config-level original_max_position_embeddings wins, as in HF.
    phi = Phi3Config(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096, original_max_position_embeddings=512,
                     rope_parameters=dict(rope_type="longrope", short_factor=[1.0] * 32, long_factor=[2.0] * 32), pad_token_id=0)  # fmt: skip
    assert RotaryEmbedding.from_config(phi)._longrope_original == 512
    # transformers 4.x style attributes on a plain object.
    from types import SimpleNamespace

    old = SimpleNamespace(hidden_size=128, num_attention_heads=2, max_position_embeddings=2048, rope_theta=1e6,
                          rope_scaling={"type": "dynamic", "factor": 2.0})  # fmt: skip
    r = RotaryEmbedding.from_config(old)
    assert (r.rope_type, r.base, r.head_dim) == ("dynamic", 1e6, 64)
    nested = SimpleNamespace(head_dim=32, max_position_embeddings=1024,
                             rope_parameters={"full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})  # fmt: skip
    with pytest.raises(ValueError, match=r"rope_parameters per layer type \['full_attention', 'sliding_attention'\]: pass layer_type="):
        RotaryEmbedding.from_config(nested)
    full = RotaryEmbedding.from_config(nested, layer_type="full_attention")
    assert full.rotary_dim == 32 and (full.inv_freq[4:] == 0).all() and (full.inv_freq[:4] > 0).all()
    assert RotaryEmbedding.from_config(nested, layer_type="sliding_attention").base == 1e4
