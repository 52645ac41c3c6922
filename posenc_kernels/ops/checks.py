"""Argument validation shared by every op family (a TypeError/ValueError, or PyTorch's own RuntimeError for
autograd's in-place rules, naming the argument), and the small helpers every launcher uses."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

_value_checks = {"on": os.environ.get("POSENC_VALUE_CHECKS", "1") != "0"}
_tls = threading.local()


def set_value_checks(enabled: bool) -> None:
    """Turn the checks that read tensor *values* (positions/offsets inside the table) on or off.

    They cost a device-to-host sync per call on CUDA with tensor positions or offsets. Without them, a row
    outside the table gives NaN outputs, never an out-of-bounds read. ``POSENC_VALUE_CHECKS=0`` sets the
    initial value. Shape, dtype, device and layout checks always run.

    >>> import posenc_kernels as pk
    >>> pk.set_value_checks(False); pk.set_value_checks(True)
    """
    from .. import _native

    _value_checks["on"] = bool(enabled)
    _native.set_value_checks(bool(enabled))


def value_checks_on(device: torch.device) -> bool:
    """Whether checks that read tensor values run for tensors on ``device``: off by setting, while a CUDA
    graph is captured, while ``torch.compile`` traces, and inside :func:`skip_value_checks`."""
    return (
        _value_checks["on"]
        and not getattr(_tls, "skip", False)
        and not torch.compiler.is_compiling()
        and not on_cuda_graph_capture(device)
    )


@contextlib.contextmanager
def skip_value_checks():
    """Skip the value checks inside, in this thread: the same call just checked their tensors."""
    prev = getattr(_tls, "skip", False)
    _tls.skip = True
    try:
        yield
    finally:
        _tls.skip = prev


def on_cuda_graph_capture(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    """Largest power of two <= n (1 for n < 1)."""
    return 1 if n < 1 else 1 << (int(n).bit_length() - 1)


I32_MAX = 2**31 - 1


def max_element_offset(t: Optional[torch.Tensor]) -> int:
    """The largest element offset a kernel can form for ``t`` (its extent), to choose 32/64-bit indexing."""
    if t is None:
        return 0
    return t.storage_offset() + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1


def reraise_with_check(error: Exception, check, *args, **kwargs):
    """An op call failed before any kernel could name the argument - the dispatcher refused what the schema
    cannot take (a list for a tensor, a string for a float): raise the op's check's error for it (a
    TypeError naming the argument), else the original error. Kernels themselves (Python and C++) already
    raise the check's messages."""
    try:
        check(*args, values=True, **kwargs)
    except (TypeError, ValueError, RuntimeError):
        raise
    except Exception:  # arguments the check cannot even inspect: the dispatcher's message says it best
        raise error from None
    raise error


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for a Triton launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Register dtype of the math: fp64 when any operand is fp64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_tensor(name: str, t, *, dtypes=None, ndim=None, device: Optional[torch.device] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the same device as the input ({device}), got {t.device}")


def _nested_layout(shape, strides) -> bool:
    """Sufficient condition for a strided layout to address distinct elements (holds for every slice,
    transpose, split or reshape): sorted by stride, each stride covers the extent of the smaller ones."""
    dims = sorted((st, n) for n, st in zip(shape, strides) if n > 1)
    extent = 1  # elements spanned by the dimensions seen so far
    for st, n in dims:
        if st < extent:
            return False
        extent += (n - 1) * st
    return True


def check_writable(name: str, t: torch.Tensor) -> None:
    """An in-place op must not write through a view whose elements overlap (expanded, as_strided), nor into
    an inference tensor outside inference mode (PyTorch's own rule; the kernels write raw memory)."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{name} is an inference tensor: in-place updates to inference tensors outside InferenceMode are "
            "not allowed (PyTorch's rule); clone it or run under torch.inference_mode()"
        )
    if t.numel() > 1 and not _nested_layout(t.shape, t.stride()):
        raise ValueError(
            f"{name} has internally overlapping memory (an expanded or as_strided view?); it cannot be written "
            "in place"
        )


def check_disjoint(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two tensors written in place by one op must not share elements (they would be rotated twice);
    disjoint head slices of one buffer (packed QKV) pass. Exact for any layout (see below)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return

    def byte_span(t):
        lo = t.storage_offset() * t.element_size()
        return lo, lo + t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))

    (a0, a1), (b0, b1) = byte_span(a), byte_span(b)
    if a1 <= b0 or b1 <= a0:
        return
    msg = f"{name_b} must not overlap {name_a}: they share memory that is written in place"
    if a.element_size() != b.element_size():
        raise ValueError(msg + " (views of one buffer with different dtypes)")
    esize = a.element_size()
    a0, a1, b0, b1 = a0 // esize, a1 // esize, b0 // esize, b1 // esize
    if a.stride() == b.stride() and _nested_layout(tuple(map(max, a.shape, b.shape)), a.stride()):
        # Same nested layout (packed QKV head slices): the offset between the views is a box shift.
        delta = b.storage_offset() - a.storage_offset()
        lo, hi = (a, b) if delta >= 0 else (b, a)
        rest = abs(delta)
        for st, n_lo in sorted(zip(a.stride(), lo.shape), reverse=True):
            shift = rest // st if st > 0 else 0
            rest -= shift * st
            if shift >= n_lo:  # hi starts beyond lo's extent in this dimension: the boxes are disjoint
                return
        if rest:
            return  # not a whole element shift of the shared layout: no element coincides
        raise ValueError(msg)
    # Any other intersecting layouts (rare): mark a's elements over the shared span and test b's. Exact,
    # at the cost of a bool map of the span (and a sync on CUDA).
    lo = min(a0, b0)
    mark = torch.zeros(max(a1, b1) - lo, dtype=torch.bool, device=a.device)
    mark.as_strided(a.shape, a.stride(), a0 - lo).fill_(True)
    if bool(mark.as_strided(b.shape, b.stride(), b0 - lo).any()):
        raise ValueError(msg)


def check_inplace_autograd(name: str, t: torch.Tensor, *, grad_from_other_input: bool = False) -> None:
    """The errors PyTorch's own in-place ops raise under autograd, raised before anything is written.

    ``grad_from_other_input``: ``t`` does not require grad but the op writes a value that does (e.g. a
    table that requires grad added into x): only the view rules apply then."""
    if not torch.is_grad_enabled() or not (t.requires_grad or grad_from_other_input):
        return
    if t.requires_grad and t.is_leaf:
        raise RuntimeError(f"{name}: a leaf Variable that requires grad is being used in an in-place operation.")
    if t._is_view():
        if t.requires_grad and t._base.is_leaf:
            raise RuntimeError(
                f"{name}: a view of a leaf Variable that requires grad is being used in an in-place operation."
            )
        meta = torch._C._autograd._get_creation_meta(t)
        if meta != torch._C._autograd.CreationMeta.DEFAULT:
            raise RuntimeError(
                f"{name} is a view created by a multi-output op (split/chunk/unbind), in no_grad or inference "
                f"mode, or in a custom Function ({meta}); autograd cannot track it being modified in place: "
                "slice it instead or clone it"
            )


def split_offsets(offsets, name: str = "offsets") -> tuple[Optional[torch.Tensor], int]:
    """Public ``offsets`` (int or tensor) -> the ops' (offsets tensor or None, int offset) pair."""
    if isinstance(offsets, torch.Tensor):
        return offsets, 0
    if isinstance(offsets, (int, torch.SymInt)) and not isinstance(offsets, bool):
        return None, offsets  # a SymInt (traced code) stays symbolic: int() would specialise it
    try:  # numpy ints and the like, through int(); never bools or floats
        as_int = int(offsets)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a [B] integer tensor, got {type(offsets).__name__}") from None
    if as_int != offsets or isinstance(offsets, (bool, float)):
        raise TypeError(f"{name} must be an int or a [B] integer tensor, got {offsets!r}")
    return None, as_int


