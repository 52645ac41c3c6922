"""QK-norm + RoPE (the attention prologue of Qwen3, Gemma 3, OLMo 2, Flux, Wan), everything in one folder:
``kernel`` (Triton), ``torch_impl``, ``reference``, ``op`` (the op pair's declaration), ``api`` (the public
functions)."""

from . import api
from .api import *  # noqa: F401,F403  (the public functions: api.__all__)

__all__ = [*api.__all__]
