"""Shared by the CUDA native-extension tests (tests/test_native_cuda*.py): the device, the check that the
CUDA C++ kernel is the one registered, and the allocation / value-check switches."""



import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native
from posenc_kernels.ops import registry



DEV = torch.device("cuda")
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
rope_ = torch.ops.posenc.rope_.default
rope = torch.ops.posenc.rope.default
PORTED = "add_sinusoidal_" in registry._OPS  # the sinusoidal/learned ops on the op layer (their port pending)
needs_port = pytest.mark.skipif(
    not PORTED, reason="the sinusoidal ops are not defined on the op layer yet (posenc::add_sinusoidal_ pending)"
)


def assert_native_cuda(name: str) -> None:
    """A CUDA call of posenc::<name> in this thread runs the C++ kernel: the registry says so, and the
    BackendSelect chooser that calls it was registered by csrc/bindings.cpp."""
    assert registry.registered_kernels(name)["CUDA"] == "native", registry.registered_kernels(name)
    dump = torch._C._dispatch_dump(f"posenc::{name}")
    line = next((ln for ln in dump.splitlines() if ln.startswith("BackendSelect:")), "")
    assert "bindings.cpp" in line, line


@pytest.fixture(scope="module", autouse=True)
def _extension():
    # On the GPU machine the extension must be there: a missing one is a failure, not a skip.
    assert _native.load(), f"native extension did not load: {_native.load_error()}"
    assert _native.has_op("rope", "cuda") and _native.has_op("sinusoidal", "cuda"), "no CUDA kernels registered"
    assert {"rope_", "rope", "sinusoidal_table", "add_sinusoidal_", "add_sinusoidal", "concat_sinusoidal"} <= set(
        _native.ops_for("CUDA")
    )


@pytest.fixture(autouse=True)
def _native_cuda():
    """Process default "native": the C++ kernels on the CUDA key, no router (conftest resets to "auto")."""
    pk.set_backend("native")
    assert_native_cuda("rope_")
    assert_native_cuda("rope")
    yield
    pk.set_backend("auto")


from .native_common import nan_poisoned_allocations, value_checks_off  # noqa: E402  (one copy)

__all__ = [
    "ALL_DTYPES",
    "DEV",
    "PORTED",
    "_extension",
    "_native_cuda",
    "assert_native_cuda",
    "nan_poisoned_allocations",
    "needs_port",
    "rope",
    "rope_",
    "value_checks_off",
]
