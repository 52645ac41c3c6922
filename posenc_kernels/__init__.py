"""posenc_kernels: fused kernels for the position encodings of transformers.

Every op is a ``torch.library`` custom op in the ``posenc`` namespace (``torch.ops.posenc.*``) with a fake
implementation and autograd, so ``torch.compile(fullgraph=True)`` traces through it. CUDA tensors run the
Triton kernels; CPU tensors run a pure-torch implementation, or the Triton kernels through the Triton
interpreter when ``TRITON_INTERPRET=1`` is set before import. :func:`set_backend` forces one.
"""

from ._common import get_backend, interpreter_enabled, set_backend, set_value_checks, use_backend
from .rope import apply_rope, apply_rope_, rope_cos_sin, rope_frequencies
from .sinusoidal import (
    SINUSOIDAL_CONVENTIONS,
    SinusoidalPositionalEncoding,
    add_sinusoidal,
    add_sinusoidal_,
    concat_sinusoidal,
    sinusoidal_table,
)

__version__ = "0.1.0"

__all__ = [
    "apply_rope",
    "apply_rope_",
    "rope_cos_sin",
    "rope_frequencies",
    "SINUSOIDAL_CONVENTIONS",
    "SinusoidalPositionalEncoding",
    "add_sinusoidal",
    "add_sinusoidal_",
    "concat_sinusoidal",
    "sinusoidal_table",
    "get_backend",
    "set_backend",
    "use_backend",
    "set_value_checks",
    "interpreter_enabled",
]
