#!/usr/bin/env bash
# The one prepared GPU check (CUDA machine, e.g. the device tool's H100/H200). It runs the whole test
# suite without the interpreter (kernels compiled for the real GPU), then the benchmark suite, and prints
# a short results table last. Full results go to $OUT (or bench-results/): tests.log, tests.xml,
# bench.log, benchmarks.json, table.md, env.txt. Budget: under 8 minutes on an H100.
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

echo "== tests (no interpreter) =="
timeout 330 python3 -m pytest tests posenc_kernels --doctest-modules -q -p no:cacheprovider -p no:logging \
  --junitxml="$OUTDIR/tests.xml" > "$OUTDIR/tests.log" 2>&1
test_rc=$?
tail -n 15 "$OUTDIR/tests.log"

echo "== benchmarks =="
timeout 270 python3 -m pytest benchmarks -q -p no:cacheprovider -p no:logging \
  --benchmark-json="$OUTDIR/benchmarks.json" --benchmark-columns=median,rounds > "$OUTDIR/bench.log" 2>&1
bench_rc=$?
tail -n 3 "$OUTDIR/bench.log"
python3 benchmarks/report.py "$OUTDIR/benchmarks.json" | tee "$OUTDIR/table.md"
echo "tests rc=$test_rc  benchmarks rc=$bench_rc"
exit $(( test_rc != 0 || bench_rc != 0 ))
