"""flash-attn-style ``apply_rotary_emb`` (``flash_attn.layers.rotary.apply_rotary_emb``),
``apply_rotary_emb_qkv_`` and ``apply_rotary_emb_kv_``, mapped onto :func:`posenc_kernels.apply_rope` /
:func:`posenc_kernels.apply_rope_`; and ``rotary_and_append_kvcache_``, the rotary + KV-cache append part of
``flash_attn_with_kvcache``, mapped onto :func:`posenc_kernels.rope_and_cache_`. The contract mirrored, and
every difference from flash-attn: ``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..ops.checks import INT_DTYPES, check_inplace_autograd, check_tensor, value_checks_on
from ..ops.rope import apply_rope, apply_rope_

try:
    from ..ops import cache as _cache
except ImportError:  # the kernels-hub layer vendors this file without the cache family
    _cache = None

__all__ = ["apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_qkv_", "apply_rotary_emb_kv_",
           "rotary_and_append_kvcache_"]


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


def _seqlens(cache_seqlens, batch: int, device):
    """flash-attn's ``cache_seqlens`` (an int, or ``[B]`` integers) as ``(int or None, tensor or None)``."""
    if isinstance(cache_seqlens, torch.Tensor):
        check_tensor("cache_seqlens", cache_seqlens, ndim=1, device=device)
        if cache_seqlens.dtype == torch.bool or cache_seqlens.dtype not in INT_DTYPES:
            raise TypeError(f"cache_seqlens must be an int or a [B] int32 tensor, got dtype {cache_seqlens.dtype}")
        if cache_seqlens.shape[0] != batch:
            raise ValueError(f"cache_seqlens must be [B] = [{batch}], got {tuple(cache_seqlens.shape)}")
        return None, cache_seqlens
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, int):
        raise TypeError(f"cache_seqlens must be an int or a [B] int32 tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
    return cache_seqlens, None


def _paged_slots(k_cache, pos, cache_batch_idx, block_table, device):
    """Slots (``row * rows_per_entry + offset``) of the tokens at cache positions ``pos`` ``[B, S]`` when
    the cache is addressed through ``cache_batch_idx`` (each sequence's cache row) or ``block_table`` (its
    pages), with the check that no position runs past its sequence's part of the cache (else it would
    land in another sequence's rows)."""
    if block_table is not None:
        check_tensor("block_table", block_table, ndim=2, device=device)
        if block_table.dtype == torch.bool or block_table.dtype not in INT_DTYPES:
            raise TypeError(f"block_table must be an int32 tensor, got dtype {block_table.dtype}")
        if block_table.shape[0] != pos.shape[0]:
            raise ValueError(f"block_table must be [B, max_num_blocks] with B = {pos.shape[0]}, got "
                             f"{tuple(block_table.shape)}")  # fmt: skip
        page, limit, what = k_cache.shape[1], block_table.shape[1] * k_cache.shape[1], "block_table's pages"
    else:
        check_tensor("cache_batch_idx", cache_batch_idx, ndim=1, device=device)
        if cache_batch_idx.dtype == torch.bool or cache_batch_idx.dtype not in INT_DTYPES:
            raise TypeError(f"cache_batch_idx must be an int32 tensor, got dtype {cache_batch_idx.dtype}")
        if cache_batch_idx.shape[0] != pos.shape[0]:
            raise ValueError(f"cache_batch_idx must be [B] = [{pos.shape[0]}], got {tuple(cache_batch_idx.shape)}")
        limit, what = k_cache.shape[1], "the cache's length"
    if pos.numel() and value_checks_on(device):
        hi = int(pos.max())
        if hi >= limit:
            raise ValueError(f"cache_seqlens + seqlen_new - 1 = {hi} is past {what} ({limit} positions per sequence)")
        if cache_batch_idx is not None:
            lo, top = (int(x) for x in torch.aminmax(cache_batch_idx))
            if lo < 0 or top >= k_cache.shape[0]:
                raise ValueError(
                    f"cache_batch_idx must lie in [0, {k_cache.shape[0]}) (k_cache's batch), got [{lo}, {top}]"
                )
    if block_table is not None:  # (clamped: with value checks off, a position past the table reads no memory)
        pages = block_table.long().gather(1, (pos // page).clamp_max(block_table.shape[1] - 1))
        return (pages * page + pos % page).flatten()
    return (cache_batch_idx.long()[:, None] * limit + pos).flatten()


def rotary_and_append_kvcache_(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rotary_cos: torch.Tensor,
    rotary_sin: torch.Tensor,
    cache_seqlens: Union[int, torch.Tensor],
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    rotary_interleaved: bool = True,
) -> torch.Tensor:
    """The rotary + append part of flash-attn's ``flash_attn_with_kvcache`` (its argument names and
    defaults): rotate ``k`` ``[B, S_new, Hk, D]`` at positions ``cache_seqlens[b] + s`` and write it, with
    ``v``, into ``k_cache`` / ``v_cache`` ``[B_cache, S_cache, Hk, D]`` at those positions; rotate ``q``
    ``[B, S_q, Hq, D]`` as flash-attn does before its attention: at ``cache_seqlens[b] + s`` when ``causal``
    or local (``window_size != (-1, -1)``), else every token of ``q`` at ``cache_seqlens[b]``. Returns the
    rotated ``q``; q and k are rotated in place (flash-attn rotates copies inside its kernel and leaves them
    as they were).

    ``rotary_cos`` / ``rotary_sin`` ``[seqlen_ro, rotary_dim / 2]`` (``rotary_dim <= D``: the rest passes
    through); ``rotary_interleaved`` (flash-attn's default True) pairs ``(2i, 2i+1)``, else ``(i, i +
    rotary_dim/2)``. ``cache_seqlens`` an int or ``[B]`` integers; ``cache_batch_idx`` ``[B]``: sequence
    ``b`` writes row ``cache_batch_idx[b]`` of the cache; ``block_table`` ``[B, max_num_blocks]``: a paged
    cache ``[num_blocks, page_block_size, Hk, D]``. One launch when q's positions are k's (causal or local
    with ``S_q == S_new``, or ``S_q == S_new == 1``), else two: k and the cache, then q alone (q's dtype,
    head_dim and table rows are checked before the first write). ``cache_leftpad`` is not supported
    (NotImplementedError).

    >>> import torch
    >>> from posenc_kernels.integrations.flash_attn import rotary_and_append_kvcache_
    >>> angle = torch.arange(16.0)[:, None] * 0.1 ** torch.arange(4.0)       # [seqlen_ro, rotary_dim / 2]
    >>> q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)   # one new token
    >>> k_cache, v_cache = torch.zeros(2, 16, 2, 8), torch.zeros(2, 16, 2, 8)
    >>> cache_seqlens = torch.tensor([3, 7], dtype=torch.int32)
    >>> q_ro = rotary_and_append_kvcache_(q, k_cache, v_cache, k, v, angle.cos(), angle.sin(), cache_seqlens)
    >>> q_ro is q, torch.equal(k_cache[1, 7], k[1, 0]), torch.equal(v_cache[0, 3], v[0, 0])
    (True, True, True)
    """
    if _cache is None:
        raise RuntimeError(
            "rotary_and_append_kvcache_ needs posenc_kernels.ops.cache, which this copy does not include"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                    ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):  # fmt: skip
        check_tensor(name, t)
    for name, flag in (("causal", causal), ("rotary_interleaved", rotary_interleaved)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad is not supported by rotary_and_append_kvcache_")
    if cache_batch_idx is not None and block_table is not None:
        raise ValueError("pass at most one of cache_batch_idx and block_table (flash-attn takes one or the other)")
    try:
        local = tuple(int(w) for w in window_size) != (-1, -1)
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair of ints, got {window_size!r}") from None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k and v must be [B, S, H, D], got {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}"
        )
    B, S_q, S = q.shape[0], q.shape[1], k.shape[1]
    if k.shape[0] != B or q.dtype != k.dtype or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have one batch, dtype and head_dim: got q {tuple(q.shape)} {q.dtype}, k "
                         f"{tuple(k.shape)} {k.dtype}")  # fmt: skip
    offset, seqlens = _seqlens(cache_seqlens, B, q.device)
    if seqlens is None:  # k's positions (and a causal q's): cache_seqlens[b] + s
        pos, offsets = torch.arange(offset, offset + S, device=q.device), offset
    else:
        pos, offsets = seqlens[:, None] + torch.arange(S, device=q.device, dtype=seqlens.dtype), seqlens
    together = S_q == S and (causal or local or S == 1)  # q's positions are k's: one launch
    if not together and (causal or local) and S_q > S and B and value_checks_on(q.device):
        # q alone runs after the cache write: its positions past k's are checked first (no write before an error)
        hi = (offset if seqlens is None else int(seqlens.max())) + S_q - 1
        if hi >= rotary_cos.shape[0]:
            raise ValueError(
                f"q's positions reach cache_seqlens + S_q - 1 = {hi}, past rotary_cos's {rotary_cos.shape[0]} rows"
            )
    q_in = q if together else k.narrow(2, 0, 0)  # no q heads: k and the cache only
    if cache_batch_idx is None and block_table is None:
        _cache.rope_and_cache_(q_in, k, v, k_cache, v_cache, rotary_cos, rotary_sin, cache_positions=pos,
                               offsets=offsets, interleaved=rotary_interleaved)  # fmt: skip
    else:
        pos2 = pos if pos.dim() == 2 else pos[None].expand(B, S)
        slots = _paged_slots(k_cache, pos2.long(), cache_batch_idx, block_table, q.device)
        flat = []
        for name, t in (("q", q_in), ("k", k), ("v", v)):
            try:
                flat.append(t.view(B * S, t.shape[2], t.shape[3]))
            except RuntimeError:
                raise ValueError(
                    f"{name} must be viewable as [B * S, H, D] (batch and sequence strides mergeable) when "
                    "cache_batch_idx or block_table addresses the cache"
                ) from None
        _cache.rope_and_cache_(*flat, k_cache, v_cache, rotary_cos, rotary_sin, slot_mapping=slots,
                               positions=pos2.flatten(), interleaved=rotary_interleaved)  # fmt: skip
    if not together:  # q alone: at cache_seqlens[b] + s (causal / local), else every token at cache_seqlens[b]
        if causal or local:
            apply_rope_(q, None, rotary_cos, rotary_sin, offsets=offsets, interleaved=rotary_interleaved)
        else:
            q_pos = torch.full((S_q,), offset, device=q.device) if seqlens is None else seqlens[:, None].expand(B, S_q)
            apply_rope_(q, None, rotary_cos, rotary_sin, positions=q_pos, interleaved=rotary_interleaved)
    return q
