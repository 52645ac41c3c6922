"""Hugging Face transformers: drop-in ``apply_rotary_pos_emb`` (and GPT-J's) and :func:`patch` for HF models
(their attention and rotary modules), mapped onto :func:`posenc_kernels.apply_rope` without copying q or k.
The contract mirrored, the mapping and its one assumption (HF's duplicated-halves cos/sin, else HF's own
math runs): ``docs/integrations.md``.
"""

from __future__ import annotations

import functools
import importlib
import threading
import warnings
from typing import Iterable, Optional, Union

import torch

from ..ops.checks import FLOAT_DTYPES, check_tensor, reraise_with_check
from ..ops.rope import apply_rope, apply_rope_

try:
    from ..ops import qknorm as _qknorm
    from ..ops.qknorm.api import _NORMS
    from ..ops.qknorm.op import qk_norm_rope as _qk_pair
except ImportError:  # the kernels-hub layer vendors this file without the QK-norm family: HF's norms then run
    _qknorm = _qk_pair = _NORMS = None
try:
    from ..ops import cache as _cache_ops
    from ..ops.cache.op import LAYOUTS as _LAYOUTS, rope_and_cache as _cache_pair
    from ..ops.cache.torch_impl import NONE as _NO_NORM_CODE
except ImportError:  # nor the cache family: HF's cache update then runs
    _cache_ops = _cache_pair = _LAYOUTS = _NO_NORM_CODE = None
from ..ops import registry as _registry
from ..ops.rope.op import rope as _rope_pair
from ..ops.rope.reference import hf_apply_rotary_pos_emb, hf_gptj_apply_rotary_pos_emb

__all__ = ["apply_rotary_pos_emb", "apply_rotary_pos_emb_gptj", "patch", "unpatch", "RotaryPatch", "RotaryAngles",
           "SUPPORTED_ARCHITECTURES", "set_cache_write", "get_cache_write"]  # fmt: skip


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES


def _tables_need_grad(cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)


def _table_of(t: torch.Tensor, half: int) -> torch.Tensor:
    """``t[..., :half]`` viewed ``[rows, half]`` (a view for contiguous HF tables)."""
    return t[..., :half].reshape(-1, half)


# The last cos/sin pair planned, and its [rows, R/2] views: HF passes the same two tensors to every layer of
# one forward, so a step plans them once, not once per layer. One entry, replaced as a whole (a tuple swap is
# atomic under the GIL); a hit needs the same objects at the same versions (an in-place write misses).
_table_cache: tuple = (None, None, -1, -1, 0, None, None)


def _tables(cos: torch.Tensor, sin: torch.Tensor, half: int):
    global _table_cache
    if torch.compiler.is_compiling():  # traced code never reads the cache (ids and versions mean nothing there)
        return _table_of(cos, half), _table_of(sin, half)
    c, s, cv, sv, h, tc, ts = _table_cache
    if c is cos and s is sin and h == half and cv == cos._version and sv == sin._version:
        return tc, ts
    tc, ts = _table_of(cos, half), _table_of(sin, half)
    _table_cache = (cos, sin, cos._version, sin._version, half, tc, ts)
    return tc, ts


def _plan(x_bshd: torch.Tensor, others, cos: torch.Tensor, sin: torch.Tensor, half: int):
    """``(xs, table_cos, table_sin, positions, unflatten)`` for tokens laid out ``[B, S, H, D]``, or None
    when the HF structure does not hold. ``others`` are tensors that must share x's B, S, D, dtype, device."""
    B, S, _, D = x_bshd.shape
    if cos.dim() != 3 or sin.shape != cos.shape or cos.shape[0] not in (1, B) or cos.shape[1] != S:
        return None
    if half < 1 or 2 * half > D or cos.device != x_bshd.device or sin.device != x_bshd.device:
        return None
    xs = [x_bshd] + list(others)
    for t in xs:
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (B, S, D) or t.dtype != x_bshd.dtype:
            return None
        if t.device != x_bshd.device or (D > 1 and t.stride(-1) != 1):
            return None
    table_cos, table_sin = _tables(cos, sin, half)
    if cos.shape[0] == 1 or B == 1:
        return xs, table_cos, table_sin, None, False  # row = s, or b*S + s with B == 1: offsets=0
    if all(t.stride(0) == S * t.stride(1) or S == 1 for t in xs):
        # [B, S, H, D] -> [1, B*S, H, D] is a view: the row of a token is its flat index (offsets=0).
        return [t.view(1, B * S, t.shape[2], D) for t in xs], table_cos, table_sin, None, True
    positions = torch.arange(B * S, device=x_bshd.device).view(B, S)
    return xs, table_cos, table_sin, positions, False


def _rope_out(q, k, cos=None, sin=None, *, positions=None, inv_freq=None, attention_factor=1.0, interleaved=False):
    """:func:`apply_rope` (out of place); below the autograd layer when nothing records a gradient.

    The out-of-place op's autograd kernel is Python (``register_autograd``) and costs about as much as the
    C++ kernel of a decode call; with no input requiring grad it only redispatches, so going below it is the
    same computation (the op's checks, fakes and errors are the same)."""
    if (torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad))) or (
        torch.compiler.is_compiling()
    ):
        return apply_rope(q, k, cos, sin, positions=positions, inv_freq=inv_freq, attention_factor=attention_factor,
                          interleaved=interleaved)  # fmt: skip
    args = (cos, sin, inv_freq, positions, None, 0, None, None, float(attention_factor), bool(interleaved), False, False)
    with _below_autograd():
        try:
            q_out, k_out = _rope_pair.out(q, k, *args)
        except (RuntimeError, ValueError, TypeError) as e:
            reraise_with_check(e, _rope_pair.check, q, k, *args, inplace=False)
    return q_out, (k_out if k is not None else None)


_below_autograd = torch._C._AutoDispatchBelowAutograd
_FLOATS = frozenset(FLOAT_DTYPES)


def _hf_usual(q, k, cos, sin):
    """HF attention's own call, planned with the fewest host operations (this is per layer and per token):
    q/k ``[B, H, S, D]`` (channel stride 1), cos/sin ``[1, S, R]`` (or batch B == 1), one float dtype for
    all four, tables that need no gradient. Returns ``(q_embed, k_embed)``, or None for anything else (the
    general path then decides)."""
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(cos) is not torch.Tensor:
        return None
    if type(sin) is not torch.Tensor:
        return None
    dt = q.dtype
    if k.dtype is not dt or cos.dtype is not dt or sin.dtype is not dt or dt not in _FLOATS:
        return None
    qs, ks, cs = q.shape, k.shape, cos.shape
    if len(qs) != 4 or len(ks) != 4 or len(cs) != 3 or sin.shape != cs:
        return None
    B, _, S, D = qs
    R = cs[2]
    if ks[0] != B or ks[2] != S or ks[3] != D or cs[1] != S or (cs[0] != 1 and B != 1) or R % 2 or R > D or R < 2:
        return None
    if (q.stride(3) != 1 or k.stride(3) != 1) and D > 1:
        return None
    dev = q.get_device()
    if k.get_device() != dev or cos.get_device() != dev or sin.get_device() != dev or q.is_meta or cos.is_meta:
        return None
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return None
    tc, ts = _tables(cos, sin, R // 2)
    q_out, k_out = _rope_out(q.transpose(1, 2), k.transpose(1, 2), tc, ts)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def _rotate(xs, table_cos, table_sin, positions, out_dtype, interleaved):
    """Out-of-place rotation of one or two tensors ([q] or [q, k]) in one launch; outputs in out_dtype."""
    q = xs[0]
    k = xs[1] if len(xs) > 1 else None
    if out_dtype == q.dtype:
        return _rope_out(q, k, table_cos, table_sin, positions=positions, interleaved=interleaved)
    # HF promotes (e.g. bf16 q with fp32 cos gives fp32): the promoted copy is the output, rotated in place.
    q_out = q.to(out_dtype)
    k_out = k.to(out_dtype) if k is not None else None
    return apply_rope_(q_out, k_out, table_cos, table_sin, positions=positions, interleaved=interleaved)


class RotaryAngles:
    """What a patched HF rotary module returns instead of its per-token ``(cos, sin)``: the module's
    frequencies and the step's positions, unpacked by HF's attention as ``cos, sin = position_embeddings``
    (both names then hold this object) and handed to the patched ``apply_rotary_pos_emb``, which rotates
    with ``inv_freq`` and ``positions`` (fp32 ``pos * inv_freq``, HF's angles) without a cos/sin tensor.

    ``cos_sin()`` builds HF's own ``(cos, sin)`` (the module's unpatched forward), for any other consumer."""

    __slots__ = ("module", "forward", "x", "position_ids", "layer_type", "inv_freq", "attention_factor",
                 "positions", "dtype")  # fmt: skip

    def __init__(self, module, forward, x, position_ids, layer_type):
        self.module, self.forward, self.x, self.position_ids, self.layer_type = (
            module, forward, x, position_ids, layer_type)  # fmt: skip
        prefix = "" if layer_type is None else f"{layer_type}_"
        inv_freq = getattr(module, prefix + "inv_freq")
        if inv_freq.dtype != torch.float32 or inv_freq.device != x.device:
            inv_freq = inv_freq.to(device=x.device, dtype=torch.float32)  # what HF's forward does
        self.inv_freq = inv_freq
        self.attention_factor = float(getattr(module, prefix + "attention_scaling"))
        # HF's [1, S] positions shared by a batch of B > 1 are the op's [S]; [B, S] are taken as they are
        p = position_ids
        self.positions = p[0] if p.dim() == 2 and p.shape[0] == 1 and x.dim() == 3 and x.shape[0] != 1 else p
        self.dtype = x.dtype

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's ``(cos, sin)`` ``[B or 1, S, R]`` for these positions."""
        if self.layer_type is None:
            return self.forward(self.module, self.x, self.position_ids)
        return self.forward(self.module, self.x, self.position_ids, self.layer_type)

    def __iter__(self):
        return iter((self, self))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        return (self, self)[i]


def _rotate_angles(q, k, angles: RotaryAngles, ud: int):
    """The patched step: q/k in HF's layout rotated out of place by the module's frequencies, or None when
    the inputs are not what HF's attention passes (then HF's cos/sin are built and the tensor path runs)."""
    if not (ud in (1, 2) and _is_float(q) and q.dim() == 4 and q.dtype == angles.dtype):
        return None
    if k is not None and not (isinstance(k, torch.Tensor) and k.dim() == 4 and k.dtype == q.dtype):
        return None
    if ud == 1:
        qb = q.transpose(1, 2)
        kb = k.transpose(1, 2) if k is not None else None
    else:
        qb, kb = q, k
    q_out, k_out = _rope_out(qb, kb, positions=angles.positions, inv_freq=angles.inv_freq,
                             attention_factor=angles.attention_factor)  # fmt: skip
    if ud == 1:
        return q_out.transpose(1, 2), (k_out.transpose(1, 2) if k_out is not None else None)
    return q_out, k_out


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Drop-in for HF's ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-NeoX, ...).

    ``q``/``k``: ``[B, H, S, D]`` (``unsqueeze_dim=1``) or ``[B, S, H, D]`` (``unsqueeze_dim=2``);
    ``cos``/``sin``: ``[B or 1, S, R]`` in HF's duplicated-halves layout ``cat(f, f)`` (see the module
    docstring), or Liger's vision form ``[S, R]`` with ``unsqueeze_dim=1`` (taken as ``[1, S, R]``), or
    the :class:`RotaryAngles` a patched rotary module returns. ``R < D`` rotates the first ``R`` channels and passes the rest through (Phi-3 / GPT-NeoX
    semantics). Returns new ``(q_embed, k_embed)`` of dtype ``promote(q.dtype, cos.dtype)``; ``k`` may be
    None. Differentiable w.r.t. q and k; cos/sin that require grad take HF's math (their gradient is HF's).

    >>> import torch
    >>> from posenc_kernels.integrations.hf import apply_rotary_pos_emb
    >>> q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 1, 5, 16)
    >>> freqs = torch.arange(5.0)[:, None] * 0.5 ** torch.arange(8.0)
    >>> emb = torch.cat((freqs, freqs), -1)[None]
    >>> q2, k2 = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    >>> q2.shape, k2.shape
    (torch.Size([2, 4, 5, 16]), torch.Size([2, 1, 5, 16]))
    """
    ud = unsqueeze_dim % 4 if isinstance(unsqueeze_dim, int) and -4 <= unsqueeze_dim < 4 else None
    if type(cos) is RotaryAngles:  # a patched model's step: the module's frequencies, no cos/sin tensors
        if sin is cos:
            out = _rotate_angles(q, k, cos, ud)
            if out is not None:
                return out
        cos, sin = cos.cos_sin() if type(sin) is RotaryAngles else (cos.cos_sin()[0], sin)
    elif type(sin) is RotaryAngles:
        sin = sin.cos_sin()[1]
    if ud == 1 and k is not None:
        out = _hf_usual(q, k, cos, sin)
        if out is not None:
            return out
    if ud == 1 and isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.dim() == 2 == sin.dim():
        if isinstance(q, torch.Tensor) and q.dim() == 4:  # Liger's vision form [S, R]: one row per position
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t is not None or name != "k":
            check_tensor(name, t)
    plan = None
    if (ud in (1, 2) and q.dim() == 4 and _is_float(q) and _is_float(cos) and _is_float(sin) and cos.dim() == 3
            and cos.shape[-1] % 2 == 0 and not _tables_need_grad(cos, sin)):  # fmt: skip
        to_bshd = (lambda t: t.transpose(1, 2)) if ud == 1 else (lambda t: t)
        others = [to_bshd(k)] if k is not None and k.dim() == 4 else ([] if k is None else None)
        if others is not None:
            plan = _plan(to_bshd(q), others, cos, sin, cos.shape[-1] // 2)
    if plan is None:
        return hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    xs, table_cos, table_sin, positions, flat = plan
    out_dtype = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
    q_out, k_out = _rotate(xs, table_cos, table_sin, positions, out_dtype, interleaved=False)
    B, S = q.shape[0], (q.shape[2] if ud == 1 else q.shape[1])

    def back(t):
        if t is None:
            return None
        if flat:
            t = t.view(B, S, t.shape[2], t.shape[3])
        return t.transpose(1, 2) if ud == 1 else t

    return back(q_out), back(k_out)


def apply_rotary_pos_emb_gptj(tensor: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Drop-in for GPT-J's ``apply_rotary_pos_emb(tensor, sin, cos)`` (note the argument order).

    ``tensor``: ``[B, S, H, D]``; ``sin``/``cos``: ``[B or 1, S, R/2]`` (GPT-J's rotary module output,
    not duplicated); pairs ``(2i, 2i+1)`` rotate. HF requires ``D == R``; here ``R < D`` also works and
    passes the tail through. Returns a new tensor of dtype ``promote(tensor, cos)``.

    >>> import torch
    >>> from posenc_kernels.integrations.hf import apply_rotary_pos_emb_gptj
    >>> x = torch.randn(1, 3, 2, 8)
    >>> angle = torch.arange(3.0)[None, :, None] * torch.ones(4)
    >>> apply_rotary_pos_emb_gptj(x, angle.sin(), angle.cos()).shape
    torch.Size([1, 3, 2, 8])
    """
    for name, t in (("tensor", tensor), ("sin", sin), ("cos", cos)):
        check_tensor(name, t)
    plan = None
    tables_ok = _is_float(cos) and _is_float(sin) and not _tables_need_grad(cos, sin)
    if tensor.dim() == 4 and _is_float(tensor) and tables_ok:
        plan = _plan(tensor, [], cos, sin, cos.shape[-1] if cos.dim() == 3 else 0)
    if plan is None:
        return hf_gptj_apply_rotary_pos_emb(tensor, sin, cos)
    xs, table_cos, table_sin, positions, flat = plan
    out_dtype = torch.promote_types(torch.promote_types(tensor.dtype, cos.dtype), sin.dtype)
    out, _ = _rotate(xs, table_cos, table_sin, positions, out_dtype, interleaved=True)
    return out.view(tensor.shape) if flat else out


# ------------------------------------------------------------------------------------------------------------
# QK-norm architectures: the attention's q_norm/k_norm and RoPE fused into one op call per layer
# ------------------------------------------------------------------------------------------------------------
# model_type -> (attention class, norm, weight_offset, the RMSNorm's eps attribute, whether HF's forward passes
# sliding_window to the attention function). Qwen3: RMSNorm per head. Gemma 3: per head, times (1 + w).
# OLMo 2: over all heads of q (and of k) before the head split.
_QK_NORM = {
    "qwen3": ("Qwen3Attention", "head", 0.0, "variance_epsilon", True),
    "gemma3": ("Gemma3Attention", "head", 1.0, "eps", True),
    "olmo2": ("Olmo2Attention", "heads", 0.0, "variance_epsilon", False),
}


def _qk_norm_rope_call(q, k, q_weight, k_weight, **kw):
    """The fused op on fresh projections ``[B, S, H, D]``: in place when nothing records a gradient, else
    (and under torch.compile) out of place, differentiable w.r.t. q, k and both weights."""
    qk_norm_rope, qk_norm_rope_ = _qknorm.qk_norm_rope, _qknorm.qk_norm_rope_
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or q_weight.requires_grad or k_weight.requires_grad)
    ):
        return qk_norm_rope(q, k, q_weight, k_weight, **kw)
    return qk_norm_rope_(q, k, q_weight, k_weight, **kw)


def _rope_kwargs(position_embeddings, B: int, S: int, D: int, dtype):
    """The op's angle arguments from what the attention received: a :class:`RotaryAngles` (the patched
    rotary module, eager) or HF's ``(cos, sin)`` ``[1 or B, S, R]`` (compiled code); None when neither fits."""
    pe = position_embeddings
    if type(pe) is RotaryAngles:
        return {"inv_freq": pe.inv_freq, "positions": pe.positions, "attention_factor": pe.attention_factor}
    if not (isinstance(pe, (tuple, list)) and len(pe) == 2):
        return None
    cos, sin = pe
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.dim() == 3):
        return None
    if sin.shape != cos.shape or cos.shape[0] not in (1, B) or cos.shape[1] != S or cos.shape[2] % 2:
        return None
    if cos.shape[2] > D or cos.dtype != dtype or sin.dtype != dtype or _tables_need_grad(cos, sin):
        return None
    tc, ts = _tables(cos, sin, cos.shape[2] // 2)
    positions = None
    if cos.shape[0] != 1 and B != 1:  # per-sequence rows: token (b, s) reads row b*S + s
        positions = torch.arange(B * S, device=cos.device).view(B, S)
    return {"cos": tc, "sin": ts, "positions": positions}


# Plain-RoPE attention classes with separate q/k/v projections: model_type -> (class, where HF's forward takes
# the sliding_window it passes to the attention function: None, "attr" (self.sliding_window) or "config").
_PLAIN_ATTENTION = {
    "llama": ("LlamaAttention", None), "mistral": ("MistralAttention", "config"),
    "qwen2": ("Qwen2Attention", "attr"), "gemma": ("GemmaAttention", None),
}  # fmt: skip


def _rope_call(q, k, **kw):
    """RoPE on fresh projections ``[B, S, H, D]``: in place when nothing records a gradient, else (and under
    torch.compile) out of place."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return _rope_out(q, k, **kw)
    return apply_rope_(q, k, **kw)


def _angle_args(kw: dict) -> tuple:
    """The RoPE family's op arguments (``RopeArgs`` order, as ``rope.api._args`` makes them) from
    :func:`_rope_kwargs`' keywords."""
    return (kw.get("cos"), kw.get("sin"), kw.get("inv_freq"), kw.get("positions"), None, 0, None, None,
            float(kw.get("attention_factor", 1.0)), False, False, False)  # fmt: skip


def _inplace_fast(pair, args: tuple) -> bool:
    """``pair``'s in-place op on the op's own arguments (:meth:`OpPair.inplace_fast`), below the public
    function: without its keyword coercion, which a patched attention pays per layer and token (measured
    inside a Qwen3 decode step: about 19 of the 53 us the public call costs there). False, having done
    nothing, where that path does not apply (compiling, forward AD, a tensor that requires grad): the caller
    then takes the public function."""
    return pair.inplace_fast(args)


# ------------------------------------------------------------------------------------------------------------
# HF's static cache: RoPE (QK-norm + RoPE) and the cache write in one op call
# ------------------------------------------------------------------------------------------------------------
CACHE_WRITE_MODES = ("auto", "fused", "hf")
_cache_write = {"mode": "auto"}


def set_cache_write(mode: str) -> None:
    """How a patched attention writes HF's ``StaticCache`` (process-wide): ``"fused"``: the rotation (and
    QK-norm) and the cache write in one call of :func:`~posenc_kernels.rope_and_cache_` /
    :func:`~posenc_kernels.qk_norm_rope_and_cache_`; ``"hf"``: the rotation op, then HF's
    ``cache.update``; ``"auto"`` (default): fused where the op has a kernel for the tensors' device (Triton,
    or a native C++ kernel), ``"hf"`` where it would run its pure-torch composite (about 30 small torch
    calls: slower than the two it replaces). Other caches (dynamic, sliding-window, quantized, offloaded)
    always take HF's update.

    >>> from posenc_kernels.integrations import hf
    >>> hf.set_cache_write("fused"); hf.get_cache_write()
    'fused'
    >>> hf.set_cache_write("auto")
    """
    if mode not in CACHE_WRITE_MODES:
        raise ValueError(f"mode must be one of {CACHE_WRITE_MODES}, got {mode!r}")
    _cache_write["mode"] = mode


def get_cache_write() -> str:
    """The mode :func:`set_cache_write` set (``"auto"`` by default)."""
    return _cache_write["mode"]


def _fuse_cache_write(device_type: str) -> bool:
    mode = _cache_write["mode"]
    if mode != "auto":
        return mode == "fused"
    try:
        return _registry.backend_for(_registry.spec("rope_and_cache_"), device_type) != "torch"
    except RuntimeError:  # a forced backend the fused op lacks here: the rotation op (which may have it) and HF's update
        return False


def _static_cache_classes():
    """``(Cache.update, StaticLayer)`` of the installed transformers."""
    from transformers.cache_utils import Cache, StaticLayer

    return Cache.update, StaticLayer


def _static_layer(cache, layer_idx: int, k: torch.Tensor, v: torch.Tensor, grad_tensors, classes):
    """The layer of HF's static cache that the fused op can write for ``k``/``v`` ``[B, S, Hk, D]`` (its
    tensors allocated first, as HF's update would on its first call), or None: HF's ``cache.update`` then
    runs. Taken: a :class:`transformers.StaticLayer` (exactly: sliding-window, indexed and hybrid layers
    subclass it) of a cache whose ``update`` is ``Cache.update`` (not a subclass that changes it), without
    offloading, whose tensors match k's and v's dtype, device and shape; nothing that records a gradient
    (the op writes buffers and refuses autograd)."""
    if _cache_ops is None or not isinstance(layer_idx, int):
        return None
    cache_update, static_layer = classes
    if getattr(type(cache), "update", None) is not cache_update or getattr(cache, "offloading", True):
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not 0 <= layer_idx < len(layers) or type(layers[layer_idx]) is not static_layer:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in grad_tensors):
        return None
    if not _fuse_cache_write(k.device.type):
        return None
    layer = layers[layer_idx]
    if not layer.is_initialized:  # HF's lazy allocation: it reads shapes, dtypes and the device only
        layer.lazy_initialization(k.transpose(1, 2), v.transpose(1, 2))
    keys, values = layer.keys, layer.values
    if keys.dtype != k.dtype or values.dtype != v.dtype or keys.device != k.device or values.device != v.device:
        return None
    if keys.dim() != 4 or values.dim() != 4 or keys.shape[0] != k.shape[0] or keys.shape[1] != k.shape[2]:
        return None
    if keys.shape[3] != k.shape[3] or values.shape[:3] != keys.shape[:3] or values.shape[3] != v.shape[3]:
        return None
    return layer


def _cache_positions(layer, S: int, device) -> torch.Tensor:
    """Where this step's ``S`` tokens go in the layer, as HF's ``StaticLayer.update`` computes it: the next
    ``S`` rows after ``cumulative_length`` (a tensor, so compiled code does not recompile per step). A decode
    step's one row is ``cumulative_length`` itself, viewed ``[1]``: no allocation, and the op reads it before
    the caller's ``add_`` (stream order on a device)."""
    if S == 1:
        return layer.cumulative_length.view(1)
    return torch.arange(S, device=device) + layer.cumulative_length


def _attention_forward(original, arch: str, module):
    """The patched ``forward`` of an attention class: HF's forward with ``q_norm(q)``, ``k_norm(k)`` (QK-norm
    models) and ``apply_rotary_pos_emb`` replaced by one op call on the fresh projections ``[B, S, H, D]``
    (fused QK-norm + RoPE, or RoPE in place: no transposes, no new q/k); HF's own forward for anything else
    (autocast, dtypes that differ, the deprecated ``past_key_values`` keyword, angles in another form)."""
    if arch in _QK_NORM:
        _, norm, weight_offset, eps_attr, sliding = _QK_NORM[arch]
        sliding = "attr" if sliding else None
    else:
        _, sliding = _PLAIN_ATTENTION[arch]
        norm = None
    eager_attention = module.eager_attention_forward
    attention_functions = module.ALL_ATTENTION_FUNCTIONS
    static_classes = _static_cache_classes()
    norm_code = _NORMS[norm] if norm is not None and _NORMS is not None else None
    no_norm = (None, None, 0.0, _NO_NORM_CODE, 0.0)  # the cache op's norm arguments without a norm stage

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        dt = hidden_states.dtype
        rope_kw = None
        if norm is not None:
            qn, kn = self.q_norm, self.k_norm
            weights_ok = _qknorm is not None and qn.weight.dtype == dt and kn.weight.dtype == dt
        else:
            weights_ok = True
        if "past_key_values" not in kwargs and weights_ok and not torch.is_autocast_enabled(hidden_states.device.type):
            B, S = hidden_states.shape[0], hidden_states.shape[1]
            rope_kw = _rope_kwargs(position_embeddings, B, S, self.head_dim, dt) if hidden_states.dim() == 3 else None
        if rope_kw is None:
            return original(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape)
        layer = None
        if cache is not None:
            grad_tensors = (q, k, v, qn.weight, kn.weight) if norm is not None else (q, k, v)
            layer = _static_layer(cache, self.layer_idx, k, v, grad_tensors, static_classes)
        if norm is not None:
            norm_args = (qn.weight, kn.weight, float(getattr(qn, eps_attr)), norm_code, weight_offset)
        if layer is not None:
            # HF's static cache: norm, rotation and the write of k and v at the layer's next rows in one call;
            # attention then reads the whole cache tensors, as HF's StaticLayer.update returns them.
            positions = _cache_positions(layer, k.shape[1], k.device)
            args = (q, k, v, layer.keys, layer.values, None, None, positions, _LAYOUTS["HND"], None, None, None, None,
                    None, None) + (norm_args if norm is not None else no_norm) + _angle_args(rope_kw)  # fmt: skip
            if not _inplace_fast(_cache_pair, args):
                _cache_pair.call_inplace(*args)  # compiled code: the traced in-place op
            layer.cumulative_length.add_(k.shape[1])
            query_states, key_states, value_states = q.transpose(1, 2), layer.keys, layer.values
        else:
            if norm is not None:
                if not _inplace_fast(_qk_pair, (q, k) + norm_args + _angle_args(rope_kw)):
                    q, k = _qk_norm_rope_call(q, k, qn.weight, kn.weight, eps=getattr(qn, eps_attr), norm=norm,
                                              weight_offset=weight_offset, **rope_kw)  # fmt: skip
            elif not _inplace_fast(_rope_pair, (q, k) + _angle_args(rope_kw)):
                q, k = _rope_call(q, k, **rope_kw)
            query_states, key_states, value_states = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attention_interface = attention_functions.get_interface(self.config._attn_implementation, eager_attention)
        if sliding == "attr":
            extra = {"sliding_window": self.sliding_window}
        elif sliding == "config":
            extra = {"sliding_window": getattr(self.config, "sliding_window", None)}
        else:
            extra = {}
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **extra, **kwargs,
        )  # fmt: skip
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    forward.__wrapped__ = original
    forward.__doc__ = original.__doc__
    return forward


# model_type -> (module, function name, replacement). Each attention forward looks the function up in its
# module's globals at call time, so replacing that global swaps the rotary application.
_REPLACEMENTS = {
    a: apply_rotary_pos_emb
    for a in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "olmo2", "phi3", "gpt_neox")
}
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str, object]] = {
    arch: (f"transformers.models.{arch}.modeling_{arch}", "apply_rotary_pos_emb", fn)
    for arch, fn in {**_REPLACEMENTS, "gptj": apply_rotary_pos_emb_gptj}.items()
}
# model_type -> its rotary module class, whose forward the patch takes over (GPT-J has none: its attention
# gathers a sin/cos table itself).
_ROTARY_CLASSES = {
    "llama": "LlamaRotaryEmbedding", "mistral": "MistralRotaryEmbedding", "qwen2": "Qwen2RotaryEmbedding",
    "qwen3": "Qwen3RotaryEmbedding", "gemma": "GemmaRotaryEmbedding", "phi3": "Phi3RotaryEmbedding",
    "gpt_neox": "GPTNeoXRotaryEmbedding", "gemma3": "Gemma3RotaryEmbedding", "olmo2": "Olmo2RotaryEmbedding",
}  # fmt: skip


def _no_rotary(self, x, position_ids, layer_type=None):
    return None


def _rotary_forward(original):
    """The patched forward of an HF rotary module class: HF's own frequency update (``dynamic_rope_update``:
    dynamic and longrope types change ``inv_freq`` with the sequence length), then a :class:`RotaryAngles`
    instead of per-token cos/sin. Traced code (torch.compile) gets HF's tensors: the drop-in's tensor path."""
    from transformers.modeling_rope_utils import dynamic_rope_update

    update = dynamic_rope_update(_no_rotary)

    def forward(self, x, position_ids, layer_type=None):
        if torch.compiler.is_compiling():
            if layer_type is None:
                return original(self, x, position_ids)
            return original(self, x, position_ids, layer_type)
        update(self, x, position_ids, layer_type)
        return RotaryAngles(self, original, x, position_ids, layer_type)

    forward.__wrapped__ = original
    forward.__doc__ = original.__doc__
    return forward


def _targets(arch: str) -> list[tuple[str, Optional[str], str, object]]:
    """What patching ``arch`` replaces: (module, class name or None, attribute, replacement or a factory of
    it from HF's original, marked by a ``from_original`` attribute)."""
    mod_name, fn_name, replacement = SUPPORTED_ARCHITECTURES[arch]
    out = [(mod_name, None, fn_name, replacement)]
    if arch in _ROTARY_CLASSES:
        out.append((mod_name, _ROTARY_CLASSES[arch], "forward", _rotary_forward))
    if arch in _QK_NORM or arch in _PLAIN_ATTENTION:
        cls = (_QK_NORM.get(arch) or _PLAIN_ATTENTION[arch])[0]
        out.append((mod_name, cls, "forward", functools.partial(_attention_forward, arch=arch)))
    return out


_lock = threading.Lock()
_originals: dict[tuple, object] = {}  # (module, class or None, name) -> HF's object, while patched
_installed: dict[tuple, object] = {}  # (module, class or None, name) -> what the patch installed
_counts: dict[tuple, int] = {}  # live handles per patched attribute
_active: list["RotaryPatch"] = []


def _architectures_of(model) -> list[str]:
    by_module = {mod: arch for arch, (mod, _, _) in SUPPORTED_ARCHITECTURES.items()}
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    found = []
    for m in modules:
        arch = by_module.get(type(m).__module__)
        if arch is not None and arch not in found:
            found.append(arch)
    if not found:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(
            f"model ({type(model).__name__}) contains no module of a supported architecture ({supported}); "
            "pass architectures=[...] to patch by name"
        )
    return found


class RotaryPatch:
    """Handle returned by :func:`patch`: ``unpatch()`` restores HF's functions; also a context manager.

    Patching replaces module-level functions, so it is process-wide: every model of a patched architecture
    uses the kernels while the handle is active, not only the model passed to :func:`patch`. Handles nest:
    HF's function comes back when the last handle patching it is undone."""

    def __init__(self, architectures: tuple[str, ...]):
        self.architectures = architectures
        self.active = False

    def _install(self) -> None:
        with _lock:
            targets = []
            for arch in self.architectures:
                for mod_name, cls_name, attr, replacement in _targets(arch):
                    module = importlib.import_module(mod_name)
                    owner = getattr(module, cls_name) if cls_name else module
                    targets.append((owner, (mod_name, cls_name, attr), replacement))
            for owner, key, replacement in targets:  # imports all succeeded: now install
                if key not in _originals:
                    original = owner.__dict__[key[2]] if isinstance(owner, type) else getattr(owner, key[2])
                    if replacement is _rotary_forward:
                        new = replacement(original)
                    elif isinstance(replacement, functools.partial):  # an attention class's forward
                        new = replacement(original, module=importlib.import_module(key[0]))
                    else:
                        new = replacement
                    _originals[key], _installed[key] = original, new
                    setattr(owner, key[2], new)
                _counts[key] = _counts.get(key, 0) + 1
            self.active = True
            _active.append(self)

    def unpatch(self) -> None:
        """Undo this handle's patch (a no-op when already undone)."""
        with _lock:
            if not self.active:
                return
            self.active = False
            _active.remove(self)
            for arch in self.architectures:
                for mod_name, cls_name, attr, _ in _targets(arch):
                    key = (mod_name, cls_name, attr)
                    _counts[key] -= 1
                    if _counts[key]:
                        continue
                    del _counts[key]
                    original, installed = _originals.pop(key), _installed.pop(key)
                    module = importlib.import_module(mod_name)
                    owner = getattr(module, cls_name) if cls_name else module
                    current = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr)
                    if current is installed:
                        setattr(owner, attr, original)
                    else:
                        where = f"{mod_name}.{cls_name + '.' if cls_name else ''}{attr}"
                        warnings.warn(f"{where} was replaced by someone else after posenc_kernels patched it; "
                                      "leaving the newer replacement in place", RuntimeWarning, stacklevel=2)  # fmt: skip

    def __enter__(self) -> "RotaryPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        return f"RotaryPatch({list(self.architectures)}, {'active' if self.active else 'undone'})"


def patch(
    model: Optional[torch.nn.Module] = None, *, architectures: Optional[Union[str, Iterable[str]]] = None
) -> RotaryPatch:
    """Route the rotary application of HF models through the posenc kernels; returns a :class:`RotaryPatch`.

    ``model``: patch the architectures found among its modules. ``architectures``: HF ``model_type`` names
    from :data:`SUPPORTED_ARCHITECTURES` (``"llama"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"``,
    ``"gemma"``, ``"gemma3"``, ``"olmo2"``, ``"phi3"``, ``"gpt_neox"``, ``"gptj"``). Neither: all of them.
    The rotary module classes (all but GPT-J's) are patched too: they run HF's frequency update, then return a :class:`RotaryAngles`
    (``inv_freq``, ``attention_scaling``, positions) instead of per-token cos/sin, and the attention's
    ``apply_rotary_pos_emb`` computes HF's fp32 angles in the kernel, so every rope type HF implements
    (dynamic, longrope, yarn, ...) keeps working. Qwen3, Gemma 3 and OLMo 2 attention run q_norm/k_norm and
    RoPE as one :func:`~posenc_kernels.qk_norm_rope_` call. With HF's static cache the attention can also write
    the cache in that call (:func:`~posenc_kernels.rope_and_cache_` / :func:`~posenc_kernels.qk_norm_rope_and_cache_`
    into the ``StaticLayer``'s tensors; see :func:`set_cache_write`). Use as ``with patch(model): ...`` or ``h = patch();
    ...; h.unpatch()``; :func:`unpatch` undoes every patch.
    """
    if model is not None and architectures is not None:
        raise TypeError("pass model or architectures, not both")
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        archs = _architectures_of(model)
    elif architectures is None:
        archs = list(SUPPORTED_ARCHITECTURES)
    else:
        archs = [architectures] if isinstance(architectures, str) else list(architectures)
        for a in archs:
            if a not in SUPPORTED_ARCHITECTURES:
                supported = ", ".join(SUPPORTED_ARCHITECTURES)
                raise ValueError(f"architectures: unknown architecture {a!r}; supported: {supported}")
        if not archs:
            raise ValueError("architectures must name at least one architecture")
    handle = RotaryPatch(tuple(dict.fromkeys(archs)))
    handle._install()
    return handle


def unpatch() -> None:
    """Undo every active :func:`patch`, restoring HF's functions."""
    for handle in list(_active):
        handle.unpatch()
