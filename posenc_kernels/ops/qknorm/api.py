"""QK-norm + RoPE: the public functions. They coerce arguments and call the op pair (:mod:`.op`); the ops
validate and dispatch. The contract, in short (``docs/qknorm.md`` has the whole of it):

* ``q`` ``[B, S, Hq, D]``, ``k`` ``[B, S, Hk, D]`` or None, any strides, or packed ``[T, H, D]`` (the
  layouts of :func:`~posenc_kernels.apply_rope_`).
* RMSNorm with fp32 statistics, times ``weight_offset + w``: ``norm="head"`` normalises each head over its
  ``D`` channels (Qwen3, Gemma 3; weights ``[D]``), ``norm="heads"`` each token over all its heads, q and k
  separately (OLMo 2, Flux, Wan; weights ``[Hq*D]`` and ``[Hk*D]``). A weight of None scales by 1
  (``weight_offset`` applies to a given weight only). Gemma's ``(1 + w)`` is ``weight_offset=1.0``.
* Then RoPE on the first ``R`` channels, with every argument of ``apply_rope_`` (tables or ``inv_freq``,
  positions / offsets / ``cu_seqlens``, ``axis_map``, ``interleaved``, ``attention_factor``, ``exact``).
* fp32 math, one rounding on store; q and k in one launch.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..rope.api import _args as _rope_args, qkv_heads
from .op import qk_norm_rope as _pair
from .torch_impl import HEAD, HEADS, acc_of

__all__ = ["qk_norm_rope_", "qk_norm_rope", "qk_norm_rope_qkv_"]

_NORMS = {"head": HEAD, "heads": HEADS}


def _norm_args(q_weight, k_weight, eps, norm, weight_offset) -> tuple:
    code = _NORMS.get(norm) if isinstance(norm, str) else None
    if code is None:
        raise ValueError(f"norm must be 'head' or 'heads', got {norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)):
        raise TypeError(f"weight_offset must be a float, got {type(weight_offset).__name__}")
    return (q_weight, k_weight, float(eps), code, float(weight_offset))


def qk_norm_rope_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
    norm: str = "head",
    weight_offset: float = 0.0,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    axis_map: Optional[torch.Tensor] = None,
    interleaved: bool = False,
    group=None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """RMSNorm q and k (``norm="head"``: each head, ``"heads"``: all heads of a token), scale by
    ``weight_offset + w``, then rotate them (RoPE, as :func:`~posenc_kernels.apply_rope_`), in place, in
    one launch. Returns ``(q, k)`` (the same tensors). Differentiable w.r.t. q, k and the weights under
    PyTorch's in-place rules.

    ``group`` (a ``torch.distributed`` process group, tensor parallelism): q and k hold this rank's shard of
    the heads (weights: its slice ``[H_local*D]``); with ``norm="heads"`` each token's sum of squares is
    all-reduced over the group (one small all-reduce per tensor, and one per tensor in backward), so the
    result equals the unsharded op's. With ``norm="head"`` the statistics are per head and ``group`` changes
    nothing.

    >>> import torch, posenc_kernels as pk
    >>> q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 1, 16)
    >>> q_weight, k_weight = torch.rand(16), torch.rand(16)
    >>> cos, sin = pk.rope_cos_sin(5, pk.rope_frequencies(16)[0])
    >>> q2, k2 = pk.qk_norm_rope_(q, k, q_weight, k_weight, cos, sin, eps=1e-6)
    >>> q2 is q
    True
    >>> q3, _ = pk.qk_norm_rope_(torch.randn(3, 5, 4, 16), None, torch.rand(4 * 16), None, cos, sin,
    ...                          norm="heads", weight_offset=1.0)  # over all heads, (1 + w)
    """
    rest = _rope_args(cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact)
    args = _norm_args(q_weight, k_weight, eps, norm, weight_offset) + rest
    if group is not None and norm == "heads":
        _sharded_inplace(q, k, args, group)
    else:
        _pair.call_inplace(q, k, *args)
    return q, k


def qk_norm_rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
    norm: str = "head",
    weight_offset: float = 0.0,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    axis_map: Optional[torch.Tensor] = None,
    interleaved: bool = False,
    group=None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Out-of-place twin of :func:`qk_norm_rope_`: returns new tensors, inputs untouched; differentiable
    w.r.t. q, k, q_weight and k_weight.

    >>> import torch, posenc_kernels as pk
    >>> q = torch.randn(1, 3, 2, 8, requires_grad=True)
    >>> w = torch.ones(8, requires_grad=True)
    >>> cos, sin = pk.rope_cos_sin(3, pk.rope_frequencies(8)[0])
    >>> q_out, _ = pk.qk_norm_rope(q, None, w, None, cos, sin)
    >>> q_out.square().mean(-1)[0, 0].round(decimals=4)  # position 0: RMS 1 per head
    tensor([1., 1.], grad_fn=<RoundBackward1>)
    >>> q_out.sum().backward(); w.grad.shape
    torch.Size([8])
    """
    rest = _rope_args(cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact)
    args = _norm_args(q_weight, k_weight, eps, norm, weight_offset) + rest
    if group is not None and norm == "heads":
        return _sharded(q, k, args, group)
    q_out, k_out = _pair.call(q, k, *args)
    return q_out, (k_out if k is not None else None)


# ---- tensor parallelism (norm="heads" with heads sharded over a process group)


def _global_factor(x: torch.Tensor, eps: float, group) -> torch.Tensor:
    """Per token ``rstd_global / rstd_local`` ``[..., 1, 1]`` in the accumulation dtype: the op normalises
    with this rank's heads; RoPE is linear, so scaling its result by this factor gives the unsharded norm.
    One all-reduce carries the token sums of squares and the channel count (shards may differ in heads);
    it is differentiable (torch.distributed.nn), so backward all-reduces their gradients once."""
    from torch.distributed.nn.functional import all_reduce

    acc = acc_of(x.dtype)
    ss_local = x.to(acc).square().sum(dim=(-2, -1))
    n_local = x.shape[-2] * x.shape[-1]
    both = torch.cat((ss_local.reshape(-1), ss_local.new_full((1,), float(n_local))))
    total = all_reduce(both, group=group)
    ss, n = total[:-1].view(ss_local.shape), total[-1]
    f = torch.rsqrt(ss / n + eps) / torch.rsqrt(ss_local / n_local + eps)
    return f[..., None, None]


def _sharded(q, k, args, group):
    _pair.check(q, k, *args, values=True, inplace=False)  # every rule before the collective
    eps = args[2]
    fq = _global_factor(q, eps, group)
    fk = _global_factor(k, eps, group) if k is not None else None
    q_out, k_out = _pair.call(q, k, *args)
    q_out = (q_out * fq).to(q.dtype)
    return q_out, ((k_out * fk).to(k.dtype) if k is not None else None)


def _sharded_inplace(q, k, args, group):
    records = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, args[0], args[1])
    )
    _pair.check(q, k, *args, values=True, inplace=True)
    if records or torch.compiler.is_compiling():  # the factors read q and k before the write
        q_new, k_new = _sharded(q, k, args, group)
        q.copy_(q_new)
        if k is not None:
            k.copy_(k_new)
        return
    eps = args[2]
    fq = _global_factor(q, eps, group)
    fk = _global_factor(k, eps, group) if k is not None else None
    _pair.call_inplace(q, k, *args)
    q.mul_(fq)
    if k is not None:
        k.mul_(fk)


def qk_norm_rope_qkv_(
    qkv: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    num_heads_q: int,
    num_heads_kv: int,
    head_dim: Optional[int] = None,
    eps: float = 1e-6,
    norm: str = "head",
    weight_offset: float = 0.0,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    axis_map: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """:func:`qk_norm_rope_` on the q and k heads of a fused projection, in place, in one launch; the v heads
    are untouched. Returns ``qkv``.

    ``qkv`` is ``[B, S, Hq + 2*Hkv, D]`` (or packed ``[T, Hq + 2*Hkv, D]``); with ``head_dim`` it is the
    flat output of the QKV linear, ``[B, S, W]`` or ``[T, W]`` with ``W = (Hq + 2*Hkv) * head_dim``.
    Heads ``[0, Hq)`` are q, ``[Hq, Hq + Hkv)`` k, the rest v. Other arguments as in :func:`qk_norm_rope_`.

    >>> import torch, posenc_kernels as pk
    >>> qkv = torch.randn(2, 6, (4 + 2 * 2) * 32)            # a QKV linear's output
    >>> v = qkv[..., 6 * 32:].clone()
    >>> cos, sin = pk.rope_cos_sin(6, pk.rope_frequencies(32)[0])
    >>> out = pk.qk_norm_rope_qkv_(qkv, torch.rand(32), torch.rand(32), cos, sin,
    ...                            num_heads_q=4, num_heads_kv=2, head_dim=32)
    >>> out is qkv, torch.equal(qkv[..., 6 * 32:], v)
    (True, True)
    """
    x = qkv_heads(qkv, num_heads_q, num_heads_kv, head_dim)
    q = x[..., :num_heads_q, :]
    k = x[..., num_heads_q : num_heads_q + num_heads_kv, :]
    args = _norm_args(q_weight, k_weight, eps, norm, weight_offset) + _rope_args(
        cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact
    )
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (qkv, q_weight, k_weight)
    ) and not torch.compiler.is_compiling():
        # q and k are two views of one base: autograd lets one Function write only one of them in place,
        # so a recorded call runs the out-of-place op and writes its results back (copy_ into the views).
        # Its inputs are copies: the op saves them for backward, and the write-back changes the views.
        q_new, k_new = _pair.call(q.clone(), k.clone(), *args)
        q.copy_(q_new)
        k.copy_(k_new)
    else:
        _pair.call_inplace(q, k, *args)
    return qkv
