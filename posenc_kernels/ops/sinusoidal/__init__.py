"""Sinusoidal absolute position encodings: ``kernel`` (Triton), ``torch_impl``, ``reference``, ``op``
(schemas, checks, registration, autograd) and ``api`` (the public functions and the module)."""

from .api import *  # noqa: F401,F403  (the public functions: api.__all__)
from .api import __all__  # noqa: F401
