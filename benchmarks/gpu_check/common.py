"""Shared plumbing of the GPU check's Python stages (smoke.py, headline.py): dry-run switch, device, timers,
incremental JSON results, a clean exit on the stage's timeout.

The dry run (``GPU_CHECK_DRY_RUN=1``) runs the same functions on CPU through the Triton interpreter
(``TRITON_INTERPRET=1``, set here before the package is imported) at tiny shapes, with a wall-clock timer in
place of CUDA events and plain calls in place of CUDA-graph replays; every figure it writes is labelled as a
dry run. Only the public API (``import posenc_kernels as pk``) and ``posenc_kernels.reference`` are used (and
the registry, to name the backend the RoPE + KV-cache rows run: :func:`cache_backend`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

DRY = os.environ.get("GPU_CHECK_DRY_RUN", "0") == "1"
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before posenc_kernels (and triton.jit decoration) is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
import _harness  # noqa: E402  (the timing helpers the benchmark suite uses)

if not DRY and not torch.cuda.is_available():
    sys.exit("no CUDA device: set GPU_CHECK_DRY_RUN=1 for the CPU dry run")
if DRY:  # the interpreter's FP8 cast and (Triton 3.6) fma, rounded as the GPU rounds them
    from posenc_dev.interpreter import round_as_the_gpu_does  # noqa: E402

    round_as_the_gpu_does()

DEVICE = torch.device("cpu" if DRY else "cuda")
OUT = os.environ.get("OUT") or "bench-results"
TIMING = (
    "DRY RUN (CPU, Triton interpreter, tiny shapes): wall-clock median of a few calls; not a GPU figure"
    if DRY
    else "triton.testing.do_bench median (CUDA events, warm-up excludes compilation, L2 flushed before every rep)"
)
GRAPH_TIMING = (
    "DRY RUN: plain calls, wall clock (no CUDA graph on CPU)"
    if DRY
    else "100 calls captured in one CUDA graph, median of 20 replays / 100 (CUDA events, L2 warm)"
)


class Cut(BaseException):
    """Raised by SIGTERM (the stage's `timeout`): unwinds so the partial results are written."""


def _on_term(signum, frame):
    raise Cut(f"signal {signum}")


signal.signal(signal.SIGTERM, _on_term)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_us(fn) -> float:
    """Median microseconds of ``fn`` (see TIMING). The first call (compilation, autotuning) is not timed."""
    fn()
    sync()
    if DEVICE.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[1] * 1e6


def graph_us_per_call(body, calls: int = 100, reps: int = 20) -> float:
    """GPU time per call of ``body`` replayed from one CUDA graph of ``calls`` calls (see GRAPH_TIMING)."""
    if DEVICE.type != "cuda":
        return time_us(body)
    return _harness.graph_us_per_call(body, calls, reps)[0]


def peak_extra_mib(fn):
    """MiB allocated above the starting level during one call (CUDA only; None on CPU)."""
    mb = _harness.peak_extra_mb(fn)
    return None if mb is None else round(mb, 2)


def cache_backend() -> str:
    """The backend the RoPE + KV-cache rows run: ``"triton"`` (what the stages force) when the op has a Triton
    kernel in this tree, else what ``auto`` picks for it on this device (the torch implementation until the
    prologue kernel lands); every cache row records it."""
    from posenc_kernels.ops import registry

    spec = registry.spec("rope_and_cache_")
    return "triton" if "triton" in spec.impls else registry.backend_for(spec, DEVICE.type, "auto")


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"DRY RUN on CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


class Results:
    """Rows written to ``$OUT/<name>.json`` after every row, so a cut stage still returns what it measured."""

    def __init__(self, name: str, **meta):
        os.makedirs(OUT, exist_ok=True)
        self.name = name
        self.path = os.path.join(OUT, f"{name}.json")
        self.data = {"dry_run": DRY, "device": device_name(), "timing": TIMING, "complete": False,
                     "torch": torch.__version__, **meta, "rows": []}  # fmt: skip
        self.flush()

    def add(self, **row) -> dict:
        self.data["rows"].append(row)
        self.flush()
        if DRY and os.environ.get("GPU_CHECK_DRY_HOLD") == f"{self.name}:{len(self.data['rows'])}":
            # ci_dry_run's deadline test: the stage stalls after N rows, as a long GPU stage would, so the
            # deadline cuts it at a known point however fast or loaded the machine is.
            time.sleep(3600)
        return row

    def flush(self, complete: bool = False) -> None:
        self.data["complete"] = complete
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def one_line(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]
