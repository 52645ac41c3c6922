"""vLLM-style ``rotary_embedding``: in place on packed tokens, cos and sin in one cache, mapped onto
:func:`posenc_kernels.apply_rope_` without copies; and ``fused_qk_norm_rope`` (QK-norm + RoPE on a packed
QKV projection) mapped onto :func:`posenc_kernels.qk_norm_rope_`. The contract mirrored, and every difference from vLLM:
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

__all__ = ["rotary_embedding", "fused_qk_norm_rope"]


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
    check_tensor("cos_sin_cache", cos_sin_cache, dtypes=FLOAT_DTYPES, ndim=2, device=positions.device)
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim == 0 or rot_dim % 2 or rot_dim > head_size:
        raise ValueError(
            f"cos_sin_cache must be [max_pos, rot_dim] with rot_dim even, in [2, head_size={head_size}], "
            f"got {tuple(cos_sin_cache.shape)}"
        )
    if not isinstance(is_neox, bool):
        raise TypeError(f"is_neox must be a bool, got {type(is_neox).__name__}")
    lead = tuple(positions.shape)
    q4 = _as_heads("query", query, lead, head_size)
    k4 = _as_heads("key", key, lead, head_size) if key is not None else None
    half = rot_dim // 2
    cos, sin = cos_sin_cache[:, :half], cos_sin_cache[:, half:]
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
    check_tensor("cos_sin_cache", cos_sin_cache, dtypes=FLOAT_DTYPES, ndim=2, device=qkv.device)
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim == 0 or rot_dim % 2 or rot_dim > d:
        raise ValueError(
            f"cos_sin_cache must be [max_pos, rot_dim] with rot_dim even, in [2, head_dim={d}], "
            f"got {tuple(cos_sin_cache.shape)}"
        )
    if not isinstance(is_neox, bool):
        raise TypeError(f"is_neox must be a bool, got {type(is_neox).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    half = rot_dim // 2
    cos, sin = cos_sin_cache[:, :half], cos_sin_cache[:, half:]
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
