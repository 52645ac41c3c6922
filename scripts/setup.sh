# Sourced by scripts/test and scripts/bench (it sets -euo pipefail for them): a virtual environment in .venv with torch, triton, the test
# tools and this package (editable). Idempotent and quick on re-runs.
#
# torch: an already-installed torch is kept. Otherwise a CUDA machine (nvidia-smi sees a GPU) gets the
# default wheel, and a CPU machine gets torch==$POSENC_TORCH_VERSION (default 2.13.0), which these
# machines hold as a CPU wheel on disk, so no CUDA build is ever downloaded there.
# Set POSENC_NO_VENV=1 to install into the current Python instead (e.g. a GPU image with torch).
# POSENC_VENV names another venv folder and POSENC_TRITON pins a Triton release in it (CI uses both to
# run the suite against triton 3.6, the GPU machine's, beside the newest).
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$_root"
if [ "${POSENC_NO_VENV:-0}" != "1" ]; then
  _venv="${POSENC_VENV:-.venv}"
  if [ ! -x "$_venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$_venv"
  fi
  # shellcheck disable=SC1091
  . "$_venv/bin/activate"
fi
_pip() { python -m pip --disable-pip-version-check -q "$@"; }
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    _pip install torch
  else
    _pip install "torch==${POSENC_TORCH_VERSION:-2.13.0}"
  fi
fi
# The stamp lives inside the environment it describes, so a recreated venv always gets its install.
_stamp="$(python -c 'import sys; print(sys.prefix)')/.posenc-installed"
_want="$( (cat setup.py pyproject.toml; pwd; echo "${POSENC_TRITON:-}") | sha256sum | cut -c1-16)"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  if [ -n "${POSENC_TRITON:-}" ]; then
    _pip install "triton==${POSENC_TRITON}"
  fi
  _pip install -e ".[test]"
  echo "$_want" > "$_stamp"
fi
# Without a GPU the Triton kernels run through the interpreter (must be set before the package is imported).
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
fi
