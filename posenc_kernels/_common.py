"""Shared plumbing: backend selection, argument validation, position resolution.

Every op family file (``rope.py``, ``sinusoidal.py``) imports from here; nothing here imports them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

from . import _native  # cheap: the extension itself loads on first use, never at import

try:  # Triton is optional on CPU-only machines: the torch backend needs nothing else.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "native", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

_backend = os.environ.get("POSENC_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"POSENC_BACKEND must be one of {BACKENDS}, got {_backend!r}")


_value_checks = os.environ.get("POSENC_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled: bool) -> None:
    """Turn the checks that read tensor *values* (positions/offsets inside the table) on or off.

    They cost a device-to-host sync per call on CUDA when positions or offsets are tensors. With them off
    (or while a CUDA graph is captured, where they are skipped), the Triton kernels turn a token whose row
    lies outside the table into NaN outputs rather than reading out of bounds. ``POSENC_VALUE_CHECKS=0``
    sets the initial value. Shape, dtype, device and layout checks always run.

    >>> import posenc_kernels as pk
    >>> pk.set_value_checks(False); pk.set_value_checks(True)
    """
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    """Whether :func:`set_value_checks` is on."""
    return _value_checks


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set before import: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_INTERPRET = interpreter_enabled()


def set_backend(name: str) -> None:
    """Force an implementation for every op: ``"auto"`` (default), ``"triton"``, ``"native"`` or ``"torch"``.

    ``auto`` runs the Triton kernels on CUDA tensors (and on CPU tensors when the Triton interpreter is on,
    ``TRITON_INTERPRET=1`` before import); on CPU otherwise the C++ kernel of the op when the native
    extension is available (see ``posenc_kernels._native``: prebuilt, or built once on first use), else the
    pure-torch implementation. ``native`` forces the C++/CUDA extension for the ops that have a native
    kernel (an error where it is unavailable for the device; ops without one run as under ``auto``). The
    environment variable ``POSENC_BACKEND`` sets the initial value; ``POSENC_NATIVE=0`` keeps ``auto`` off
    the extension.

    >>> import posenc_kernels as pk
    >>> pk.set_backend("torch"); pk.get_backend()
    'torch'
    >>> pk.set_backend("auto")
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend set by :func:`set_backend` (or ``POSENC_BACKEND``)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous backend on exit.

    >>> import torch, posenc_kernels as pk
    >>> with pk.use_backend("torch"):
    ...     pe = pk.sinusoidal_table(4, 8)
    >>> pe.shape
    torch.Size([4, 8])
    """
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def resolve_backend(device: torch.device, native: Optional[str] = None) -> str:
    """Which implementation runs for tensors on ``device`` under the current setting.

    ``native`` names the op's kernel in the C++/CUDA extension (``"rope"``, ``"sinusoidal"``); ops without
    one pass None and run as under ``auto`` when ``native`` is forced. Returns ``"triton"``, ``"native"`` or
    ``"torch"``. Asking about a native kernel loads the extension on first use (maybe building it once, see
    ``posenc_kernels._native``)."""
    triton_ok = HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and _INTERPRET))
    if _backend == "torch":
        return "torch"
    if _backend == "triton":
        if not triton_ok:
            raise RuntimeError(
                f"backend 'triton' was forced but cannot run on {device.type} tensors: Triton kernels need a "
                "CUDA device, or TRITON_INTERPRET=1 set before importing posenc_kernels for CPU tensors"
            )
        return "triton"
    if _backend == "native" and native is not None:  # ops without a native kernel run as under auto
        if _native.has_op(native, device.type):
            return "native"
        if _native.load_error() is not None:
            why = f"the extension is unavailable: {_native.load_error()}"
        else:
            why = f"the extension has no {device.type} kernel for {native!r}"
        raise RuntimeError(
            f"backend 'native' was forced but cannot run on {device.type} tensors: {why}. Build it with "
            "POSENC_BUILD_EXT=1 pip install --no-build-isolation . or let it build on first use (needs a C++ "
            "compiler, and nvcc for the CUDA kernels)"
        )
    if triton_ok:
        return "triton"
    # No Triton for this device: the op's native kernel when the extension has one (CPU; CUDA without Triton).
    if native is not None and device.type in ("cpu", "cuda") and _native.has_op(native, device.type):
        return "native"
    return "torch"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    """Largest power of two <= n (1 for n < 1)."""
    return 1 if n < 1 else 1 << (int(n).bit_length() - 1)


def tl_acc_dtype(dtype: torch.dtype):
    """Register dtype for the math: fp64 for fp64 storage, fp32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def on_cuda_graph_capture(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------------------------
# Validation helpers: each raises a TypeError/ValueError that names the argument.
# ----------------------------------------------------------------------------------------------


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


def check_last_stride(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have stride(-1) == 1 (contiguous channels; other strides are fine), got strides "
            f"{tuple(t.stride())}; call .contiguous() on it yourself if a copy is what you want"
        )


def _nested_layout(shape, strides) -> bool:
    """Sufficient condition for a strided layout to address distinct elements: sorted by stride, each
    dimension's stride covers the whole extent of the smaller ones. Holds for every view that slicing,
    transposing, expanding-free reshaping or splitting produces."""
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
    """Two tensors written in place by one op must not share elements (they would be rotated twice).

    Disjoint head slices of one buffer (packed QKV) pass. Same storage with intersecting spans is
    resolved exactly when both views have the same nested strides (the offset between them is then a
    box shift in the parent's coordinates); any other intersecting layout is refused as unprovable."""
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
    """The errors PyTorch's own in-place ops raise under autograd, raised here before anything is
    written (a custom autograd.Function would only raise them after its forward had run).

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


def check_position_args(
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    *,
    batch: int,
    seqlen: int,
    device: torch.device,
    integer_positions: bool = True,
    positions_name: str = "positions",
    offsets_name: str = "offsets",
) -> None:
    """Shape/dtype checks shared by every op that resolves a row per token."""
    if positions is not None:
        dtypes = INT_DTYPES if integer_positions else INT_DTYPES + FLOAT_DTYPES
        if positions.dtype == torch.bool or positions.dtype not in dtypes:
            kind = "an integer" if integer_positions else "an integer or floating"
            raise TypeError(f"{positions_name} must be {kind} tensor, got dtype {positions.dtype}")
        check_tensor(positions_name, positions, ndim=(1, 2), device=device)
        want = [(seqlen,), (batch, seqlen)]
        if tuple(positions.shape) not in want:
            raise ValueError(
                f"{positions_name} must have shape [S] = [{seqlen}] or [B, S] = [{batch}, {seqlen}], "
                f"got {tuple(positions.shape)}"
            )
        if offsets is not None or offset != 0:
            raise ValueError(f"pass {positions_name} or {offsets_name}, not both")
    if offsets is not None:
        if offsets.dtype == torch.bool or offsets.dtype not in INT_DTYPES:
            raise TypeError(f"{offsets_name} must be an int or an integer tensor, got dtype {offsets.dtype}")
        check_tensor(offsets_name, offsets, ndim=1, device=device)
        if offsets.shape[0] != batch:
            raise ValueError(f"{offsets_name} must have shape [B] = [{batch}], got {tuple(offsets.shape)}")


def check_position_values(
    positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    offset: int,
    *,
    seqlen: int,
    num_rows: int,
    device: torch.device,
    positions_name: str = "positions",
) -> None:
    """Rows used must lie in [0, num_rows). Reads tensor values (a host sync on CUDA), so it is skipped
    while a CUDA graph is being captured; the kernels then turn an out-of-table row into NaN outputs
    instead of reading out of bounds."""
    if seqlen == 0:
        return
    if positions is None and offsets is None:
        if offset < 0 or offset + seqlen > num_rows:
            raise ValueError(
                f"offsets={offset} with seqlen {seqlen} needs table rows [{offset}, {offset + seqlen}), "
                f"but the cos/sin table has {num_rows} rows"
            )
        return
    if not _value_checks or on_cuda_graph_capture(device):
        return
    t = positions if positions is not None else offsets
    if t.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(t.to(torch.int64)))
    if positions is not None:
        if lo < 0 or hi >= num_rows:
            raise ValueError(
                f"{positions_name} must lie in [0, {num_rows}) (the table's rows), got values in [{lo}, {hi}]"
            )
    elif lo < 0 or hi + seqlen > num_rows:
        raise ValueError(
            f"offsets + seqlen must stay within the table's {num_rows} rows: offsets lie in [{lo}, {hi}] "
            f"and seqlen is {seqlen}"
        )


def token_positions(
    positions: Optional[torch.Tensor], offsets: Optional[torch.Tensor], offset: int, batch: int, seqlen: int, device
) -> torch.Tensor:
    """The row of every token as a ``[B, S]`` tensor (int64, or the positions' float dtype): used by the
    torch backend and by the references."""
    if positions is not None:
        if positions.dtype.is_floating_point:
            return positions.expand(batch, seqlen)
        return positions.to(torch.int64).expand(batch, seqlen)
    s = torch.arange(seqlen, device=device, dtype=torch.int64)
    if offsets is not None:
        return offsets.to(torch.int64)[:, None] + s[None, :]
    return (s + offset)[None, :].expand(batch, seqlen)


def split_offsets(offsets, name: str = "offsets") -> tuple[Optional[torch.Tensor], int]:
    """Public ``offsets`` (int or tensor) -> the ops' (offsets tensor or None, int offset) pair."""
    if isinstance(offsets, torch.Tensor):
        return offsets, 0
    if isinstance(offsets, bool) or not isinstance(offsets, int):
        # Python ints only: numpy ints and the like are accepted through int().
        try:
            as_int = int(offsets)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an int or a [B] integer tensor, got {type(offsets).__name__}") from None
        if as_int != offsets or isinstance(offsets, (bool, float)):
            raise TypeError(f"{name} must be an int or a [B] integer tensor, got {offsets!r}")
        return None, as_int
    return None, offsets


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for a Triton launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
