"""RoPE + KV-cache write (the attention prologue's last stage, with QK-norm in front when asked, and MLA's
latent cache), everything in one folder: ``torch_impl``, ``reference``, ``op`` (the op pair's declaration),
``api`` (the public functions); the Triton launcher drives the QK-norm family's prologue kernel."""

from . import api
from .api import *  # noqa: F401,F403  (the public functions: api.__all__)

__all__ = [*api.__all__]
