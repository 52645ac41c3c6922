"""Rotary position embedding (RoPE), everything in one folder: ``kernel`` (Triton), ``torch_impl``,
``reference``, ``op`` (the op pair's declaration and the table op), ``api`` (the public functions),
``schedules`` (inverse frequencies of every long-context schedule) and ``module`` (``RotaryEmbedding``)."""

from . import api, module, schedules
from .api import *  # noqa: F401,F403  (the public functions: api.__all__)
from .module import *  # noqa: F401,F403
from .schedules import ROPE_TYPES, rope_frequencies

__all__ = [*api.__all__, *module.__all__, "ROPE_TYPES", "rope_frequencies"]
