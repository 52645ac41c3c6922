"""RoPE + KV-cache write: the pair ``posenc::rope_and_cache_`` / ``posenc::rope_and_cache`` (q and k rotated
in place, optionally QK-normalised first; the rotated k and v written into a paged or contiguous cache, in
its dtype or FP8; out of place: new q, k and caches), with the check shared by the fakes and every
implementation.

One op for the whole attention prologue: ``norm`` is the QK-norm family's code (``-1``: no norm stage), the
RoPE arguments are the RoPE family's (:data:`..rope.op._ARGS`, checked by its
:func:`..rope.op.check_rope`), so every rotation mode of ``apply_rope_`` is available, and the q/k part of
the result is bit for bit ``apply_rope_`` (or ``qk_norm_rope_``) on the same backend.

The caches are buffers, not differentiable values: the op is refused under autograd (a clear error before
anything is written); train with ``apply_rope`` / ``qk_norm_rope`` and an ordinary cache.
"""

from __future__ import annotations


import torch

from ..checks import (
    FLOAT_DTYPES, check_disjoint, check_tensor, check_writable, value_checks_on,
)  # fmt: skip
from ..pair import define_pair
from ..qknorm.op import NORM_ARGS, check_qk_norm_rope
from ..rope.op import _ARGS as ROPE_ARGS
from ..rope.op import check_rope
from .kernel import rope_and_cache_triton
from .torch_impl import FP8_DTYPES, HND, NHD, NONE, rope_and_cache_torch

CACHE_ARGS = (
    "Tensor? v, Tensor k_cache, Tensor? v_cache, Tensor? q_fp8, Tensor? slot_mapping, Tensor? cache_positions, "
    "SymInt kv_layout, Tensor? k_scale, Tensor? v_scale, Tensor? q_scale, float? k_scale_value, "
    "float? v_scale_value, float? q_scale_value"
)
ARGS = f"Tensor q, Tensor k, {CACHE_ARGS}, {NORM_ARGS}, {ROPE_ARGS}"
N_CACHE = len(CACHE_ARGS.split(", "))  # arguments between k and the norm's
N_NORM = len(NORM_ARGS.split(", "))
SLOT_DTYPES = (torch.int32, torch.int64)
# FP8 scales: the kernels divide in fp32 by the scale (and Triton by its fp32 reciprocal): a normal fp32 number
SCALE_MIN, SCALE_MAX = 2.0**-126, float(torch.finfo(torch.float32).max)
LAYOUTS = {"NHD": NHD, "HND": HND}


def _fmt(t) -> str:
    return str(tuple(t.shape))


def cache_view(cache: torch.Tensor, layout: int) -> torch.Tensor:
    """The cache as ``[N0, N1, H, D]`` (NHD: block/sequence, slot/position, head, channel), a view."""
    return cache.transpose(1, 2) if layout == HND else cache


def _check_cache(name: str, cache, x, xname: str, layout: int, want_n0, want_n1, paged: bool, k_cache=None):
    check_tensor(name, cache, ndim=4, device=x.device)
    if cache.dtype != x.dtype and cache.dtype not in FP8_DTYPES:
        raise TypeError(
            f"{name} must have {xname}'s dtype ({x.dtype}) or an FP8 dtype (float8_e4m3fn, float8_e5m2), got "
            f"{cache.dtype}"
        )
    if k_cache is not None and cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache must have k_cache's dtype ({k_cache.dtype}), got {cache.dtype}")
    if cache.stride(-1) != 1 and cache.shape[-1] > 1:
        raise ValueError(f"{name} must have unit stride in its last dimension (head_dim), got strides {cache.stride()}")
    H, D = x.shape[-2], x.shape[-1]
    c = cache_view(cache, layout)
    what = ("[num_blocks, block_size, Hk, D]" if layout == NHD else "[num_blocks, Hk, block_size, D]") if paged else (
        "[B, S_max, Hk, D]" if layout == NHD else "[B, Hk, S_max, D]")  # fmt: skip
    bad = c.shape[2] != H or c.shape[3] != D
    if want_n0 is not None and c.shape[0] != want_n0:
        bad = True
    if want_n1 is not None and c.shape[1] != want_n1:
        bad = True
    if bad:
        names = {"k_cache": "k", "v_cache": "v"}
        raise ValueError(
            f"{name} must be {what} with {names[name]}'s heads and head_dim (Hk = {H}, D = {D})"
            + (f" and k_cache's {'blocks' if paged else 'batch'} and {'block_size' if paged else 'length'}"
               if name == "v_cache" else (f" and B = {want_n0}" if want_n0 is not None else ""))
            + f" in kv_layout={'NHD' if layout == NHD else 'HND'}, got {_fmt(cache)}"
        )  # fmt: skip


def _check_scale(name: str, t, value, H: int, dev) -> None:
    if t is not None:
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=(0, 1), device=dev)
        if t.dim() == 1 and t.shape[0] not in (1, H):
            raise ValueError(f"{name} must be a float, a 0-d tensor, [1] or per head [{H}], got {_fmt(t)}")
    elif value is not None and not (SCALE_MIN <= value <= SCALE_MAX):
        raise ValueError(f"{name} must be a normal fp32 number in [2**-126, 3.4e38] (its reciprocal finite), got {value!r}")


def _check_scale_values(name: str, t) -> None:
    if t is not None and t.numel() and value_checks_on(t.device):
        lo, hi = torch.stack(torch.aminmax(t.to(torch.float64))).tolist()  # one host transfer
        if not (lo >= SCALE_MIN and hi <= SCALE_MAX):
            raise ValueError(f"{name} must hold normal fp32 numbers in [2**-126, 3.4e38] (reciprocals finite), got min "
                             f"{lo}, max {hi}")  # fmt: skip


def _check_v(q, k, v) -> None:
    check_tensor("v", v, ndim=q.dim(), device=q.device)
    if v.dtype != k.dtype:
        raise TypeError(f"v must have k's dtype ({k.dtype}), got {v.dtype}")
    if v.shape[:-2] != k.shape[:-2] or v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v must have k's tokens and heads ({_fmt(k)[:-1]} with any head_dim): got {_fmt(v)}"
            + (f" (v has {v.shape[-2]} heads, k {k.shape[-2]})" if v.shape[:-2] == k.shape[:-2] else "")
        )


def _check_index(name, t, ndim) -> None:
    check_tensor(name, t, ndim=ndim)
    if t.dtype not in SLOT_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")


def check_rope_and_cache(q, k, v, k_cache, v_cache, q_fp8, slot_mapping, cache_positions, kv_layout, k_scale,
                         v_scale, q_scale, k_scale_value, v_scale_value, q_scale_value, q_weight, k_weight, eps, norm,
                         weight_offset, *rest, values: bool, inplace: bool) -> None:  # fmt: skip
    """Every check of both ops, before anything is written: the cache arguments, then the norm and RoPE
    checks of their families (``norm == -1``: RoPE's alone)."""
    if isinstance(kv_layout, bool) or kv_layout not in (NHD, HND):
        raise ValueError(f"kv_layout must be 'NHD' or 'HND' (codes {NHD}, {HND}), got {kv_layout!r}")
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=(3, 4))
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
    if (slot_mapping is None) == (cache_positions is None):
        raise ValueError(
            "pass exactly one of slot_mapping (a paged cache, q/k/v [T, H, D]) and cache_positions (a contiguous "
            "cache, q/k/v [B, S, H, D])" + (", got both" if slot_mapping is not None else ", got neither")
        )
    paged = slot_mapping is not None
    if paged and q.dim() != 3:
        raise ValueError(f"with slot_mapping (a paged cache), q, k and v must be packed [T, H, D], got q {_fmt(q)}")
    if not paged and q.dim() != 4:
        raise ValueError(f"with cache_positions (a contiguous cache), q, k and v must be [B, S, H, D], got q {_fmt(q)}")
    # q and k: the norm's and RoPE's own checks (shapes, dtypes, angles, positions)
    if norm == NONE:
        check_rope(q, k, *rest, values=False, inplace=inplace)
        if rest[-2]:  # conjugate
            raise ValueError("conjugate must be False for rope_and_cache (RoPE's backward flag)")
    else:
        check_qk_norm_rope(q, k, q_weight, k_weight, eps, norm, weight_offset, *rest, values=False, inplace=inplace)
    if (v is None) != (v_cache is None):
        raise ValueError("pass v and v_cache together (or neither, for a k-only cache), got " + (
            "v without v_cache" if v is not None else "v_cache without v"))  # fmt: skip
    if v is not None:
        _check_v(q, k, v)
    T = q.shape[0] if paged else q.shape[1]

    B = 1 if paged else q.shape[0]
    if paged:
        _check_index("slot_mapping", slot_mapping, 1)
        if slot_mapping.device != q.device:
            raise ValueError(f"slot_mapping must be on the same device as the input ({q.device}), got {slot_mapping.device}")
        if slot_mapping.shape[0] > T:
            raise ValueError(f"slot_mapping must have at most one slot per token ([T] = [{T}]), got {_fmt(slot_mapping)}")
        _check_cache("k_cache", k_cache, k, "k", kv_layout, None, None, True)
    else:
        _check_index("cache_positions", cache_positions, (1, 2))
        if cache_positions.device != q.device:
            raise ValueError(
                f"cache_positions must be on the same device as the input ({q.device}), got {cache_positions.device}"
            )
        if tuple(cache_positions.shape) not in [(T,), (B, T)]:
            raise ValueError(f"cache_positions must be [S] = [{T}] or [B, S] = [{B}, {T}], got {_fmt(cache_positions)}")
        _check_cache("k_cache", k_cache, k, "k", kv_layout, B, None, False)
    kc = cache_view(k_cache, kv_layout)
    if v is not None:
        _check_cache("v_cache", v_cache, v, "v", kv_layout, kc.shape[0], kc.shape[1], paged, k_cache=k_cache)
    Hk = k.shape[-2]
    fp8 = k_cache.dtype in FP8_DTYPES
    for name, t, val in (("k_scale", k_scale, k_scale_value), ("v_scale", v_scale, v_scale_value)):
        if name == "v_scale" and v is None:
            if t is not None or val is not None:
                raise ValueError("v_scale was given without v")
            continue
        if fp8 and t is None and val is None:
            raise ValueError(f"an FP8 cache ({k_cache.dtype}) needs {name} (a float, a 0-d tensor or per head [Hk])")
        if not fp8 and (t is not None or val is not None):
            raise ValueError(f"{name} applies to FP8 caches only; this cache is {k_cache.dtype}")
        _check_scale(name, t, val, Hk, q.device)
    if q_fp8 is not None:
        check_tensor("q_fp8", q_fp8, dtypes=FP8_DTYPES, device=q.device)
        if q_fp8.shape != q.shape:
            raise ValueError(f"q_fp8 must have q's shape {_fmt(q)}, got {_fmt(q_fp8)}")
        if q_scale is None and q_scale_value is None:
            raise ValueError("q_fp8 needs q_scale (a float, a 0-d tensor or per head [Hq])")
        _check_scale("q_scale", q_scale, q_scale_value, q.shape[-2], q.device)
    elif q_scale is not None or q_scale_value is not None:
        raise ValueError("q_scale applies to the FP8 q output: pass q_fp8 too")
    if not values:
        return
    if norm == NONE:
        check_rope(q, k, *rest, values=True, inplace=inplace)
    else:
        check_qk_norm_rope(q, k, q_weight, k_weight, eps, norm, weight_offset, *rest, values=True, inplace=inplace)
    written = [("k_cache", k_cache)] + ([("v_cache", v_cache)] if v is not None else [])
    written += [("q_fp8", q_fp8)] if q_fp8 is not None else []
    for name, t in written:
        check_writable(name, t)
    if inplace:
        written = [("q", q), ("k", k)] + written
    read = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for i, (na, a) in enumerate(written):
        for nb, b in written[i + 1 :]:
            check_disjoint(na, a, nb, b)
        for nb, b in read:
            if all(b is not t for _, t in written):
                check_disjoint(nb, b, na, a)
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale), ("q_scale", q_scale)):
        _check_scale_values(name, t)
    if paged:
        _check_slot_values(slot_mapping, kc.shape[0] * kc.shape[1], kc.shape[0], kc.shape[1])
    else:
        _check_position_values(cache_positions, kc.shape[1])


def _sorted_stats(x: torch.Tensor):
    """``(sorted rows, [min, max, any duplicate >= 0])`` with one host transfer (a sync on CUDA)."""
    srt = x.sort(dim=-1).values
    dup = ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()
    lo, hi, d = torch.stack((srt.min(), srt.max(), dup.to(srt.dtype))).tolist()
    return srt, lo, hi, bool(d)


def _check_slot_values(slots, n_slots: int, n_blocks: int, block_size: int) -> None:
    if slots.numel() == 0 or not value_checks_on(slots.device):
        return
    s = slots.to(torch.int64)
    srt, lo, hi, dup = _sorted_stats(s)
    if lo < -1 or hi >= n_slots:
        bad = lo if lo < -1 else hi
        i = int((s == bad).nonzero()[0, 0])
        raise ValueError(
            f"slot_mapping[{i}] = {bad} is out of range: slots must lie in [0, num_blocks * block_size) = "
            f"[0, {n_blocks} * {block_size}) = [0, {n_slots}), or be -1 (not written)"
        )
    if dup:
        j = int(((srt[1:] == srt[:-1]) & (srt[1:] >= 0)).nonzero()[0, 0])
        d = int(srt[j])
        idx = (s == d).nonzero()[:, 0].tolist()
        raise ValueError(f"slot {d} is written twice in one call (slot_mapping{idx}): the cache row would be a race")


def _check_position_values(pos, s_max: int) -> None:
    if pos.numel() == 0 or not value_checks_on(pos.device):
        return
    p = pos.to(torch.int64)
    srt, lo, hi, dup = _sorted_stats(p if p.dim() == 2 else p[None])
    if lo < -1 or hi >= s_max:
        bad = lo if lo < -1 else hi
        at = tuple((p == bad).nonzero()[0].tolist())
        raise ValueError(
            f"cache_positions{list(at)} = {bad} is out of range: cache positions must lie in [0, S_max) = [0, "
            f"{s_max}), or be -1 (not written)"
        )
    if dup:
        r, c = (int(x) for x in ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).nonzero()[0])
        raise ValueError(
            f"cache position {int(srt[r, c + 1])} is written twice in one call (cache_positions row {r}): the "
            "cache row would be a race"
        )


# ---- the pair


def _as_4d(t):
    return t.unsqueeze(0) if t is not None and t.dim() == 3 else t


def _body(launch, outs, q, k, v, k_cache, v_cache, q_fp8, slot_mapping, cache_positions, kv_layout, *rest):
    q_o, k_o, kc_o, vc_o, qf_o = outs
    if kc_o is not k_cache:  # out of place: the new caches start as copies of the old
        kc_o.copy_(k_cache)
        if v is not None:
            vc_o.copy_(v_cache)
        if q_fp8 is not None:
            q_o.copy_(q)  # q itself is not written when the rotated q goes to q_fp8 (which is, whole)
    kc4 = cache_view(kc_o, kv_layout)
    vc4 = cache_view(vc_o, kv_layout) if v is not None else None
    launch(_as_4d(q), _as_4d(k), _as_4d(v), _as_4d(q_o), _as_4d(k_o), kc4, vc4, _as_4d(qf_o) if q_fp8 is not None else None,
           slot_mapping, cache_positions, *rest)  # fmt: skip


def _torch_launch(q, k, v, q_o, k_o, kc4, vc4, q_fp8, slot_mapping, cache_positions, k_scale, v_scale, q_scale, ksv,
                  vsv, qsv, q_weight, k_weight, eps, norm, weight_offset, *rope_rest):  # fmt: skip
    rope_and_cache_torch(q, k, v, q_o, k_o, kc4, vc4, q_fp8, slot_mapping, cache_positions, kc4.shape[1],
                         k_scale, v_scale, q_scale, ksv, vsv, qsv, q_weight, k_weight, eps, norm, weight_offset,
                         rope_rest)  # fmt: skip


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, *grads):  # never reached: the op refuses to record (differentiable=())
    raise RuntimeError("posenc::rope_and_cache is not differentiable")


LAUNCHERS = {"triton": rope_and_cache_triton, "torch": _torch_launch}  # Triton: the prologue kernel (.kernel)

rope_and_cache = define_pair(
    "rope_and_cache",
    ARGS,
    mutates=("q", "k", "k_cache", "v_cache", "q_fp8"),
    differentiable=(),
    check=check_rope_and_cache,
    body=_body,
    launchers=LAUNCHERS,
    setup_context=_setup_context,
    backward=_backward,
    native=True,
    compile_inplace=True,  # under torch.compile the mutating op itself (a copy-back would copy whole caches)
)
