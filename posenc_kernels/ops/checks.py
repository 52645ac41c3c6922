"""Argument validation shared by every op family (a TypeError/ValueError, or PyTorch's own RuntimeError for
autograd's in-place rules, naming the argument), and the small helpers every launcher uses."""

from __future__ import annotations

import contextlib
import math
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

    check_flag("enabled", enabled)
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


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers' grids (``triton.cdiv`` is a JITFunction: about 3 us per host call,
    several per decode launch)."""
    return -(-a // b)


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


def check_flag(name: str, value, *, optional: bool = False) -> None:
    """A flag is a bool (``interleaved="yes"`` is an error, not True); ``optional`` also takes None."""
    if not (type(value) is bool or (optional and value is None)):
        raise TypeError(f"{name} must be a bool{' or None' if optional else ''}, got {type(value).__name__}")


def check_flags(**flags) -> None:
    """:func:`check_flag` for each keyword (the public functions' flags in one call)."""
    for name, value in flags.items():
        check_flag(name, value)


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


#: Search steps the exact overlap test may take before it refuses conservatively (see :func:`shared_element`).
OVERLAP_WORK = 4096


def _byte_terms(t: torch.Tensor, flip: bool, terms: dict) -> int:
    """Adds ``t``'s bytes as ``first + sum(c * z)``, ``0 <= z <= bound``, to ``terms`` ({c: summed bound});
    returns its first byte, or with ``flip`` its last (its bytes then count down: ``last - sum(c * z)``)."""
    e = t.element_size()
    first = t.storage_offset() * e
    span = e - 1
    if e > 1:
        terms[1] = terms.get(1, 0) + e - 1
    for n, st in zip(t.shape, t.stride()):
        if n > 1 and st != 0:
            c = (st if st > 0 else -st) * e
            if st < 0:
                first += st * (n - 1) * e
            terms[c] = terms.get(c, 0) + n - 1
            span += c * (n - 1)
    return first + span if flip else first


def shared_element(a: torch.Tensor, b: torch.Tensor, work: int = OVERLAP_WORK) -> Optional[bool]:
    """Whether two strided views of one storage share a byte: exact (True/False), or None when the search
    needed more than ``work`` steps. Mirrored by ``csrc/alias_checks.h`` (``element_overlap``).

    A byte of a is ``a0 + sum(c_i x_i)``, one of b ``b1 - sum(d_j y_j)`` counted down from b's last byte
    (the element's bytes are a term of coefficient 1). They meet iff ``sum(c_i x_i) + sum(d_j y_j) = b1 - a0``
    with every ``0 <= x_i, y_j <=`` its bound: a bounded knapsack over at most 2 (rank + 1) terms. Terms of
    equal coefficient merge (views of one buffer share strides), then a depth-first search from the largest
    coefficient, pruned by the reach of the smaller ones and by their gcd. For layouts whose strides each
    cover the smaller dimensions' extent (every slice, transpose or split of a buffer) a coefficient has at
    most two feasible values, and the search takes a few steps per dimension; the cap only bounds
    adversarial as_strided layouts."""
    merged: dict = {}
    target = _byte_terms(b, True, merged) - _byte_terms(a, False, merged)
    terms = sorted(merged.items(), reverse=True)
    n = len(terms)
    reach, gcd = [0] * (n + 1), [0] * (n + 1)
    for k in range(n - 1, -1, -1):
        c, u = terms[k]
        reach[k] = reach[k + 1] + c * u
        gcd[k] = math.gcd(gcd[k + 1], c)
    if target < 0 or target > reach[0]:
        return False  # disjoint byte spans
    stack, steps = [(0, target)], 0  # depth first: (next term, remainder)
    while stack:
        k, rem = stack.pop()
        steps += 1
        if steps > work:
            return None
        if rem == 0:
            return True
        if k == n or rem > reach[k] or rem % gcd[k]:
            continue
        c, u = terms[k]
        if k == n - 1:
            if rem // c <= u:  # rem is a multiple of c (gcd)
                return True
            continue
        lo, hi = max(0, -(-(rem - reach[k + 1]) // c)), min(u, rem // c)
        stack.extend((k + 1, rem - z * c) for z in range(lo, hi + 1))  # the largest z is popped first
    return False


def check_disjoint(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two tensors written in place by one op must not share elements (they would be rotated twice);
    disjoint views of one buffer (head or channel slices of packed QKV, a token shift) pass. Exact for any
    two strided views (:func:`shared_element`), from metadata alone: no sync, graph-capture safe."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return
    shared = shared_element(a, b)
    if shared is None:
        raise ValueError(
            f"{name_b} must not overlap {name_a}, and their layouts are too irregular to prove that they do not "
            f"share an element within the exact check's budget ({OVERLAP_WORK} steps): refused conservatively; "
            "pass tensors of separate buffers or a plain slice of one"
        )
    if shared:
        raise ValueError(f"{name_b} must not overlap {name_a}: they share memory that is written in place")


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


