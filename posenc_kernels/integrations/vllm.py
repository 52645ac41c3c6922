"""vLLM-style ``rotary_embedding``: in place on packed tokens, cos and sin in one cache, mapped onto
:func:`posenc_kernels.apply_rope_` without copies; ``fused_qk_norm_rope`` (QK-norm + RoPE on a packed
QKV projection) mapped onto :func:`posenc_kernels.qk_norm_rope_`; and ``fused_rope_and_reshape_cache_flash``
(RoPE + the paged KV-cache write, ``rotary_embedding`` then ``reshape_and_cache_flash`` in one launch) mapped
onto :func:`posenc_kernels.rope_and_cache_`. The contract mirrored, and every difference from vLLM:
``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.checks import FLOAT_DTYPES, INT_DTYPES, check_tensor
from ..ops.rope import apply_rope_

try:
    from ..ops import qknorm as _qknorm
except ImportError:  # the kernels-hub layer vendors this file without the QK-norm family
    _qknorm = None
try:
    from ..ops import cache as _cache
except ImportError:  # ... and without the cache family
    _cache = None

__all__ = ["rotary_embedding", "fused_qk_norm_rope", "fused_rope_and_reshape_cache_flash", "rotary_embedding_and_cache"]


def _cos_sin(cos_sin_cache, head_size: int, device, size_name: str = "head_size"):
    """The ``cos`` and ``sin`` tables of vLLM's ``cos_sin_cache`` ``[max_pos, rot_dim]`` = ``[cos | sin]``: its
    two column halves, as views (no copy; the ops take a row stride)."""
    check_tensor("cos_sin_cache", cos_sin_cache, dtypes=FLOAT_DTYPES, ndim=2, device=device)
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim == 0 or rot_dim % 2 or rot_dim > head_size:
        raise ValueError(
            f"cos_sin_cache must be [max_pos, rot_dim] with rot_dim even, in [2, {size_name}={head_size}], "
            f"got {tuple(cos_sin_cache.shape)}"
        )
    half = rot_dim // 2
    return cos_sin_cache[:, :half], cos_sin_cache[:, half:]


def _check_is_neox(is_neox) -> None:
    if not isinstance(is_neox, bool):
        raise TypeError(f"is_neox must be a bool, got {type(is_neox).__name__}")


def _as_heads(name: str, x: torch.Tensor, lead: tuple[int, ...], head_size: int) -> torch.Tensor:
    """``x`` with ``lead`` leading dims, then ``[H*D]`` or ``[H, D]``, as a ``[*lead, H, D]`` view."""
    check_tensor(name, x, dtypes=FLOAT_DTYPES, ndim=(len(lead) + 1, len(lead) + 2))
    if tuple(x.shape[: len(lead)]) != lead:
        raise ValueError(f"{name} must have the leading dims of positions {list(lead)}, got shape {tuple(x.shape)}")
    if x.dim() == len(lead) + 2:
        if x.shape[-1] != head_size:
            raise ValueError(f"{name} is [..., H, D]: D must equal head_size={head_size}, got {tuple(x.shape)}")
        heads = x
    else:
        if x.shape[-1] % head_size:
            raise ValueError(
                f"{name}'s last dim must be a multiple of head_size={head_size} (H * head_size), got {x.shape[-1]}"
            )
        # A view whatever the channel stride; the kernel's launcher decides which strides it takes.
        heads = x.unflatten(-1, (x.shape[-1] // head_size, head_size))
    return heads if len(lead) == 2 else heads.unsqueeze(0)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: Optional[torch.Tensor],
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """vLLM's ``rotary_embedding``: rotate ``query`` and ``key`` in place; returns ``(query, key)``.

    ``positions`` ``[T]`` or ``[B, S]`` (integers), ``query`` ``[*positions.shape, Hq*D]`` or
    ``[*positions.shape, Hq, D]``, ``key`` the same with ``Hk`` heads or None, ``cos_sin_cache``
    ``[max_pos, rot_dim]`` = ``[cos | sin]``, ``rot_dim`` even and ``<= head_size``.

    >>> import torch
    >>> from posenc_kernels.integrations.vllm import rotary_embedding
    >>> angle = torch.arange(32.0)[:, None] * 0.1 ** torch.arange(4.0)
    >>> cache = torch.cat((angle.cos(), angle.sin()), dim=-1)  # [max_pos, rot_dim = 8]
    >>> q, k = torch.randn(5, 4 * 8), torch.randn(5, 2 * 8)
    >>> q_, k_ = rotary_embedding(torch.tensor([3, 0, 7, 7, 1]), q, k, 8, cache, True)
    >>> q_ is q
    True
    """
    check_tensor("positions", positions, ndim=(1, 2))
    if positions.dtype == torch.bool or positions.dtype not in INT_DTYPES:
        raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size must be a positive int, got {head_size!r}")
    cos, sin = _cos_sin(cos_sin_cache, head_size, positions.device)
    _check_is_neox(is_neox)
    lead = tuple(positions.shape)
    q4 = _as_heads("query", query, lead, head_size)
    k4 = _as_heads("key", key, lead, head_size) if key is not None else None
    apply_rope_(q4, k4, cos, sin, positions=positions, interleaved=not is_neox)
    return query, key


def _positive_int(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return n


def fused_qk_norm_rope(
    qkv: torch.Tensor,
    num_heads_q: int,
    num_heads_k: int,
    num_heads_v: int,
    head_dim: int,
    eps: float,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """vLLM's ``fused_qk_norm_rope`` (Qwen3-style attention prologue), in its argument order: RMSNorm of
    every q and k head over ``head_dim`` (fp32 statistics, times ``q_weight`` / ``k_weight`` ``[head_dim]``),
    then RoPE of the first ``rot_dim`` channels, in place in ``qkv``; the v heads are untouched. Returns
    ``qkv`` (vLLM's op returns nothing).

    ``qkv`` ``[T, (Hq + Hk + Hv) * head_dim]`` (a QKV linear's output), ``cos_sin_cache`` ``[max_pos,
    rot_dim]`` = ``[cos | sin]`` (``rot_dim`` even, ``<= head_dim``), ``position_ids`` ``[T]`` (integers,
    rows of the cache), ``is_neox``: pairs ``(i, i + rot_dim/2)``, else GPT-J pairs ``(2i, 2i+1)``.
    One launch of :func:`posenc_kernels.qk_norm_rope_` on the q and k views.

    >>> import torch
    >>> from posenc_kernels.integrations.vllm import fused_qk_norm_rope
    >>> angle = torch.arange(32.0)[:, None] * 0.1 ** torch.arange(4.0)
    >>> cache = torch.cat((angle.cos(), angle.sin()), dim=-1)  # [max_pos, rot_dim = 8]
    >>> qkv = torch.randn(5, (4 + 2 + 2) * 8)
    >>> out = fused_qk_norm_rope(qkv, 4, 2, 2, 8, 1e-6, torch.ones(8), torch.ones(8), cache, True,
    ...                          torch.tensor([3, 0, 7, 7, 1]))
    >>> out is qkv
    True
    """
    if _qknorm is None:
        raise RuntimeError("fused_qk_norm_rope needs posenc_kernels.ops.qknorm, which this copy does not include")
    qk_norm_rope, qk_norm_rope_ = _qknorm.qk_norm_rope, _qknorm.qk_norm_rope_
    hq, hk = _positive_int("num_heads_q", num_heads_q), _positive_int("num_heads_k", num_heads_k)
    hv, d = _positive_int("num_heads_v", num_heads_v), _positive_int("head_dim", head_dim)
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=2)
    width = (hq + hk + hv) * d
    if qkv.shape[1] != width:
        raise ValueError(
            f"qkv must be [T, (num_heads_q + num_heads_k + num_heads_v) * head_dim] = [T, ({hq} + {hk} + {hv}) * {d}]"
            f" = [T, {width}], got {tuple(qkv.shape)}"
        )
    check_tensor("position_ids", position_ids, ndim=1, device=qkv.device)
    if position_ids.dtype == torch.bool or position_ids.dtype not in INT_DTYPES:
        raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    if position_ids.shape[0] != qkv.shape[0]:
        raise ValueError(f"position_ids must be [T] = [{qkv.shape[0]}] (one per token of qkv), got {tuple(position_ids.shape)}")
    cos, sin = _cos_sin(cos_sin_cache, d, qkv.device, "head_dim")
    _check_is_neox(is_neox)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    heads = qkv.unflatten(-1, (hq + hk + hv, d))  # a view: [T, H, D]
    q, k = heads[:, :hq], heads[:, hq : hq + hk]
    kw = dict(eps=float(eps), norm="head", positions=position_ids, interleaved=not is_neox)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, q_weight, k_weight) if isinstance(t, torch.Tensor)):
        # q and k are views of one base: autograd lets one Function write only one of them in place, so a
        # recorded call runs the out-of-place op and writes the results back. Its backward needs q and k as
        # they were, and the write-back changes them: it gets copies.
        q_new, k_new = qk_norm_rope(q.clone(), k.clone(), q_weight, k_weight, cos, sin, **kw)
        q.copy_(q_new)
        k.copy_(k_new)
    else:
        qk_norm_rope_(q, k, q_weight, k_weight, cos, sin, **kw)
    return qkv


# vLLM's ``kv_cache_dtype`` strings of the flash-layout cache ops (``reshape_and_cache_flash``): "auto" stores in
# the model dtype; the FP8 ones store ``x / scale``, saturated, in a cache vLLM allocates as uint8 (or as the FP8
# dtype itself) and that is read here as the FP8 dtype the string names (a view: same element size).
_FP8_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _cache_view(name: str, cache, fp8: Optional[torch.dtype]) -> torch.Tensor:
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cache).__name__}")
    if fp8 is None or cache.dtype == fp8:
        return cache
    if cache.dtype == torch.uint8:
        return cache.view(fp8)
    raise TypeError(f"{name} must be uint8 (vLLM's FP8 storage) or {fp8} for this kv_cache_dtype, got {cache.dtype}")


def _token_heads(name: str, x, size: int) -> torch.Tensor:
    """``x`` ``[T, H, D]`` as it is, or ``[T, H*D]`` viewed ``[T, H, D]`` (``D`` = ``size``, the cache's)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        return x
    if x.dim() == 2 and x.shape[-1] % size == 0:
        return x.unflatten(-1, (x.shape[-1] // size, size))  # a view whatever the strides
    raise ValueError(f"{name} must be [T, H, D] or [T, H * D] with D = {size} (the cache's head_size), got shape "
                     f"{tuple(x.shape)}")  # fmt: skip


def fused_rope_and_reshape_cache_flash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    kv_cache_dtype: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused RoPE + flash-layout cache write (``ops.fused_rope_and_reshape_cache_flash``, its argument
    order): ``rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)`` then
    ``reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale,
    v_scale)``, in one launch of :func:`posenc_kernels.rope_and_cache_`. Returns ``(query, key)``, rotated in
    place (vLLM's op returns nothing).

    ``query`` ``[T, Hq, D]`` or ``[T, Hq*D]``, ``key`` / ``value`` ``[T, Hk, D]`` or ``[T, Hk*D]`` (views of a
    packed QKV projection are fine), ``positions`` ``[T]``; ``cos_sin_cache`` ``[max_pos, rot_dim]`` = ``[cos |
    sin]`` (``rot_dim <= D``: partial rotary); ``is_neox`` pairs ``(i, i + rot_dim/2)``, else GPT-J pairs
    ``(2i, 2i+1)``. ``key_cache`` / ``value_cache`` ``[num_blocks, block_size, Hk, D]`` with any strides and a
    unit last stride (every vLLM ``KVCacheLayout``: the two halves of a packed ``kv_cache``, see
    ``docs/integrations.md``); token ``t`` goes to slot ``slot_mapping[t]`` (``block * block_size + offset``);
    slot -1, and tokens past ``len(slot_mapping)`` (CUDA-graph padding), are rotated and not written.
    ``kv_cache_dtype``: ``"auto"`` (the cache has query's dtype; ``k_scale`` / ``v_scale`` are ignored, as
    vLLM's kernel ignores them) or ``"fp8"`` / ``"fp8_e4m3"`` / ``"fp8_e5m2"`` (a uint8 cache is read as that
    FP8 dtype; stores ``x / scale`` saturated to the format's range; scales 0-d, ``[1]`` or per kv head
    ``[Hk]``).

    >>> import torch
    >>> from posenc_kernels.integrations.vllm import fused_rope_and_reshape_cache_flash
    >>> angle = torch.arange(32.0)[:, None] * 0.1 ** torch.arange(4.0)
    >>> cos_sin_cache = torch.cat((angle.cos(), angle.sin()), dim=-1)     # [max_pos, rot_dim = 8]
    >>> qkv = torch.randn(3, (4 + 2 + 2) * 16)                           # 3 tokens, Hq 4, Hk 2, D 16
    >>> q, k, v = qkv.split([4 * 16, 2 * 16, 2 * 16], dim=-1)
    >>> kv_cache = torch.zeros(2, 8, 4, 2, 16, dtype=torch.uint8)        # [2, num_blocks, block_size, Hk, D]
    >>> key_cache, value_cache = kv_cache.unbind(0)
    >>> scale = torch.tensor([0.5])
    >>> _ = fused_rope_and_reshape_cache_flash(q, k, v, torch.tensor([5, 6, 7]), cos_sin_cache, True, key_cache,
    ...                                        value_cache, torch.tensor([9, 10, -1]), scale, scale, "fp8")
    >>> stored = value_cache[2, 2].view(torch.float8_e4m3fn).float() * 0.5     # slot 10: block 2, offset 2
    >>> torch.allclose(stored, v[1].view(2, 16), rtol=0.07, atol=0.01)
    True
    """
    if _cache is None:
        raise RuntimeError("fused_rope_and_reshape_cache_flash needs posenc_kernels.ops.cache, which this copy "
                           "does not include")  # fmt: skip
    _check_is_neox(is_neox)
    if not isinstance(kv_cache_dtype, str):
        raise TypeError(f"kv_cache_dtype must be a str, got {type(kv_cache_dtype).__name__}")
    if kv_cache_dtype == "auto":
        fp8 = None
    else:
        fp8 = _FP8_CACHE_DTYPES.get(kv_cache_dtype)
        if fp8 is None:
            raise ValueError(f"kv_cache_dtype must be 'auto', 'fp8', 'fp8_e4m3' or 'fp8_e5m2', got {kv_cache_dtype!r}")
    kc = _cache_view("key_cache", key_cache, fp8)
    vc = _cache_view("value_cache", value_cache, fp8)
    if kc.dim() != 4 or vc.dim() != 4:
        raise ValueError(
            "key_cache and value_cache must be [num_blocks, block_size, num_kv_heads, head_size], got "
            f"{tuple(kc.shape)} and {tuple(vc.shape)}"
        )
    d = kc.shape[3]
    q3 = _token_heads("query", query, d)
    k3 = _token_heads("key", key, d)
    v3 = _token_heads("value", value, vc.shape[3])
    cos, sin = _cos_sin(cos_sin_cache, d, query.device)
    if not isinstance(positions, torch.Tensor):  # (the op's dispatcher would raise a RuntimeError for it)
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if fp8 is None:
        k_scale = v_scale = None  # vLLM passes the layer's scales whatever the cache dtype; "auto" ignores them
    _cache.rope_and_cache_(q3, k3, v3, kc, vc, cos, sin, slot_mapping=slot_mapping, positions=positions,
                           k_scale=k_scale, v_scale=v_scale, interleaved=not is_neox)  # fmt: skip
    return query, key


def rotary_embedding_and_cache(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    kv_cache_dtype: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fused_rope_and_reshape_cache_flash` in the argument order of vLLM's ``rotary_embedding``
    (positions first) extended by the cache write: ``(positions, query, key, value, key_cache, value_cache,
    slot_mapping, cos_sin_cache, is_neox, k_scale, v_scale)``. Same op, same semantics; returns ``(query, key)``.

    >>> import torch
    >>> from posenc_kernels.integrations.vllm import rotary_embedding_and_cache
    >>> angle = torch.arange(32.0)[:, None] * 0.1 ** torch.arange(8.0)
    >>> cos_sin_cache = torch.cat((angle.cos(), angle.sin()), dim=-1)     # [max_pos, rot_dim = 16]
    >>> q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    >>> key_cache, value_cache = torch.zeros(4, 8, 2, 16), torch.zeros(4, 8, 2, 16)
    >>> _ = rotary_embedding_and_cache(torch.tensor([3, 4]), q, k, v, key_cache, value_cache,
    ...                                torch.tensor([8, 9]), cos_sin_cache, True)
    >>> torch.equal(key_cache[1, 0], k[0]), torch.equal(value_cache[1, 1], v[1])
    (True, True)
    """
    return fused_rope_and_reshape_cache_flash(query, key, value, positions, cos_sin_cache, is_neox, key_cache,
                                              value_cache, slot_mapping, k_scale, v_scale, kv_cache_dtype)  # fmt: skip
