"""RoPE benchmarks: apply_rope_ vs the HF-style eager reference, torch.compile of it, and peers.

Shapes come from the shared model registry. Bytes are the minimal traffic: q and k each read and written
once (Llama-3-8B bf16: 20,480 bytes per token). cos/sin tables are built once outside the timing, as a
model builds them once per forward for all layers.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.configs import MODEL_CONFIGS
from posenc_kernels.reference import hf_apply_rotary_pos_emb

from _harness import DEVICE, IS_CUDA, run

if IS_CUDA:
    CASES = [("llama3-8b", t, torch.bfloat16) for t in (4096, 32768, 131072)] + [
        (name, 4096, torch.bfloat16) for name in ("qwen2.5-7b", "llama2-7b", "gpt-j-6b", "phi-2", "gemma-2b")
    ]
else:  # 2-core CPU: the shapes of the CPU targets, kept few
    CASES = [("llama3-8b", t, dt) for t in (512, 4096) for dt in (torch.float32, torch.bfloat16)]

PROVIDERS = ["posenc_inplace", "posenc_outofplace", "hf_eager", "hf_compiled"] + (["liger"] if IS_CUDA else [])

_compiled_hf = None


def _setup(name, tokens, dtype):
    cfg = MODEL_CONFIGS[name]
    B, S = 1, tokens
    q = torch.randn(B, S, cfg.num_heads_q, cfg.head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, cfg.num_heads_kv, cfg.head_dim, device=DEVICE, dtype=dtype)
    inv = pk.rope_frequencies(cfg.rotary_dim, cfg.rope_theta)[0].to(DEVICE)
    cos, sin = pk.rope_cos_sin(S, inv)
    return cfg, q, k, cos, sin


def _hf_tables(cos, sin, dtype):
    # HF's rotary module output: the half table duplicated to [B, S, R], in the activations' dtype.
    return torch.cat((cos, cos), -1)[None].to(dtype), torch.cat((sin, sin), -1)[None].to(dtype)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}tok-{str(c[2]).replace('torch.', '')}")
def test_rope(benchmark, case, provider):
    global _compiled_hf
    name, tokens, dtype = case
    cfg, q, k, cos, sin = _setup(name, tokens, dtype)
    nbytes = 2 * (q.nbytes + k.nbytes)
    if provider == "posenc_inplace":
        fn = lambda: pk.apply_rope_(q, k, cos, sin, interleaved=cfg.interleaved)  # noqa: E731
    elif provider == "posenc_outofplace":
        fn = lambda: pk.apply_rope(q, k, cos, sin, interleaved=cfg.interleaved)  # noqa: E731
    else:
        if cfg.interleaved or cfg.rotary_dim != cfg.head_dim:
            pytest.skip("the HF-style full-rotary provider covers NeoX pairs with R == D only")
        qh, kh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # HF layout [B, H, S, D]
        c, s = _hf_tables(cos, sin, dtype)
        if provider == "hf_eager":
            fn = lambda: hf_apply_rotary_pos_emb(qh, kh, c, s)  # noqa: E731
        elif provider == "hf_compiled":
            if _compiled_hf is None:
                _compiled_hf = torch.compile(hf_apply_rotary_pos_emb, dynamic=False)
            fn = lambda: _compiled_hf(qh, kh, c, s)  # noqa: E731
        elif provider == "liger":
            liger = pytest.importorskip("liger_kernel.transformers.rope", reason="Liger-Kernel is not installed")
            fn = lambda: liger.liger_rotary_pos_emb(qh, kh, c, s)  # noqa: E731
    run(benchmark, fn, op="apply_rope_", shape=f"{name} {tokens} tok {str(dtype).replace('torch.', '')}",
        provider=provider, nbytes=nbytes)  # fmt: skip
