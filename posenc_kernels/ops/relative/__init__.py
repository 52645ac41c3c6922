"""Relative position biases (ALiBi, T5 buckets): ``buckets`` (exact integer T5 thresholds), ``kernel``
(Triton), ``torch_impl``, ``reference``, ``op`` (schemas, checks, registration, autograd) and ``api`` (the
public functions, score_mods and the module)."""

from .api import *  # noqa: F401,F403  (the public functions: api.__all__)
from .api import __all__  # noqa: F401
