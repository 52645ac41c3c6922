"""Layers in the Hugging Face ``kernels`` hub format (``kernels.kernelize`` swaps a model layer's ``forward``
for one of these).

``apply_rotary_transformers`` replaces transformers' ``rotary_pos_emb`` (the ``apply_rotary_pos_emb`` that
every Llama-style attention calls): :func:`posenc_kernels.integrations.hf.apply_rotary_pos_emb`, so partial
rotary, both q and k in one launch, out of place without copies of q or k, and a backward. Its rules are
``kernels``' own: no ``__init__`` (the layer is stateless), no class members beyond ``can_torch_compile`` and
``has_backward``, and ``forward`` takes what the function it replaces takes.

This file is vendored verbatim into the hub repository that ``python -m posenc_kernels.hub OUTDIR`` writes
(``build/torch-universal/posenc_rotary/layers.py``), beside a copy of the RoPE code it needs; it therefore
imports only relative to its package. ``docs/integrations.md`` shows how a user maps it.
"""

from __future__ import annotations

from torch import nn

from .integrations.hf import apply_rotary_pos_emb

__all__ = ["apply_rotary_transformers"]


class apply_rotary_transformers(nn.Module):  # noqa: N801 - the name kernels' mappings use for this layer
    """Drop-in for transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``: q/k ``[B, H, S, D]``
    (``unsqueeze_dim=1``) or ``[B, S, H, D]`` (``unsqueeze_dim=2``), cos/sin ``[B or 1, S, R]`` with ``R <= D``;
    returns new ``(q_embed, k_embed)``. Inputs of another structure take HF's own math (see the HF drop-in)."""

    can_torch_compile = True
    has_backward = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
