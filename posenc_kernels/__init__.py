"""posenc_kernels: fused kernels for the position encodings of transformers.

Every op is defined once, by its schema, in the ``posenc`` namespace (``torch.ops.posenc.*``), with its
implementations registered with the dispatcher per key (``posenc_kernels.ops.registry``): CUDA tensors run
the Triton kernels, CPU tensors the native C++ kernels when the extension is loaded, else a pure-torch
implementation (or the Triton kernels through the interpreter with ``TRITON_INTERPRET=1`` set before
import). :func:`set_backend` / :func:`use_backend` force one. The families live in ``posenc_kernels.ops``.
"""

from .ops import cache as _cache
from .ops import learned as _learned
from .ops import positions as _positions
from .ops import qknorm as _qknorm
from .ops import registry as _registry
from .ops import relative as _relative
from .ops import rope as _rope
from .ops import sinusoidal as _sinusoidal
from .ops.checks import set_value_checks
from .ops.cache import *  # noqa: F401,F403
from .ops.learned import *  # noqa: F401,F403
from .ops.registry import get_backend, interpreter_enabled, set_backend, use_backend
from .ops.qknorm import *  # noqa: F401,F403
from .ops.relative import *  # noqa: F401,F403
from .ops.rope import *  # noqa: F401,F403
from .ops.sinusoidal import *  # noqa: F401,F403
from .ops.positions import *  # noqa: F401,F403

__version__ = "0.1.0"

_registry.finalize()  # every family has defined its ops: register their kernels

__all__ = [
    *_rope.__all__, *_qknorm.__all__, *_cache.__all__, *_sinusoidal.__all__, *_learned.__all__,
    *_relative.__all__, *_positions.__all__, "get_backend", "set_backend", "use_backend", "set_value_checks",
    "interpreter_enabled",
]  # fmt: skip
