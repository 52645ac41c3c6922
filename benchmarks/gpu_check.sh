#!/usr/bin/env bash
# The one prepared GPU check (a CUDA machine, e.g. the device tool's H100/H200): the figures that matter
# first, inside a hard time budget. Stages, in order of value (budget in seconds; each stage gets
# min(budget, time left before the deadline - the summary's reserve), via `timeout`):
#
#   env              20  card, driver, versions, commit, date; peers from .whl/ installed (no network)
#   smoke            90  every Triton kernel family at real shapes vs its float64 reference, compiled for
#                        this card; RoPE + KV-cache write: paged/contiguous, bf16/FP8, MLA, padded slots
#                        untouched, no allocation, a CUDA-graph capture replayed (benchmarks/gpu_check/smoke.py)
#   headline        150  Llama-3-8B RoPE bf16 in place at 4k/32k/131k as a ratio to a same-run copy,
#                        decode from a CUDA graph, the sinusoidal add, peak memory, HF eager, torch.compile,
#                        Liger-Kernel, flash-attn's Triton rotary; rope_and_cache_ decode (CUDA graph) vs
#                        apply_rope_ alone vs unfused, 4k prefill copy% (benchmarks/gpu_check/headline.py)
#   native_build    120  the CUDA C++ extension, JIT for this card's arch only (posenc_kernels._native)
#   native_headline  60  the posenc headline rows again with pk.use_backend("native")
#   tests          rest  the test suite without the interpreter, CUDA tests first, as time allows; a cut
#                        run reports how far it got (pytest -v log parsed)
#
# The deadline is GPU_CHECK_BUDGET_S (default 480 s = 8 min) after the start; the summary (stage table,
# smoke table, Triton vs CUDA C++ headline table, test progress, and a block to paste into
# benchmarks/RESULTS.md) prints last, from an EXIT trap, so it also prints when the deadline cuts a stage or
# the script is signalled. Every stage writes its files to $OUT (default bench-results/) as soon as it
# finishes (the Python stages row by row): env.txt, stages.tsv, smoke.json, headline_triton.json,
# headline_native.json, native_build.log, tests.log, tests.xml (when the suite finished), <stage>.log,
# summary.md.
#
# Exit status: 0 all stages passed (the tests stage may be cut by the deadline); 1 a stage failed or the
# summary is missing; 3 no failure, but a stage other than tests was cut or skipped by the deadline.
#
# GPU_CHECK_DRY_RUN=1 runs every stage on CPU (Triton interpreter, tiny shapes, a wall-clock timer, no CUDA
# graph, the native CPU kernels), same code paths and files, labelled as a dry run; .ci/run calls it through
# benchmarks/gpu_check/ci_dry_run (GPU_CHECK_DRY_HOLD=<results name>:<N> stalls that stage after N rows, so its
# deadline test cuts at a known point). SKIP_NATIVE=1 skips the extension stages.
# Uses the machine's own python3 (torch/triton from the image; GPU_CHECK_PYTHON overrides; the dry run
# uses .venv/bin/python when present). Peers: scripts/prepare_peers fills .whl/ (see benchmarks/RESULTS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
DEADLINE=$((START + BUDGET))
RESERVE="${GPU_CHECK_RESERVE_S:-15}"  # kept for the summary
MIN_STAGE=5
DRY="${GPU_CHECK_DRY_RUN:-0}"
OUTDIR="${OUT:-bench-results}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
export OUT="$OUTDIR" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
rm -f "$OUTDIR"/{env.txt,stages.tsv,smoke.json,headline_triton.json,headline_native.json,native_build.log,tests.log,tests.xml,summary.md}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  PY="${GPU_CHECK_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
  TESTS_BUDGET="${GPU_CHECK_TESTS_S:-15}"  # short on purpose: the dry run proves the cut-and-report path
else
  unset TRITON_INTERPRET
  PY="${GPU_CHECK_PYTHON:-python3}"
  TESTS_BUDGET="${GPU_CHECK_TESTS_S:-$BUDGET}"
fi
PY="$(command -v "$PY")"
SITE="${TMPDIR:-/tmp}/posenc-gpu-check-site"
export PYTHONPATH="$SITE:$PWD:${PYTHONPATH:-}"
FAILED=0
INCOMPLETE=0
STAGE_PID=""

finish() {
  trap - EXIT TERM INT
  if [ -n "$STAGE_PID" ] && kill -0 "$STAGE_PID" 2>/dev/null; then
    kill -TERM "$STAGE_PID" 2>/dev/null; sleep 2; kill -KILL "$STAGE_PID" 2>/dev/null
    printf '%s\t-\t-\t-\tcut: check terminated\n' "${CURRENT:-?}" >> "$OUTDIR/stages.tsv"
    INCOMPLETE=1
  fi
  if ! timeout 30 python3 benchmarks/gpu_check/summary.py "$OUTDIR" || [ ! -s "$OUTDIR/summary.md" ]; then
    echo "gpu_check: SUMMARY MISSING; stages:"; cat "$OUTDIR/stages.tsv" 2>/dev/null
    FAILED=1
  fi
  echo "gpu_check: $(( $(date +%s) - START )) s wall (budget ${BUDGET} s), results in $OUTDIR$( [ "$DRY" = 1 ] && echo ' (DRY RUN)')"
  if [ $FAILED -ne 0 ]; then exit 1; elif [ $INCOMPLETE -ne 0 ]; then exit 3; else exit 0; fi
}
trap finish EXIT
trap 'echo "gpu_check: signalled, summarising"; exit' TERM INT

# run_stage NAME BUDGET CUT_OK CMD...: runs CMD under timeout min(BUDGET, time left - RESERVE), log in
# $OUT/NAME.log, a line in stages.tsv. CUT_OK=1: a cut by the deadline is not "incomplete" (the tests).
run_stage() {
  local name=$1 budget=$2 cut_ok=$3 left t rc start used status
  shift 3
  CURRENT=$name
  left=$((DEADLINE - $(date +%s) - RESERVE))
  t=$budget; [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -lt "$MIN_STAGE" ]; then
    printf '%s\t%s\t0\t-\tskipped: deadline\n' "$name" "$budget" >> "$OUTDIR/stages.tsv"
    echo "== $name: skipped, ${left} s left before the deadline's reserve =="
    INCOMPLETE=1; return 0
  fi
  echo "== $name (budget ${budget} s, given ${t} s) =="
  start=$(date +%s)
  timeout -k 5 "$t" "$@" > "$OUTDIR/$name.log" 2>&1 &
  STAGE_PID=$!
  wait "$STAGE_PID"; rc=$?
  STAGE_PID=""
  used=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ]; then status=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="cut at ${t} s"; [ "$cut_ok" = 1 ] || INCOMPLETE=1
  else status=FAILED; FAILED=1
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$budget" "$used" "$rc" "$status" >> "$OUTDIR/stages.tsv"
  tail -n "${GPU_CHECK_TAIL:-4}" "$OUTDIR/$name.log"; echo
  echo "-- $name: $status in ${used} s"
  return $rc
}

env_stage() {
  {
    if [ "$DRY" = 1 ]; then
      echo "dry_run: 1"
      echo "card: DRY RUN on CPU ($(uname -m), $(nproc) cores)"
    else
      echo "dry_run: 0"
      echo "card: $(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader | head -n1)"
    fi
    echo "date: $(date -u +%F)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$( [ -n "$(git status --porcelain -uno 2>/dev/null)" ] && echo ' (with uncommitted changes)')"
    echo "versions: $("$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)")"
    local peers=""
    if ls .whl/*.whl >/dev/null 2>&1; then
      rm -rf "$SITE"
      if "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >/dev/null 2>&1; then
        peers="$(cd .whl && ls ./*.whl | xargs -n1 basename | tr '\n' ' ')"
      else
        peers="(wheel install failed) "
      fi
    fi
    [ -f .whl/flash_attn_rotary.py ] && peers+="$(head -n1 .whl/flash_attn_rotary.py | sed -E 's/.*flash-attn ([^ ]+).*/flash-attn \1 rotary.py/')"
    echo "peers: ${peers:-none (run scripts/prepare_peers, carry .whl)}"
    [ "$DRY" = 1 ] || nvidia-smi
  } > "$OUTDIR/env.txt" 2>&1
  cat "$OUTDIR/env.txt" | head -n 7
  [ "$DRY" = 1 ] || "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
}
export -f env_stage
export DRY PY SITE OUTDIR

run_stage env 20 0 bash -c env_stage || { echo "gpu_check: environment stage failed"; exit; }
run_stage smoke 90 0 "$PY" benchmarks/gpu_check/smoke.py
run_stage headline 150 0 "$PY" benchmarks/gpu_check/headline.py --backend triton

if [ "${SKIP_NATIVE:-0}" != 1 ]; then
  if [ "$DRY" != 1 ]; then  # this card's arch only, all cores, the cache outside $OUT (the .so need not travel back)
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}" POSENC_NATIVE=jit POSENC_NATIVE_CACHE="${POSENC_NATIVE_CACHE:-/tmp/posenc-native-cache}"
  fi  # dry run: the CPU extension as the venv has it (CI's ahead-of-time build, or the JIT cache)
  if POSENC_NATIVE_VERBOSE=1 run_stage native_build 120 0 "$PY" benchmarks/gpu_check/native_build.py; then
    run_stage native_headline 60 0 "$PY" benchmarks/gpu_check/headline.py --backend native
  else
    printf 'native_headline\t60\t0\t-\tskipped: native build failed\n' >> "$OUTDIR/stages.tsv"
  fi
fi

# The rest of the suite: the tests that need a GPU first (test_cuda*.py in any folder: tests/core/test_cuda*.py,
# tests/native/test_cuda*.py), then every other folder, the static SASS tests (tests/static/, CPU CI runs
# them) and the doctests last.
mapfile -t cuda_tests < <(find tests -name 'test_cuda*.py' -not -path 'tests/static/*' | LC_ALL=C sort)
mapfile -t other_tests < <(find tests -name 'test_*.py' -not -name 'test_cuda*.py' -not -path 'tests/static/*' | LC_ALL=C sort)
mapfile -t static_tests < <(find tests/static -name 'test_*.py' | LC_ALL=C sort)
tests=("${cuda_tests[@]}" "${other_tests[@]}" "${static_tests[@]}")
run_stage tests "$TESTS_BUDGET" 1 "$PY" -m pytest "${tests[@]}" posenc_kernels --doctest-modules -v -p no:cacheprovider \
  -p no:logging --junitxml="$OUTDIR/tests.xml"
rc=$?
if [ $rc -ne 0 ] && grep -qE " (FAILED|ERROR)( |$)" "$OUTDIR/tests.log"; then FAILED=1; fi
