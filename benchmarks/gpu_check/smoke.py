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
from common import DEVICE, DRY, Cut, Results, one_line  # noqa: E402  (sets TRITON_INTERPRET first)

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
