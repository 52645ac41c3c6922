"""Sinusoidal absolute position encodings: ``kernel`` (Triton), ``torch_impl``, ``reference``, ``op``
(schemas, checks, registration, autograd) and ``api`` (the public functions and the module)."""

from .api import (
    SINUSOIDAL_CONVENTIONS,
    SinusoidalPositionalEncoding,
    add_sinusoidal,
    add_sinusoidal_,
    concat_sinusoidal,
    sinusoidal_table,
)

__all__ = [
    "SINUSOIDAL_CONVENTIONS",
    "SinusoidalPositionalEncoding",
    "add_sinusoidal",
    "add_sinusoidal_",
    "concat_sinusoidal",
    "sinusoidal_table",
]
