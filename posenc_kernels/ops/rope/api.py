"""RoPE: the public functions. They coerce arguments and call the op pair (:mod:`.op`); the ops validate
and dispatch. The contract, in short (``docs/rope.md`` has the whole of it):

* ``q`` ``[B, S, Hq, D]``, ``k`` ``[B, S, Hk, D]`` or None, any strides (HF's ``[B, H, S, D]`` as
  ``.transpose(1, 2)``); packed ``[T, H, D]`` with ``cu_seqlens`` ``[N + 1]`` or per-token positions.
* Angles from ``cos``/``sin`` tables ``[P, R/2]`` (``R <= D`` channels rotate: partial rotary) or on the fly
  from ``inv_freq`` ``[R/2]`` (fp32 ``pos * inv_freq`` as HF, or ``exact=True`` with float64 frequencies).
* Token ``(b, s)`` takes row ``positions[b, s]`` (or ``[s]``), else ``offsets + s`` (:mod:`..positions`);
  ``axis_map`` ``[R/2]`` picks a row of ``positions`` ``[A, ...]`` per frequency (M-RoPE, axial).
* ``interleaved=False`` pairs ``d`` with ``d + R/2`` (GPT-NeoX / HF), ``True`` pairs ``2i``, ``2i + 1``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..checks import FLOAT_DTYPES, check_flag, check_flags, check_tensor, split_offsets
from .op import rope, rope_cos_sin_op

__all__ = ["rope_cos_sin", "apply_rope_", "apply_rope", "apply_rope_qkv_", "mrope_axis_map", "axial_positions"]


def rope_cos_sin(
    positions_or_length: Union[int, torch.Tensor],
    inv_freq: torch.Tensor,
    *,
    attention_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[..., R/2]`` for ``apply_rope_``: ``attention_factor * cos(pos * inv_freq)``.

    ``positions_or_length`` is an int ``P`` (rows ``0..P-1``) or a tensor of positions of any shape
    (int or float). Each angle is one fp32 product ``fp32(pos) * inv_freq`` (never a matmul), computed by a
    Triton kernel on CUDA.

    >>> import posenc_kernels as pk
    >>> cos, sin = pk.rope_cos_sin(16, pk.rope_frequencies(8)[0])
    >>> cos.shape, sin.dtype
    (torch.Size([16, 4]), torch.float32)
    """
    if isinstance(positions_or_length, torch.Tensor):
        positions = positions_or_length
    elif isinstance(positions_or_length, (int, torch.SymInt)) and not isinstance(positions_or_length, bool):
        if positions_or_length < 0:
            raise ValueError(f"positions_or_length must be >= 0, got {positions_or_length}")
        device = inv_freq.device if isinstance(inv_freq, torch.Tensor) else None
        positions = torch.arange(positions_or_length, device=device)
    else:
        raise TypeError(f"positions_or_length must be an int or a tensor, got {type(positions_or_length).__name__}")
    check_tensor("inv_freq", inv_freq)
    return rope_cos_sin_op(positions, inv_freq, float(attention_factor), dtype)


def _args(cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact):
    """The ops' arguments after q and k (RopeArgs order) from the public keywords."""
    if type(interleaved) is not bool or type(exact) is not bool:  # (one type test per flag on the decode path)
        check_flags(interleaved=interleaved, exact=exact)
    if type(offsets) is int:  # the common case, without split_offsets' checks
        offsets_t, offset = None, offsets
    else:
        offsets_t, offset = split_offsets(offsets)
    return (cos, sin, inv_freq, positions, offsets_t, offset, cu_seqlens, axis_map, float(attention_factor),
            bool(interleaved), False, bool(exact))  # fmt: skip


def apply_rope_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    axis_map: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate ``q`` ``[B, S, Hq, D]`` and ``k`` ``[B, S, Hk, D]`` in place, in one kernel launch.

    See the module docstring for layouts, angle sources (``cos``/``sin`` tables or ``inv_freq``), packed
    ``[T, H, D]`` inputs with ``cu_seqlens`` and multi-axis positions (``axis_map``). Returns ``(q, k)``
    (the same tensors). Differentiable w.r.t. q and k under PyTorch's in-place rules (a leaf that requires
    grad raises, as for ``x.mul_``).

    >>> import torch, posenc_kernels as pk
    >>> q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 1, 16)
    >>> inv_freq, _ = pk.rope_frequencies(16)
    >>> cos, sin = pk.rope_cos_sin(5, inv_freq)
    >>> q2, k2 = pk.apply_rope_(q, k, cos, sin)
    >>> q2 is q
    True
    >>> q3, _ = pk.apply_rope_(torch.randn(7, 4, 16), None, inv_freq=inv_freq,  # packed, on the fly
    ...                        cu_seqlens=torch.tensor([0, 3, 7]))
    """
    rope.call_inplace(q, k, *_args(cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor,
                                   interleaved, exact))  # fmt: skip
    return q, k


def apply_rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    axis_map: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Out-of-place twin of :func:`apply_rope_`: returns new rotated tensors, inputs untouched.

    >>> import torch, posenc_kernels as pk
    >>> q = torch.randn(1, 3, 2, 8)
    >>> cos, sin = pk.rope_cos_sin(3, pk.rope_frequencies(8)[0])
    >>> q_rot, _ = pk.apply_rope(q, None, cos, sin)
    >>> torch.equal(q_rot[:, 0], q[:, 0])  # position 0 is the identity rotation
    True
    """
    args = _args(cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact)
    q_out, k_out = rope.call(q, k, *args)
    return q_out, (k_out if k is not None else None)


def qkv_heads(qkv: torch.Tensor, num_heads_q: int, num_heads_kv: int, head_dim: Optional[int] = None) -> torch.Tensor:
    """A fused QKV projection checked and viewed as heads ``[..., Hq + 2*Hkv, D]`` (a view, never a copy): ``qkv``
    itself, or with ``head_dim`` its flat form ``[..., (Hq + 2*Hkv) * head_dim]`` unflattened. The one home of
    the fused-projection rules (``apply_rope_qkv_``, ``qk_norm_rope_qkv_``)."""
    for name, n in (("num_heads_q", num_heads_q), ("num_heads_kv", num_heads_kv)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    heads = num_heads_q + 2 * num_heads_kv
    if head_dim is None:
        check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=(3, 4))
        if qkv.shape[-2] != heads:
            raise ValueError(
                f"qkv must have Hq + 2*Hkv = {num_heads_q} + 2*{num_heads_kv} = {heads} heads (dim -2), "
                f"got {qkv.shape[-2]}"
            )
        return qkv
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    if qkv.shape[-1] != heads * head_dim:
        raise ValueError(
            f"qkv's last dim must be (Hq + 2*Hkv) * head_dim = ({num_heads_q} + 2*{num_heads_kv}) * {head_dim} "
            f"= {heads * head_dim}, got {qkv.shape[-1]}"
            + (f" (not a multiple of head_dim {head_dim})" if qkv.shape[-1] % head_dim else "")
        )
    return qkv.unflatten(-1, (heads, head_dim))


def apply_rope_qkv_(
    qkv: torch.Tensor,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    num_heads_q: int,
    num_heads_kv: int,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    axis_map: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate the q and k heads of a fused projection ``[B, S, Hq + 2*Hkv, D]`` (or packed
    ``[T, Hq + 2*Hkv, D]``) in place, in one launch; the v heads are untouched. Returns ``qkv``.

    Heads ``[0, Hq)`` are q, ``[Hq, Hq + Hkv)`` are k, the rest v (the layout of a fused QKV linear
    viewed as heads). Other arguments as in :func:`apply_rope_`.

    >>> import torch, posenc_kernels as pk
    >>> qkv = torch.randn(2, 6, 4 + 2 * 2, 32)
    >>> v = qkv[:, :, 6:].clone()
    >>> cos, sin = pk.rope_cos_sin(6, pk.rope_frequencies(32)[0])
    >>> out = pk.apply_rope_qkv_(qkv, cos, sin, num_heads_q=4, num_heads_kv=2)
    >>> out is qkv, torch.equal(qkv[:, :, 6:], v)
    (True, True)
    """
    qkv_heads(qkv, num_heads_q, num_heads_kv)
    # q's and k's heads are adjacent and take the same rotation: one tensor, one launch, one mutation.
    qk = qkv[..., : num_heads_q + num_heads_kv, :]
    args = _args(cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact)
    rope.call_inplace(qk, None, *args)  # under autograd, the in-place op on the view rebases qkv's history
    return qkv


def mrope_axis_map(mrope_section, *, interleaved: bool = False, device=None) -> torch.Tensor:
    """Which position axis each frequency follows, for multi-axis RoPE (``axis_map`` of
    :func:`apply_rope_`), from a section list such as Qwen2-VL's ``mrope_section`` ``[16, 24, 24]``.

    ``interleaved=False`` (Qwen2-VL): frequencies ``[0, s0)`` follow axis 0 (time), the next ``s1`` axis 1
    (height), ... ``interleaved=True`` (Qwen3-VL): frequency ``i`` follows axis ``a = i % A`` when
    ``a >= 1`` and ``i < A * s_a``, else axis 0. 2-D axial RoPE for image patches is ``[n/2, n/2]`` with
    positions ``[2, ...]`` = (row, column) (see :func:`axial_positions`). Returns int32 ``[sum(sections)]``.

    >>> import posenc_kernels as pk
    >>> pk.mrope_axis_map([2, 1, 1])
    tensor([0, 0, 1, 2], dtype=torch.int32)
    >>> pk.mrope_axis_map([2, 2, 2], interleaved=True)
    tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)
    """
    check_flag("interleaved", interleaved)
    sections = [int(v) for v in mrope_section]
    if not sections or any(v < 0 for v in sections) or sum(sections) == 0:
        raise ValueError(f"mrope_section must be non-negative ints with a positive sum, got {list(mrope_section)}")
    n_axes, half = len(sections), sum(sections)
    if not interleaved:
        axes = [a for a, n in enumerate(sections) for _ in range(n)]
    else:
        axes = []
        for i in range(half):
            a = i % n_axes
            axes.append(a if a >= 1 and i < n_axes * sections[a] else 0)
    return torch.tensor(axes, dtype=torch.int32, device=device)


def axial_positions(*sizes: int, device=None) -> torch.Tensor:
    """Positions ``[A, prod(sizes)]`` of a row-major grid (``axial_positions(H, W)`` gives each image patch
    its (row, column)), for 2-D / 3-D axial RoPE with :func:`mrope_axis_map`.

    >>> import posenc_kernels as pk
    >>> pk.axial_positions(2, 3)
    tensor([[0, 0, 0, 1, 1, 1],
            [0, 1, 2, 0, 1, 2]])
    """
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes):
        raise ValueError(f"sizes must be non-negative ints, got {sizes}")
    grids = torch.meshgrid(*(torch.arange(n, device=device) for n in sizes), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids])
