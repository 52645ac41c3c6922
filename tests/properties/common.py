"""What the property tests share: example budgets, backends, memory layouts, the reproducer note."""

from __future__ import annotations

import os

import torch
from hypothesis import event, note

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels.ops import registry

from conftest import INTERPRET, ulp_err

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def examples(ci: int) -> int:
    """A test's example budget: ``ci`` in CI; 10x under the nightly profile; ``POSENC_HYPOTHESIS_EXAMPLES``
    for every test when set."""
    if os.environ.get("POSENC_HYPOTHESIS_EXAMPLES"):
        return int(os.environ["POSENC_HYPOTHESIS_EXAMPLES"])
    return ci * (10 if os.environ.get("POSENC_HYPOTHESIS_PROFILE") == "nightly" else 1)


def backends(op: str) -> list:
    """The backends that run ``posenc::<op>`` on CPU tensors (the suite's cases are CPU tensors, on any
    machine): torch always, Triton through the interpreter (``TRITON_INTERPRET=1``), native where the
    extension has a CPU kernel for it."""
    out = ["torch"]
    if INTERPRET and registry.HAS_TRITON and "triton" in registry.spec(op).impls:
        out.append("triton")
    if op in _native.ops_for("CPU") and registry.spec(op).native:
        out.append("native")
    return out


#: How a tensor of logical shape ``[..., N, D]`` is laid out in memory: ``contiguous``; ``transposed`` (the
#: two leading-but-last dims swapped in storage, as HF's [B, H, S, D] seen as [B, S, H, D]); ``sliced`` (a
#: window of a larger buffer: storage offset, padded rows and channels); ``channel_strided`` (every other
#: channel: last stride 2).
LAYOUTS = ("contiguous", "transposed", "sliced", "channel_strided")


def make(shape, dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    """A random tensor of ``shape`` with the memory ``layout`` (values from ``gen``)."""
    shape = tuple(shape)
    if layout == "contiguous" or len(shape) < 2:
        return torch.randn(shape, generator=gen).to(dtype)
    if layout == "transposed":
        if len(shape) < 3:
            return torch.randn(shape[::-1], generator=gen).to(dtype).t()
        perm = list(range(len(shape)))
        perm[-3], perm[-2] = perm[-2], perm[-3]
        return torch.randn([shape[i] for i in perm], generator=gen).to(dtype).permute(*perm)
    if layout == "sliced":
        big = torch.randn(tuple(n + 1 for n in shape[:-1]) + (shape[-1] + 3,), generator=gen).to(dtype)
        return big[tuple(slice(1, None) for _ in shape[:-1]) + (slice(0, shape[-1]),)]
    if layout == "channel_strided":
        return torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen).to(dtype)[..., ::2]
    raise ValueError(layout)


def reproduce(case, *tags: str) -> None:
    """Note a command that reruns ``case`` outside pytest (printed with a failing, shrunk example); count the
    example under each of ``case``'s fields named in ``tags`` (``--hypothesis-show-statistics``)."""
    for t in tags:
        event(f"{t}={getattr(case, t)}")
    event("tokens=none" if case.B * case.S == 0 else "tokens=1" if case.B * case.S == 1 else "tokens>1")
    note(
        "reproduce (from the repository root): PYTHONPATH=.:tests TRITON_INTERPRET=1 python -c "
        f"\"from properties.{type(case).__module__.rsplit('.', 1)[-1]} import *; check({case!r})\""
    )


def use(backend: str):
    return pk.use_backend(backend)


def compiled_equals_eager(call, args, *, inplace_call=None) -> None:
    """``torch.compile(call, fullgraph=True, dynamic=True)`` (aot_eager: the ops' fakes and the traced
    in-place path) gives eager's values bit for bit; with ``inplace_call``, the compiled in-place op on copies
    of ``args`` writes them too."""
    import torch._dynamo

    torch._dynamo.reset()
    expected = call(*args)
    got = torch.compile(call, backend="aot_eager", fullgraph=True, dynamic=True)(*args)
    for g, e in zip(_flat(got), _flat(expected)):
        assert torch.equal(g, e), "compiled differs from eager"
    if inplace_call is not None:
        copies = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        got = torch.compile(inplace_call, backend="aot_eager", fullgraph=True, dynamic=True)(*copies)
        for g, e in zip(_flat(got), _flat(expected)):
            assert torch.equal(g, e), "compiled in-place op differs from the eager out-of-place op"


def _flat(x):
    if isinstance(x, (tuple, list)):
        return [t for t in x if t is not None]
    return [x]


def atol_ulp(backend: str, dtype) -> float:
    """The tolerance rule's atol, in ulps of the output: 0.5; 1.05 for bf16 outputs of the Triton kernels
    run by the interpreter, whose fp32 -> bf16 cast truncates (GPUs round to nearest; tests/learned/common.py
    makes the same allowance), so a value correctly rounded elsewhere may land 1 ulp off there."""
    if backend == "triton" and INTERPRET and dtype == torch.bfloat16:
        return 1.05
    return 0.5


def assert_rule(out, truth, same_in_torch, *, calibration=None, backend: str = "", what: str = "") -> None:
    """The dtype-tied tolerance rule of tests/conftest.py (``assert_dtype_tolerance``: error <= 2 x torch's
    error + atol, in ulps of the output), with torch's error measured on the case's elements and, given
    ``calibration`` = ``(truth, same_in_torch)`` of the same computation on a few hundred elements, on those
    too. On a drawn case of a few elements torch may happen to round every element well, while a kernel's
    equally good rounding (an fp32 product fused or not, a cos/sin within 1 ulp) lands 1-2 ulps off where
    terms cancel: the torch error the rule doubles is that of the computation, not of one lucky draw."""
    assert out.shape == truth.shape, (out.shape, truth.shape)
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err = ulp_err(out, truth, out.dtype)
    base = ulp_err(same_in_torch, truth, out.dtype)
    cal = ulp_err(calibration[1], calibration[0], out.dtype) if calibration is not None else 0.0
    limit = 2.0 * max(base, cal) + atol_ulp(backend, out.dtype)
    assert err <= limit, (
        f"{what}: error {err:.2f} ulp > 2 x torch-in-dtype error (this case {base:.2f} ulp, calibration "
        f"{cal:.2f} ulp) + {atol_ulp(backend, out.dtype)}"
    )
