# Sourced by scripts/test and scripts/bench (it sets -euo pipefail for them): a virtual environment in .venv with torch, triton, the test
# tools and this package (editable). Idempotent and quick on re-runs.
#
# torch: an already-installed torch is kept. Otherwise a CUDA machine (nvidia-smi sees a GPU) gets the
# default wheel, and a CPU machine gets torch==$POSENC_TORCH_VERSION (default 2.13.0), which these
# machines hold as a CPU wheel on disk, so no CUDA build is ever downloaded there.
# Set POSENC_NO_VENV=1 to install into the current Python instead (e.g. a GPU image with torch).
# POSENC_VENV names another venv folder and POSENC_TRITON pins a Triton release in it (CI uses both to
# run the suite against triton 3.6, the GPU machine's, beside the newest).
# POSENC_BUILD_EXT=1 installs with the C++ extension built ahead of time against the venv's torch
# (pip install --no-build-isolation; editable, so posenc_kernels/_C*.so lands in the checkout); without it
# the install stays pure Python and the extension builds just in time on first use (posenc_kernels/_native.py).
set -euo pipefail
# Progress: one line per step that does work (a fresh clone's set-up takes minutes; a re-run prints one line).
_say() { echo "setup.sh: $*"; }
_t_setup=$SECONDS
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$_root"
if [ "${POSENC_NO_VENV:-0}" != "1" ]; then
  _venv="${POSENC_VENV:-.venv}"
  if [ ! -x "$_venv/bin/python" ]; then
    _say "creating the virtual environment $_venv"
    "${PYTHON:-python3}" -m venv "$_venv"
  fi
  # shellcheck disable=SC1091
  . "$_venv/bin/activate"
fi
_pip() { python -m pip --disable-pip-version-check -q "$@"; }
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    _say "installing torch (the default CUDA wheel; a GPU is visible): a few minutes"
    _pip install torch
  else
    _say "installing torch==${POSENC_TORCH_VERSION:-2.13.0} (CPU wheel): a minute or two"
    _pip install "torch==${POSENC_TORCH_VERSION:-2.13.0}"
  fi
  _say "torch installed ($((SECONDS - _t_setup)) s so far)"
fi
# The stamp lives inside the environment it describes, so a recreated venv always gets its install.
_stamp="$(python -c 'import sys; print(sys.prefix)')/.posenc-installed"
_build_ext="${POSENC_BUILD_EXT:-0}"
_want="$( (cat setup.py pyproject.toml; pwd; echo "${POSENC_TRITON:-}" "$_build_ext"
           if [ "$_build_ext" = "1" ]; then find csrc -type f | LC_ALL=C sort | xargs cat; python -c 'import torch; print(torch.__version__)'; fi
         ) | sha256sum | cut -c1-16)"
_need_install=0
[ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ] && _need_install=1
# The AOT module lives in the checkout, shared by every venv installed from it: rebuild it when it is gone
# or older than a source (posenc_kernels/_native.py refuses to load it then).
if [ "$_build_ext" = "1" ]; then
  _so="$(compgen -G "posenc_kernels/_C.*.so" | head -n1 || true)"
  if [ -z "$_so" ] || [ -n "$(find csrc -type f -newer "$_so" | head -n1)" ]; then _need_install=1; fi
fi
if [ "$_need_install" = "1" ]; then
  _say "installing posenc_kernels (editable) with its test tools (pytest, pytest-benchmark, matplotlib, transformers)"
  if [ -n "${POSENC_TRITON:-}" ]; then
    _pip install "triton==${POSENC_TRITON}"
  fi
  # torch.utils.cpp_extension (AOT and JIT builds) needs setuptools in the environment (>= 70.1 builds
  # wheels without the wheel package, which --no-build-isolation needs), and ninja.
  python -c "import setuptools as s, sys; sys.exit(tuple(map(int, s.__version__.split('.')[:2])) < (70, 1))" \
    >/dev/null 2>&1 || _pip install "setuptools>=70.1"
  command -v ninja >/dev/null 2>&1 || _pip install ninja
  if [ "$_build_ext" = "1" ]; then
    rm -f posenc_kernels/_C.*.so  # never load a module from an older build
    _t0=$SECONDS
    POSENC_BUILD_EXT=1 _pip install --no-build-isolation -e ".[test]"
    echo "setup.sh: built posenc_kernels._C ahead of time in $((SECONDS - _t0)) s"
  else
    _pip install -e ".[test]"
  fi
  echo "$_want" > "$_stamp"
  _say "installed in $((SECONDS - _t_setup)) s"
else
  _say "${_venv:-the current Python} is up to date (posenc_kernels installed from $_root)"
fi
# Without a GPU the Triton kernels run through the interpreter (must be set before the package is imported).
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
fi
