"""The Triton interpreter rounding as the GPU rounds, where it does not (for the tests and the GPU check's
dry run, which run every kernel through the interpreter on CPU). Two conversions differ:

* fp32 -> FP8 (Triton 3.9's interpreter): half up on the first dropped bit, the carry dropped, subnormals
  truncated, where the GPU's ``cvt.rn.satfinite`` rounds to nearest even and saturates;
* ``tl.fma`` (Triton 3.6's interpreter): ``x * y + z``, two roundings, where the GPU's ``fma.rn`` rounds once.

:func:`round_as_the_gpu_does` replaces exactly those two, once, after ``TRITON_INTERPRET=1`` is set and before
a kernel runs. Every other conversion is the interpreter's own (its truncating fp32 -> bf16 cast, which the
tests account for where it matters, stays).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch


def _fp8_cast_rounds_to_nearest_even():
    """The Triton interpreter's fp32 -> FP8 cast (``triton.runtime.interpreter._convert_float``, Triton 3.9)
    rounds half up on the first dropped bit, drops the carry when that overflows the mantissa (1.96 -> e4m3
    1.0, not 2.0) and truncates subnormals. What a kernel's cast lowers to on the GPU (sm_90:
    ``cvt.rn.satfinite.e4m3x2.f32`` / ``.e5m2x2``) rounds to nearest even and saturates to the largest finite
    value: the interpreter does that here, through torch's correctly rounded cast (NaN stays NaN), so an FP8
    kernel (the KV-cache write) is checked on its own code. Every other conversion is the interpreter's."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst in fp8:
            x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            fmax = torch.finfo(fp8[dst]).max
            x = torch.where(x.isnan(), x, x.clamp(-fmax, fmax))  # satfinite
            return x.to(fp8[dst]).view(torch.uint8).numpy().reshape(np.shape(data))
        return original(data, src, dst, rounding_mode)

    interpreter._convert_float = convert


def _fma_rounds_once():
    """Triton 3.6's interpreter computes ``tl.fma(x, y, z)`` as ``x * y + z`` in the operands' dtype: two
    roundings where the GPU's ``fma.rn`` rounds once (Triton 3.9's interpreter has a correctly rounded fp32
    fma). A kernel whose result rests on the fused rounding (the KV-cache write's correctly rounded division:
    a Markstein correction) is checked on its own code here by an fma through x86's 64-bit-mantissa long
    double: the fp32 product is exact there and the sum rounds once more only where it needs more than 64 bits."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if "fma_fp32" in inspect.getsource(builder.create_fma) or np.finfo(np.longdouble).nmant < 63:
        return

    def create_fma(self, x, y, z):
        dtype = np.result_type(x.data, y.data, z.data)
        wide = [np.asarray(t.data, dtype=np.longdouble) for t in (x, y, z)]
        return interpreter.TensorHandle((wide[0] * wide[1] + wide[2]).astype(dtype), z.dtype.scalar)

    builder.create_fma = create_fma


_done = {"applied": False}


def round_as_the_gpu_does() -> None:
    """Apply both replacements (idempotent)."""
    if _done["applied"]:
        return
    _fp8_cast_rounds_to_nearest_even()
    _fma_rounds_once()
    _done["applied"] = True
