"""Compile every hot Triton kernel for sm_90 without a GPU and report its static figures.

Run as ``python -m posenc_dev.static_compile`` in a process WITHOUT ``TRITON_INTERPRET``
(tests/static/test_kernel_sass.py runs it in a subprocess; scripts/static_figures writes its output to
benchmarks/static_figures.json). The real launchers run on CPU tensors of real model shapes with the
kernel objects swapped for recorders, so each kernel is compiled with exactly the arguments, constexprs
and divisibility specialisations a launch of those shapes would use (Triton's own
``native_specialize_impl``).

Per case: ptxas's registers and spills, PTX access counts, and the SASS figures of ``sass`` (load
rounds, bytes in flight, instructions on the path, occupancy), plus ``dram_bytes_per_program``: the
case's minimal DRAM traffic (each input read once, each output written once: the figure the benchmarks'
bandwidth uses) over its programs, and ``instructions_per_byte`` from it. Prints one JSON object:
{"triton": version, "cases": {name: figures}}.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

try:
    from triton.backends.nvidia.compiler import CUDABackend as Backend
except ImportError:  # pragma: no cover
    from triton.backends.compiler import BaseBackend as Backend

import posenc_kernels.ops.cache.kernel as cache
import posenc_kernels.ops.learned.kernel as learned
import posenc_kernels.ops.qknorm.kernel as qknorm
import posenc_kernels.ops.relative.kernel as relative
import posenc_kernels.ops.rope.kernel as rope
import posenc_kernels.ops.sinusoidal.kernel as sinus
from posenc_dev import sass

TARGET = GPUTarget("cuda", 90, 32)


class Recorder:
    """Stands in for a JITFunction: records the launch instead of running it."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))

        return launch


def compile_call(fn, args, kwargs):
    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(names, fn.params)):
        value = bound[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        ty, spec = native_specialize_impl(Backend, value, False, True, True)
        if ty == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = spec
            continue
        signature[name] = ty
        if spec:
            attrs[(i,)] = Backend.parse_attr(spec)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=TARGET, options=options)


def _ptxas_path() -> str:
    """The ptxas Triton itself uses for sm_90 (its bundled one matching the PTX version it emits)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(90).path
    except TypeError:  # older Triton: get_ptxas() without arch
        return get_ptxas().path


PTXAS = _ptxas_path()


def ptxas_report(ptx: str) -> dict:
    """Registers, stack frame and spill bytes as ptxas reports them for sm_90a (Triton's own ptxas)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([PTXAS, "-arch=sm_90a", "-v", "-o", os.path.join(d, "k.cubin"), path],
                             capture_output=True, text=True, check=False)  # fmt: skip
    text = res.stdout + res.stderr
    if res.returncode != 0:
        return {"ptxas_error": text[-2000:]}

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None

    return {
        "registers": grab(r"Used (\d+) registers"),
        "stack_frame_bytes": grab(r"(\d+) bytes stack frame"),
        "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
        "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
    }


def ptx_facts(ptx: str) -> dict:
    lines = ptx.splitlines()

    def count(pattern):
        return sum(1 for line in lines if re.search(pattern, line))

    return {
        "local_memory": count(r"\b(ld|st)\.local\b"),
        "ld_v4": count(r"ld\.global(\.\w+)*\.v4\."),
        "st_v4": count(r"st\.global(\.\w+)*\.v4\."),
        "st_all": count(r"\bst\.global\."),
        # 16-bit scalar global accesses: an unvectorised bf16/fp16 path would show up here.
        "ld_b16_scalar": count(r"ld\.global(\.\w+)*\.(b16|u16|f16|bf16)\s"),
        "st_b16_scalar": count(r"st\.global(\.\w+)*\.(b16|u16|f16|bf16)\s"),
        "sin_approx": count(r"sin\.approx"),
        "cos_approx": count(r"cos\.approx"),
    }


def figures(compiled, grid, dram_bytes: int, trips: int = 1) -> dict:
    """Every static figure of one compiled launch (module doc)."""
    cubin = compiled.asm["cubin"]
    (name, ins), = sass.disassemble(cubin).items()
    res = sass.resources(cubin)[name]
    num_warps = compiled.metadata.num_warps
    smem = max(compiled.metadata.shared, res["shared"])
    programs = math.prod(grid)
    fig = {
        "kernel": name,
        "grid": list(grid),
        "programs": programs,
        "num_warps": num_warps,
        "shared_bytes": smem,
        "cubin_registers": res["regs"],  # what occupancy is computed from: Triton's own cubin
        **ptxas_report(compiled.asm["ptx"]),
        **ptx_facts(compiled.asm["ptx"]),
        **sass.kernel_figures(ins, trips),
        # every global store of the kernel, on the path or not (a kernel with program kinds, e.g. the v
        # programs of the cache write, has several paths)
        "all_stores": sass.access_widths(ins, sass.GLOBAL_STORES),
        **sass.occupancy(res["regs"], num_warps, smem),
        "dram_bytes_per_program": round(dram_bytes / programs, 1),
    }
    fig["instructions_per_byte"] = round(
        sass.instructions_per_byte(fig["path_instructions"], num_warps, dram_bytes / programs), 4
    )
    return fig


@contextlib.contextmanager
def recording(module, *names):
    """Swap ``module.<name>`` for a recorder for each name; yields ({name: jit}, {name: recorder})."""
    jits = {n: getattr(module, n) for n in names}
    recs = {n: Recorder() for n in names}
    for n, r in recs.items():
        setattr(module, n, r)
    try:
        yield jits, recs
    finally:
        for n, j in jits.items():
            setattr(module, n, j)


def resolve_grid(jit, grid, args, kwargs) -> tuple:
    """A launch's grid as ints (a callable grid gets every argument by name, as Triton's launcher passes)."""
    if callable(grid):
        grid = grid({**dict(zip(jit.arg_names, args)), **kwargs})
    return tuple(int(g) for g in grid)


def compile_recorded(jit, call, dram_bytes: int, trips: int = 1) -> dict:
    """Compile one recorded ``(grid, args, kwargs)`` launch of ``jit`` and read its figures."""
    grid, args, kwargs = call
    return figures(compile_call(jit, args, kwargs), resolve_grid(jit, grid, args, kwargs), dram_bytes, trips)


def record(module, kernel_name: str, launch, dram_bytes: int, trips: int = 1) -> dict:
    """Run ``launch`` with ``module.kernel_name`` recorded; compile the one launch it makes."""
    with recording(module, kernel_name) as (jits, recs):
        launch()
    (call,) = recs[kernel_name].calls
    return compile_recorded(jits[kernel_name], call, dram_bytes, trips)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@contextlib.contextmanager
def force_int64_indexing(module):
    """The launcher's 32-bit test sees every offset as too large: the IDX64 build of the kernel."""
    saved = module.I32_MAX
    module.I32_MAX = -1
    try:
        yield
    finally:
        module.I32_MAX = saved


# ---------------------------------------------------------------------------------------------- RoPE


def rope_case(B, S, Hq, Hk, D, R, dtype, *, interleaved=False, hf_layout=False, out_of_place=False, positions=False,
              offsets=False, angles="table", table_dtype=torch.float32, varlen=0, axes=0, idx64=False):  # fmt: skip
    """Record and compile the RoPE launch of one shape. ``varlen=N``: packed into N sequences."""
    if hf_layout:
        q = torch.empty(B, Hq, S, D, dtype=dtype).transpose(1, 2)
        k = torch.empty(B, Hk, S, D, dtype=dtype).transpose(1, 2)
    else:
        q = torch.empty(B, S, Hq, D, dtype=dtype)
        k = torch.empty(B, S, Hk, D, dtype=dtype)
    n_pos = S if not (offsets or positions) else B * S  # distinct table rows the launch reads
    cos = torch.empty(max(n_pos, S) + 8, R // 2, dtype=table_dtype) if angles == "table" else None
    inv = None if angles == "table" else torch.empty(R // 2, dtype=torch.float64 if angles == "exact" else torch.float32)
    pos = torch.zeros(B, S, dtype=torch.int64) if positions else None
    off = torch.zeros(B, dtype=torch.int64) if offsets else None
    axis_map = None
    if axes:
        pos = torch.zeros(axes, B, S, dtype=torch.int64)
        axis_map = torch.zeros(R // 2, dtype=torch.int32)
    cu = None
    if varlen:
        cu = torch.linspace(0, B * S, varlen + 1).to(torch.int32)
        q, k = (t.reshape(1, B * S, *t.shape[2:]) for t in (q, k))
    q_out = torch.empty_like(q) if out_of_place else q
    k_out = torch.empty_like(k) if out_of_place else k
    rows = cos[:n_pos] if cos is not None else None
    # in place only the rotary channels move; out of place every channel is read and written
    moved = 2 * nbytes(q, k) * (R / D if not out_of_place else 1)
    dram = moved + 2 * nbytes(rows) + nbytes(inv, pos, off, axis_map, cu)

    def launch():
        with force_int64_indexing(rope) if idx64 else contextlib.nullcontext():
            rope.rope_triton(q, k, q_out, k_out, cos, cos, inv, pos, off, 0, cu, axis_map, 1.0, interleaved, False,
                             angles == "exact")  # fmt: skip

    # the varlen search loop runs once per 256 sequences (positions.launch_args' cu_block)
    trips = -(-varlen // 256) if varlen else 1
    return record(rope, "_rope_kernel", launch, dram, trips)


LLAMA3 = dict(Hq=32, Hk=8, D=128, R=128, dtype=torch.bfloat16)
ROPE_CASES = {
    # Llama-3-8B (32 q heads, 8 kv heads, head_dim 128), bf16, fp32 tables, in place
    "rope_llama3_8b_prefill_bf16": dict(B=1, S=4096, **LLAMA3),
    "rope_llama3_8b_prefill_bf16_hf_layout": dict(B=2, S=2048, **LLAMA3, hf_layout=True),
    "rope_llama3_8b_prefill_bf16_tables": dict(B=1, S=4096, **LLAMA3, table_dtype=torch.bfloat16),
    "rope_llama3_8b_decode_bf16_offsets": dict(B=64, S=1, **LLAMA3, offsets=True),
    "rope_llama3_8b_decode_bf16_positions": dict(B=64, S=1, **LLAMA3, positions=True),
    "rope_llama3_8b_prefill_on_the_fly_bf16": dict(B=1, S=4096, **LLAMA3, angles="freq"),
    "rope_llama3_8b_prefill_exact_bf16": dict(B=1, S=4096, **LLAMA3, angles="exact"),
    "rope_llama3_8b_varlen_bf16": dict(B=4, S=1024, **LLAMA3, varlen=4),
    "rope_llama3_8b_prefill_bf16_idx64": dict(B=1, S=4096, **LLAMA3, idx64=True),
    "rope_llama3_interleaved_bf16": dict(B=1, S=4096, **LLAMA3, interleaved=True),
    # GPT-J: interleaved pairs, rotary 64 of head_dim 256
    "rope_gptj_interleaved_bf16": dict(B=1, S=2048, Hq=16, Hk=16, D=256, R=64, dtype=torch.bfloat16, interleaved=True),
    # head_dim 64 (GPT-NeoX-style 12 x 64 with 25% rotary and full rotary)
    "rope_headdim64_bf16": dict(B=1, S=2048, Hq=12, Hk=12, D=64, R=64, dtype=torch.bfloat16),
    "rope_headdim64_partial_bf16": dict(B=1, S=2048, Hq=12, Hk=12, D=64, R=16, dtype=torch.bfloat16),
    # Phi-2: head_dim 80, partial rotary 32, fp16, explicit positions
    "rope_phi2_partial_fp16_positions": dict(B=2, S=2048, Hq=32, Hk=32, D=80, R=32, dtype=torch.float16, positions=True),
    "rope_headdim80_fp16": dict(B=1, S=2048, Hq=32, Hk=32, D=80, R=80, dtype=torch.float16),
    # head_dim 256 (Gemma-7B: 16 heads; decode of a 1-kv-head variant)
    "rope_headdim256_bf16": dict(B=1, S=2048, Hq=16, Hk=16, D=256, R=256, dtype=torch.bfloat16),
    "rope_headdim256_decode_bf16_offsets": dict(B=64, S=1, Hq=8, Hk=1, D=256, R=256, dtype=torch.bfloat16, offsets=True),
    # out of place, partial rotary, fp32
    "rope_out_of_place_partial_fp32": dict(B=1, S=2048, Hq=8, Hk=8, D=256, R=64, dtype=torch.float32, out_of_place=True),
    # Qwen2-VL M-RoPE: 3 position axes
    "rope_mrope_bf16": dict(B=1, S=2048, Hq=28, Hk=4, D=128, R=128, dtype=torch.bfloat16, axes=3),
}  # fmt: skip


def rope_cos_sin_case():
    pos, inv = torch.arange(4096), torch.empty(64, dtype=torch.float32)
    cos, sin = torch.empty(4096, 64), torch.empty(4096, 64)
    return record(rope, "_rope_cos_sin_kernel", lambda: rope.cos_sin_triton(pos, inv, 1.0, cos, sin),
                  nbytes(pos, inv, cos, sin))  # fmt: skip


# ---------------------------------------------------------------------------------------------- QK-norm


def qknorm_case(B, S, Hq, Hk, D, R, dtype, *, norm=0, offsets=False, weights=True):
    """Record and compile the QK-norm + RoPE launch of one shape (in place, fp32 tables). Every channel of
    q and k is read and written once (the norm touches them all), plus the weights and the table rows."""
    q = torch.empty(B, S, Hq, D, dtype=dtype)
    k = torch.empty(B, S, Hk, D, dtype=dtype)
    n = D if norm == 0 else None
    qw = torch.empty(n or Hq * D, dtype=dtype) if weights else None
    kw = torch.empty(n or Hk * D, dtype=dtype) if weights else None
    n_pos = B * S if offsets else S
    cos = torch.empty(n_pos + 8, R // 2, dtype=torch.float32)
    off = torch.zeros(B, dtype=torch.int64) if offsets else None
    dram = 2 * nbytes(q, k) + nbytes(qw, kw) + 2 * nbytes(cos[:n_pos]) + nbytes(off)

    def launch():
        qknorm.qk_norm_rope_triton(q, k, q, k, qw, kw, 1e-6, norm, 0.0, cos, cos, None, None, off, 0, None, None,
                                   1.0, False, False, False)  # fmt: skip

    return record(qknorm, "_prologue_kernel", launch, dram)


QKNORM_CASES = {
    # Qwen3-8B: per-head norm, 32 q / 8 kv heads x 128, bf16
    "qknorm_qwen3_8b_prefill_bf16": dict(B=1, S=4096, Hq=32, Hk=8, D=128, R=128, dtype=torch.bfloat16),
    "qknorm_qwen3_8b_decode_bf16_offsets": dict(B=64, S=1, Hq=32, Hk=8, D=128, R=128, dtype=torch.bfloat16,
                                                offsets=True),
    # Wan-style cross-head norm: 40 x 128 for q and k, statistics over all heads of a token
    "qknorm_wan_heads_prefill_bf16": dict(B=1, S=4096, Hq=40, Hk=40, D=128, R=128, dtype=torch.bfloat16, norm=1),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- RoPE + cache


def cache_case(T, Hq, Hk, D, R, dtype, *, Dv=None, cache_dtype=None, interleaved=False, norm=-1, mla=False,
               num_blocks=512, block_size=16):  # fmt: skip
    """Record and compile a paged RoPE + KV-cache write (vLLM's layout: q/k/v ``[T, H, D]``, NHD caches
    ``[num_blocks, block_size, Hk, D]``, int64 slots, positions per token, fp32 tables), in place. FP8 caches
    take per-tensor scale tensors (vLLM's ``k_scale``). ``mla``: DeepSeek's latent cache, q a slice of
    ``[T, H, 128 + R]``, the k and v caches two column ranges of one ``[.., .., Dv + R]`` cache. DRAM bytes:
    q's and k's rotary channels read and written, k's other channels read, v read, the cache rows written,
    the slots, positions and table rows read (norm: every channel of q and k read and written, the weights)."""
    Dv = D if Dv is None else Dv
    cache_dtype = cache_dtype or dtype
    if mla:
        q = torch.empty(T, Hq, 128 + D, dtype=dtype)[..., 128:]
        kv = torch.empty(num_blocks, block_size, Dv + D, dtype=cache_dtype)
        kc, vc = kv[..., Dv:].unsqueeze(2), kv[..., :Dv].unsqueeze(2)
    else:
        q = torch.empty(T, Hq, D, dtype=dtype)
        kc = torch.empty(num_blocks, block_size, Hk, D, dtype=cache_dtype)
        vc = torch.empty(num_blocks, block_size, Hk, Dv, dtype=cache_dtype)
    k, v = torch.empty(T, Hk, D, dtype=dtype), torch.empty(T, Hk, Dv, dtype=dtype)
    slots, pos = torch.zeros(T, dtype=torch.int64), torch.zeros(T, dtype=torch.int64)
    cos = torch.empty(T + 8, R // 2, dtype=torch.float32)
    fp8 = cache_dtype in cache.FP8_MAX
    ks = torch.ones((), dtype=torch.float32) if fp8 else None
    n = D if norm == 0 else None
    qw, kw = (torch.empty(D, dtype=dtype), torch.empty(D, dtype=dtype)) if norm >= 0 else (None, None)
    q4, k4, v4 = (t.unsqueeze(0) for t in (q, k, v))
    rows_cache = T * (Hk * D + Hk * Dv) * torch.finfo(cache_dtype).bits // 8
    moved = 2 * nbytes(q, k) * (R / D if norm < 0 else 1)
    dram = moved + nbytes(k) * (1 - R / D if norm < 0 else 0) + nbytes(v) + rows_cache + 2 * nbytes(cos[:T])
    dram += nbytes(slots, pos, ks, qw, kw)

    def launch():
        cache.rope_and_cache_triton(q4, k4, v4, q4, k4, kc, vc, None, slots, None, ks, ks if fp8 else None, None,
                                    None, None, None, qw, kw, 1e-6, norm, 0.0, cos, cos, None, pos, None, 0, None,
                                    None, 1.0, interleaved, False, False)  # fmt: skip

    return record(cache, "_prologue_kernel", launch, dram)


CACHE_CASES = {
    # Llama-3-8B (32 q / 8 kv heads x 128), bf16, bf16 paged cache: one decode token; a 16-token block
    "cache_llama3_8b_decode_bf16": dict(T=1, **LLAMA3),
    "cache_llama3_8b_prefill16_bf16": dict(T=16, **LLAMA3),
    # the same block into an FP8 (e4m3) cache with per-tensor scale tensors
    "cache_llama3_8b_prefill16_fp8_e4m3": dict(T=16, **LLAMA3, cache_dtype=torch.float8_e4m3fn),
    # Qwen3-8B (the same head counts), one decode token: per-head QK-norm + RoPE + cache write, one launch
    "cache_qwen3_8b_norm_decode_bf16": dict(T=1, **LLAMA3, norm=0),
    # DeepSeek MLA: 128 heads' rope part (64, interleaved) of q, k_pe 64, the 512-wide latent as v
    "cache_mla_decode16_bf16": dict(T=16, Hq=128, Hk=1, D=64, R=64, dtype=torch.bfloat16, Dv=512, interleaved=True,
                                    mla=True),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- absolute


def sinusoidal_case(B, S, D, dtype, *, add=True, interleaved=True, offsets=False, idx64=False):
    x = torch.empty(B, S, D, dtype=dtype)
    inv = torch.empty(D // 2, dtype=torch.float32)
    off = torch.zeros(B, dtype=torch.int64) if offsets else None
    dram = nbytes(x) * (2 if add else 1) + nbytes(inv, off)

    def launch():
        with force_int64_indexing(sinus) if idx64 else contextlib.nullcontext():
            sinus.sinusoidal_triton(x if add else None, x, None, off, 0, 1.0, inv, 1.0, interleaved, False)

    return record(sinus, "_sinusoidal_kernel", launch, dram)


def learned_add_case(B, S, D, dtype, table_dtype, idx64=False):
    x, table = torch.empty(B, S, D, dtype=dtype), torch.empty(2048, D, dtype=table_dtype)
    pos = torch.zeros(B, S, dtype=torch.int64)
    dram = 2 * nbytes(x) + nbytes(table[:S], pos)

    def launch():
        with force_int64_indexing(learned) if idx64 else contextlib.nullcontext():
            learned.pe_add_triton(x, x, table, pos)

    return record(learned, "_pe_add_kernel", launch, dram)


def learned_grad_case(B, S, D, dtype, deterministic):
    g, out = torch.empty(B, S, D, dtype=dtype), torch.empty(1024, D, dtype=dtype)
    pos = torch.zeros(B, S, dtype=torch.int64)
    kernel = "_pe_grad_sorted_kernel" if deterministic else "_pe_grad_atomic_kernel"
    return record(learned, kernel, lambda: learned.grad_table_triton(g, pos, out, -1, deterministic),
                  nbytes(g, pos) + nbytes(out) * (1 if deterministic else 2))  # fmt: skip


# ---------------------------------------------------------------------------------------------- relative


def alibi_case(H, Lq, Lk, dtype):
    out, slopes = torch.empty(H, Lq, Lk, dtype=dtype), torch.empty(H)
    heads_per_program = relative._bias_blocks(H, Lq, Lk)[4]  # the head loop's trips
    return record(relative, "_alibi_kernel", lambda: relative.alibi_triton(out, slopes, Lq, Lk, True, 0), nbytes(out),
                  heads_per_program)  # fmt: skip


def t5_case(H, Lq, Lk, dtype):
    out, table = torch.empty(H, Lq, Lk, dtype=dtype), torch.empty(32, H)
    return record(relative, "_t5_bias_kernel", lambda: relative.t5_triton(out, table, Lq, Lk, 0, True, 128),
                  nbytes(out, table), relative._bias_blocks(H, Lq, Lk)[4])  # fmt: skip


def t5_grad_case(kernel_name: str):
    """The T5 backward launches two kernels (the diagonal sums, then the bucket gradient): compile one."""
    grad, gtable = torch.empty(32, 1024, 1024), torch.empty(32, 32)
    diag = 32 * (2 * 1024 - 1) * 4  # the fp32 diagonal sums, written by the first, read by the second
    dram = {"_diagonal_sum_kernel": nbytes(grad) + diag, "_t5_bucket_grad_kernel": diag + nbytes(gtable)}
    with recording(relative, *dram) as (jits, recs):
        relative.t5_backward_triton(grad, gtable, 1024, 1024, 0, True, 128)
    (call,) = recs[kernel_name].calls
    return compile_recorded(jits[kernel_name], call, dram[kernel_name])


# Every case: name -> what compiles it (tests/static/test_kernel_sass.py parametrises over these names).
CASES = {
    **{name: (lambda kw=kw: rope_case(**kw)) for name, kw in ROPE_CASES.items()},
    "rope_cos_sin": rope_cos_sin_case,
    **{name: (lambda kw=kw: qknorm_case(**kw)) for name, kw in QKNORM_CASES.items()},
    **{name: (lambda kw=kw: cache_case(**kw)) for name, kw in CACHE_CASES.items()},
    "add_sinusoidal_bf16_d4096": lambda: sinusoidal_case(8, 4096, 4096, torch.bfloat16),
    "add_sinusoidal_bf16_d4096_halves": lambda: sinusoidal_case(8, 4096, 4096, torch.bfloat16, interleaved=False),
    "add_sinusoidal_bf16_d4096_offsets": lambda: sinusoidal_case(8, 4096, 4096, torch.bfloat16, offsets=True),
    "add_sinusoidal_bf16_d4096_idx64": lambda: sinusoidal_case(8, 4096, 4096, torch.bfloat16, idx64=True),
    "add_sinusoidal_fp32_d1023": lambda: sinusoidal_case(2, 1024, 1023, torch.float32),
    "sinusoidal_table_fp32_d512": lambda: sinusoidal_case(1, 4096, 512, torch.float32, add=False),
    "learned_add_gpt2_bf16_d768": lambda: learned_add_case(8, 1024, 768, torch.bfloat16, torch.bfloat16),
    "learned_add_gpt2_bf16_d768_idx64": lambda: learned_add_case(8, 1024, 768, torch.bfloat16, torch.bfloat16, idx64=True),
    "learned_add_fp16_d1023": lambda: learned_add_case(4, 256, 1023, torch.float16, torch.float32),
    "learned_grad_atomic_bf16_d768": lambda: learned_grad_case(8, 1024, 768, torch.bfloat16, False),
    "learned_grad_sorted_fp32_d4096": lambda: learned_grad_case(2, 512, 4096, torch.float32, True),
    "alibi_bias_bf16": lambda: alibi_case(32, 4096, 4096, torch.bfloat16),
    "alibi_bias_fp32_decode": lambda: alibi_case(32, 1, 4096, torch.float32),
    "t5_bias_bf16": lambda: t5_case(32, 1024, 1024, torch.bfloat16),
    "t5_grad_diagonal_sum": lambda: t5_grad_case("_diagonal_sum_kernel"),
    "t5_grad_buckets": lambda: t5_grad_case("_t5_bucket_grad_kernel"),
}  # fmt: skip


def main():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    json.dump({"triton": triton.__version__, "cases": {n: f() for n, f in CASES.items()}}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
