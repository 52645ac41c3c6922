"""GPU check, stage 1: correctness smoke. Every Triton kernel family at real shapes (Llama-3-8B and friends)
against its float64 reference, with the Triton backend forced, so each kernel is compiled for this card.

Tolerance (the project's rule): the kernel's max error against the float64 truth may be at most twice the
max error of the same computation done by torch in the input dtype, plus a tiny atol (eps(dtype) / 16 times
the output's scale). Outputs must be finite. Rows go to $OUT/smoke.json as they finish.

    OUT=bench-results python benchmarks/gpu_check/smoke.py          # CUDA
    GPU_CHECK_DRY_RUN=1 python benchmarks/gpu_check/smoke.py        # CPU, interpreter, tiny shapes
"""

from __future__ import annotations

import sys
import time

# common.py sits beside this script: run as a script, its folder is already first on sys.path.
from common import DEVICE, DRY, Cut, Results, one_line, sync  # noqa: E402  (sets TRITON_INTERPRET first)

import torch  # noqa: E402

import posenc_kernels as pk  # noqa: E402
from posenc_kernels import reference as ref  # noqa: E402

D = DEVICE
# Llama-3-8B: Hq 32, Hk 8, D 128, theta 5e5; GPT-J-6B: 16 heads, D 256, 64 rotary channels, interleaved pairs.
HQ, HK, HD, THETA = 32, 8, 128, 500000.0
S = 13 if DRY else 4096  # prefill tokens
MAX_POS = 64 if DRY else 131072  # table rows for decode offsets
DECODE_B = 3 if DRY else 64
VARLEN = [5, 1, 7] if DRY else [1, 17, 130, 511, 1024, 2413]
SIN_SHAPE = (2, 13, 64) if DRY else (4, 2048, 4096)
PE_ROWS = 29 if DRY else 8192
LQ, LK = (13, 17) if DRY else (2048, 2048)
T5_HEADS = 2 if DRY else 12


def eps(dtype):
    return torch.finfo(dtype).eps


def maxerr(a, b) -> float:
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item() if a.numel() else 0.0


def verdict(name, shape, dtype, pairs, **extra):
    """pairs: [(kernel_out, torch_out, truth)]; one row with the worst ratio of the pairs."""
    err = max(maxerr(k, t) for k, _, t in pairs)
    err_torch = max(maxerr(e, t) for _, e, t in pairs)
    scale = max(max(t.abs().max().item() if t.numel() else 0.0 for _, _, t in pairs), 1.0)
    bound = 2 * err_torch + eps(dtype) / 16 * scale
    finite = all(bool(torch.isfinite(k).all()) for k, _, _ in pairs)
    ok = finite and err <= bound
    return dict(check=name, shape=shape, dtype=str(dtype).replace("torch.", ""), err=err, err_torch=err_torch,
                bound=bound, finite=finite, ok=ok, **extra)  # fmt: skip


def llama_qk(B, S_, dtype, hq=HQ, hk=HK, hd=HD):
    g = torch.Generator().manual_seed(B * 1000 + S_)
    q = torch.randn(B, S_, hq, hd, generator=g).to(D, dtype)
    k = torch.randn(B, S_, hk, hd, generator=g).to(D, dtype)
    return q, k


def inv_freq(R=HD, theta=THETA, dtype=torch.float32):
    return pk.rope_frequencies(R, theta, dtype=dtype)[0].to(D)


def torch_tables(positions, inv):
    """cos/sin as torch computes them in fp32 (HF's rotary module): the 'same computation' baseline."""
    a = positions.to(torch.float32)[..., None] * inv.to(torch.float32)
    return a.cos(), a.sin()


# ---------------------------------------------------------------------------------------------- RoPE
def check_rope_table():
    q, k = llama_qk(1, S, torch.bfloat16)
    cos, sin = pk.rope_cos_sin(S, inv_freq())
    tq, tk = ref.rope_reference(q, k, cos, sin)
    eq, ek = ref.rope_hf_eager(q, k, cos, sin)
    q2, k2 = pk.apply_rope_(q.clone(), k.clone(), cos, sin)
    return verdict("apply_rope_ cos/sin tables", f"llama3-8b 1x{S} tok", q.dtype, [(q2, eq, tq), (k2, ek, tk)])


def check_rope_onthefly(exact):
    q, k = llama_qk(2, S // 2 + 1, torch.bfloat16)
    pos = torch.arange(q.shape[1], device=D)
    inv32 = inv_freq()
    inv = inv_freq(dtype=torch.float64) if exact else inv32
    c64, s64 = ref.rope_cos_sin_reference(pos, inv)
    tq, tk = ref.rope_reference(q, k, c64, s64)
    c32, s32 = torch_tables(pos, inv32)
    eq, ek = ref.rope_hf_eager(q, k, c32, s32)
    q2, k2 = pk.apply_rope_(q.clone(), k.clone(), inv_freq=inv, exact=exact)
    name = "apply_rope_ inv_freq fp64 exact" if exact else "apply_rope_ inv_freq fp32 on the fly"
    return verdict(name, f"llama3-8b 2x{q.shape[1]} tok", q.dtype, [(q2, eq, tq), (k2, ek, tk)])


def check_rope_decode_interleaved_partial():
    # GPT-J: 16 heads, D 256, 64 rotary channels, interleaved pairs; one token per sequence at random offsets.
    q, k = llama_qk(DECODE_B, 1, torch.bfloat16, hq=16, hk=16, hd=256)
    cos, sin = pk.rope_cos_sin(MAX_POS, inv_freq(64, 10000.0))
    offsets = torch.randint(0, MAX_POS, (DECODE_B,), generator=torch.Generator().manual_seed(1)).to(D)
    tq, tk = ref.rope_reference(q, k, cos, sin, offsets=offsets, interleaved=True)
    eq, ek = ref.rope_hf_eager(q, k, cos, sin, offsets=offsets, interleaved=True)
    q2, k2 = pk.apply_rope_(q.clone(), k.clone(), cos, sin, offsets=offsets, interleaved=True)
    return verdict("apply_rope_ decode, offsets [B], interleaved, partial", f"gpt-j-6b B={DECODE_B} x 1 tok",
                   q.dtype, [(q2, eq, tq), (k2, ek, tk)])  # fmt: skip


def check_rope_varlen():
    T = sum(VARLEN)
    q, k = llama_qk(1, T, torch.bfloat16)
    q, k = q[0], k[0]  # packed [T, H, D]
    cu = torch.tensor([0] + VARLEN, device=D).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n, device=D) for n in VARLEN])
    cos, sin = pk.rope_cos_sin(max(VARLEN), inv_freq())
    tq, tk = ref.rope_reference(q[None], k[None], cos, sin, positions=pos[None])
    eq, ek = ref.rope_hf_eager(q[None], k[None], cos, sin, positions=pos[None])
    q2, k2 = pk.apply_rope_(q.clone(), k.clone(), cos, sin, cu_seqlens=cu)
    return verdict("apply_rope_ varlen cu_seqlens", f"llama3-8b {len(VARLEN)} seqs T={T}", q.dtype,
                   [(q2[None], eq, tq), (k2[None], ek, tk)])  # fmt: skip


def check_rope_qkv():
    q, k = llama_qk(1, S, torch.bfloat16)
    v = torch.randn_like(k)
    qkv = torch.cat((q, k, v), dim=2)
    cos, sin = pk.rope_cos_sin(S, inv_freq())
    tq, tk = ref.rope_reference(q, k, cos, sin)
    eq, ek = ref.rope_hf_eager(q, k, cos, sin)
    out = pk.apply_rope_qkv_(qkv, cos, sin, num_heads_q=HQ, num_heads_kv=HK)
    v_ok = torch.equal(out[:, :, HQ + HK :], v)
    row = verdict("apply_rope_qkv_ fused projection", f"llama3-8b 1x{S} tok Hq+2Hkv=48", q.dtype,
                  [(out[:, :, :HQ], eq, tq), (out[:, :, HQ : HQ + HK], ek, tk)], v_untouched=v_ok)  # fmt: skip
    row["ok"] = row["ok"] and v_ok
    return row


def check_rope_backward():
    q, k = llama_qk(1, S // 4 + 1, torch.float32)
    cos, sin = pk.rope_cos_sin(q.shape[1], inv_freq())
    g = torch.Generator().manual_seed(7)
    gq, gk = torch.randn(q.shape, generator=g).to(D), torch.randn(k.shape, generator=g).to(D)

    def grads(fn, dtype):
        qq, kk = q.detach().to(dtype, copy=True).requires_grad_(), k.detach().to(dtype, copy=True).requires_grad_()
        oq, ok = fn(qq, kk)
        torch.autograd.backward((oq, ok), (gq.to(oq.dtype), gk.to(ok.dtype)))
        return qq.grad, kk.grad

    tq, tk = grads(lambda a, b: ref.rope_reference(a, b, cos, sin), torch.float64)
    eq, ek = grads(lambda a, b: ref.rope_hf_eager(a, b, cos, sin), torch.float32)
    kq, kk = grads(lambda a, b: pk.apply_rope(a, b, cos, sin), torch.float32)
    return verdict("apply_rope backward (rotation by -theta)", f"llama3-8b 1x{q.shape[1]} tok", torch.float32,
                   [(kq, eq, tq), (kk, ek, tk)])  # fmt: skip


# ---------------------------------------------------------------------------------------------- QK-norm + RoPE
def check_qknorm(norm):
    """Qwen3-8B (per-head norm, 32/8 x 128) or Wan-style cross-head (40 x 128, norm over all heads), bf16,
    in place, against the float64 reference; HF eager (fp32 statistics, bf16 products) as the torch baseline."""
    from posenc_kernels.ops.qknorm.reference import qk_norm_rope_hf_eager, qk_norm_rope_reference

    hq, hk = (HQ, HK) if norm == "head" else (4 if DRY else 40, 4 if DRY else 40)
    q, k = llama_qk(1, S, torch.bfloat16, hq=hq, hk=hk)
    g = torch.Generator().manual_seed(21)
    n = (lambda H: HD) if norm == "head" else (lambda H: H * HD)
    qw = (torch.rand(n(hq), generator=g) + 0.5).to(D, torch.bfloat16)
    kw = (torch.rand(n(hk), generator=g) + 0.5).to(D, torch.bfloat16)
    cos, sin = pk.rope_cos_sin(S, inv_freq())
    kw_ = dict(norm=norm, weight_offset=0.0)
    tq, tk = qk_norm_rope_reference(q, k, qw, kw, cos, sin, **kw_)
    eq, ek = qk_norm_rope_hf_eager(q, k, qw, kw, cos, sin, **kw_)
    q2, k2 = pk.qk_norm_rope_(q.clone(), k.clone(), qw, kw, cos, sin, **kw_)
    name = "qk_norm_rope_ per head (Qwen3)" if norm == "head" else "qk_norm_rope_ over all heads (Wan)"
    return verdict(name, f"{hq}/{hk}x{HD} 1x{S} tok", q.dtype, [(q2, eq, tq), (k2, ek, tk)])


def check_qknorm_backward():
    """dq, dk, dq_weight, dk_weight (fp32) against float64 reference autograd under a random upstream grad."""
    from posenc_kernels.ops.qknorm.reference import qk_norm_rope_reference

    s = 7 if DRY else 1024
    q, k = llama_qk(1, s, torch.float32)
    g = torch.Generator().manual_seed(22)
    w = [(torch.rand(HD, generator=g) + 0.5).to(D) for _ in range(2)]
    up = [torch.randn(q.shape, generator=g).to(D), torch.randn(k.shape, generator=g).to(D)]
    cos, sin = pk.rope_cos_sin(s, inv_freq())

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, *w)]
        oq, ok = fn(*leaves)
        return torch.autograd.grad((oq, ok), leaves, [u.to(dtype) for u in up])

    kern = grads(lambda a, b, c, d: pk.qk_norm_rope(a, b, c, d, cos, sin), torch.float32)
    truth = grads(lambda a, b, c, d: qk_norm_rope_reference(a, b, c, d, cos, sin), torch.float64)
    eager = grads(lambda a, b, c, d: qk_norm_rope_reference(a, b, c, d, cos, sin, dtype=torch.float32), torch.float32)
    return verdict("qk_norm_rope backward (dq, dk, dw)", f"llama3-8b 1x{s} tok", torch.float32,
                   list(zip(kern, eager, truth)))  # fmt: skip


def check_rope_cos_sin():
    pos = torch.arange(MAX_POS, device=D)
    inv = inv_freq()
    c, s = pk.rope_cos_sin(pos, inv)
    tc, ts = ref.rope_cos_sin_reference(pos, inv)
    ec, es = torch_tables(pos, inv)
    return verdict("rope_cos_sin tables", f"{MAX_POS} rows x 64", torch.float32, [(c, ec, tc), (s, es, ts)])


# ---------------------------------------------------------------------------------------------- RoPE + KV cache
# Each row runs common.cache_backend() (Triton when the op has its kernel in this tree, else what auto picks:
# named in the row and its check name). Caches are poisoned with NaN first: a row left unwritten stays NaN,
# a padded (-1 or past len(slot_mapping)) token's row must stay NaN, bit for bit.
CACHE_T = 13 if DRY else 4096  # paged prefill tokens
GRAPH_B = 5 if DRY else 64  # decode tokens captured in a CUDA graph
BLOCK = 16
FP8 = torch.float8_e4m3fn


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), device=D).to(dtype)


def _dequant(x, scale):
    """float64 values a cache row stands for: FP8 rows times their scale (a float or per head [H])."""
    x = x.to(torch.float64)
    if scale is None:
        return x
    s = torch.as_tensor(scale, dtype=torch.float64, device=x.device)
    return x * (s[:, None] if s.dim() == 1 else s)


def _torch_store(x, scale, dtype):
    """The same storage done by torch (fp32 x / scale, clamped, cast), dequantised: the 'same computation'."""
    if dtype != FP8:
        return x.to(dtype)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    s = s[:, None] if s.dim() == 1 else s
    fmax = torch.finfo(dtype).max
    return (x.to(torch.float32) / s).clamp(-fmax, fmax).to(dtype)


def _cache_scales(Hk, cdt):
    if cdt != FP8:
        return None, None
    return 0.5, torch.linspace(0.25, 1.0, Hk, device=D)  # k: a float; v: per kv head


def _untouched(out, before, written_mask):
    """Rows not written are bit for bit what they were (NaN poison); written rows are finite."""
    o, b = out.view(torch.uint8), before.view(torch.uint8)
    same = torch.equal(o[~written_mask], b[~written_mask])
    finite = bool(torch.isfinite(out[written_mask].float()).all())
    return same and finite


def _cache_row(name, shape, cdt, backend, pairs, untouched, **extra):
    row = verdict(f"{name} [{backend}]", shape, cdt, pairs, untouched=untouched, backend=backend, **extra)
    row["ok"] = row["ok"] and untouched and all(v for k, v in extra.items() if k.startswith("exact"))
    return row


def check_cache_paged(cdt):
    """Llama-3-8B paged NHD cache (block 16), prefill-sized: slots shuffled over the cache, one slot -1 and the
    last two tokens past len(slot_mapping) (CUDA-graph padding): rotated, not written."""
    from common import cache_backend

    backend = cache_backend()
    T = CACHE_T
    q, k = llama_qk(1, T, torch.bfloat16)
    q, k = q[0], k[0]
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(31)).to(D, torch.bfloat16)
    g = torch.Generator().manual_seed(32)
    n_blocks = 2 * T // BLOCK + 1
    slots = torch.randperm(n_blocks * BLOCK, generator=g)[: T - 2].to(D)
    slots[1] = -1
    pos = torch.randint(0, MAX_POS, (T,), generator=g).to(D)
    cos, sin = pk.rope_cos_sin(MAX_POS, inv_freq())
    ks, vs = _cache_scales(HK, cdt)
    kc0, vc0 = _poisoned((n_blocks, BLOCK, HK, HD), cdt), _poisoned((n_blocks, BLOCK, HK, HD), cdt)
    kc, vc, q2, k2 = kc0.clone(), vc0.clone(), q.clone(), k.clone()
    with pk.use_backend(backend):
        pk.rope_and_cache_(q2, k2, v, kc, vc, cos, sin, slot_mapping=slots, positions=pos, k_scale=ks, v_scale=vs)
    tq, tk = ref.rope_reference(q[None], k[None], cos, sin, positions=pos[None])
    eq, ek = ref.rope_hf_eager(q[None], k[None], cos, sin, positions=pos[None])
    tok = torch.nonzero(slots >= 0)[:, 0]  # written tokens
    sl = slots[tok]
    blk, off = sl // BLOCK, sl % BLOCK
    mask = torch.zeros(n_blocks, BLOCK, dtype=torch.bool, device=D)
    mask[blk, off] = True
    pairs = [(q2[None], eq, tq), (k2[None], ek, tk),
             (_dequant(kc[blk, off], ks), _dequant(_torch_store(ek[0, tok], ks, cdt), ks), tk[0, tok]),
             (_dequant(vc[blk, off], vs), _dequant(_torch_store(v[tok], vs, cdt), vs), v[tok].to(torch.float64))]  # fmt: skip
    untouched = _untouched(kc, kc0, mask) and _untouched(vc, vc0, mask)
    extra = {}
    if cdt != FP8:  # a cache in the input dtype holds exactly what apply_rope_ left in k (and v itself)
        extra["exact_rows"] = torch.equal(kc[blk, off], k2[tok]) and torch.equal(vc[blk, off], v[tok])
    return _cache_row(f"rope_and_cache_ paged NHD, kv {str(cdt).replace('torch.', '')}",
                      f"llama3-8b T={T}, {len(tok)} written", cdt, backend, pairs, untouched, **extra)  # fmt: skip


def check_cache_contiguous(cdt):
    """HF's static cache (contiguous HND [B, Hk, S_max, D]), cache_positions [B, S] from per-sequence offsets,
    one position -1 (rotated, not written)."""
    from common import cache_backend

    backend = cache_backend()
    B, S_ = 2, max(CACHE_T // 2, 3)
    q, k = llama_qk(B, S_, torch.bfloat16)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(33)).to(D, torch.bfloat16)
    offs = torch.tensor([3, 7], device=D)
    s_max = S_ + 16
    cpos = offs[:, None] + torch.arange(S_, device=D)
    cpos[1, 0] = -1
    cos, sin = pk.rope_cos_sin(MAX_POS, inv_freq())
    ks, vs = _cache_scales(HK, cdt)
    kc0, vc0 = _poisoned((B, HK, s_max, HD), cdt), _poisoned((B, HK, s_max, HD), cdt)
    kc, vc, q2, k2 = kc0.clone(), vc0.clone(), q.clone(), k.clone()
    with pk.use_backend(backend):
        pk.rope_and_cache_(q2, k2, v, kc, vc, cos, sin, cache_positions=cpos, kv_layout="HND", offsets=offs,
                           k_scale=ks, v_scale=vs)  # fmt: skip
    tq, tk = ref.rope_reference(q, k, cos, sin, offsets=offs)
    eq, ek = ref.rope_hf_eager(q, k, cos, sin, offsets=offs)
    bi, si = torch.nonzero(cpos >= 0, as_tuple=True)
    pi = cpos[bi, si]
    kn, vn = kc.transpose(1, 2), vc.transpose(1, 2)  # [B, S_max, Hk, D] views
    mask = torch.zeros(B, s_max, dtype=torch.bool, device=D)
    mask[bi, pi] = True
    pairs = [(q2, eq, tq), (k2, ek, tk),
             (_dequant(kn[bi, pi], ks), _dequant(_torch_store(ek[bi, si], ks, cdt), ks), tk[bi, si]),
             (_dequant(vn[bi, pi], vs), _dequant(_torch_store(v[bi, si], vs, cdt), vs), v[bi, si].to(torch.float64))]  # fmt: skip
    untouched = _untouched(kn, kc0.transpose(1, 2), mask) and _untouched(vn, vc0.transpose(1, 2), mask)
    extra = {}
    if cdt != FP8:
        extra["exact_rows"] = torch.equal(kn[bi, pi], k2[bi, si]) and torch.equal(vn[bi, pi], v[bi, si])
    return _cache_row(f"rope_and_cache_ contiguous HND, kv {str(cdt).replace('torch.', '')}",
                      f"llama3-8b {B}x{S_} tok, S_max {s_max}", cdt, backend, pairs, untouched, **extra)  # fmt: skip


def check_cache_mla():
    """MLA (DeepSeek-V3: 128 heads, q_pe a strided slice of q [T, H, 128 + 64], latent 512 + 64), interleaved
    pairs, FP8 latent cache with scale 0.5; q's nope part and padded slots untouched."""
    from common import cache_backend

    backend = cache_backend()
    H, nope, R, rank = (4, 16, 16, 32) if DRY else (128, 128, 64, 512)
    T = 13 if DRY else 1024
    g = torch.Generator().manual_seed(34)
    q = torch.randn(T, H, nope + R, generator=g).to(D, torch.bfloat16)
    k_pe = torch.randn(T, R, generator=g).to(D, torch.bfloat16)
    kv_c = torch.randn(T, rank, generator=g).to(D, torch.bfloat16)
    n_blocks = 2 * T // BLOCK + 1
    slots = torch.randperm(n_blocks * BLOCK, generator=g)[: T - 1].to(D)
    slots[0] = -1
    pos = torch.randint(0, MAX_POS, (T,), generator=g).to(D)
    cos, sin = pk.rope_cos_sin(MAX_POS, inv_freq(R, 10000.0))
    c0 = _poisoned((n_blocks, BLOCK, rank + R), FP8)
    cache, q2, kp2 = c0.clone(), q.clone(), k_pe.clone()
    with pk.use_backend(backend):
        pk.mla_rope_and_cache_(q2[..., nope:], kp2, kv_c, cache, cos, sin, slot_mapping=slots, positions=pos, scale=0.5)
    tq, tk = ref.rope_reference(q[None, ..., nope:], k_pe[None, :, None], cos, sin, positions=pos[None], interleaved=True)
    eq, ek = ref.rope_hf_eager(q[None, ..., nope:], k_pe[None, :, None], cos, sin, positions=pos[None], interleaved=True)
    tok = torch.nonzero(slots >= 0)[:, 0]
    sl = slots[tok]
    rows = cache.view(-1, rank + R)[sl]
    mask = torch.zeros(n_blocks * BLOCK, dtype=torch.bool, device=D)
    mask[sl] = True
    pairs = [(q2[None, ..., nope:], eq, tq), (kp2[None, :, None], ek, tk),
             (_dequant(rows[:, rank:], 0.5), _dequant(_torch_store(ek[0, tok, 0], 0.5, FP8), 0.5), tk[0, tok, 0]),
             (_dequant(rows[:, :rank], 0.5), _dequant(_torch_store(kv_c[tok], 0.5, FP8), 0.5), kv_c[tok].to(torch.float64))]  # fmt: skip
    untouched = _untouched(cache.view(-1, rank + R), c0.view(-1, rank + R), mask)
    return _cache_row("mla_rope_and_cache_ paged latent, kv float8_e4m3fn", f"{H} heads {nope}+{R}, {rank}+{R}, T={T}",
                      torch.bfloat16, backend, pairs, untouched, exact_nope=torch.equal(q2[..., :nope], q[..., :nope]))  # fmt: skip


def _capture(fn):
    """CUDA: ``fn`` warmed up on a side stream and captured in a graph; returns its replay. Dry run: ``fn``."""
    if D.type != "cuda":
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def check_cache_cuda_graph():
    """rope_and_cache_ captured once in a CUDA graph (decode: GRAPH_B tokens, the last two slots -1: padding
    of the graph's bucket), replayed 3 times with new slots, positions and q/k/v written into the captured
    buffers; after each replay the cache holds the new rows and nothing else (poisoned again between
    replays, in place). Dry run: plain calls in place of the replays."""
    from common import cache_backend

    backend = cache_backend()
    T = GRAPH_B
    n_blocks = 64
    sq, sk = (t[:, 0] for t in llama_qk(T, 1, torch.bfloat16))
    sv = torch.randn(sk.shape, device=D).to(torch.bfloat16)
    kc, vc = _poisoned((n_blocks, BLOCK, HK, HD), torch.bfloat16), _poisoned((n_blocks, BLOCK, HK, HD), torch.bfloat16)
    slots = torch.arange(T, device=D)
    slots[-2:] = -1
    pos = torch.zeros(T, dtype=torch.int64, device=D)
    cos, sin = pk.rope_cos_sin(MAX_POS, inv_freq())
    try:
        with pk.use_backend(backend):
            replay = _capture(lambda: pk.rope_and_cache_(sq, sk, sv, kc, vc, cos, sin, slot_mapping=slots, positions=pos))
    except Exception as e:  # name the backend: the torch path syncs on the host and cannot be captured
        raise RuntimeError(f"capture failed on the {backend} backend: {one_line(e)}") from e
    g = torch.Generator().manual_seed(35)
    poison = kc.clone()
    pairs, untouched, exact = [], True, True
    for _ in range(3):
        q = torch.randn(sq.shape, generator=g).to(D, torch.bfloat16)
        k = torch.randn(sk.shape, generator=g).to(D, torch.bfloat16)
        v = torch.randn(sk.shape, generator=g).to(D, torch.bfloat16)
        new_slots = torch.randperm(n_blocks * BLOCK, generator=g)[:T].to(D)
        new_slots[-2:] = -1
        new_pos = torch.randint(0, MAX_POS, (T,), generator=g).to(D)
        for dst, src in ((sq, q), (sk, k), (sv, v), (slots, new_slots), (pos, new_pos)):
            dst.copy_(src)
        kc.copy_(poison)  # in place: the captured addresses stay
        vc.copy_(poison)
        with pk.use_backend(backend):
            replay()
        sync()
        tq, tk = ref.rope_reference(q[None], k[None], cos, sin, positions=new_pos[None])
        eq, ek = ref.rope_hf_eager(q[None], k[None], cos, sin, positions=new_pos[None])
        tok = torch.nonzero(new_slots >= 0)[:, 0]
        blk, off = new_slots[tok] // BLOCK, new_slots[tok] % BLOCK
        mask = torch.zeros(n_blocks, BLOCK, dtype=torch.bool, device=D)
        mask[blk, off] = True
        pairs += [(sq[None].clone(), eq, tq), (sk[None].clone(), ek, tk), (kc[blk, off].clone(), ek[0, tok], tk[0, tok])]
        untouched = untouched and _untouched(kc, poison, mask) and _untouched(vc, poison, mask)
        exact = exact and torch.equal(kc[blk, off], sk[tok]) and torch.equal(vc[blk, off], v[tok])
    what = "CUDA graph, 3 replays" if D.type == "cuda" else "DRY RUN: 3 plain calls"
    return _cache_row(f"rope_and_cache_ {what}, slots padded with -1", f"llama3-8b decode T={T}, 2 padded",
                      torch.bfloat16, backend, pairs, untouched, exact_rows=exact)  # fmt: skip


def check_cache_no_alloc():
    """The in-place op allocates nothing proportional to its tensors: peak above the starting level during
    one call (after a warm-up call) under 1 MiB at the paged prefill shape (CUDA; not measurable on CPU)."""
    from common import cache_backend, peak_extra_mib

    backend = cache_backend()
    T = CACHE_T
    q, k = llama_qk(1, T, torch.bfloat16)
    q, k = q[0], k[0]
    v = torch.randn_like(k)
    kc = torch.zeros(2 * T // BLOCK + 1, BLOCK, HK, HD, device=D, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(kc.shape[0] * BLOCK, generator=torch.Generator().manual_seed(36))[:T].to(D)
    pos = torch.arange(T, device=D)
    cos, sin = pk.rope_cos_sin(MAX_POS, inv_freq())

    def fn():
        with pk.use_backend(backend):
            pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, slot_mapping=slots, positions=pos)

    fn()
    sync()
    mib = peak_extra_mib(fn)
    ok = mib is None or mib < 1.0
    return dict(check=f"rope_and_cache_ in place allocates < 1 MiB [{backend}]", shape=f"llama3-8b paged T={T}",
                dtype="bfloat16", err=mib if mib is not None else 0.0, err_torch=0.0, bound=1.0, finite=True, ok=ok,
                peak_mib=mib, backend=backend, note=None if mib is not None else "DRY RUN: no CUDA allocator to read")  # fmt: skip


# ---------------------------------------------------------------------------------------------- sinusoidal
def check_add_sinusoidal():  # positions passed explicitly: works whether the keyword is offset= or offsets=
    B, S_, Dm = SIN_SHAPE
    x = torch.randn(B, S_, Dm, generator=torch.Generator().manual_seed(3)).to(D, torch.bfloat16)
    pos = torch.arange(S_, device=D)
    truth = ref.add_sinusoidal_reference(x, positions=pos)
    pe32 = ref.sinusoidal_table_reference(pos, Dm, dtype=torch.float32)
    eager = x + pe32.to(x.dtype)  # as models write it: a table in the activations' dtype, added
    out = pk.add_sinusoidal_(x.clone(), positions=pos)
    return verdict("add_sinusoidal_", f"{B}x{S_}x{Dm}", x.dtype, [(out, eager, truth)])


def check_sinusoidal_table():
    pos = torch.linspace(0, MAX_POS // 8, 1000 if not DRY else 11, device=D)  # float positions (timesteps)
    dim = 1024 if not DRY else 32
    out = pk.sinusoidal_table(pos, dim)
    truth = ref.sinusoidal_table_reference(pos, dim)
    eager = ref.sinusoidal_table_reference(pos, dim, dtype=torch.float32)
    return verdict("sinusoidal_table (float positions)", f"{pos.numel()} x {dim}", torch.float32, [(out, eager, truth)])


def check_concat_sinusoidal():
    B, S_, Dm = SIN_SHAPE
    x = torch.randn(B, S_ // 2 + 1, Dm // 4, generator=torch.Generator().manual_seed(4)).to(D, torch.bfloat16)
    pos = torch.arange(x.shape[1], device=D)
    dpe = 128 if not DRY else 16
    truth = ref.concat_sinusoidal_reference(x, dpe, positions=pos)
    eager = torch.cat((x, ref.sinusoidal_table_reference(pos, dpe, dtype=torch.float32).to(x.dtype).expand(x.shape[0], -1, -1)), -1)
    out = pk.concat_sinusoidal(x, dpe, positions=pos)
    return verdict("concat_sinusoidal", f"{tuple(x.shape)} + {dpe}", x.dtype, [(out, eager, truth)])


# ---------------------------------------------------------------------------------------------- learned
def _pe_inputs(dtype):
    B, S_, Dm = SIN_SHAPE
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, S_, Dm, generator=g).to(D, dtype)
    table = torch.randn(PE_ROWS, Dm, generator=g).to(D, dtype)
    # Few distinct rows, so the backward sums many tokens per row (the atomic/sorted kernels' real work).
    positions = torch.randint(0, min(PE_ROWS, 64), (B, S_), generator=g).to(D)
    return x, table, positions


def check_add_position_embedding():
    x, table, pos = _pe_inputs(torch.bfloat16)
    truth = ref.add_position_embedding_reference(x, table, pos)
    eager = ref.position_embedding_eager(x, table, pos)
    out = pk.add_position_embedding_(x.clone(), table, pos)
    return verdict("add_position_embedding_", f"{tuple(x.shape)} table {PE_ROWS} rows", x.dtype, [(out, eager, truth)])


def check_position_embedding_backward(deterministic):
    x, table, pos = _pe_inputs(torch.float32)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(D)
    t = table.clone().requires_grad_()
    pk.add_position_embedding(x, t, pos, deterministic=deterministic).backward(grad)
    rows = pos.reshape(-1)
    truth = torch.zeros(PE_ROWS, x.shape[-1], dtype=torch.float64, device=D).index_add_(0, rows, grad.reshape(-1, x.shape[-1]).double())
    eager = torch.zeros(PE_ROWS, x.shape[-1], dtype=torch.float32, device=D).index_add_(0, rows, grad.reshape(-1, x.shape[-1]))
    name = "position embedding table grad, " + ("deterministic (sorted)" if deterministic else "atomic")
    return verdict(name, f"{tuple(x.shape)} -> {PE_ROWS} rows", torch.float32, [(t.grad, eager, truth)])


# ---------------------------------------------------------------------------------------------- relative
def check_alibi(causal):
    slopes = pk.alibi_slopes(12 if not DRY else 5).to(D)  # 12 heads: a non-power-of-two head count
    out = pk.alibi_bias(slopes, LQ, LK, causal=causal)
    return verdict(f"alibi_bias causal={causal}", f"H={slopes.numel()} {LQ}x{LK}", torch.float32,
                   [(out, ref.alibi_bias_eager(slopes, LQ, LK, causal=causal), ref.alibi_bias_reference(slopes, LQ, LK, causal=causal))])  # fmt: skip


def check_alibi_backward():
    slopes = pk.alibi_slopes(12 if not DRY else 5).to(D)
    grad = torch.randn(slopes.numel(), LQ, LK, generator=torch.Generator().manual_seed(8)).to(D)
    s = slopes.clone().requires_grad_()
    pk.alibi_bias(s, LQ, LK).backward(grad)
    s64, s32 = slopes.double().requires_grad_(), slopes.clone().requires_grad_()
    ref.alibi_bias_reference(s64, LQ, LK).backward(grad.double())
    ref.alibi_bias_eager(s32, LQ, LK).backward(grad)
    truth, eager = s64.grad, s32.grad
    return verdict("alibi_bias slopes grad", f"H={slopes.numel()} {LQ}x{LK}", torch.float32, [(s.grad, eager, truth)])


def check_t5(bidirectional):
    table = torch.randn(32, T5_HEADS, generator=torch.Generator().manual_seed(9)).to(D)
    out = pk.t5_relative_bias(table, LQ, LK, bidirectional=bidirectional)
    truth = ref.t5_relative_bias_reference(table, LQ, LK, bidirectional=bidirectional)
    return verdict(f"t5_relative_bias bidirectional={bidirectional}", f"32 buckets H={T5_HEADS} {LQ}x{LK}",
                   torch.float32, [(out, truth.float(), truth)])  # fmt: skip


def check_t5_backward():
    table = torch.randn(32, T5_HEADS, generator=torch.Generator().manual_seed(10)).to(D).requires_grad_()
    grad = torch.randn(T5_HEADS, LQ, LK, generator=torch.Generator().manual_seed(11)).to(D)
    pk.t5_relative_bias(table, LQ, LK).backward(grad)
    t64, t32 = table.detach().double().requires_grad_(), table.detach().clone().requires_grad_()
    ref.t5_relative_bias_reference(t64, LQ, LK).backward(grad.double())
    ref.t5_relative_bias_hf_eager(t32, LQ, LK).backward(grad)
    truth, eager = t64.grad, t32.grad
    return verdict("t5_relative_bias table grad", f"32 buckets H={T5_HEADS} {LQ}x{LK}", torch.float32,
                   [(table.grad, eager, truth)])  # fmt: skip


CHECKS = [
    ("rope", check_rope_table),
    ("rope", lambda: check_rope_onthefly(False)),
    ("rope", lambda: check_rope_onthefly(True)),
    ("rope", check_rope_decode_interleaved_partial),
    ("rope", check_rope_varlen),
    ("rope", check_rope_qkv),
    ("rope", check_rope_backward),
    ("rope", check_rope_cos_sin),
    ("qknorm", lambda: check_qknorm("head")),
    ("qknorm", lambda: check_qknorm("heads")),
    ("qknorm", check_qknorm_backward),
    ("cache", lambda: check_cache_paged(torch.bfloat16)),
    ("cache", lambda: check_cache_paged(FP8)),
    ("cache", lambda: check_cache_contiguous(torch.bfloat16)),
    ("cache", lambda: check_cache_contiguous(FP8)),
    ("cache", check_cache_mla),
    ("cache", check_cache_no_alloc),
    ("sinusoidal", check_add_sinusoidal),
    ("sinusoidal", check_sinusoidal_table),
    ("sinusoidal", check_concat_sinusoidal),
    ("learned", check_add_position_embedding),
    ("learned", lambda: check_position_embedding_backward(False)),
    ("learned", lambda: check_position_embedding_backward(True)),
    ("relative", lambda: check_alibi(True)),
    ("relative", lambda: check_alibi(False)),
    ("relative", check_alibi_backward),
    ("relative", lambda: check_t5(True)),
    ("relative", lambda: check_t5(False)),
    ("relative", check_t5_backward),
    ("cache", check_cache_cuda_graph),  # last: a capture that fails must not disturb the other checks
]


def main() -> int:
    res = Results("smoke", backend="triton (forced)", rule="err <= 2 * err_torch + eps(dtype)/16 * scale")
    failed = 0
    try:
        with pk.use_backend("triton"):
            for family, fn in CHECKS:
                t0 = time.perf_counter()
                try:
                    row = fn()
                except Exception as e:  # one family's failure must not hide the others
                    row = dict(check=getattr(fn, "__name__", "?"), ok=False, error=one_line(e))
                row.update(family=family, seconds=round(time.perf_counter() - t0, 2))
                res.add(**row)
                failed += not row["ok"]
                status = "ok  " if row["ok"] else "FAIL"
                print(f"{status} {row['check']:<52} {row.get('shape', ''):<32} err {row.get('err', float('nan')):.3g}"
                      f" bound {row.get('bound', float('nan')):.3g} ({row['seconds']:.1f} s)"
                      + (f"  {row['error']}" if "error" in row else ""), flush=True)  # fmt: skip
        res.flush(complete=True)
    except Cut:
        print("smoke: cut by the stage timeout; partial results in", res.path, flush=True)
        return 124
    print(f"smoke: {len(CHECKS) - failed}/{len(CHECKS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
