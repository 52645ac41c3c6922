"""Rotation angles ``pos * inv_freq``: HF's fp32 numerics, and the exact algorithm. One home for both.

* Default (HF numerics): one fp32 product ``fp32(pos) * fp32(inv_freq)``, then fp32 cos/sin.
* Exact (``exact=True``, float64 ``inv_freq``): ``a = f64(pos) * inv_freq``; ``k = floor(a / 2pi + 1/2)``;
  ``r = (a - k * TWO_PI_HI) - k * TWO_PI_LO`` in float64, rounded once to fp32 (``r`` in ``[-pi, pi]``);
  then fp32 cos/sin of ``r``. ``TWO_PI_HI`` is ``float32(2pi)``, so ``k * TWO_PI_HI`` is exact in float64
  for ``k < 2**29``, and ``TWO_PI_LO = 2pi - TWO_PI_HI``: within ~2e-7 rad of the float64 truth at any
  position below ``2**40`` or so. Triton (:func:`exact_angle_tl`), torch (:func:`exact_angles`), and the
  C++/CUDA kernels (``csrc/exact_angle.h``, same constants, checked by the tests) run this one algorithm.
"""

from __future__ import annotations

import torch

from .registry import HAS_TRITON

INV_TWO_PI = 0.15915494309189535  # 1 / (2 pi)
TWO_PI_HI = 6.2831854820251465  # float32(2 pi)
TWO_PI_LO = -1.7484556025237907e-07  # 2 pi - TWO_PI_HI

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def exact_angle_tl(pos, inv):
        a = pos.to(tl.float64) * inv.to(tl.float64)
        k = tl.floor(a * 0.15915494309189535 + 0.5)
        return ((a - k * 6.2831854820251465) - k * -1.7484556025237907e-07).to(tl.float32)


def exact_angles(pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """fp32 angles of ``pos * inv_freq`` reduced to ``[-pi, pi]`` (the exact algorithm above)."""
    a = pos.to(torch.float64) * inv_freq.to(torch.float64)
    k = torch.floor(a * INV_TWO_PI + 0.5)
    return ((a - k * TWO_PI_HI) - k * TWO_PI_LO).to(torch.float32)


def hf_angles(pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """One fp32 product per angle (HF's numerics)."""
    return pos.to(torch.float32) * inv_freq.to(torch.float32)
