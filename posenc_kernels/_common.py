"""Transitional: the names the not-yet-ported families (sinusoidal, learned, relative) import, now living in
``posenc_kernels.ops`` (checks, positions, registry). Removed once every family is on the op layer."""

from __future__ import annotations

from typing import Optional

import torch

from . import _native
from .ops import registry
from .ops.checks import (  # noqa: F401
    FLOAT_DTYPES,
    INT_DTYPES,
    check_disjoint,
    check_inplace_autograd,
    check_last_stride,
    check_tensor,
    check_writable,
    device_guard,
    next_pow2,
    on_cuda_graph_capture,
    prev_pow2,
    split_offsets,
    value_checks_on,
)
from .ops.checks import _value_checks as _value_checks_state
from .ops.positions import check_position_values as _check_position_values
from .ops.positions import token_positions  # noqa: F401
from .ops.registry import HAS_TRITON, interpreter_enabled  # noqa: F401

if HAS_TRITON:
    import triton.language as tl


def value_checks_enabled() -> bool:
    return _value_checks_state["on"]


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_position_args(positions, offsets, offset, *, batch, seqlen, device, integer_positions=True,
                        positions_name="positions", offsets_name="offsets") -> None:  # fmt: skip
    from .ops.positions import check_position_args as impl

    impl(positions, offsets, offset, batch=batch, seqlen=seqlen, device=device, integer_positions=integer_positions)


def check_position_values(positions, offsets, offset, *, seqlen, num_rows, device, positions_name="positions"):
    _check_position_values(positions, offsets, offset, seqlen=seqlen, num_rows=num_rows, device=device)


def resolve_backend(device: torch.device, native: Optional[str] = None) -> str:
    """Transitional backend choice for the custom ops not yet on the registry (reads the registry's)."""
    name = registry.get_backend()
    interp = registry._INTERPRET
    triton_ok = HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and interp))
    if name == "torch":
        return "torch"
    if name == "triton":
        if not triton_ok:
            raise RuntimeError(f"backend 'triton' was forced but cannot run on {device.type} tensors")
        return "triton"
    if name == "native" and native is not None:
        if _native.has_op(native, device.type):
            return "native"
        raise RuntimeError(f"backend 'native' was forced but cannot run on {device.type} tensors")
    if triton_ok:
        return "triton"
    if native is not None and device.type in ("cpu", "cuda") and _native.has_op(native, device.type):
        return "native"
    return "torch"
