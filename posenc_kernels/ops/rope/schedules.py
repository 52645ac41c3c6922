"""RoPE frequency schedules: :func:`rope_frequencies` gives the inverse frequencies and attention factor of
every HF rope type from HF's ``rope_parameters`` dict, with the semantics of
``transformers.modeling_rope_utils``, evaluated in float64 and rounded once. The formula of each type, the
aliases and keys accepted: ``docs/rope.md``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Mapping, Optional

import torch

__all__ = ["rope_frequencies", "ROPE_TYPES", "MissingRopeParameter"]

# rope_type -> the keys of ``scaling`` it reads (besides rope_type itself).
_SCHEDULE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor", "original_max_position_embeddings"}),
    "ntk": frozenset({"factor"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"}),  # fmt: skip
    "longrope": frozenset({"short_factor", "long_factor", "original_max_position_embeddings", "factor",
                           "attention_factor"}),  # fmt: skip
    "llama3": frozenset({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}),
    "proportional": frozenset({"factor", "partial_rotary_factor"}),
}
ROPE_TYPES = tuple(_SCHEDULE_KEYS)
# rope_type -> the keys that must be present, checked (as HF's _check_received_keys does) before any value:
# HF's required keys minus rope_type/rope_theta (defaulted here) and original_max_position_embeddings
# (falls back to max_position_embeddings, as HF's standardize_rope_params fills it).
_REQUIRED_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "ntk": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
_ALIASES = {"mrope": "default", "su": "longrope"}
# Keys of an HF rope_parameters dict that are not schedule keys: tolerated, never warned about.
_NOT_SCHEDULE_KEYS = frozenset(
    {"rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved"}
)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class MissingRopeParameter(KeyError, ValueError):
    """A required key of a rope type is absent from ``scaling``. A ``KeyError`` as in HF (its
    ``validate_rope`` and init functions raise ``KeyError``), and a ``ValueError`` like every other bad
    argument here."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


def _missing(rope_type: str, key: str, hint: str = "") -> MissingRopeParameter:
    return MissingRopeParameter(f"scaling[{key!r}] is required for rope_type {rope_type!r}{hint}")


def _number(p: Mapping, key: str, rope_type: str, *, default=None, positive=True, required=False) -> Optional[float]:
    """``p[key]`` as a finite float (``> 0`` if ``positive``); ``default`` when absent or None, or
    :class:`MissingRopeParameter` if ``required``."""
    v = p.get(key)
    if v is None:
        if required:
            raise _missing(rope_type, key)
        return default
    if not _is_number(v) or not math.isfinite(float(v)) or (positive and float(v) <= 0):
        want = "a positive finite number" if positive else "a finite number"
        raise ValueError(f"scaling[{key!r}] must be {want} for rope_type {rope_type!r}, got {v!r}")
    return float(v)


def _length(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) <= 0:
        raise ValueError(f"{what} must be a positive int, got {v!r}")
    return int(v)


def _original_length(p: Mapping, rope_type: str, max_position_embeddings: Optional[int]) -> int:
    """``original_max_position_embeddings``; like HF's ``standardize_rope_params``, falls back to
    ``max_position_embeddings`` when the key is absent."""
    v = p.get("original_max_position_embeddings")
    if v is not None:
        return _length(v, f"scaling['original_max_position_embeddings'] (rope_type {rope_type!r})")
    if max_position_embeddings is not None:
        return max_position_embeddings
    raise _missing(rope_type, "original_max_position_embeddings", " (or pass max_position_embeddings=)")


def _factor_list(p: Mapping, key: str, rope_type: str, n: int) -> torch.Tensor:
    v = p.get(key)
    if v is None:
        raise _missing(rope_type, key)
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or not all(_is_number(x) for x in v):
        raise ValueError(f"scaling[{key!r}] must be a list of numbers for rope_type {rope_type!r}, got {v!r}")
    if len(v) != n:
        raise ValueError(f"scaling[{key!r}] must have rotary_dim / 2 = {n} entries, got {len(v)}")
    t = torch.tensor([float(x) for x in v], dtype=torch.float64)
    if not (torch.isfinite(t).all() and (t > 0).all()):
        raise ValueError(f"scaling[{key!r}] entries must be positive finite numbers, got {v!r}")
    return t


def _rope_type(scaling: Mapping) -> str:
    # HF: rope_type wins over the old "type" key.
    name = scaling.get("rope_type", scaling.get("type", "default"))
    name = _ALIASES.get(name, name)
    if name not in _SCHEDULE_KEYS:
        raise ValueError(f"unknown rope_type {name!r}: expected one of {', '.join(ROPE_TYPES)}")
    return name


def _powers(base: float, d: int, n: Optional[int] = None) -> torch.Tensor:
    """float64 ``base ** (-2i / d)`` for ``i < n`` (``d / 2`` by default)."""
    stop = d if n is None else 2 * n
    return float(base) ** -(torch.arange(0, stop, 2, dtype=torch.float64) / d)


def _ntk_exponent(d: int, rope_type: str) -> float:
    if d <= 2:
        raise ValueError(f"rope_type {rope_type!r} needs rotary_dim > 2 (its base is raised to d / (d - 2)), got {d}")
    return d / (d - 2)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _schedule(rope_type, p, d, base, seq_len, max_position_embeddings):
    if rope_type == "default":
        return _powers(base, d), 1.0

    if rope_type == "linear":
        factor = _number(p, "factor", rope_type, required=True)
        return _powers(base, d) / factor, 1.0

    if rope_type == "ntk":
        factor = _number(p, "factor", rope_type, required=True)
        return _powers(base * factor ** _ntk_exponent(d, rope_type), d), 1.0

    if rope_type == "dynamic":
        factor = _number(p, "factor", rope_type, required=True)
        # HF reads config.max_position_embeddings; the scaling key is the fallback for a bare dict.
        original = max_position_embeddings or _original_length(p, rope_type, None)
        length = original if seq_len is None else max(seq_len, original)
        new_base = base * (factor * length / original - (factor - 1)) ** _ntk_exponent(d, rope_type)
        return _powers(new_base, d), 1.0

    if rope_type == "yarn":
        # HF requires the key (``validate_rope`` and ``_compute_yarn_parameters`` raise KeyError without
        # it); only an explicit ``"factor": None`` means the ratio of the two lengths (DeepSeek-V3).
        if "factor" not in p:
            raise _missing(rope_type, "factor", " (set it to None to derive it from max_position_embeddings)")
        original = _original_length(p, rope_type, max_position_embeddings)
        factor = _number(p, "factor", rope_type)
        if factor is None:  # DeepSeek-V3: the ratio of the two lengths
            if max_position_embeddings is None:
                raise ValueError(
                    "scaling['factor'] is None for rope_type 'yarn': pass max_position_embeddings= to derive it "
                    "as max_position_embeddings / original_max_position_embeddings"
                )
            factor = max_position_embeddings / original
        attention_factor = _number(p, "attention_factor", rope_type)
        if attention_factor is None:
            mscale = _number(p, "mscale", rope_type, positive=False)
            mscale_all_dim = _number(p, "mscale_all_dim", rope_type, positive=False)
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        beta_fast = _number(p, "beta_fast", rope_type, default=32.0)
        beta_slow = _number(p, "beta_slow", rope_type, default=1.0)
        if base == 1:
            raise ValueError("base must not be 1 for rope_type 'yarn' (its correction range divides by log(base))")
        truncate = True if p.get("truncate") is None else p["truncate"]
        if not isinstance(truncate, bool):
            raise ValueError(f"scaling['truncate'] must be a bool for rope_type 'yarn', got {truncate!r}")

        def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
            return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # HF: avoid the singular ramp
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        # ramp 0: extrapolate (frequency kept), 1: interpolate (frequency / factor).
        return _powers(base, d) * (ramp / factor + (1 - ramp)), float(attention_factor)

    if rope_type == "longrope":
        original = _original_length(p, rope_type, max_position_embeddings)
        long_factor = _factor_list(p, "long_factor", rope_type, d // 2)
        short_factor = _factor_list(p, "short_factor", rope_type, d // 2)
        factor = _number(p, "factor", rope_type)
        if factor is None:  # Phi-3: the ratio of the two lengths
            if max_position_embeddings is None:
                raise _missing(rope_type, "factor", " (or pass max_position_embeddings= to derive it)")
            factor = max_position_embeddings / original
        attention_factor = _number(p, "attention_factor", rope_type)
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = long_factor if (seq_len is not None and seq_len > original) else short_factor
        return 1.0 / (ext * float(base) ** (torch.arange(0, d, 2, dtype=torch.float64) / d)), float(attention_factor)

    if rope_type == "llama3":
        factor = _number(p, "factor", rope_type, required=True)
        low_ff = _number(p, "low_freq_factor", rope_type, required=True)
        high_ff = _number(p, "high_freq_factor", rope_type, required=True)
        if high_ff <= low_ff:
            raise ValueError(
                f"scaling['high_freq_factor'] must exceed scaling['low_freq_factor'] for rope_type 'llama3', "
                f"got {high_ff!r} <= {low_ff!r}"
            )
        original = _original_length(p, rope_type, max_position_embeddings)
        inv = _powers(base, d)
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = original / low_ff, original / high_ff
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0

    if rope_type == "proportional":
        factor = _number(p, "factor", rope_type, default=1.0)
        fraction = _number(p, "partial_rotary_factor", rope_type, default=1.0)
        if fraction > 1:
            raise ValueError(
                f"scaling['partial_rotary_factor'] must be in (0, 1] for rope_type 'proportional', got {fraction!r}"
            )
        rotated = int(fraction * d // 2)
        inv = torch.zeros(d // 2, dtype=torch.float64)
        inv[:rotated] = _powers(base, d, rotated)
        return inv / factor, 1.0

    raise AssertionError(rope_type)  # pragma: no cover - _rope_type() filters


def rope_frequencies(
    rotary_dim: int,
    base: Optional[float] = None,
    *,
    scaling: Optional[Mapping[str, Any]] = None,
    seq_len: Optional[int] = None,
    max_position_embeddings: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_factor)``: the ``rotary_dim / 2`` inverse frequencies of a RoPE schedule as
    ``dtype`` (fp32 by default; float64 for ``exact`` on-the-fly angles), and the factor cos/sin are scaled
    by (a Python float).

    Args:
        rotary_dim: channels that rotate (even). With partial rotary this is ``int(head_dim *
            partial_rotary_factor)``: the caller applies ``partial_rotary_factor`` (except for
            ``proportional``, where ``rotary_dim`` is the head dim; see the module docstring).
        base: ``rope_theta``. ``None`` (default) takes ``scaling["rope_theta"]`` when present, else 10000. An
            explicit base that disagrees with ``scaling["rope_theta"]`` is an error, not a silent choice.
        scaling: HF ``rope_parameters`` dict (``rope_type``/``type``, ``factor``,
            ``original_max_position_embeddings``, ...); ``None`` is the default schedule.
        seq_len: current length (HF: largest position + 1), read by ``dynamic`` and ``longrope`` only.
        max_position_embeddings: the model's ``config.max_position_embeddings``: the original length of
            ``dynamic``; the fallback for a missing ``original_max_position_embeddings`` and the source of
            ``factor = max_position_embeddings / original`` when ``yarn``/``longrope`` have no factor, as in HF.
        dtype: a floating dtype; values are computed in float64 and rounded once.

    Errors name the argument or key: ``ValueError`` for an unknown rope_type or a bad value (e.g.
    ``factor <= 0``); a missing required key raises :class:`MissingRopeParameter`, both a ``KeyError`` (as
    HF raises) and a ``ValueError``. Required keys, as in HF's ``_validate_*_rope_parameters``: ``factor``
    for linear, dynamic, ntk, yarn and llama3 (yarn's may be ``None``: the ratio of the lengths);
    ``short_factor`` and ``long_factor`` for longrope; ``low_freq_factor`` and ``high_freq_factor`` for
    llama3; ``original_max_position_embeddings`` for yarn, longrope and llama3, which falls back to
    ``max_position_embeddings`` as HF's ``standardize_rope_params`` fills it in.

    >>> import posenc_kernels as pk
    >>> inv_freq, attention_factor = pk.rope_frequencies(8)
    >>> inv_freq, attention_factor
    (tensor([1.0000, 0.1000, 0.0100, 0.0010]), 1.0)
    >>> pk.rope_frequencies(8, scaling={"rope_type": "linear", "factor": 4.0})[0]
    tensor([0.2500, 0.0250, 0.0025, 0.0003])
    >>> yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    >>> round(pk.rope_frequencies(128, 1e6, scaling=yarn)[1], 4)  # 0.1 ln(4) + 1
    1.1386
    """
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"rotary_dim must be an int, got {type(rotary_dim).__name__}")
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even int (channels rotate in pairs), got {rotary_dim}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise TypeError(f"scaling must be a dict of HF rope_parameters or None, got {type(scaling).__name__}")
    p = dict(scaling or {})

    theta = p.get("rope_theta")
    if base is None:
        base = 10000.0 if theta is None else theta
    elif theta is not None and _is_number(theta) and float(theta) != float(base):
        raise ValueError(f"base={base!r} disagrees with scaling['rope_theta']={theta!r}: pass one of them")
    if not (_is_number(base) and math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a positive finite number, got {base!r}")
    base = float(base)
    if seq_len is not None:
        if isinstance(seq_len, torch.Tensor) and seq_len.numel() == 1 and not seq_len.is_floating_point():
            seq_len = int(seq_len.item())  # a host sync on an accelerator: pass an int where you can
        # 0 is accepted as HF accepts it (an empty prefix: the original-length schedule).
        if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or int(seq_len) < 0:
            raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
        seq_len = int(seq_len)
    if max_position_embeddings is not None:
        max_position_embeddings = _length(max_position_embeddings, "max_position_embeddings")

    rope_type = _rope_type(p)
    unknown = set(p) - _SCHEDULE_KEYS[rope_type] - _NOT_SCHEDULE_KEYS
    if unknown:
        warnings.warn(
            f"rope_frequencies: keys {sorted(unknown)} are not used by rope_type {rope_type!r} and are ignored",
            stacklevel=2,
        )
    for key in _REQUIRED_KEYS.get(rope_type, ()):
        if key not in p:
            raise _missing(rope_type, key)
    inv_freq, attention_factor = _schedule(rope_type, p, rotary_dim, base, seq_len, max_position_embeddings)
    return inv_freq.to(dtype), float(attention_factor)
