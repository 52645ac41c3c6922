"""GPU check, stages 2 and 3: the headline benchmarks, standalone (no pytest), rows written as they finish.

* Llama-3-8B RoPE (Hq 32, Hk 8, D 128, bf16) in place at 4k, 32k and 131k tokens, as a ratio to a
  device-to-device copy of the same bytes measured in the same run (q+k read+write: 20,480 bytes/token);
* decode (B = 1..256 sequences x 1 token, an offsets tensor [B]) replayed from a CUDA graph, against a graph
  of copies of the same bytes;
* the sinusoidal add (``add_sinusoidal_``) against a copy and an eager ``x + table`` buffer add;
* the HF-style eager code, ``torch.compile`` of it, and the peers Liger-Kernel and flash-attn's Triton rotary
  (loaded from ``.whl/``, see scripts/prepare_peers; a peer that is absent is skipped with the reason);
* peak memory above the starting level during one call, for every prefill row;
* RoPE + KV-cache write (issue 19), Llama-3-8B paged NHD cache: decode (1 and 64 tokens) replayed from a CUDA
  graph, ``rope_and_cache_`` against a plain ``apply_rope_`` on the same q/k (the target: fused <= 1.2x) and
  the unfused ``apply_rope_`` + ``index_copy_`` writes; 4k prefill (bf16 and FP8 cache) as a share of copy
  bandwidth (bytes: q/k read + written, v read, the cache rows written), with the unfused sequence beside it.
  These rows run :func:`common.cache_backend` (Triton once the op has its kernel), in the Triton stage only.

Order inside the stage is by value: posenc + copy rows first, then decode, sinusoidal, peers and eager,
torch.compile last (its compilation is the slowest set-up). ``--backend native`` runs the posenc rows (and
their copies) with ``pk.use_backend("native")``, the CUDA C++ kernels, for the side-by-side table.

    OUT=bench-results python benchmarks/gpu_check/headline.py --backend triton
    GPU_CHECK_DRY_RUN=1 python benchmarks/gpu_check/headline.py      # CPU, interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import sys
import types

# common.py sits beside this script: run as a script, its folder is already first on sys.path.
from common import (  # noqa: E402  (sets TRITON_INTERPRET first)
    DEVICE, DRY, GRAPH_TIMING, TIMING, Cut, Results, cache_backend, graph_us_per_call, one_line, peak_extra_mib,
    time_us,
)  # fmt: skip

import torch  # noqa: E402

import posenc_kernels as pk  # noqa: E402
from posenc_kernels.reference import hf_apply_rotary_pos_emb  # noqa: E402

D = DEVICE
HQ, HK, HD, THETA = 32, 8, 128, 500000.0
DT = torch.bfloat16
BYTES_PER_TOKEN = 2 * (HQ + HK) * HD * 2  # q+k, read+write, bf16: 20,480
PREFILL = (16, 48) if DRY else (4096, 32768, 131072)
DECODE = (1, 4) if DRY else (1, 16, 64, 256)
MAX_POS = 64 if DRY else 131072
SIN_SHAPE = (2, 16, 64) if DRY else (8, 4096, 4096)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS = os.environ.get("GPU_CHECK_PEERS", os.path.join(REPO, ".whl"))
# Which kernel each posenc row runs, for the static figures (benchmarks/static_figures.json) beside it.
KERNELS = {"apply_rope_": "rope_llama3_8b_prefill_bf16", "apply_rope_ decode CUDA graph": "rope_llama3_8b_decode_bf16_offsets",
           "add_sinusoidal_": "add_sinusoidal_bf16_d4096"}  # fmt: skip


class Bench:
    def __init__(self, backend: str):
        self.backend = backend
        self.res = Results(f"headline_{backend}", backend=backend, graph_timing=GRAPH_TIMING,
                           bytes_per_token=BYTES_PER_TOKEN)  # fmt: skip
        self.copy = {}
        self.base = {}

    def copy_us(self, nbytes: int, graph: bool = False) -> float:
        key = (nbytes, graph)
        if key not in self.copy:
            src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=D)
            dst = torch.empty_like(src)
            fn = lambda: dst.copy_(src)  # noqa: E731
            self.copy[key] = graph_us_per_call(fn) if graph else time_us(fn)
            del src, dst
        return self.copy[key]

    def row(self, op, shape, provider, nbytes, fn, *, graph=False, peak=True, **extra):
        """Time ``fn`` and write one row; an exception becomes a row with the error (the stage goes on)."""
        try:
            us = graph_us_per_call(fn) if graph else time_us(fn)
            copy_us = self.copy_us(nbytes, graph)
            mib = peak_extra_mib(fn) if peak and not graph else None
        except Cut:
            raise
        except Exception as e:
            r = self.res.add(op=op, shape=shape, provider=provider, error=one_line(e), **extra)
            print(f"  {op} | {shape} | {provider}: ERROR {r['error']}", flush=True)
            return r
        gbps = nbytes / (us * 1e-6) / 1e9
        copy_gbps = nbytes / (copy_us * 1e-6) / 1e9
        if provider.startswith("hf_eager"):
            self.base[(op, shape)] = us
        extra.setdefault("backend", self.backend if provider == "posenc" else "-")
        r = self.res.add(op=op, shape=shape, provider=provider,
                         kernel=KERNELS.get(op) if provider == "posenc" else None, bytes=nbytes, us=round(us, 3),
                         gbps=round(gbps, 1), copy_us=round(copy_us, 3), copy_ratio=round(gbps / copy_gbps, 4),
                         peak_mib=mib, timing=GRAPH_TIMING if graph else TIMING, **extra)  # fmt: skip
        print(f"  {op} | {shape} | {provider}: {us:.1f} us, {gbps:.0f} GB/s, {100 * r['copy_ratio']:.0f}% of copy"
              + (f", peak {mib} MiB" if mib is not None else ""), flush=True)  # fmt: skip
        return r

    def skip(self, op, shape, provider, why):
        self.res.add(op=op, shape=shape, provider=provider, skipped=why)
        print(f"  {op} | {shape} | {provider}: skipped ({why})", flush=True)


def prefill_inputs(S):
    g = torch.Generator().manual_seed(S)
    q = torch.randn(1, S, HQ, HD, generator=g).to(D, DT)
    k = torch.randn(1, S, HK, HD, generator=g).to(D, DT)
    cos, sin = pk.rope_cos_sin(S, pk.rope_frequencies(HD, THETA)[0].to(D))
    return q, k, cos, sin


def hf_inputs(q, k, cos, sin):
    """HF's layout [B, H, S, D] and its rotary-module output: the half table duplicated, in q's dtype."""
    qh, kh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    c, s = torch.cat((cos, cos), -1)[None].to(DT), torch.cat((sin, sin), -1)[None].to(DT)
    return qh, kh, c, s


def load_liger():
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception as e:
        return None, f"Liger-Kernel not importable ({one_line(e)}); run scripts/prepare_peers and carry .whl"
    return liger_rotary_pos_emb, None


class _TorchWithoutCudaDevice(types.ModuleType):
    """Dry run only: torch, with ``torch.cuda.device`` a no-op, so flash-attn's launcher runs on CPU tensors
    through the interpreter. Its kernel and everything else are untouched."""

    class _Cuda(types.ModuleType):
        def __getattr__(self, name):
            return contextlib.nullcontext if name == "device" else getattr(torch.cuda, name)

    def __init__(self):
        super().__init__("torch")
        self.cuda = self._Cuda("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch, name)


def load_flash_rotary():
    path = os.path.join(PEERS, "flash_attn_rotary.py")
    if not os.path.exists(path):
        return None, f"{path} absent; run scripts/prepare_peers and carry .whl"
    try:
        spec = importlib.util.spec_from_file_location("flash_attn_rotary", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if DRY:  # its launch is wrapped in torch.cuda.device(x.device.index), which a CPU tensor (index None) breaks
            mod.torch = _TorchWithoutCudaDevice()
        return mod.apply_rotary, None
    except Exception as e:
        return None, f"flash-attn rotary failed to load ({one_line(e)})"


def agreement(out_q, out_k, q, k, cos, sin):
    """Max |peer - posenc| on the same inputs (posenc's out-of-place result), recorded beside the peer's row."""
    pq, pk_ = pk.apply_rope(q, k, cos, sin)
    return max((out_q.float() - pq.float()).abs().max().item(), (out_k.float() - pk_.float()).abs().max().item())


def posenc_rows(b: Bench):
    for S in PREFILL:
        q, k, cos, sin = prefill_inputs(S)
        b.row("apply_rope_", f"llama3-8b {S} tok bf16", "posenc", S * BYTES_PER_TOKEN,
              lambda: pk.apply_rope_(q, k, cos, sin))  # fmt: skip
        del q, k
        gc.collect()
    cos, sin = pk.rope_cos_sin(MAX_POS, pk.rope_frequencies(HD, THETA)[0].to(D))
    for B in DECODE:
        q, k = prefill_inputs(1)[:2]
        q, k = q.expand(B, -1, -1, -1).contiguous(), k.expand(B, -1, -1, -1).contiguous()
        offsets = torch.randint(0, MAX_POS, (B,), generator=torch.Generator().manual_seed(B)).to(D)
        b.row("apply_rope_ decode CUDA graph", f"llama3-8b B={B} x 1 tok bf16, offsets [B]", "posenc",
              B * BYTES_PER_TOKEN, lambda: pk.apply_rope_(q, k, cos, sin, offsets=offsets), graph=True)  # fmt: skip
    Bx, Sx, Dx = SIN_SHAPE
    x = torch.randn(Bx, Sx, Dx, device=D, dtype=DT)
    b.row("add_sinusoidal_", f"{Bx}x{Sx}x{Dx} bf16", "posenc", 2 * x.nbytes, lambda: pk.add_sinusoidal_(x))
    return x


CACHE_DECODE = (1, 4) if DRY else (1, 64)
CACHE_PREFILL = 16 if DRY else 4096
CACHE_TARGET = 1.2  # the issue's: a fused decode call costs at most 1.2x a plain apply_rope_ call


def cache_inputs(T, cdt, decode):
    """Llama-3-8B paged NHD cache (block 16): q/k/v [T, H, D] bf16, slots scattered (decode) or whole shuffled
    blocks (prefill), positions [T]; the bytes the fused call must move."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(T, HQ, HD, generator=g).to(D, DT)
    k = torch.randn(T, HK, HD, generator=g).to(D, DT)
    v = torch.randn(T, HK, HD, generator=g).to(D, DT)
    n_slots = max(4096, 2 * T) // 16 * 16
    kc = torch.zeros(n_slots // 16, 16, HK, HD, device=D, dtype=cdt)
    vc = torch.zeros_like(kc)
    if decode:
        slots = torch.randperm(n_slots, generator=g)[:T]
        pos = torch.randint(0, MAX_POS, (T,), generator=g)
    else:
        blocks = torch.randperm(n_slots // 16, generator=g)[: (T + 15) // 16]
        slots = (blocks[:, None] * 16 + torch.arange(16)).flatten()[:T]
        pos = torch.arange(T)
    nbytes = 2 * (q.nbytes + k.nbytes) + v.nbytes + 2 * k.numel() * kc.element_size()
    return q, k, v, kc, vc, slots.to(D), pos.to(D), nbytes


def cache_rows(b: Bench):
    """The issue's figures: decode fused vs apply_rope_ alone vs unfused (CUDA graph), 4k prefill copy%."""
    backend = cache_backend()
    cos, sin = pk.rope_cos_sin(MAX_POS, pk.rope_frequencies(HD, THETA)[0].to(D))
    fp8 = torch.float8_e4m3fn

    def unfused(q, k, v, kc, vc, slots, pos, cdt):
        s64, kf, vf = slots.to(torch.int64), kc.view(-1, HK, HD), vc.view(-1, HK, HD)
        if cdt == fp8:  # quantise, write through a uint8 view (as vLLM keeps FP8 caches)
            fmax = torch.finfo(fp8).max
            kf, vf = kf.view(torch.uint8), vf.view(torch.uint8)

            def fn():
                pk.apply_rope_(q, k, cos, sin, positions=pos)
                kf.index_copy_(0, s64, (k.float() / 0.5).clamp(-fmax, fmax).to(fp8).view(torch.uint8))
                vf.index_copy_(0, s64, (v.float() / 0.5).clamp(-fmax, fmax).to(fp8).view(torch.uint8))
        else:
            def fn():
                pk.apply_rope_(q, k, cos, sin, positions=pos)
                kf.index_copy_(0, s64, k)
                vf.index_copy_(0, s64, v)
        return fn

    op = "rope_and_cache_ decode CUDA graph"
    for T in CACHE_DECODE:
        q, k, v, kc, vc, slots, pos, nbytes = cache_inputs(T, DT, True)
        shape = f"llama3-8b paged B={T} x 1 tok bf16"
        rope = b.row(op, shape, "rope_only", 2 * (q.nbytes + k.nbytes), lambda: pk.apply_rope_(q, k, cos, sin, positions=pos),
                     graph=True)  # fmt: skip
        if D.type == "cuda" and backend != "triton":  # the torch path syncs on the host: not capturable
            b.skip(op, shape, "posenc", f"rope_and_cache_ runs {backend} here (no Triton kernel in this tree): "
                   "not capturable in a CUDA graph")  # fmt: skip
            fused = {}
        else:
            with pk.use_backend(backend):
                fused = b.row(op, shape, "posenc", nbytes, lambda: pk.rope_and_cache_(q, k, v, kc, vc, cos, sin,
                              slot_mapping=slots, positions=pos), graph=True, backend=backend)  # fmt: skip
        if "us" in fused and "us" in rope:
            ratio = fused["us"] / rope["us"]
            fused.update(vs_rope_only=round(ratio, 3), target=CACHE_TARGET, meets_target=ratio <= CACHE_TARGET)
            b.res.flush()
            print(f"    fused / apply_rope_ alone = {ratio:.2f}x (target <= {CACHE_TARGET}x)", flush=True)
        b.row(op, shape, "unfused", nbytes, unfused(q, k, v, kc, vc, slots, pos, DT), graph=True)
    op = "rope_and_cache_ prefill"
    for cdt in (DT, fp8):
        T = CACHE_PREFILL
        q, k, v, kc, vc, slots, pos, nbytes = cache_inputs(T, cdt, False)
        shape = f"llama3-8b paged {T} tok bf16" + ("" if cdt == DT else ", kv fp8_e4m3")
        scales = dict(k_scale=0.5, v_scale=0.5) if cdt == fp8 else {}
        with pk.use_backend(backend):
            b.row(op, shape, "posenc", nbytes, lambda: pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, slot_mapping=slots,
                  positions=pos, **scales), backend=backend)  # fmt: skip
        b.row(op, shape, "unfused", nbytes, unfused(q, k, v, kc, vc, slots, pos, cdt))
        del q, k, v, kc, vc
        gc.collect()


def baseline_rows(b: Bench, x):
    Bx, Sx, Dx = x.shape
    pe = pk.sinusoidal_table(Sx, Dx, device=D).to(DT)  # a precomputed buffer, as models keep one
    b.row("add_sinusoidal_", f"{Bx}x{Sx}x{Dx} bf16", "eager_buffer", 2 * x.nbytes, lambda: x.add_(pe))
    del x
    liger, liger_why = load_liger()
    flash, flash_why = load_flash_rotary()
    for S in PREFILL:
        q, k, cos, sin = prefill_inputs(S)
        shape, nbytes = f"llama3-8b {S} tok bf16", S * BYTES_PER_TOKEN
        qh, kh, c, s = hf_inputs(q, k, cos, sin)
        b.row("apply_rope_", shape, "hf_eager", nbytes, lambda: hf_apply_rotary_pos_emb(qh, kh, c, s))
        if liger is None:
            b.skip("apply_rope_", shape, "liger", liger_why)
        else:
            try:
                lq, lk = liger(qh.clone(), kh.clone(), c, s)
                agree = agreement(lq.transpose(1, 2), lk.transpose(1, 2), q, k, cos, sin)
            except Exception as e:
                agree = f"error: {one_line(e)}"
            b.row("apply_rope_", shape, "liger", nbytes, lambda: liger(qh, kh, c, s), max_diff_vs_posenc=agree)
        if flash is None:
            b.skip("apply_rope_", shape, "flash_attn_triton", flash_why)
        else:
            def fa():  # two launches (q, k), in place, fp32 tables as ours
                flash(q, cos, sin, inplace=True)
                flash(k, cos, sin, inplace=True)

            try:
                agree = agreement(flash(q, cos, sin), flash(k, cos, sin), q, k, cos, sin)
            except Exception as e:
                agree = f"error: {one_line(e)}"
            b.row("apply_rope_", shape, "flash_attn_triton", nbytes, fa, max_diff_vs_posenc=agree)
        del q, k, qh, kh
        gc.collect()
    # decode inside a graph, HF style (tables gathered per token outside the timing, as a model does once)
    cos, sin = pk.rope_cos_sin(MAX_POS, pk.rope_frequencies(HD, THETA)[0].to(D))
    for B in DECODE:
        q, k = prefill_inputs(1)[:2]
        q, k = q.expand(B, -1, -1, -1).contiguous(), k.expand(B, -1, -1, -1).contiguous()
        offsets = torch.randint(0, MAX_POS, (B,), generator=torch.Generator().manual_seed(B)).to(D)
        c, s = cos[offsets[:, None]], sin[offsets[:, None]]
        c, s = torch.cat((c, c), -1).to(DT), torch.cat((s, s), -1).to(DT)
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        b.row("apply_rope_ decode CUDA graph", f"llama3-8b B={B} x 1 tok bf16, offsets [B]", "hf_eager",
              B * BYTES_PER_TOKEN, lambda: hf_apply_rotary_pos_emb(qh, kh, c, s), graph=True)  # fmt: skip
    # torch.compile of the HF code, last: compilation (per shape, dynamic=False) is the slowest set-up.
    compiled = torch.compile(hf_apply_rotary_pos_emb, dynamic=False)
    for S in PREFILL:
        q, k, cos, sin = prefill_inputs(S)
        qh, kh, c, s = hf_inputs(q, k, cos, sin)
        b.row("apply_rope_", f"llama3-8b {S} tok bf16", "hf_compiled", S * BYTES_PER_TOKEN,
              lambda: compiled(qh, kh, c, s))  # fmt: skip
        del q, k, qh, kh
        gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("triton", "native"), default="triton")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    b = Bench(args.backend)
    print(f"headline ({args.backend}) on {b.res.data['device']}; {TIMING}", flush=True)
    try:
        with pk.use_backend(args.backend):
            x = posenc_rows(b)
            if args.backend == "triton":  # no CUDA C++ cache kernel: its rows once, in the Triton stage
                cache_rows(b)
        if args.backend == "triton":  # peers and eager once, in the Triton stage
            baseline_rows(b, x)
        b.res.flush(complete=True)
    except Cut:
        print("headline: cut by the stage timeout; partial results in", b.res.path, flush=True)
        return 124
    errors = [r for r in b.res.data["rows"] if "error" in r and r.get("provider") == "posenc"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
