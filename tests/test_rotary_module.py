"""posenc_kernels.rotary.RotaryEmbedding against Hugging Face's rotary modules and apply functions.

Tolerance (GUIDE: a test never compares two low-precision results): both our output and HF's fp32
output are measured against a float64 truth - the rotation by the float64 angles ``pos * inv_freq`` with
the float64 schedule at the ``seq_len`` HF's module used - and ours may be off by at most twice HF's error
plus a few fp32 roundings of |x|. HF's own error is also bounded, which ties the truth to HF's behaviour
(its schedule switching: dynamic NTK state, LongRoPE short/long).
"""

import pytest
import torch

from posenc_kernels import reference as ref
from posenc_kernels.ops.rope import mrope_axis_map, rope_cos_sin
from posenc_kernels.ops.rope.module import RotaryEmbedding
from posenc_kernels.ops.rope.schedules import rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers import GPTJConfig, GPTNeoXConfig, LlamaConfig, Phi3Config  # noqa: E402
from transformers.models.gptj import modeling_gptj  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402
from transformers.models.qwen2_vl import modeling_qwen2_vl  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig  # noqa: E402
from transformers.models.qwen3_vl import modeling_qwen3_vl  # noqa: E402
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps

# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def truth_rotate(x, angle, af, *, interleaved=False):
    """float64 rotation of x [B, S, H, D] by angle [B, S, R/2] (float64), cos/sin scaled by af."""
    return ref.rotate_by_angles_reference(x, angle, af, interleaved=interleaved)



def truth_angles(positions, inv64, axis_map=None):
    """positions [B, S] (or [A, B, S] with axis_map) -> float64 angles [B, S, R/2]."""
    if axis_map is None:
        return positions.double()[..., None] * inv64
    p = positions.double()[axis_map.long()]  # [half, B, S]
    return p.permute(1, 2, 0) * inv64


def hf_apply(rot, apply_fn, q, k, position_ids):
    """HF: cos/sin from its rotary module, then its apply function on [B, H, S, D] views."""
    cos, sin = rot(q, position_ids)
    qh, kh = apply_fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qh.transpose(1, 2), kh.transpose(1, 2)


def check_vs_truth(ours, hf, want, x, af, what=""):
    """ours may be off the float64 truth by at most 2x HF's error + 4 fp32 roundings of |x|*af."""
    atol = 4 * EPS32 * x.abs().max().item() * max(af, 1.0)
    err_ours = (ours.double() - want).abs().max().item()
    err_hf = (hf.double() - want).abs().max().item()
    assert err_hf <= 1e-3 * x.abs().max().item() * max(af, 1.0), f"{what}: HF is {err_hf:.3g} off the truth: wrong reference"
    assert err_ours <= 2 * err_hf + atol, f"{what}: ours {err_ours:.3g} vs HF {err_hf:.3g} off the truth"
    return err_ours, err_hf


def llama_config(head_dim=64, max_pos=64, **rope):
    rope.setdefault("rope_theta", 10000.0)
    rope.setdefault("rope_type", "default")
    return LlamaConfig(head_dim=head_dim, hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max_pos, rope_parameters=rope)  # fmt: skip


# HF rope_parameters of each type, with a short original length (64) so that small tests cross it.
LLAMA_TYPES = {
    "default": dict(rope_type="default", rope_theta=500000.0),
    "linear": dict(rope_type="linear", factor=4.0),
    "yarn": dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=64),
    "yarn-deepseek": dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.8),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),  # fmt: skip
    "dynamic": dict(rope_type="dynamic", factor=4.0),
}


def qk(B=2, S=13, Hq=4, Hk=2, D=64, dtype=torch.float32):
    return torch.randn(B, S, Hq, D, dtype=dtype), torch.randn(B, S, Hk, D, dtype=dtype)


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


def test_cos_sin_tables(backend):
    scaling = LLAMA_TYPES["yarn"]
    rope = RotaryEmbedding(64, scaling=scaling)
    inv, af = rope_frequencies(64, scaling=scaling)
    cos, sin = rope.cos_sin(100)
    want_cos, want_sin = rope_cos_sin(256, inv, attention_factor=af)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    cos, sin = RotaryEmbedding(64, scaling=scaling, cache=False).cos_sin(100)
    assert torch.equal(cos, want_cos[:100]) and torch.equal(sin, want_sin[:100])


# ----------------------------------------------------------------------------------------------
# Angle sources: table vs on the fly vs exact
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["default", "yarn", "llama3"])
def test_cache_and_on_the_fly_agree(backend, kind):
    cfg = llama_config(max_pos=256, **LLAMA_TYPES[kind])
    q, k = qk()
    a = RotaryEmbedding.from_config(cfg, cache=True)(q.clone(), k.clone(), offsets=torch.tensor([3, 500]))
    b = RotaryEmbedding.from_config(cfg, cache=False)(q.clone(), k.clone(), offsets=torch.tensor([3, 500]))
    # Same fp32 angle product, cos/sin in the table kernel vs in registers.
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=0, atol=4 * EPS32 * 4), (x - y).abs().max()


@pytest.mark.parametrize("cache", [True, False], ids=["exact-table", "exact-on-the-fly"])
def test_exact_far_positions(backend, cache):
    """exact=True: float64 frequencies and angles, accurate at positions where an fp32 angle is not."""
    scaling = dict(LLAMA_TYPES["yarn"])
    rope = RotaryEmbedding(64, scaling=scaling, cache=cache, exact=True)
    assert rope.inv_freq.dtype == torch.float64
    q, k = qk(B=1, S=5)
    start = (1 << 20) + 12345 if not cache else 5000  # keep the exact table small under the interpreter
    got_q, got_k = rope(q.clone(), k.clone(), offsets=start)
    inv64, af = rope_frequencies(64, scaling=scaling, dtype=torch.float64)
    angle = truth_angles(torch.arange(start, start + 5)[None], inv64)
    for got, x in ((got_q, q), (got_k, k)):
        err = (got.double() - truth_rotate(x, angle, af)).abs().max().item()
        assert err <= 8 * EPS32 * x.abs().max().item() * af, err
    if not cache:
        fp32 = RotaryEmbedding(64, scaling=scaling, cache=False)(q.clone(), k.clone(), offsets=start)[0]
        err32 = (fp32.double() - truth_rotate(q, angle, af)).abs().max().item()
        assert err32 > 10 * err, "the fp32 angle product loses accuracy this far out; exact must not"


# ----------------------------------------------------------------------------------------------
# Cache growth, positions, packed input
# ----------------------------------------------------------------------------------------------


def test_cache_grows_on_demand_and_never_shrinks(backend):
    rope = RotaryEmbedding(32, base=10000.0)
    assert rope.cos_cached.shape == (0, 16)
    q, k = qk(B=1, S=3, D=32)
    rope(q, k)
    assert rope.cos_cached.shape == (256, 16)
    rope(q, k, offsets=1000)  # needs 1003 rows
    assert rope.cos_cached.shape == (1024, 16)
    rope(q, k, positions=torch.tensor([[5, 3000, 7]]))  # tensor positions: read on the host
    assert rope.cos_cached.shape == (4096, 16)
    rope(q, k)
    assert rope.cos_cached.shape == (4096, 16)
    cos, sin = rope_cos_sin(4096, rope_frequencies(32)[0])
    assert torch.equal(rope.cos_cached, cos) and torch.equal(rope.sin_cached, sin)
    # Per-sequence offsets.
    rope(q, k.new_empty(1, 3, 0, 32), offsets=torch.tensor([5000]))
    assert rope.cos_cached.shape == (8192, 16)


def test_seq_len_hint_skips_the_host_read(backend, monkeypatch):
    rope = RotaryEmbedding(32)
    monkeypatch.setattr(rope, "_seq_len", lambda *a: pytest.fail("read positions on the host despite seq_len"))
    q, k = qk(B=2, S=4, D=32)
    pos = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    ref_q = RotaryEmbedding(32)(q.clone(), k.clone(), positions=pos)[0]
    got_q = rope(q.clone(), k.clone(), positions=pos, seq_len=14)[0]
    assert torch.equal(got_q, ref_q)


def test_cache_false_never_reads_positions_for_static_schedules(backend, monkeypatch):
    rope = RotaryEmbedding(32, cache=False, scaling={"rope_type": "linear", "factor": 2.0})
    monkeypatch.setattr(rope, "_seq_len", lambda *a: pytest.fail("no host read needed"))
    q, k = qk(B=2, S=4, D=32)
    rope(q, k, positions=torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]]))
    assert rope.cos_cached.numel() == 0


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_packed_cu_seqlens_equals_padded(backend, cache):
    rope = RotaryEmbedding(64, scaling=LLAMA_TYPES["llama3"], max_position_embeddings=256, cache=cache)
    lengths, offs = [5, 1, 7], [0, 300, 12]
    q, k = qk(B=3, S=7)
    packed_q = torch.cat([q[i, : lengths[i]] for i in range(3)])
    packed_k = torch.cat([k[i, : lengths[i]] for i in range(3)])
    cu = torch.tensor([0, 5, 6, 13])
    got_q, got_k = rope(packed_q.clone(), packed_k.clone(), offsets=torch.tensor(offs), cu_seqlens=cu)
    pad_q, pad_k = rope(q.clone(), k.clone(), offsets=torch.tensor(offs))
    want_q = torch.cat([pad_q[i, : lengths[i]] for i in range(3)])
    want_k = torch.cat([pad_k[i, : lengths[i]] for i in range(3)])
    assert torch.allclose(got_q, want_q, rtol=0, atol=1e-6) and torch.allclose(got_k, want_k, rtol=0, atol=1e-6)
    if cache:
        assert rope.cos_cached.shape[0] == 512  # largest position 300 -> 301 rows -> 512


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


def test_gradcheck_float64(backend):
    rope = RotaryEmbedding(8, scaling={"rope_type": "linear", "factor": 2.0}, cache=False)
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, dtype=torch.float64, requires_grad=True)

    def f(q, k):
        return rope(q.clone(), k.clone(), offsets=5)

    assert torch.autograd.gradcheck(f, (q, k))


# ----------------------------------------------------------------------------------------------
# Module plumbing: devices, dtypes, state dict, from_config
# ----------------------------------------------------------------------------------------------


def test_buffers_follow_device_and_keep_their_dtype():
    rope = RotaryEmbedding(32, scaling={"rope_type": "longrope", "original_max_position_embeddings": 8,
                                        "short_factor": [1.0] * 16, "long_factor": [2.0] * 16, "factor": 4.0})  # fmt: skip
    exact = RotaryEmbedding(32, exact=True)
    q, k = qk(B=1, S=3, D=32)
    rope(q, k, offsets=20)  # builds the long table
    for m in (rope, exact):
        before = {n: b.dtype for n, b in m.named_buffers()}
        m.to(torch.bfloat16)
        m.half()
        assert {n: b.dtype for n, b in m.named_buffers()} == before, "frequencies and tables keep their precision"
        m.to("meta")
        assert all(b.device.type == "meta" for _, b in m.named_buffers())
        assert {n: b.dtype for n, b in m.named_buffers()} == before
    assert rope.state_dict() == {} and exact.state_dict() == {}
    with pytest.raises(ValueError, match=r"q is on cpu but this RotaryEmbedding's buffers are on meta: move the module with .to\('cpu'\)"):
        rope(q, k)


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


def test_proportional_rotates_only_the_leading_pairs(backend):
    rope = RotaryEmbedding(32, scaling={"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25})
    q, k = qk(B=1, S=4, D=32)
    got_q, _ = rope(q.clone(), k.clone(), offsets=3)
    untouched = torch.cat([torch.arange(4, 16), torch.arange(20, 32)])
    assert torch.equal(got_q[..., untouched], q[..., untouched])
    assert not torch.equal(got_q[:, 1:, :, :4], q[:, 1:, :, :4])


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(head_dim=0), ValueError, r"head_dim must be a positive int, got 0"),
        (dict(head_dim=64, rotary_dim=80), ValueError, r"rotary_dim \(80\) must not exceed head_dim \(64\)"),
        (dict(head_dim=64, rotary_dim=15), ValueError, r"rotary_dim must be a positive even int, got 15"),
        (dict(head_dim=64, rotary_dim=16, partial_rotary_factor=0.5), ValueError, r"pass rotary_dim or partial_rotary_factor, not both"),
        (dict(head_dim=64, partial_rotary_factor=1.5), ValueError, r"partial_rotary_factor must be in \(0, 1\], got 1.5"),
        (dict(head_dim=64, base=1e4, scaling={"rope_theta": 5e5}), ValueError, r"base=10000.0 disagrees with scaling\['rope_theta'\]"),
        (dict(head_dim=64, scaling={"rope_type": "xpos"}), ValueError, r"unknown rope_type 'xpos'"),
        (dict(head_dim=64, scaling={"rope_type": "linear"}), ValueError, r"scaling\['factor'\] is required for rope_type 'linear'"),
        (dict(head_dim=64, scaling={"rope_type": "dynamic", "factor": 2.0}), ValueError,
         r"original_max_position_embeddings'\] is required .*max_position_embeddings"),
        (dict(head_dim=64, mrope_section=[8, 8, 8]), ValueError, r"mrope_section \[8, 8, 8\] must sum to rotary_dim / 2 = 32, got 24"),
        (dict(head_dim=64, max_position_embeddings=0), ValueError, r"max_position_embeddings must be a positive int"),
        (dict(head_dim=64, scaling="linear"), TypeError, r"scaling must be a dict"),
    ],
)
def test_constructor_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        RotaryEmbedding(**kwargs)


@pytest.mark.parametrize(
    "args, kwargs, exc, msg",
    [
        (("q",), {}, TypeError, r"q must be a torch.Tensor, got str"),
        ((torch.randn(2, 3, 64),), {"positions": None, "seq_len": 0}, ValueError, r"seq_len must be a positive int, got 0"),
        ((torch.randn(3, 64),), {}, ValueError, r"q must be \[B, S, H, D\] or packed \[T, H, D\], got shape \(3, 64\)"),
        ((torch.randn(1, 3, 2, 32),), {}, ValueError, r"q's head dim \(last\) must be head_dim = 64, got 32"),
        ((torch.randn(1, 3, 2, 64), torch.randn(1, 4, 2, 64)), {}, ValueError, r"k must be \[B, S, Hk, D\]"),
        ((torch.randn(1, 3, 2, 64),), {"positions": torch.tensor([[0, 1, -1]])}, ValueError, r"positions|rows"),
    ],
)
def test_forward_errors_leave_inputs_unchanged(backend, args, kwargs, exc, msg):
    rope = RotaryEmbedding(64)
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(exc, match=msg):
        rope(*args, **kwargs)
    for b, a in zip(before, [a for a in args if isinstance(a, torch.Tensor)]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cache", [True, False])
def test_module_under_torch_compile_fullgraph(cache):
    """int offsets need no host value: the module traces without graph breaks (cache growth is Python)."""
    rope = RotaryEmbedding(head_dim=64, base=10000.0, max_position_embeddings=256, cache=cache)

    def f(x, y):
        q, k = x * 1, y * 1
        rope(q, k, offsets=3)
        return q, k

    x, y = torch.randn(2, 8, 4, 64), torch.randn(2, 8, 2, 64)
    want = f(x, y)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
