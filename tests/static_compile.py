"""Compile every Triton kernel for sm_90 without a GPU and report facts about its PTX.

Run as a script in a process WITHOUT ``TRITON_INTERPRET`` (the test suite does this in a subprocess).
The real launchers run on CPU tensors of real model shapes with the kernel objects swapped for
recorders, so each kernel is compiled with exactly the arguments, constexprs and divisibility
specialisations a launch of those shapes would use (Triton's own ``native_specialize_impl``).
Prints one JSON object: case name -> facts.
"""

import json
import os
import re
import sys

import torch
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

try:
    from triton.backends.nvidia.compiler import CUDABackend as Backend
except ImportError:  # pragma: no cover
    from triton.backends.compiler import BaseBackend as Backend

import posenc_kernels.ops.learned.kernel as learned  # noqa: E402
import posenc_kernels.ops.relative.kernel as relative  # noqa: E402
import posenc_kernels.ops.rope.kernel as rope  # noqa: E402
import posenc_kernels.ops.sinusoidal.kernel as sinus  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class Recorder:
    """Stands in for a JITFunction: records the launch instead of running it."""

    def __init__(self, fn):
        self.fn = fn
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
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, TypeError):  # older Triton: get_ptxas() without arch
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas().path


PTXAS = _ptxas_path()


def ptxas_report(ptx: str) -> dict:
    """Registers, stack frame and spill bytes as ptxas reports them for sm_90a (Triton's own ptxas)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([PTXAS, "-arch=sm_90a", "-v", "-o", os.path.join(d, "k.cubin"), path],
                             capture_output=True, text=True)  # fmt: skip
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


def facts(compiled):
    ptx = compiled.asm["ptx"]
    lines = ptx.splitlines()

    def count(pattern):
        return sum(1 for line in lines if re.search(pattern, line))

    return {
        "local_memory": count(r"\b(ld|st)\.local\b"),
        "ld_v4": count(r"ld\.global(\.\w+)*\.v4\."),
        "st_v4": count(r"st\.global(\.\w+)*\.v4\."),
        "ld_v2": count(r"ld\.global(\.\w+)*\.v2\."),
        "st_v2": count(r"st\.global(\.\w+)*\.v2\."),
        "st_all": count(r"\bst\.global\."),
        # 16-bit scalar global accesses: an unvectorised bf16/fp16 path would show up here.
        "ld_b16_scalar": count(r"ld\.global(\.\w+)*\.(b16|u16|f16|bf16)\s"),
        "st_b16_scalar": count(r"st\.global(\.\w+)*\.(b16|u16|f16|bf16)\s"),
        "sin_approx": count(r"sin\.approx"),
        "cos_approx": count(r"cos\.approx"),
        **ptxas_report(ptx),
    }


def rope_case(B, S, Hq, Hk, D, R, dtype, *, interleaved=False, hf_layout=False, out_of_place=False, positions=False,
              angles="table", varlen=False, axes=0):
    if hf_layout:
        q = torch.empty(B, Hq, S, D, dtype=dtype).transpose(1, 2)
        k = torch.empty(B, Hk, S, D, dtype=dtype).transpose(1, 2)
    else:
        q = torch.empty(B, S, Hq, D, dtype=dtype)
        k = torch.empty(B, S, Hk, D, dtype=dtype)
    cos = torch.empty(S + 8, R // 2, dtype=torch.float32) if angles == "table" else None
    inv = None if angles == "table" else torch.empty(R // 2, dtype=torch.float64 if angles == "exact" else torch.float32)
    pos = torch.zeros(B, S, dtype=torch.int64) if positions else None
    axis_map = None
    if axes:
        pos = torch.zeros(axes, B, S, dtype=torch.int64)
        axis_map = torch.zeros(R // 2, dtype=torch.int32)
    cu = torch.tensor([0, S * B], dtype=torch.int32) if varlen else None
    q_out = torch.empty_like(q) if out_of_place else q
    k_out = torch.empty_like(k) if out_of_place else k
    if varlen:  # packed [T, H, D] arrives at the launcher as [1, T, H, D]
        q, k, q_out, k_out = (t.reshape(1, B * S, *t.shape[2:]) for t in (q, k, q_out, k_out))
    rope.rope_triton(q, k, q_out, k_out, cos, cos, inv, pos, None, 0, cu, axis_map, 1.0, interleaved, False,
                     angles == "exact")  # fmt: skip


def main():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    out = {}
    rec = Recorder(rope._rope_kernel.fn if hasattr(rope._rope_kernel, "fn") else rope._rope_kernel)
    rope_jit = rope._rope_kernel
    rope._rope_kernel = rec
    cases = {
        "rope_llama3_8b_bf16": dict(B=1, S=64, Hq=32, Hk=8, D=128, R=128, dtype=torch.bfloat16),
        "rope_llama3_8b_bf16_hf_layout": dict(B=2, S=64, Hq=32, Hk=8, D=128, R=128, dtype=torch.bfloat16, hf_layout=True),
        "rope_gptj_interleaved_bf16": dict(B=1, S=64, Hq=16, Hk=16, D=256, R=64, dtype=torch.bfloat16, interleaved=True),
        "rope_llama3_interleaved_bf16": dict(B=1, S=64, Hq=32, Hk=8, D=128, R=128, dtype=torch.bfloat16, interleaved=True),
        "rope_phi2_fp16_positions": dict(B=2, S=64, Hq=32, Hk=32, D=80, R=32, dtype=torch.float16, positions=True),
        "rope_headdim80_fp16": dict(B=1, S=64, Hq=32, Hk=32, D=80, R=80, dtype=torch.float16),
        "rope_out_of_place_partial_fp32": dict(B=1, S=64, Hq=8, Hk=8, D=256, R=64, dtype=torch.float32, out_of_place=True),
        "rope_decode_gemma_bf16": dict(B=64, S=1, Hq=8, Hk=1, D=256, R=256, dtype=torch.bfloat16),
        "rope_on_the_fly_bf16": dict(B=1, S=64, Hq=32, Hk=8, D=128, R=128, dtype=torch.bfloat16, angles="freq"),
        "rope_exact_bf16": dict(B=1, S=64, Hq=32, Hk=8, D=128, R=128, dtype=torch.bfloat16, angles="exact"),
        "rope_varlen_bf16": dict(B=1, S=64, Hq=32, Hk=8, D=128, R=128, dtype=torch.bfloat16, varlen=True),
        "rope_mrope_bf16": dict(B=1, S=64, Hq=28, Hk=4, D=128, R=128, dtype=torch.bfloat16, axes=3),
    }
    for name, kw in cases.items():
        rec.calls.clear()
        rope_case(**kw)
        (grid, args, kwargs), = rec.calls
        out[name] = facts(compile_call(rope_jit, args, kwargs))
    rope._rope_kernel = rope_jit

    rec = Recorder(None)
    cs_jit = rope._rope_cos_sin_kernel
    rope._rope_cos_sin_kernel = rec
    inv = torch.empty(64, dtype=torch.float32)
    rope.cos_sin_triton(torch.arange(4096), inv, 1.0, torch.empty(4096, 64), torch.empty(4096, 64))
    (grid, args, kwargs), = rec.calls
    out["rope_cos_sin"] = facts(compile_call(cs_jit, args, kwargs))
    rope._rope_cos_sin_kernel = cs_jit

    rec = Recorder(None)
    sin_jit = sinus._sinusoidal_kernel
    sinus._sinusoidal_kernel = rec
    sin_cases = {
        "add_sinusoidal_bf16_d4096": (torch.empty(2, 64, 4096, dtype=torch.bfloat16), True, True),
        "add_sinusoidal_bf16_d4096_halves": (torch.empty(2, 64, 4096, dtype=torch.bfloat16), True, False),
        "add_sinusoidal_fp32_d1023": (torch.empty(2, 64, 1023, dtype=torch.float32), True, True),
        "sinusoidal_table_fp32_d512": (torch.empty(1, 256, 512, dtype=torch.float32), False, False),
    }
    for name, (x, has_x, interleaved) in sin_cases.items():
        rec.calls.clear()
        inv_freq = torch.empty(x.shape[-1] // 2, dtype=torch.float32)
        sinus.sinusoidal_triton(x if has_x else None, x, None, None, 0, 1.0, inv_freq, 1.0, interleaved, False)
        (grid, args, kwargs), = rec.calls
        out[name] = facts(compile_call(sin_jit, args, kwargs))
    out.update(learned_cases())
    out.update(relative_cases())
    json.dump(out, sys.stdout, indent=1)


def record(module, kernel_name, launch):
    """Run ``launch`` with ``module.kernel_name`` swapped for a recorder; compile what it recorded."""
    jit = getattr(module, kernel_name)
    rec = Recorder(None)
    setattr(module, kernel_name, rec)
    try:
        launch()
    finally:
        setattr(module, kernel_name, jit)
    (grid, args, kwargs), = rec.calls
    return facts(compile_call(jit, args, kwargs))


def learned_cases():
    def fwd(B, S, D, dt, tdt):
        x, t = torch.empty(B, S, D, dtype=dt), torch.empty(1024, D, dtype=tdt)
        return lambda: learned.pe_add_triton(x, x, t, torch.zeros(B, S, dtype=torch.int64))

    def bwd(B, S, D, dt, det):
        g, out = torch.empty(B, S, D, dtype=dt), torch.empty(1024, D, dtype=dt)
        return lambda: learned.grad_table_triton(g, torch.zeros(B, S, dtype=torch.int64), out, -1, det)

    return {
        "learned_add_gpt2_bf16_d768": record(learned, "_pe_add_kernel", fwd(8, 1024, 768, torch.bfloat16, torch.bfloat16)),
        "learned_add_fp16_d1023": record(learned, "_pe_add_kernel", fwd(4, 256, 1023, torch.float16, torch.float32)),
        "learned_grad_atomic_bf16_d768": record(learned, "_pe_grad_atomic_kernel", bwd(8, 1024, 768, torch.bfloat16, False)),
        "learned_grad_sorted_fp32_d4096": record(learned, "_pe_grad_sorted_kernel", bwd(2, 512, 4096, torch.float32, True)),
    }



def relative_cases():
    def alibi(H, Lq, Lk, dt):
        out, slopes = torch.empty(H, Lq, Lk, dtype=dt), torch.empty(H)
        return lambda: relative.alibi_triton(out, slopes, Lq, Lk, True, 0)

    def t5(H, Lq, Lk, dt):
        out, table = torch.empty(H, Lq, Lk, dtype=dt), torch.empty(32, H)
        return lambda: relative.t5_triton(out, table, Lq, Lk, 0, True, 128)

    def t5_bwd():
        grad, gtable = torch.empty(32, 1024, 1024), torch.empty(32, 32)
        return lambda: relative.t5_backward_triton(grad, gtable, 1024, 1024, 0, True, 128)

    def record_both():
        # The backward launches two kernels: record both in one run.
        jits = {n: getattr(relative, n) for n in ("_diagonal_sum_kernel", "_t5_bucket_grad_kernel")}
        recs = {n: Recorder(None) for n in jits}
        for n, r in recs.items():
            setattr(relative, n, r)
        try:
            t5_bwd()()
        finally:
            for n, j in jits.items():
                setattr(relative, n, j)
        return {n: facts(compile_call(jits[n], *recs[n].calls[0][1:])) for n in jits}

    bwd = record_both()
    return {
        "alibi_bias_bf16": record(relative, "_alibi_kernel", alibi(32, 4096, 4096, torch.bfloat16)),
        "alibi_bias_fp32_decode": record(relative, "_alibi_kernel", alibi(32, 1, 4096, torch.float32)),
        "t5_bias_bf16": record(relative, "_t5_bias_kernel", t5(32, 1024, 1024, torch.bfloat16)),
        "t5_grad_diagonal_sum": bwd["_diagonal_sum_kernel"],
        "t5_grad_buckets": bwd["_t5_bucket_grad_kernel"],
    }


if __name__ == "__main__":
    main()
