"""flash-attn-style ``apply_rotary_emb`` (``flash_attn.layers.rotary.apply_rotary_emb``),
``apply_rotary_emb_qkv_`` and ``apply_rotary_emb_kv_``, mapped onto :func:`posenc_kernels.apply_rope` /
:func:`posenc_kernels.apply_rope_`. The contract mirrored, and every difference from flash-attn:
``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..ops.checks import check_inplace_autograd, check_tensor
from ..ops.rope import apply_rope, apply_rope_

__all__ = ["apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_qkv_", "apply_rotary_emb_kv_"]


def _check_flags(interleaved, inplace=False) -> None:
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")


def _autograd_refuses_inplace(t: torch.Tensor) -> bool:
    """True where PyTorch's in-place rules (which :func:`posenc_kernels.apply_rope_` keeps) refuse to record
    a write into ``t``: a leaf that requires grad, a view of one, a view made by a multi-output op."""
    try:
        check_inplace_autograd("x", t)
    except RuntimeError:
        return True
    return False


def _qk_views(t: torch.Tensor, layout: str, num_heads_q: Optional[int]):
    """The (q, k) parts of ``t`` that rotate, as views (k None for a lone ``x``, q None for ``kv``)."""
    if layout == "x":
        return t, None
    if layout == "kv":
        return None, t[:, :, 0]
    if t.dim() == 5:
        return t[:, :, 0], t[:, :, 1]
    num_heads_k = (t.shape[2] - num_heads_q) // 2
    return t[:, :, :num_heads_q], t[:, :, num_heads_q : num_heads_q + num_heads_k]


def _rotate_(t, layout, num_heads_q, cos, sin, cos_k, sin_k, interleaved, offsets, cu_seqlens) -> None:
    """Rotate the q/k parts of ``t`` in place (one launch when q and k share the tables)."""
    q, k = _qk_views(t, layout, num_heads_q)
    kw = {"offsets": offsets, "interleaved": interleaved}
    if cu_seqlens is not None:
        kw["cu_seqlens"] = cu_seqlens
    if q is None:
        apply_rope_(k, None, cos, sin, **kw)
    elif k is None or (cos_k is None and sin_k is None):
        apply_rope_(q, k, cos, sin, **kw)
    else:
        apply_rope_(q, None, cos, sin, **kw)
        apply_rope_(k, None, cos if cos_k is None else cos_k, sin if sin_k is None else sin_k, **kw)


class _RawInplaceRotary(torch.autograd.Function):
    """flash-attn's in-place contract: the rotation is written into the tensor's data with autograd off and
    the tensor comes back as a differentiable output (an alias of the input, not marked dirty), exactly
    as flash-attn's ``ApplyRotaryEmb``/``ApplyRotaryEmbQKV_``/``ApplyRotaryEmbKV_`` do. Used only where
    PyTorch's in-place rules refuse the write (see :func:`_autograd_refuses_inplace`); gradients flow
    through the returned tensor. Backward rotates a copy of the incoming gradient by -theta (the tables'
    sine negated, exact in any dtype); it never writes the incoming gradient (flash-attn rotates it in place)."""

    @staticmethod
    def forward(ctx, x, cos, sin, cos_k, sin_k, offsets_t, cu_seqlens, layout, num_heads_q, interleaved, offset):
        offsets = offset if offsets_t is None else offsets_t
        _rotate_(x, layout, num_heads_q, cos, sin, cos_k, sin_k, interleaved, offsets, cu_seqlens)
        ctx.save_for_backward(cos, sin, cos_k, sin_k, offsets_t, cu_seqlens)
        ctx.spec = (layout, num_heads_q, interleaved, offset)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin, cos_k, sin_k, offsets_t, cu_seqlens = ctx.saved_tensors
        layout, num_heads_q, interleaved, offset = ctx.spec
        offsets = offset if offsets_t is None else offsets_t
        g = grad.clone()
        neg = lambda s: None if s is None else -s  # noqa: E731
        _rotate_(g, layout, num_heads_q, cos, -sin, cos_k, neg(sin_k), interleaved, offsets, cu_seqlens)
        return (g,) + (None,) * 10


def _split_offsets(seqlen_offsets):
    if isinstance(seqlen_offsets, torch.Tensor):
        return seqlen_offsets, 0
    return None, seqlen_offsets


def _inplace(x, layout, num_heads_q, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, cu_seqlens):
    """In place under flash-attn's rules: PyTorch's in-place autograd where it applies, else the raw write."""
    if torch.is_grad_enabled() and x.requires_grad and _autograd_refuses_inplace(x):
        offsets_t, offset = _split_offsets(seqlen_offsets)
        return _RawInplaceRotary.apply(x, cos, sin, cos_k, sin_k, offsets_t, cu_seqlens, layout, num_heads_q,
                                       interleaved, offset)  # fmt: skip
    _rotate_(x, layout, num_heads_q, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, cu_seqlens)
    return x


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """flash-attn's ``apply_rotary_emb``: ``x`` rotated (``x``'s storage when ``inplace``).

    >>> import torch
    >>> from posenc_kernels.integrations.flash_attn import apply_rotary_emb
    >>> angle = torch.arange(16.0)[:, None] * 0.1 ** torch.arange(4.0)  # [seqlen_ro, rotary_dim / 2]
    >>> x = torch.randn(2, 6, 3, 8)
    >>> y = apply_rotary_emb(x, angle.cos(), angle.sin(), seqlen_offsets=4)
    >>> y.shape, torch.equal(y, x)
    (torch.Size([2, 6, 3, 8]), False)
    >>> leaf = torch.randn(2, 6, 3, 8, requires_grad=True)  # in place on a leaf, as flash-attn allows
    >>> out = apply_rotary_emb(leaf, angle.cos(), angle.sin(), inplace=True)
    >>> out.sum().backward(); leaf.grad.shape
    torch.Size([2, 6, 3, 8])
    """
    check_tensor("x", x)
    _check_flags(interleaved, inplace)
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be None or an int >= 0, got {max_seqlen!r}")
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, S, H, D] (or [T, H, D] with cu_seqlens), got shape {tuple(x.shape)}")
    elif x.dim() != 3:
        raise ValueError(f"x must be packed [T, H, D] when cu_seqlens is given, got shape {tuple(x.shape)}")
    if inplace:
        return _inplace(x, "x", None, cos, sin, None, None, interleaved, seqlen_offsets, cu_seqlens)
    kwargs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    out, _ = apply_rope(x, None, cos, sin, offsets=seqlen_offsets, interleaved=interleaved, **kwargs)
    return out


apply_rotary_emb_func = apply_rotary_emb  # flash-attn's backward-compatible name


def apply_rotary_emb_qkv_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cos_k: Optional[torch.Tensor] = None,
    sin_k: Optional[torch.Tensor] = None,
    interleaved: bool = False,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    num_heads_q: Optional[int] = None,
) -> torch.Tensor:
    """flash-attn's ``apply_rotary_emb_qkv_``: rotate q and k of ``qkv`` in place, v untouched; returns
    ``qkv`` (an alias of it where PyTorch's in-place rules refuse the write, as flash-attn returns).

    ``qkv`` ``[B, S, 3, H, D]``, or ``[B, S, Hq + 2*Hk, D]`` with ``num_heads_q`` (GQA/MQA); ``cos_k``/
    ``sin_k`` optional tables for k (default: q's). q and k take one launch when they share the tables.

    >>> import torch
    >>> from posenc_kernels.integrations.flash_attn import apply_rotary_emb_qkv_
    >>> angle = torch.arange(8.0)[:, None] * 0.1 ** torch.arange(4.0)
    >>> qkv = torch.randn(2, 5, 4 + 2 * 2, 8)
    >>> v = qkv[:, :, 6:].clone()
    >>> out = apply_rotary_emb_qkv_(qkv, angle.cos(), angle.sin(), num_heads_q=4)
    >>> out is qkv, torch.equal(qkv[:, :, 6:], v)
    (True, True)
    """
    check_tensor("qkv", qkv)
    _check_flags(interleaved)
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv must be [B, S, 3, H, D], got shape {tuple(qkv.shape)}")
    elif qkv.dim() == 4:
        if isinstance(num_heads_q, bool) or not isinstance(num_heads_q, int) or num_heads_q < 1:
            raise ValueError(f"num_heads_q must be a positive int for a [B, S, Hq + 2*Hk, D] qkv, got {num_heads_q!r}")
        rest = qkv.shape[2] - num_heads_q
        if rest < 2 or rest % 2:
            raise ValueError(
                f"qkv must have num_heads_q + 2 * num_heads_k heads (dim 2) with num_heads_k >= 1: "
                f"{qkv.shape[2]} heads with num_heads_q={num_heads_q}"
            )
    else:
        raise ValueError(f"qkv must be [B, S, 3, H, D] or [B, S, Hq + 2*Hk, D], got shape {tuple(qkv.shape)}")
    return _inplace(qkv, "qkv", num_heads_q, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, None)


def apply_rotary_emb_kv_(
    kv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
) -> torch.Tensor:
    """flash-attn's ``apply_rotary_emb_kv_``: rotate k = ``kv[:, :, 0]`` of ``kv`` ``[B, S, 2, H, D]`` in
    place; returns ``kv`` (an alias where PyTorch's in-place rules refuse the write).

    >>> import torch
    >>> from posenc_kernels.integrations.flash_attn import apply_rotary_emb_kv_
    >>> angle = torch.arange(8.0)[:, None] * 0.1 ** torch.arange(4.0)
    >>> kv = torch.randn(2, 5, 2, 3, 8)
    >>> v = kv[:, :, 1].clone()
    >>> apply_rotary_emb_kv_(kv, angle.cos(), angle.sin()) is kv, torch.equal(kv[:, :, 1], v)
    (True, True)
    """
    check_tensor("kv", kv)
    _check_flags(interleaved)
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must be [B, S, 2, H, D], got shape {tuple(kv.shape)}")
    return _inplace(kv, "kv", None, cos, sin, None, None, interleaved, seqlen_offsets, None)
