"""RoPE serving shapes: decode, varlen (packed) prefill, fused QKV, and the three angle sources.

* decode: Llama-3-8B (Hq 32, Hk 8, D 128, bf16), a batch of 1, 64 or 256 sequences with one new token each
  at different KV lengths (an ``offsets`` tensor ``[B]``, as a serving engine passes it).
* varlen prefill: packed ``q`` ``[T, Hq, D]`` / ``k`` ``[T, Hk, D]`` with ``cu_seqlens`` for a few length mixes.
* fused QKV: ``apply_rope_qkv_`` on ``[B, S, Hq + 2 Hkv, D]`` vs ``apply_rope_`` on the q/k views of the same
  buffer vs HF's split + ``apply_rotary_pos_emb``.
* angle sources, as providers: ``posenc_table`` (cos/sin tables), ``posenc_onthefly`` (fp32 ``inv_freq``,
  HF numerics, no table), ``posenc_exact`` (float64 ``inv_freq``, angle reduced mod 2 pi).

Baselines: ``hf_eager`` (HF transformers' ``apply_rotary_pos_emb`` in the activations' dtype; its cos/sin are
gathered per token and duplicated once outside the timing, as a model does once per forward for all layers)
and ``vllm_gather`` (vLLM's ``RotaryEmbedding.forward_native``: ``cos_sin_cache.index_select(0, positions)``
inside every call, then the rotation in the activations' dtype). Bytes are the minimal traffic: q and k read
and written once (Llama-3-8B bf16: 20,480 bytes per token); v, tables and positions are not counted.

Outside graphs ``apply_rope_`` runs with its default value checks on: with an ``offsets``/``positions``/
``cu_seqlens`` tensor that is one host sync per call on CUDA (part of the eager figure). Under capture the
checks are skipped automatically, so the graph figures below are GPU time only.

CUDA only: ``test_decode_cuda_graph`` captures 100 decode calls in one ``torch.cuda.CUDAGraph`` and times
replays with CUDA events (L2 warm, not flushed); the figure is microseconds of GPU time per call, against
the issue's target of 1.5 us per decode call. A graph of 100 copies of the same bytes is the comparator.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops import registry
from posenc_kernels.reference import vllm_rope_native
from posenc_kernels.configs import MODEL_CONFIGS
from posenc_kernels.reference import hf_apply_rotary_pos_emb

from _harness import DEVICE, IS_CUDA, graph_us_per_call, record, run

CFG = MODEL_CONFIGS["llama3-8b"]
DTYPE = torch.bfloat16
DECODE_TARGET_US = 1.5  # the GPU target for one decode call inside a CUDA graph
GRAPH_CALLS = 100

if IS_CUDA:
    MAX_POS = 131072
    DECODE_BATCHES = (1, 64, 256)
    VARLEN_CASES = {  # name -> sequence lengths
        "8x512": [512] * 8,
        "mixed-4k": [1, 17, 130, 511, 1024, 2413],
        "mixed-32k": [8192, 4096, 4096, 2048, 1000, 13336],
    }
    QKV_SHAPES = ((64, 1), (1, 4096))  # (B, S): a decode batch, a prefill
else:  # 2-core CPU: few and small
    MAX_POS = 4096
    DECODE_BATCHES = (1, 64, 256)
    VARLEN_CASES = {"mixed-512": [100, 37, 250, 125]}
    QKV_SHAPES = ((1, 512),)

ANGLES = ["posenc_table", "posenc_onthefly", "posenc_exact"]
_tables = {}


def _angle_sources():
    """(inv_freq fp32, inv_freq fp64, cos, sin, vLLM cos_sin_cache in bf16), built once per session."""
    if not _tables:
        inv32, _ = pk.rope_frequencies(CFG.rotary_dim, CFG.rope_theta)
        inv64, _ = pk.rope_frequencies(CFG.rotary_dim, CFG.rope_theta, dtype=torch.float64)
        inv32, inv64 = inv32.to(DEVICE), inv64.to(DEVICE)
        cos, sin = pk.rope_cos_sin(MAX_POS, inv32)
        _tables.update(inv32=inv32, inv64=inv64, cos=cos, sin=sin, cache=torch.cat((cos, sin), -1).to(DTYPE))
    return _tables


def _posenc_kwargs(provider, t):
    if provider == "posenc_table":
        return dict(cos=t["cos"], sin=t["sin"])
    if provider == "posenc_onthefly":
        return dict(inv_freq=t["inv32"])
    if provider == "posenc_exact":
        return dict(inv_freq=t["inv64"], exact=True)
    raise ValueError(provider)


def _hf_cos_sin(t, positions):
    """HF's rotary-module output for ``positions`` ``[B, S]``: ``[B, S, R]`` in the activations' dtype."""
    c, s = t["cos"][positions], t["sin"][positions]
    return torch.cat((c, c), -1).to(DTYPE), torch.cat((s, s), -1).to(DTYPE)


def _backend_info(x):
    return {"backend": registry.backend_for(registry.spec("rope_"), x.device.type)}


def _shape(*parts):
    return " ".join(str(p) for p in parts)


# ----------------------------------------------------------------------------------------------
# Decode: B sequences x 1 new token each, at different KV lengths
# ----------------------------------------------------------------------------------------------
DECODE_PROVIDERS = ANGLES + ["hf_eager", "vllm_gather"]


def _decode_inputs(batch):
    g = torch.Generator().manual_seed(batch)
    q = torch.randn(batch, 1, CFG.num_heads_q, CFG.head_dim, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(batch, 1, CFG.num_heads_kv, CFG.head_dim, generator=g).to(DEVICE, DTYPE)
    offsets = torch.randint(0, MAX_POS, (batch,), generator=g).to(DEVICE)  # each sequence's KV length
    return q, k, offsets


def _decode_fn(provider, q, k, offsets):
    t = _angle_sources()
    if provider in ANGLES:
        kw = _posenc_kwargs(provider, t)
        return lambda: pk.apply_rope_(q, k, offsets=offsets, **kw)
    if provider == "hf_eager":
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)  # HF's [B, H, 1, D] view of the projection
        c, s = _hf_cos_sin(t, offsets[:, None])
        return lambda: hf_apply_rotary_pos_emb(qh, kh, c, s)
    if provider == "vllm_gather":
        qf, kf = q.view(q.shape[0], -1), k.view(k.shape[0], -1)
        return lambda: vllm_rope_native(offsets, qf, kf, t["cache"], CFG.head_dim)
    raise ValueError(provider)


@pytest.mark.parametrize("provider", DECODE_PROVIDERS)
@pytest.mark.parametrize("batch", DECODE_BATCHES, ids=lambda b: f"B{b}")
def test_decode(benchmark, batch, provider):
    q, k, offsets = _decode_inputs(batch)
    fn = _decode_fn(provider, q, k, offsets)
    run(benchmark, fn, op="apply_rope_ decode", shape=_shape(CFG.name, f"B={batch} x 1 tok bf16"),
        provider=provider, nbytes=2 * (q.nbytes + k.nbytes), **_backend_info(q))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Varlen prefill: packed [T, H, D] with cu_seqlens
# ----------------------------------------------------------------------------------------------
VARLEN_PROVIDERS = ANGLES + ["posenc_positions", "hf_eager", "vllm_gather"]


@pytest.mark.parametrize("provider", VARLEN_PROVIDERS)
@pytest.mark.parametrize("mix", list(VARLEN_CASES))
def test_varlen_prefill(benchmark, mix, provider):
    lengths = VARLEN_CASES[mix]
    T = sum(lengths)
    q = torch.randn(T, CFG.num_heads_q, CFG.head_dim, device=DEVICE, dtype=DTYPE)
    k = torch.randn(T, CFG.num_heads_kv, CFG.head_dim, device=DEVICE, dtype=DTYPE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    positions = pk.positions_from_cu_seqlens(cu, T)  # per-token [T], restarting at 0 (the scheduler's job)
    t = _angle_sources()
    if provider in ANGLES:
        kw = _posenc_kwargs(provider, t)
        fn = lambda: pk.apply_rope_(q, k, cu_seqlens=cu, **kw)  # noqa: E731
    elif provider == "posenc_positions":
        fn = lambda: pk.apply_rope_(q, k, t["cos"], t["sin"], positions=positions)  # noqa: E731
    elif provider == "hf_eager":  # packed HF (flash-attention varlen): [1, H, T, D] with position_ids [1, T]
        qh, kh = q[None].transpose(1, 2), k[None].transpose(1, 2)
        c, s = _hf_cos_sin(t, positions[None])
        fn = lambda: hf_apply_rotary_pos_emb(qh, kh, c, s)  # noqa: E731
    elif provider == "vllm_gather":
        qf, kf = q.view(T, -1), k.view(T, -1)
        fn = lambda: vllm_rope_native(positions, qf, kf, t["cache"], CFG.head_dim)  # noqa: E731
    run(benchmark, fn, op="apply_rope_ varlen", shape=_shape(CFG.name, f"{len(lengths)} seqs {mix} T={T} bf16"),
        provider=provider, nbytes=2 * (q.nbytes + k.nbytes), **_backend_info(q))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Fused QKV projection output [B, S, Hq + 2 Hkv, D]
# ----------------------------------------------------------------------------------------------
QKV_PROVIDERS = ["posenc_qkv", "posenc_qkv_onthefly", "posenc_split_views", "hf_eager"]


@pytest.mark.parametrize("provider", QKV_PROVIDERS)
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=lambda bs: f"B{bs[0]}xS{bs[1]}")
def test_qkv(benchmark, shape, provider):
    Hq, Hk, D = CFG.num_heads_q, CFG.num_heads_kv, CFG.head_dim
    B, S = shape
    qkv = torch.randn(B, S, Hq + 2 * Hk, D, device=DEVICE, dtype=DTYPE)
    t = _angle_sources()
    cos, sin = t["cos"], t["sin"]
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hk]
    if provider == "posenc_qkv":
        fn = lambda: pk.apply_rope_qkv_(qkv, cos, sin, num_heads_q=Hq, num_heads_kv=Hk)  # noqa: E731
    elif provider == "posenc_qkv_onthefly":
        fn = lambda: pk.apply_rope_qkv_(qkv, inv_freq=t["inv32"], num_heads_q=Hq, num_heads_kv=Hk)  # noqa: E731
    elif provider == "posenc_split_views":
        fn = lambda: pk.apply_rope_(q, k, cos, sin)  # noqa: E731
    elif provider == "hf_eager":  # qkv.split + view + transpose (free), then the out-of-place rotation
        flat = qkv.view(B, S, -1)
        c, s = _hf_cos_sin(t, torch.arange(S, device=DEVICE)[None])

        def fn():
            qs, ks, _ = flat.split([Hq * D, Hk * D, Hk * D], dim=-1)
            qh = qs.view(B, S, Hq, D).transpose(1, 2)
            kh = ks.view(B, S, Hk, D).transpose(1, 2)
            return hf_apply_rotary_pos_emb(qh, kh, c, s)

    run(benchmark, fn, op="apply_rope_qkv_", shape=_shape(CFG.name, f"{B}x{S} tok Hq+2Hkv={Hq + 2 * Hk} bf16"),
        provider=provider, nbytes=2 * (q.numel() + k.numel()) * qkv.element_size(), **_backend_info(qkv))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# CUDA only: decode calls inside a CUDA graph, GPU time per call
# ----------------------------------------------------------------------------------------------
GRAPH_PROVIDERS = ANGLES + ["posenc_cu_seqlens", "hf_eager", "vllm_gather"]


@pytest.mark.skipif(not IS_CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("provider", GRAPH_PROVIDERS)
@pytest.mark.parametrize("batch", DECODE_BATCHES, ids=lambda b: f"B{b}")
def test_decode_cuda_graph(benchmark, batch, provider):
    q, k, offsets = _decode_inputs(batch)
    if provider == "posenc_cu_seqlens":  # the packed layout of a varlen decode step: [B, H, D], 1 token each
        t = _angle_sources()
        qp, kp = q.view(batch, CFG.num_heads_q, CFG.head_dim), k.view(batch, CFG.num_heads_kv, CFG.head_dim)
        cu = torch.arange(batch + 1, device=DEVICE, dtype=torch.int32)
        fn = lambda: pk.apply_rope_(qp, kp, t["cos"], t["sin"], cu_seqlens=cu, offsets=offsets)  # noqa: E731
    else:
        fn = _decode_fn(provider, q, k, offsets)
    nbytes = 2 * (q.nbytes + k.nbytes)
    us, g = graph_us_per_call(fn, GRAPH_CALLS)
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy_us, _ = graph_us_per_call(lambda: dst.copy_(src), GRAPH_CALLS)

    def timed():
        g.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)
    record(
        benchmark, op="apply_rope_ decode CUDA graph",
        shape=_shape(CFG.name, f"B={batch} x 1 tok bf16, us/call of {GRAPH_CALLS}"), provider=provider,
        nbytes=nbytes, median_us=us, copy_us=copy_us, target_us=DECODE_TARGET_US,
        meets_target=us <= DECODE_TARGET_US,
        timing=f"{GRAPH_CALLS} calls in one CUDA graph, median of 20 replays / {GRAPH_CALLS}, CUDA events, L2 warm",
        **_backend_info(q),
    )  # fmt: skip
