#!/usr/bin/env bash
# The one prepared GPU check (CUDA machine, e.g. the device tool's H100/H200). It builds the native
# C++/CUDA extension (csrc/, JIT through posenc_kernels._native, for this GPU's arch only), runs the whole
# test suite without the interpreter (Triton kernels compiled for the real GPU, tests/test_native_cuda.py
# against the CUDA C++ kernels), then the benchmark suite with the default (Triton) backend and the posenc
# providers again with POSENC_BACKEND=native, and prints the results tables last, Triton and CUDA C++ side
# by side. Full results go to $OUT (or bench-results/): native_build.log, tests.log, tests.xml, bench.log,
# benchmarks.json, bench_native.log, benchmarks_native.json, table.md, table_native.md, side_by_side.md,
# env.txt. Budget: under 9 minutes on an H100 (build ~1 min on 16 cores).
# SKIP_NATIVE=1 skips the extension (build, native tests and native benchmarks).
#
# Uses the machine's own torch/triton (no venv, nothing downloaded). Wheels placed in .whl/ (e.g. a
# Liger-Kernel peer for the benchmarks) are installed first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-bench-results}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/posenc-site .whl/*.whl && export PYTHONPATH="/tmp/posenc-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null
  date -u
} 2>&1 | tee "$OUTDIR/env.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2

native_rc=0
if [ "${SKIP_NATIVE:-0}" != 1 ]; then
  echo "== native extension (JIT build, this GPU's arch) =="
  # One arch (the card's), all cores, the cache outside $OUT (the .so need not travel back).
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}" POSENC_NATIVE=jit POSENC_NATIVE_VERBOSE=1
  export POSENC_NATIVE_CACHE="${POSENC_NATIVE_CACHE:-/tmp/posenc-native-cache}"
  start=$SECONDS
  timeout 240 python3 -c "
from posenc_kernels import _native
ok = _native.load()
print('native extension:', _native.source() if ok else 'FAILED: %s' % _native.load_error())
print('cuda kernels: rope', _native.has_op('rope', 'cuda'), 'sinusoidal', _native.has_op('sinusoidal', 'cuda'))
raise SystemExit(0 if ok and _native.has_op('rope', 'cuda') and _native.has_op('sinusoidal', 'cuda') else 1)
" > "$OUTDIR/native_build.log" 2>&1
  native_rc=$?
  unset POSENC_NATIVE_VERBOSE
  tail -n 2 "$OUTDIR/native_build.log"
  echo "build: $((SECONDS - start)) s, rc=$native_rc (arch $TORCH_CUDA_ARCH_LIST)"
  [ $native_rc -ne 0 ] && grep -m 20 -i "error" "$OUTDIR/native_build.log"
fi

echo "== tests (no interpreter) =="
timeout 330 python3 -m pytest tests posenc_kernels --doctest-modules -q -p no:cacheprovider -p no:logging \
  --junitxml="$OUTDIR/tests.xml" > "$OUTDIR/tests.log" 2>&1
test_rc=$?
tail -n 15 "$OUTDIR/tests.log"
grep -E "^tests/test_native_cuda.py" "$OUTDIR/tests.log" | head -5
python3 - "$OUTDIR/tests.xml" <<'PY' || true
import sys, xml.etree.ElementTree as ET
cases = [c for c in ET.parse(sys.argv[1]).iter("testcase") if "test_native_cuda" in c.get("classname", "")]
bad = sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None)
skipped = sum(1 for c in cases if c.find("skipped") is not None)
print(f"test_native_cuda.py: {len(cases)} tests, {bad} failed, {skipped} skipped")
PY

echo "== benchmarks =="
timeout 270 python3 -m pytest benchmarks -q -p no:cacheprovider -p no:logging \
  --benchmark-json="$OUTDIR/benchmarks.json" --benchmark-columns=median,rounds > "$OUTDIR/bench.log" 2>&1
bench_rc=$?
tail -n 3 "$OUTDIR/bench.log"
python3 benchmarks/report.py "$OUTDIR/benchmarks.json" > "$OUTDIR/table.md"

nbench_rc=0
if [ "${SKIP_NATIVE:-0}" != 1 ] && [ $native_rc -eq 0 ]; then
  echo "== benchmarks, CUDA C++ backend (posenc providers, POSENC_BACKEND=native) =="
  POSENC_BACKEND=native timeout 150 python3 -m pytest benchmarks/bench_rope.py benchmarks/bench_sinusoidal.py \
    -k posenc -q -p no:cacheprovider -p no:logging --benchmark-json="$OUTDIR/benchmarks_native.json" \
    --benchmark-columns=median,rounds > "$OUTDIR/bench_native.log" 2>&1
  nbench_rc=$?
  tail -n 3 "$OUTDIR/bench_native.log"
  python3 benchmarks/report.py "$OUTDIR/benchmarks_native.json" > "$OUTDIR/table_native.md"
  # Side by side: the same benchmark (op, shape, provider) under each backend, from the two runs.
  python3 - "$OUTDIR/benchmarks.json" "$OUTDIR/benchmarks_native.json" > "$OUTDIR/side_by_side.md" <<'PY'
import json, sys
def rows(path):
    out = {}
    for b in json.load(open(path))["benchmarks"]:
        e = b.get("extra_info", {})
        if "median_us" in e and str(e.get("provider", "")).startswith("posenc"):
            out[b["name"]] = e
    return out
tri, nat = rows(sys.argv[1]), rows(sys.argv[2])
print("| benchmark | triton us | cuda c++ us | triton GB/s | cuda c++ GB/s | c++/copy | c++ speedup |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in sorted(set(tri) & set(nat)):
    t, n = tri[name], nat[name]
    print(f"| {name} | {t['median_us']:.1f} | {n['median_us']:.1f} | {t.get('gbps', 0):.0f} | {n.get('gbps', 0):.0f} "
          f"| {n.get('copy_ratio', 0):.2f} | {t['median_us'] / n['median_us']:.2f}x |")
PY
fi

# Tables last: all providers (default backend), then Triton vs CUDA C++ for the posenc providers.
cat "$OUTDIR/table.md"
[ -s "$OUTDIR/side_by_side.md" ] && { echo; echo "Triton vs CUDA C++ (posenc providers):"; cat "$OUTDIR/side_by_side.md"; }
echo "native build rc=$native_rc  tests rc=$test_rc  benchmarks rc=$bench_rc  native benchmarks rc=$nbench_rc"
exit $(( native_rc != 0 || test_rc != 0 || bench_rc != 0 || nbench_rc != 0 ))
