"""Benchmark harness shared by the bench_*.py files.

Timing method (stated in every result's extra_info):

* CUDA: ``triton.testing.do_bench`` (warm-up first so compilation is excluded, CUDA-event timing, the L2
  cache flushed before every repetition, median). Peak memory is the allocator's high-water mark during
  one call, above what was allocated before it. pytest-benchmark also times the call with a
  ``torch.cuda.synchronize()`` inside (host-side, L2 warm) for its own statistics.
* CPU: pytest-benchmark's pedantic mode (warm-up rounds, then the median of timed rounds).
* Host cost (CUDA): ``host_us``, the wall-clock time per call of issuing ``calls`` calls back to back with no
  synchronisation (Python, argument checks, dispatch and launches; a call that syncs, e.g. a value check
  reading a tensor, waits for the GPU here). Beside the kernel time it says whether a small call is bound by
  the host. On CPU the median itself is host time (no field).

Memory-bound ops report effective bandwidth: minimal bytes (each input read once, each output written
once) / median time, and the ratio to a device-to-device copy of the same number of bytes measured in the
same run, the figure to quote.

Every row's ``extra_info`` names its ``family`` (pass ``family=...``; else derived from ``op`` by
``posenc_dev.bench_summary.family_of``), ``op``, ``shape`` and ``provider``; ``scripts/bench``'s summary
(``posenc_dev/bench_summary.py``) groups by them and compares ours (``posenc*`` providers) with the op's
baseline, which a row may name itself with ``baseline="<provider>"``.
"""

from __future__ import annotations

import functools
import time

import torch

from posenc_dev.bench_summary import family_of

# Every shape compiles its own torch.compile graph (dynamic=False): allow more than the default 8.
torch._dynamo.config.recompile_limit = 64

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IS_CUDA = DEVICE.type == "cuda"


def device_name() -> str:
    if IS_CUDA:
        return torch.cuda.get_device_name(DEVICE)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync():
    if IS_CUDA:
        torch.cuda.synchronize()


def kernel_median_us(fn) -> float:
    """Median time of ``fn`` in microseconds by the method of this device (see module docstring)."""
    if IS_CUDA:
        import triton.testing

        fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    fn()
    times = []
    budget = time.perf_counter() + 1.0
    while len(times) < 5 or (time.perf_counter() < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def peak_extra_mb(fn) -> float | None:
    """Bytes allocated above the starting level during one call (CUDA only), in MiB."""
    if not IS_CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def graph_us_per_call(body, calls: int = 100, reps: int = 20):
    """Capture ``calls`` invocations of ``body`` in one graph; median over ``reps`` replays (CUDA events,
    L2 warm) divided by ``calls``. Returns (us per call, graph)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs recommends
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            body()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    times.sort()
    return times[len(times) // 2], g


def host_us_per_call(fn, calls: int = 20) -> float | None:
    """CUDA: microseconds of host time per call of ``fn``, ``calls`` calls issued back to back after a
    synchronisation, the clock stopped before the closing synchronisation (median of 3 such batches).
    None on CPU, where the measured time is all host time."""
    if not IS_CUDA:
        return None
    fn()
    out = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(out)[1]


@functools.lru_cache(maxsize=None)
def copy_median_us(nbytes: int) -> float:
    """A device-to-device copy moving ``nbytes`` in total (nbytes/2 read + nbytes/2 written)."""
    n = max(1, nbytes // 2)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return kernel_median_us(lambda: dst.copy_(src))


def run(benchmark, fn, *, op: str, shape: str, provider: str, nbytes: int, **info):
    """Time ``fn`` and record the figures the report prints."""
    copy_us = copy_median_us(nbytes)

    def timed():
        fn()
        _sync()

    if IS_CUDA:
        median_us = kernel_median_us(fn)
        benchmark.pedantic(timed, rounds=20, iterations=5, warmup_rounds=3)
    else:  # on CPU the pytest-benchmark median is the figure
        benchmark.pedantic(timed, rounds=7, iterations=1, warmup_rounds=2)
        median_us = benchmark.stats.stats.median * 1e6
    timing = (
        "triton.testing.do_bench median, CUDA events, L2 flushed"
        if IS_CUDA
        else "pytest-benchmark pedantic median, wall clock"
    )
    host = host_us_per_call(fn)
    if host is not None:
        info.setdefault("host_us", round(host, 2))
    record(benchmark, op=op, shape=shape, provider=provider, nbytes=nbytes, median_us=median_us, copy_us=copy_us,
           peak_extra_mb=peak_extra_mb(fn), timing=timing, **info)  # fmt: skip


def record(benchmark, *, op: str, shape: str, provider: str, nbytes: int, median_us: float, copy_us: float,
           timing: str, peak_extra_mb: float | None = None, **info) -> None:  # fmt: skip
    """Store one result in the fields report.py reads (bandwidth and copy ratio derived here; 0 for
    dispatch-bound cases that count no bytes)."""
    gbps = nbytes / (median_us * 1e-6) / 1e9 if median_us > 0 else 0.0
    copy_gbps = nbytes / (copy_us * 1e-6) / 1e9 if copy_us > 0 else 0.0
    info.setdefault("family", family_of(op))
    benchmark.extra_info.update(
        op=op,
        shape=shape,
        provider=provider,
        device=device_name(),
        bytes=nbytes,
        median_us=round(median_us, 3),
        gbps=round(gbps, 2),
        copy_us=round(copy_us, 3),
        copy_ratio=round(gbps / copy_gbps, 4) if copy_gbps > 0 else 0.0,
        peak_extra_mb=peak_extra_mb,
        timing=timing,
        **info,
    )
