"""The native CPU kernels (csrc/) through the public API: RoPE prefill against the HF-style references, and
the host cost of a decode call against the bare op and a one-op aten call.

    python -m pytest benchmarks/bench_native_cpu.py -s -p no:cacheprovider --benchmark-json=bench-results/native_cpu.json

Prefill [1, 4096, 32/8, 128] (Llama-3-8B) in fp32 and bf16: ``pk.apply_rope_`` on the native kernel (the
default CPU backend) and on the pure-torch backend, the HF-style eager reference (``x * cos +
rotate_half(x) * sin`` on [B, H, S, D] with cos/sin gathered per token and duplicated to [1, S, D] in the
activations' dtype, as HF's rotary module hands them over) and ``torch.compile`` of that reference.

Threads under contention (``test_thread_scaling``, issue 21): ``pk.apply_rope_`` on Llama-3-8B bf16 at 4096
and 512 tokens with 1 thread and with the default thread count, beside ``x.mul_(1.0)`` over the same bytes
(torch's own elementwise op), on the machine as it is and with two busy background processes started by
the test (``python -c "while 1: pass"``, killed after). The four calls are timed in interleaved rounds
(one call each per round, the order reversed every other round), so a change in the machine's load hits
all four alike and none always runs on the cache another left warm; the figure is the
N-thread/1-thread ratio of the median times, ours beside mul_'s (lower is better; 1.0: the second thread
neither helps nor hurts).

Host cost at decode (one token, an offsets tensor, one thread): each public in-place function
(``apply_rope_``, ``add_sinusoidal_``, ``add_position_embedding_``) beside the bare call of its op
(``torch.ops.posenc.<op>.default``, whose CPU kernel is the C++ one: registered straight for the op's CPU
dispatch key) and ``q.mul_(1.0)``, a one-op aten call. Targets (issue 9): apply_rope_ <= 1.5x its bare op;
each public function <= 2.5x the aten call. Timing: pytest-benchmark pedantic, wall clock, median of
rounds of 200 calls. The last test prints the ratios of this run (the figures to quote: absolute times
drift with machine load).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels.configs import MODEL_CONFIGS
from posenc_kernels.reference import hf_apply_rotary_pos_emb

from _harness import IS_CUDA, device_name, record, run

# On a CUDA machine nothing here runs, and the extension is not even loaded (short-circuit: no build).
_SKIP = "CPU benchmarks (the CUDA kernels are measured by bench_rope.py)" if IS_CUDA else (
    None if "rope_" in _native.ops_for("CPU") else f"native extension unavailable: {_native.load_error()}"
)
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

CFG = MODEL_CONFIGS["llama3-8b"]
PREFILL = [(4096, torch.float32), (4096, torch.bfloat16)]
DECODE = [(1, torch.float32), (1, torch.bfloat16)]
PROVIDERS = ["posenc_native", "posenc_torch", "hf_eager", "hf_compiled"]
DECODE_PROVIDERS = PROVIDERS + ["empty_custom_op", "rope_op_bare", "aten_mul_"]
HOST_COST = ["add_sinusoidal_", "add_sinusoidal_op_bare", "add_position_embedding_", "add_position_embedding_op_bare",
             "aten_mul_"]  # fmt: skip

THREAD_CASES = [(4096, 0), (4096, 2), (512, 0), (512, 2)]  # (tokens, busy background processes)
THREAD_ROUNDS = 16

_RESULTS: dict = {}  # (tokens, dtype name) -> {provider: median us}
_HOST: dict = {}  # provider -> median us (absolute encodings at decode)
_THREADS = torch.get_num_threads()
_compiled_hf = None


@torch.library.custom_op("posenc_bench::empty_rope_", mutates_args=("q", "k"))
def _empty_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The same mutating signature as posenc::rope_, doing nothing: what any Python custom op costs."""


def _backend_for(provider):
    # The native kernel is the default CPU backend: measured without an override (an override routes calls
    # through a Python dispatcher kernel, which is what the torch backend pays anyway).
    return pk.use_backend("torch") if provider == "posenc_torch" else nullcontext()


def _setup(tokens, dtype):
    q = torch.randn(1, tokens, CFG.num_heads_q, CFG.head_dim, dtype=dtype)
    k = torch.randn(1, tokens, CFG.num_heads_kv, CFG.head_dim, dtype=dtype)
    inv = pk.rope_frequencies(CFG.rotary_dim, CFG.rope_theta)[0]
    cos, sin = pk.rope_cos_sin(max(tokens, 4096), inv)
    return q, k, cos, sin


def _providers(provider, tokens, dtype):
    global _compiled_hf
    q, k, cos, sin = _setup(tokens, dtype)
    offs = torch.full((1,), 100 if tokens == 1 else 0)
    if provider in ("posenc_native", "posenc_torch"):  # the backend is set around the timing (_backend_for)
        return lambda: pk.apply_rope_(q, k, cos, sin, offsets=offs)
    if provider == "empty_custom_op":
        return lambda: _empty_rope_(q, k, cos, sin)
    if provider == "rope_op_bare":
        op = torch.ops.posenc.rope_.default
        return lambda: op(q, k, cos, sin, None, None, offs, 0, None, None, 1.0, False, False, False)
    if provider == "aten_mul_":
        return lambda: q.mul_(1.0)
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
def _time_calls(benchmark, fn, *, op, shape, provider, iters=200):
    """Per-call cost of a dispatch-bound call: timed in batches of ``iters`` calls."""
    for _ in range(50):  # warm-up (compile, caches, the extension load)
        fn()
    benchmark.pedantic(fn, rounds=25, iterations=iters, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
        return None
    median_us = benchmark.stats.stats.median * 1e6
    record(
        benchmark, op=op, shape=shape, provider=provider, nbytes=0, median_us=median_us, copy_us=0.0,
        timing=f"pytest-benchmark pedantic median of 25 rounds x {iters} calls, wall clock",
    )  # fmt: skip
    return median_us


@pytest.mark.parametrize("provider", DECODE_PROVIDERS)
@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"{c[0]}tok-{str(c[1]).replace('torch.', '')}")
def test_decode(benchmark, case, provider):
    """apply_rope_ at one token (an offsets tensor), beside its bare op and a one-op aten call."""
    tokens, dtype = case
    fn = _providers(provider, tokens, dtype)
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), _backend_for(provider):
            us = _time_calls(benchmark, fn, op="apply_rope_ CPU decode", provider=provider,
                             shape=f"llama3-8b 1 tok {str(dtype).replace('torch.', '')}")  # fmt: skip
    finally:
        torch.set_num_threads(_THREADS)
    if us is not None:
        _record(tokens, dtype, provider, us)


@contextmanager
def _busy_processes(n):
    """``n`` background processes spinning on the CPU (``python -c "while 1: pass"``) for the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(0.3)  # let them start spinning
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _interleaved_medians(calls, rounds):
    """Median seconds of each ``(fn, threads)`` in ``calls``, timed one call each per round, in turn; every
    other round in reverse order, so no call always follows the one that warmed the cache for it."""
    times = [[] for _ in calls]
    for fn, threads in calls:  # warm-up, each thread count once
        torch.set_num_threads(threads)
        fn()
    for r in range(rounds):
        order = list(enumerate(calls))
        for i, (fn, threads) in order if r % 2 == 0 else order[::-1]:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


@pytest.mark.parametrize("case", THREAD_CASES, ids=lambda c: f"{c[0]}tok-busy{c[1]}")
def test_thread_scaling(benchmark, case):
    """apply_rope_ with 1 thread and the default count beside x.mul_(1.0) over the same bytes, one run."""
    tokens, busy = case
    q, k, cos, sin = _setup(tokens, torch.bfloat16)
    x = torch.randn(q.numel() + k.numel(), dtype=torch.bfloat16)
    ours = lambda: pk.apply_rope_(q, k, cos, sin)  # noqa: E731
    mul = lambda: x.mul_(1.0)  # noqa: E731
    n = _THREADS
    try:
        with torch.no_grad(), _busy_processes(busy):
            o1, on, m1, mn = _interleaved_medians([(ours, 1), (ours, n), (mul, 1), (mul, n)], THREAD_ROUNDS)
            torch.set_num_threads(n)
            benchmark.pedantic(ours, rounds=3, iterations=1, warmup_rounds=0)  # pytest-benchmark's own row
    finally:
        torch.set_num_threads(_THREADS)
    nbytes = 2 * (q.nbytes + k.nbytes)
    record(
        benchmark, op="apply_rope_ CPU threads", shape=f"llama3-8b {tokens} tok bf16", provider="posenc_native",
        nbytes=nbytes, median_us=on * 1e6, copy_us=0.0, condition=f"+{busy} busy procs" if busy else "as is",
        timing=f"median of {THREAD_ROUNDS} interleaved rounds (ours 1 / {n} threads, x.mul_ 1 / {n} threads), "
               "wall clock",
        scaling={"threads": n, "ours": on / o1, "mul_": mn / m1, "ours_1_us": o1 * 1e6, "ours_n_us": on * 1e6,
                 "mul_1_us": m1 * 1e6, "mul_n_us": mn * 1e6},
    )  # fmt: skip


def _host_cost_fn(provider):
    D = CFG.num_heads_q * CFG.head_dim  # the hidden size (4096): one token of the residual stream
    x = torch.randn(1, 1, D)
    offs = torch.full((1,), 100)
    if provider == "add_sinusoidal_":
        return lambda: pk.add_sinusoidal_(x, offsets=offs)
    if provider == "add_sinusoidal_op_bare":
        op = torch.ops.posenc.add_sinusoidal_.default
        return lambda: op(x, None, offs, 0, 1.0, 10000.0, True, False, 0.0, 1.0)
    table = torch.randn(2048, D)
    if provider == "add_position_embedding_":
        return lambda: pk.add_position_embedding_(x, table, offs)
    if provider == "add_position_embedding_op_bare":
        op = torch.ops.posenc.add_position_embedding_.default
        return lambda: op(x, table, offs, None)
    return lambda: x.mul_(1.0)


@pytest.mark.parametrize("provider", HOST_COST)
def test_host_cost_absolute_encodings(benchmark, provider):
    """add_sinusoidal_ / add_position_embedding_ at one token of a 4096-wide residual stream."""
    fn = _host_cost_fn(provider)
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            us = _time_calls(benchmark, fn, op="absolute encodings CPU decode", shape="1 tok x 4096 fp32",
                             provider=provider)  # fmt: skip
    finally:
        torch.set_num_threads(_THREADS)
    if us is not None:
        _HOST[provider] = us


def test_summary():
    """The targets, as ratios of this run: prefill >= 3x hf_eager and faster than hf_compiled; at decode
    apply_rope_ <= 1.5x its bare op, and every public in-place function <= 2.5x a one-op aten call. Printed
    (run with -s to see it), not asserted: a loaded machine moves absolute times, and a benchmark is not a
    correctness test."""
    if not _RESULTS:
        pytest.skip("run the whole file to get the summary")
    lines = [f"native CPU kernels, {device_name()}, torch {torch.__version__}, capability "
             f"{torch.backends.cpu.get_cpu_capability()}", "",
             "| case | provider | median us | hf_eager / this | hf_compiled / this | this / bare op | this / aten mul_ |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (tokens, dt), res in sorted(_RESULTS.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        for prov, us in sorted(res.items(), key=lambda kv: kv[1]):
            eager = f"{res['hf_eager'] / us:.2f}x" if "hf_eager" in res else "-"
            comp = f"{res['hf_compiled'] / us:.2f}x" if "hf_compiled" in res else "-"
            bare = f"{us / res['rope_op_bare']:.2f}x" if "rope_op_bare" in res and tokens == 1 else "-"
            mul = f"{us / res['aten_mul_']:.2f}x" if "aten_mul_" in res and tokens == 1 else "-"
            lines.append(f"| [1, {tokens}, 32/8, 128] {dt} | {prov} | {us:.1f} | {eager} | {comp} | {bare} | {mul} |")
    for prov in HOST_COST:
        if prov in _HOST:
            bare = _HOST.get(prov.rstrip("_") + "_op_bare") if not prov.endswith("bare") else None
            b = f"{_HOST[prov] / bare:.2f}x" if bare else "-"
            m = f"{_HOST[prov] / _HOST['aten_mul_']:.2f}x" if "aten_mul_" in _HOST else "-"
            lines.append(f"| [1, 1, 4096] fp32 | {prov} | {_HOST[prov]:.1f} | - | - | {b} | {m} |")
    print("\n" + "\n".join(lines))
