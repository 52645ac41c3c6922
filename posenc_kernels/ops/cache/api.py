"""RoPE + KV-cache write: the public functions. They coerce arguments and call the op pair (:mod:`.op`); the
op validates and dispatches. The contract, in short (``docs/cache.md`` has the whole of it):

* q and k are rotated in place (every mode of :func:`~posenc_kernels.apply_rope_`); the rotated k and v are
  written into the cache, in one launch. :func:`qk_norm_rope_and_cache_` puts the QK-norm stage in front
  (the whole attention prologue, one launch).
* Paged (``slot_mapping [T]``, slot = block * block_size + offset): q/k/v ``[T, H, D]``, caches
  ``[num_blocks, block_size, Hk, D]`` (``"NHD"``) or ``[num_blocks, Hk, block_size, D]`` (``"HND"``), any
  strides with a unit last stride. Slot -1, and tokens past ``len(slot_mapping)`` (CUDA-graph padding), are
  rotated and not written.
* Contiguous (``cache_positions`` ``[S]`` or ``[B, S]``, HF's ``cache_position``): q/k/v ``[B, S, H, D]``,
  caches ``[B, S_max, Hk, D]`` (``"NHD"``) or ``[B, Hk, S_max, D]`` (``"HND"``: HF's static cache).
* A cache in the input dtype gets bit for bit what ``apply_rope_`` then a scatter gives. An FP8 cache
  (``float8_e4m3fn`` / ``float8_e5m2``) stores ``x / scale`` clamped to the format's finite range, rounded to
  nearest; ``k_scale`` / ``v_scale`` are floats, 0-d tensors or per kv head ``[Hk]``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..checks import check_flags
from ..qknorm.api import _norm_args
from ..rope.api import _args as _rope_args
from .op import LAYOUTS, rope_and_cache as _pair
from .torch_impl import NONE

__all__ = ["rope_and_cache_", "qk_norm_rope_and_cache_", "mla_rope_and_cache_"]

Scale = Union[None, float, torch.Tensor]
_NO_NORM = (None, None, 0.0, NONE, 0.0)


def _scale(name: str, s) -> tuple:
    """``(tensor, value)`` for the op from a public scale (None, a float or a tensor)."""
    if s is None:
        return None, None
    if isinstance(s, torch.Tensor):
        return s, None
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return None, float(s)
    raise TypeError(f"{name} must be a float, a tensor or None, got {type(s).__name__}")


def _layout(kv_layout) -> int:
    code = LAYOUTS.get(kv_layout) if isinstance(kv_layout, str) else None
    if code is None:
        raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
    return code


def _cache_args(v, k_cache, v_cache, q_fp8, slot_mapping, cache_positions, kv_layout, k_scale, v_scale, q_scale):
    ks, ksv = _scale("k_scale", k_scale)
    vs, vsv = _scale("v_scale", v_scale)
    qs, qsv = _scale("q_scale", q_scale)
    return (v, k_cache, v_cache, q_fp8, slot_mapping, cache_positions, _layout(kv_layout), ks, vs, qs, ksv, vsv, qsv)


def rope_and_cache_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    k_cache: torch.Tensor,
    v_cache: Optional[torch.Tensor],
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    slot_mapping: Optional[torch.Tensor] = None,
    cache_positions: Optional[torch.Tensor] = None,
    kv_layout: str = "NHD",
    k_scale: Scale = None,
    v_scale: Scale = None,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    interleaved: bool = False,
    axis_map: Optional[torch.Tensor] = None,
    q_fp8: Optional[torch.Tensor] = None,
    q_scale: Scale = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place (RoPE, as :func:`~posenc_kernels.apply_rope_`) and write the rotated k and v
    into a KV cache, in one launch. Returns ``(q, k)`` (the same tensors).

    Exactly one of ``slot_mapping`` (a paged cache) and ``cache_positions`` (a contiguous cache) addresses
    the cache (see the module docstring for the shapes); -1 skips a token's write. ``v``/``v_cache`` may
    both be None (a k-only cache). ``q_fp8`` (an FP8 tensor of q's shape, with ``q_scale``) receives the
    rotated q quantised, for FP8 attention; q itself is then left as it is. Not differentiable: call it
    where no gradient is recorded (the cache is a buffer).

    >>> import torch, posenc_kernels as pk
    >>> q, k, v = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16)   # 3 tokens
    >>> k_cache, v_cache = torch.zeros(8, 4, 2, 16), torch.zeros(8, 4, 2, 16)          # 8 blocks of 4 slots
    >>> cos, sin = pk.rope_cos_sin(64, pk.rope_frequencies(16)[0])
    >>> slots = torch.tensor([5, 6, -1])                                             # the third is padding
    >>> q2, k2 = pk.rope_and_cache_(q, k, v, k_cache, v_cache, cos, sin, slot_mapping=slots,
    ...                             positions=torch.tensor([9, 10, 0]))
    >>> torch.equal(k_cache[1, 1], k[0]), torch.equal(v_cache[1, 2], v[1]), q2 is q
    (True, True, True)
    """
    args = (q, k) + _cache_args(v, k_cache, v_cache, q_fp8, slot_mapping, cache_positions, kv_layout, k_scale,
                                v_scale, q_scale) + _NO_NORM + _rope_args(
        cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact)  # fmt: skip
    _pair.call_inplace(*args)
    return q, k


def qk_norm_rope_and_cache_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    k_cache: torch.Tensor,
    v_cache: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
    norm: str = "head",
    weight_offset: float = 0.0,
    slot_mapping: Optional[torch.Tensor] = None,
    cache_positions: Optional[torch.Tensor] = None,
    kv_layout: str = "NHD",
    k_scale: Scale = None,
    v_scale: Scale = None,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    exact: bool = False,
    interleaved: bool = False,
    axis_map: Optional[torch.Tensor] = None,
    q_fp8: Optional[torch.Tensor] = None,
    q_scale: Scale = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole attention prologue in one launch: RMSNorm q and k (as :func:`~posenc_kernels.qk_norm_rope_`:
    ``norm``, ``eps``, ``weight_offset``), rotate them in place, and write the rotated k and v into the
    cache (as :func:`rope_and_cache_`). Returns ``(q, k)``.

    >>> import torch, posenc_kernels as pk
    >>> q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    >>> k_cache, v_cache = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)   # HF static cache [B, Hk, S_max, D]
    >>> cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(16)[0])
    >>> _ = pk.qk_norm_rope_and_cache_(q, k, v, k_cache, v_cache, torch.ones(16), torch.ones(16), cos, sin,
    ...                                cache_positions=torch.tensor([3, 4]), kv_layout="HND", offsets=3)
    >>> torch.equal(k_cache[0, :, 3], k[0, 0]), torch.equal(v_cache[0, :, 4], v[0, 1])
    (True, True)
    """
    args = (q, k) + _cache_args(v, k_cache, v_cache, q_fp8, slot_mapping, cache_positions, kv_layout, k_scale,
                                v_scale, q_scale) + _norm_args(q_weight, k_weight, eps, norm, weight_offset) + _rope_args(
        cos, sin, inv_freq, positions, offsets, cu_seqlens, axis_map, attention_factor, interleaved, exact)  # fmt: skip
    _pair.call_inplace(*args)
    return q, k


def mla_rope_and_cache_(
    q_pe: torch.Tensor,
    k_pe: torch.Tensor,
    kv_c: torch.Tensor,
    kv_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool = True,
    scale: Scale = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head latent attention (DeepSeek-V2/V3): rotate ``q_pe`` ``[T, H, rope_dim]`` (a strided slice of
    q) and ``k_pe`` ``[T, rope_dim]`` in place, and write ``[kv_c | k_pe]`` rows into the paged latent cache
    ``kv_cache`` ``[num_blocks, block_size, kv_lora_rank + rope_dim]`` at ``slot_mapping``, in one launch
    (:func:`rope_and_cache_` with the latent as a one-head v and the cache's two column ranges as k and v
    caches). ``scale`` quantises for an FP8 cache. Returns ``(q_pe, k_pe)``.

    >>> import torch, posenc_kernels as pk
    >>> q = torch.randn(3, 4, 128 + 64)                      # [T, H, qk_nope + rope]
    >>> q_pe, k_pe, kv_c = q[..., 128:], torch.randn(3, 64), torch.randn(3, 512)
    >>> kv_cache = torch.zeros(2, 16, 512 + 64)
    >>> cos, sin = pk.rope_cos_sin(32, pk.rope_frequencies(64)[0])
    >>> _ = pk.mla_rope_and_cache_(q_pe, k_pe, kv_c, kv_cache, cos, sin,
    ...                            slot_mapping=torch.tensor([0, 1, 17]), positions=torch.tensor([0, 1, 2]))
    >>> torch.equal(kv_cache[1, 1], torch.cat([kv_c[2], k_pe[2]]))
    True
    """
    for name, t in (("q_pe", q_pe), ("k_pe", k_pe), ("kv_c", kv_c), ("kv_cache", kv_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q_pe.dim() != 3:
        raise ValueError(f"q_pe must be [T, H, rope_dim], got {tuple(q_pe.shape)}")
    if k_pe.dim() != 2 or kv_c.dim() != 2:
        raise ValueError(f"k_pe must be [T, rope_dim] and kv_c [T, kv_lora_rank], got {tuple(k_pe.shape)} and "
                         f"{tuple(kv_c.shape)}")  # fmt: skip
    rank, rope_dim = kv_c.shape[-1], k_pe.shape[-1]
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != rank + rope_dim:
        raise ValueError(
            f"kv_cache must be [num_blocks, block_size, kv_lora_rank + rope_dim] = [.., .., {rank} + {rope_dim}], "
            f"got {tuple(kv_cache.shape)}"
        )
    v_cache, k_cache = kv_cache.unsqueeze(2).split((rank, rope_dim), dim=-1)  # [.., 1, rank], [.., 1, rope_dim]
    if type(interleaved) is not bool:
        check_flags(interleaved=interleaved)
    s, sv = _scale("scale", scale)
    _pair.call_inplace(q_pe, k_pe.unsqueeze(1), kv_c.unsqueeze(1), k_cache, v_cache, None, slot_mapping, None, 0, s, s,
                       None, sv, sv, None, *_NO_NORM, cos, sin, None, positions, None, 0, None, None, 1.0, interleaved,
                       False, False)  # fmt: skip
    return q_pe, k_pe
