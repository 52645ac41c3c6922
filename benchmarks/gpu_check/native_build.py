"""GPU check, stage 3a: build (or load) the C++/CUDA extension through posenc_kernels._native and check that
it has the RoPE and sinusoidal kernels for this device (CUDA on the GPU; CPU in the dry run)."""

import sys
import time

# common.py sits beside this script: run as a script, its folder is already first on sys.path.
from common import DEVICE  # noqa: E402

from posenc_kernels import _native  # noqa: E402

t0 = time.perf_counter()
ok = _native.load()
print("native extension:", _native.source() if ok else "FAILED: %s" % _native.load_error())
has = {op: _native.has_op(op, DEVICE.type) for op in ("rope", "sinusoidal")}
print(f"{DEVICE.type} kernels: " + ", ".join(f"{k} {v}" for k, v in has.items()) + f"; {time.perf_counter() - t0:.0f} s")
sys.exit(0 if ok and all(has.values()) else 1)
