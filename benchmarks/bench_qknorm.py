"""QK-norm + RoPE benchmarks (issue 18): the fused ``qk_norm_rope_`` against the unfused sequences users run
today: RMSNorm (``torch.nn.functional.rms_norm``) followed by ``apply_rope_``; HF eager (Qwen3's
``q_norm``/``k_norm`` on the projection's ``[B, S, H, D]`` view, transpose, ``apply_rotary_pos_emb``); and
``torch.compile`` of the HF sequence.

Shapes: Qwen3-8B (32 q / 8 kv heads x 128, per-head norm) and a Wan-style cross-head norm (40 x 128 for q
and k, norm over all heads); decode at 1, 8, 64 and 256 tokens (one token per sequence) and prefill at 4k.
Bytes are the minimal traffic: q and k each read and written once. cos/sin are built once outside the
timing (HF's rotary module output, gathered per token, for the HF providers). extra_info family: "qknorm".
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops.qknorm.reference import hf_rms_norm
from posenc_kernels.reference import hf_apply_rotary_pos_emb

from _harness import DEVICE, IS_CUDA, run

SHAPES = {"qwen3-8b": (32, 8, 128, "head"), "wan-cross-head": (40, 40, 128, "heads")}
TOKENS = [("decode", 1), ("decode", 8), ("decode", 64), ("decode", 256), ("prefill", 4096)]
DTYPE = torch.bfloat16 if IS_CUDA else torch.float32  # CPU: the dtype tiny CPU models run in
PROVIDERS = ["posenc_fused", "rmsnorm_then_rope", "hf_eager", "hf_compiled"]
EPS = 1e-6

_compiled = {}


def hf_prologue(q, k, qw, kw, cos, sin, norm: str):
    """HF eager: RMSNorm on the projection's [B, S, H, D] view (Qwen3: per head; Wan/OLMo 2: over the
    flattened heads), transpose to [B, H, S, D], apply_rotary_pos_emb with per-token cos/sin [B, S, D]."""
    if norm == "head":
        qn, kn = hf_rms_norm(q, qw, EPS), hf_rms_norm(k, kw, EPS)
    else:
        qn = hf_rms_norm(q.flatten(-2), qw, EPS).view(q.shape)
        kn = hf_rms_norm(k.flatten(-2), kw, EPS).view(k.shape)
    return hf_apply_rotary_pos_emb(qn.transpose(1, 2), kn.transpose(1, 2), cos, sin)


def _setup(shape, phase, tokens):
    Hq, Hk, D, norm = SHAPES[shape]
    B, S = (tokens, 1) if phase == "decode" else (1, tokens)
    q = torch.randn(B, S, Hq, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, S, Hk, D, device=DEVICE, dtype=DTYPE)
    n = (lambda H: D) if norm == "head" else (lambda H: H * D)
    qw = torch.rand(n(Hq), device=DEVICE, dtype=DTYPE) + 0.5
    kw = torch.rand(n(Hk), device=DEVICE, dtype=DTYPE) + 0.5
    offset = 100 if phase == "decode" else 0  # decode: every sequence at position 100
    inv = pk.rope_frequencies(D, 1e6)[0].to(DEVICE)
    cos, sin = pk.rope_cos_sin(offset + S, inv)
    return q, k, qw, kw, cos, sin, norm, offset


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"{t[0]}{t[1]}")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_qknorm(benchmark, shape, tokens, provider):
    phase, n = tokens
    q, k, qw, kw, cos, sin, norm, offset = _setup(shape, phase, n)
    nbytes = 2 * (q.nbytes + k.nbytes)
    if provider == "posenc_fused":
        fn = lambda: pk.qk_norm_rope_(q, k, qw, kw, cos, sin, eps=EPS, norm=norm, offsets=offset)  # noqa: E731
    elif provider == "rmsnorm_then_rope":
        dims = [q.shape[-1]] if norm == "head" else None

        def fn():
            if norm == "head":
                qn = torch.nn.functional.rms_norm(q, dims, qw, EPS)
                kn = torch.nn.functional.rms_norm(k, dims, kw, EPS)
            else:
                qn = torch.nn.functional.rms_norm(q.flatten(-2), [qw.shape[0]], qw, EPS).view(q.shape)
                kn = torch.nn.functional.rms_norm(k.flatten(-2), [kw.shape[0]], kw, EPS).view(k.shape)
            return pk.apply_rope_(qn, kn, cos, sin, offsets=offset)
    else:
        S = q.shape[1]
        c = torch.cat((cos, cos), -1)[offset : offset + S][None].to(DTYPE).expand(q.shape[0], -1, -1)
        s = torch.cat((sin, sin), -1)[offset : offset + S][None].to(DTYPE).expand(q.shape[0], -1, -1)
        if provider == "hf_eager":
            fn = lambda: hf_prologue(q, k, qw, kw, c, s, norm)  # noqa: E731
        else:
            if norm not in _compiled:
                _compiled[norm] = torch.compile(hf_prologue, dynamic=False)
            fn = lambda: _compiled[norm](q, k, qw, kw, c, s, norm)  # noqa: E731
    run(benchmark, fn, op="qk_norm_rope_", shape=f"{shape} {phase} {n} tok {str(DTYPE).replace('torch.', '')}",
        provider=provider, nbytes=nbytes, family="qknorm")  # fmt: skip
