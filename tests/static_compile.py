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

import posenc_kernels.rope as rope  # noqa: E402
import posenc_kernels.sinusoidal as sinus  # noqa: E402

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


def rope_case(B, S, Hq, Hk, D, R, dtype, *, interleaved=False, hf_layout=False, out_of_place=False, positions=False):
    if hf_layout:
        q = torch.empty(B, Hq, S, D, dtype=dtype).transpose(1, 2)
        k = torch.empty(B, Hk, S, D, dtype=dtype).transpose(1, 2)
    else:
        q = torch.empty(B, S, Hq, D, dtype=dtype)
        k = torch.empty(B, S, Hk, D, dtype=dtype)
    cos = torch.empty(S + 8, R // 2, dtype=torch.float32)
    pos = torch.zeros(B, S, dtype=torch.int64) if positions else None
    q_out = torch.empty_like(q) if out_of_place else q
    k_out = torch.empty_like(k) if out_of_place else k
    rope._rope_triton(q, k, q_out, k_out, cos, cos, pos, None, 0, interleaved, False)


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
    rope._cos_sin_triton(torch.arange(4096), inv, 1.0, torch.empty(4096, 64), torch.empty(4096, 64))
    (grid, args, kwargs), = rec.calls
    out["rope_cos_sin"] = facts(compile_call(cs_jit, args, kwargs))
    rope._rope_cos_sin_kernel = cs_jit

    rec = Recorder(None)
    sin_jit = sinus._sinusoidal_kernel
    sinus._sinusoidal_kernel = rec
    # resolve_backend picks torch on CPU; force the Triton path for the recorder.
    sinus.resolve_backend = lambda device: "triton"
    sin_cases = {
        "add_sinusoidal_bf16_d4096": (torch.empty(2, 64, 4096, dtype=torch.bfloat16), True, True),
        "add_sinusoidal_bf16_d4096_halves": (torch.empty(2, 64, 4096, dtype=torch.bfloat16), True, False),
        "add_sinusoidal_fp32_d1023": (torch.empty(2, 64, 1023, dtype=torch.float32), True, True),
        "sinusoidal_table_fp32_d512": (torch.empty(1, 256, 512, dtype=torch.float32), False, False),
    }
    for name, (x, has_x, interleaved) in sin_cases.items():
        rec.calls.clear()
        sinus._sinusoidal_launch(x if has_x else None, x, None, None, 0, 1.0, 1e4, interleaved, False, 0.0, 1.0)
        (grid, args, kwargs), = rec.calls
        out[name] = facts(compile_call(sin_jit, args, kwargs))
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
