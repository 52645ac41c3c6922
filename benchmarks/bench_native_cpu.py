"""The native CPU RoPE kernel (csrc/rope_cpu.cpp) through the public API, against the HF-style references.

    python -m pytest benchmarks/bench_native_cpu.py -p no:cacheprovider --benchmark-json=bench-results/native_cpu.json

Prefill [1, 4096, 32/8, 128] (Llama-3-8B) in fp32 and bf16: ``pk.apply_rope_`` on the native backend (and
on the pure-torch backend, the CPU path before), the HF-style eager reference (``x * cos + rotate_half(x) *
sin`` on [B, H, S, D] with cos/sin gathered per token and duplicated to [1, S, D] in the activations' dtype,
as HF's rotary module hands them over) and ``torch.compile`` of that reference. Decode (one token): the same
providers plus an empty mutating ``torch.library.custom_op`` (q, k, cos, sin: the floor of a Python custom
op call), an empty one with posenc::rope_'s 14-argument schema, and the bare ``torch.ops.posenc.native_rope``
call. Timing: pytest-benchmark pedantic,
wall clock, median; decode times are per call over batches of calls. The last test prints the ratios of
this run (the figures to quote: absolute times drift with machine load).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels.configs import MODEL_CONFIGS
from posenc_kernels.reference import hf_apply_rotary_pos_emb

from _harness import IS_CUDA, device_name, record, run

# On a CUDA machine nothing here runs, and the extension is not even loaded (short-circuit: no build).
_SKIP = "CPU benchmarks (the CUDA kernels are measured by bench_rope.py)" if IS_CUDA else (
    None if _native.has_op("rope", "cpu") else f"native extension unavailable: {_native.load_error()}"
)
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

CFG = MODEL_CONFIGS["llama3-8b"]
PREFILL = [(4096, torch.float32), (4096, torch.bfloat16)]
DECODE = [(1, torch.float32), (1, torch.bfloat16)]
PROVIDERS = ["posenc_native", "posenc_torch", "hf_eager", "hf_compiled"]
DECODE_PROVIDERS = PROVIDERS + ["empty_custom_op", "empty_custom_op_14args", "native_op_direct"]

_RESULTS: dict = {}  # (tokens, dtype name) -> {provider: median us}
_compiled_hf = None


@torch.library.custom_op("posenc_bench::empty_rope_", mutates_args=("q", "k"))
def _empty_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The same mutating signature as posenc::rope_, doing nothing: what any Python custom op costs."""


@torch.library.custom_op("posenc_bench::empty_rope14_", mutates_args=("q", "k"))
def _empty_rope14_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    inv_freq: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    cu_seqlens: Optional[torch.Tensor],
    axis_map: Optional[torch.Tensor],
    attention_factor: float,
    interleaved: bool,
    conjugate: bool,
    exact: bool,
) -> None:
    """posenc::rope_'s own 14-argument mutating schema, doing nothing: torch's custom-op machinery for it
    (torch._library.utils.fill_defaults is quadratic in the argument count) is most of apply_rope_'s cost."""


def _backend_for(provider):
    return pk.use_backend(provider.split("_")[1]) if provider in ("posenc_native", "posenc_torch") else nullcontext()


def _setup(tokens, dtype):
    q = torch.randn(1, tokens, CFG.num_heads_q, CFG.head_dim, dtype=dtype)
    k = torch.randn(1, tokens, CFG.num_heads_kv, CFG.head_dim, dtype=dtype)
    inv = pk.rope_frequencies(CFG.rotary_dim, CFG.rope_theta)[0]
    cos, sin = pk.rope_cos_sin(max(tokens, 4096), inv)
    return q, k, cos, sin


def _providers(provider, tokens, dtype):
    global _compiled_hf
    q, k, cos, sin = _setup(tokens, dtype)
    if provider in ("posenc_native", "posenc_torch"):  # the backend is set around the timing (_backend_for)
        return lambda: pk.apply_rope_(q, k, cos, sin)
    if provider == "empty_custom_op":
        return lambda: _empty_rope_(q, k, cos, sin)
    if provider == "empty_custom_op_14args":
        return lambda: _empty_rope14_(q, k, cos, sin, None, None, None, 0, None, None, 1.0, False, False, False)
    if provider == "native_op_direct":
        op = torch.ops.posenc.native_rope.default
        return lambda: op(q, k, q, k, cos, sin, None, None, None, 0, 1.0, False, False, False)
    # HF layout [B, H, S, D]; cos/sin as HF's rotary module returns them: [1, S, D] in the activations' dtype.
    qh, kh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    c = torch.cat((cos[:tokens], cos[:tokens]), -1)[None].to(dtype)
    s = torch.cat((sin[:tokens], sin[:tokens]), -1)[None].to(dtype)
    if provider == "hf_eager":
        return lambda: hf_apply_rotary_pos_emb(qh, kh, c, s)
    if _compiled_hf is None:
        _compiled_hf = torch.compile(hf_apply_rotary_pos_emb, dynamic=False)
    return lambda: _compiled_hf(qh, kh, c, s)


def _record(tokens, dtype, provider, median_us):
    _RESULTS.setdefault((tokens, str(dtype).replace("torch.", "")), {})[provider] = median_us


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", PREFILL, ids=lambda c: f"{c[0]}tok-{str(c[1]).replace('torch.', '')}")
def test_prefill(benchmark, case, provider):
    tokens, dtype = case
    fn = _providers(provider, tokens, dtype)
    nbytes = 2 * tokens * (CFG.num_heads_q + CFG.num_heads_kv) * CFG.head_dim * dtype.itemsize
    with _backend_for(provider):
        run(benchmark, fn, op="apply_rope_ CPU", shape=f"llama3-8b {tokens} tok {str(dtype).replace('torch.', '')}",
            provider=provider, nbytes=nbytes)  # fmt: skip
    _record(tokens, dtype, provider, benchmark.extra_info["median_us"])


@pytest.mark.parametrize("provider", DECODE_PROVIDERS)
@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"{c[0]}tok-{str(c[1]).replace('torch.', '')}")
def test_decode(benchmark, case, provider):
    """Per-call cost at one token: dispatch-bound, so calls are timed in batches of 200."""
    tokens, dtype = case
    fn = _providers(provider, tokens, dtype)
    iters = 200
    with _backend_for(provider):
        for _ in range(50):  # warm-up (compile, caches, the extension load)
            fn()
        benchmark.pedantic(fn, rounds=25, iterations=iters, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    median_us = benchmark.stats.stats.median * 1e6
    record(
        benchmark, op="apply_rope_ CPU decode", shape=f"llama3-8b 1 tok {str(dtype).replace('torch.', '')}",
        provider=provider, nbytes=0, median_us=median_us, copy_us=0.0,
        timing=f"pytest-benchmark pedantic median of 25 rounds x {iters} calls, wall clock",
    )  # fmt: skip
    _record(tokens, dtype, provider, median_us)


def test_summary():
    """The targets, as ratios of this run: prefill >= 3x hf_eager and faster than hf_compiled; decode
    within 2x of an empty custom op. Printed (run with -s to see it), not asserted: a loaded machine moves
    absolute times, and a benchmark is not a correctness test."""
    if not _RESULTS:
        pytest.skip("run the whole file to get the summary")
    lines = [f"native CPU RoPE, {device_name()}, torch {torch.__version__}, capability "
             f"{torch.backends.cpu.get_cpu_capability()}", "",
             "| case | provider | median us | hf_eager / this | hf_compiled / this | this / empty op |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for (tokens, dt), res in sorted(_RESULTS.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        for prov, us in sorted(res.items(), key=lambda kv: kv[1]):
            eager = f"{res['hf_eager'] / us:.2f}x" if "hf_eager" in res else "-"
            comp = f"{res['hf_compiled'] / us:.2f}x" if "hf_compiled" in res else "-"
            empty = f"{us / res['empty_custom_op']:.2f}x" if "empty_custom_op" in res else "-"
            lines.append(f"| [1, {tokens}, 32/8, 128] {dt} | {prov} | {us:.1f} | {eager} | {comp} | {empty} |")
    print("\n" + "\n".join(lines))
