"""Rotary position embedding (RoPE): ``kernel`` (Triton), ``torch_impl``, ``reference``, ``op`` (schemas,
check, registration, autograd) and ``api`` (the public functions)."""

from .api import apply_rope, apply_rope_, apply_rope_qkv_, axial_positions, mrope_axis_map, rope_cos_sin

__all__ = ["apply_rope", "apply_rope_", "apply_rope_qkv_", "axial_positions", "mrope_axis_map", "rope_cos_sin"]
