"""Rotary position embedding (RoPE): ``kernel`` (Triton), ``torch_impl``, ``reference``, ``op`` (schemas,
check, registration, autograd) and ``api`` (the public functions)."""

from .api import *  # noqa: F401,F403  (the public functions: api.__all__)
from .api import __all__  # noqa: F401
