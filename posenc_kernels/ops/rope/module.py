"""``RotaryEmbedding``: the nn.Module that owns a RoPE schedule (what an HF ``*RotaryEmbedding`` holds) and,
instead of returning cos/sin, rotates q and k in place with one launch (:func:`posenc_kernels.apply_rope_`).
Its angle sources (``cache``, ``exact``), the dynamic-NTK / LongRoPE switching and the buffers' rules:
``docs/rope.md``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..checks import check_flag, check_flags
from .api import apply_rope_, mrope_axis_map, rope_cos_sin
from .schedules import rope_frequencies

__all__ = ["RotaryEmbedding"]

# Models whose rotary pairs are (2i, 2i + 1) (rotate_every_two, or a rotate_half on x[..., 0::2] /
# x[..., 1::2]) rather than (i, i + R/2); configs with ``rope_interleave=True`` (DeepSeek-V3) too.
_INTERLEAVED_MODEL_TYPES = frozenset({"gptj", "codegen", "glm", "glm4", "cohere"})
# Qwen3-VL text models interleave their M-RoPE sections whatever the config says.
_MROPE_INTERLEAVED_MODEL_TYPES = frozenset({"qwen3_vl_text", "qwen3_vl_moe_text", "qwen3_vl", "qwen3_vl_moe"})
_MIN_TABLE_ROWS = 256
_EXACT_TABLE_CHUNK = 1 << 16  # rows per float64 chunk when building exact tables


def _positive_int(name: str, v: Any, *, allow_none: bool = False) -> Optional[int]:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _start(offsets) -> int:
    """An int offset as an int; a SymInt (traced code) stays symbolic, where int() would specialise it."""
    return offsets if isinstance(offsets, torch.SymInt) else int(offsets)


def _table_rows(needed: int) -> int:
    return max(_MIN_TABLE_ROWS, 1 << max(0, needed - 1).bit_length())


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with any HF rope schedule; ``forward(q, k, ...)`` rotates q/k in place.

    Args:
        head_dim: channels per head ``D``.
        rotary_dim: channels that rotate (``R <= D``, even); the rest pass through. Default: ``int(head_dim
            * partial_rotary_factor)`` (HF's rule), or ``head_dim``. For ``rope_type="proportional"``
            (Gemma 4) it is ``head_dim``: that schedule reads ``partial_rotary_factor`` itself and gives the
            non-rotated pairs frequency 0.
        partial_rotary_factor: fraction of ``head_dim`` that rotates (exclusive with ``rotary_dim``). Also
            read from ``scaling["partial_rotary_factor"]`` when not given.
        base: ``rope_theta``; default ``scaling["rope_theta"]`` or 10000.
        scaling: HF ``rope_parameters`` dict (see :func:`posenc_kernels.rope_frequencies`); ``mrope_section``
            and ``mrope_interleaved`` in it turn on M-RoPE, as in HF configs.
        interleaved: pair channels ``(2i, 2i+1)`` (GPT-J) instead of ``(i, i + R/2)`` (GPT-NeoX / HF).
        max_position_embeddings: the model's ``max_position_embeddings`` (needed by ``dynamic``; a fallback
            for the ``original_max_position_embeddings`` of ``yarn``/``longrope``/``llama3``, as in HF).
        cache: keep fp32 cos/sin tables (see the module docstring) or compute angles on the fly.
        exact: float64 frequencies and angles (see the module docstring).
        mrope_section: M-RoPE sections (Qwen2-VL ``[16, 24, 24]``); positions are then ``[A, B, S]`` (or
            ``[A, T]`` packed). Default: ``scaling["mrope_section"]``.
        mrope_interleaved: Qwen3-VL's interleaved section layout. Default: ``scaling["mrope_interleaved"]``.
        device: where the buffers live.

    >>> import torch
    >>> from posenc_kernels import RotaryEmbedding
    >>> rope = RotaryEmbedding(64, base=500000.0, scaling={"rope_type": "llama3", "factor": 8.0,
    ...     "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    >>> q, k = torch.randn(2, 5, 4, 64), torch.randn(2, 5, 1, 64)
    >>> q2, k2 = rope(q, k, offsets=3)  # tokens at positions 3..7
    >>> q2 is q, rope.cos_cached.shape
    (True, torch.Size([256, 32]))
    """

    def __init__(
        self,
        head_dim: int,
        rotary_dim: Optional[int] = None,
        *,
        partial_rotary_factor: Optional[float] = None,
        base: Optional[float] = None,
        scaling: Optional[Mapping[str, Any]] = None,
        interleaved: bool = False,
        max_position_embeddings: Optional[int] = None,
        cache: bool = True,
        exact: bool = False,
        mrope_section: Optional[list] = None,
        mrope_interleaved: Optional[bool] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        # None: the default device in force (a torch.device("meta") block builds meta buffers).
        device = torch.empty(0).device if device is None else torch.device(device)
        head_dim = _positive_int("head_dim", head_dim)
        if scaling is not None and not isinstance(scaling, Mapping):
            raise TypeError(f"scaling must be a dict of HF rope_parameters or None, got {type(scaling).__name__}")
        scaling = dict(scaling or {})
        mpe = _positive_int("max_position_embeddings", max_position_embeddings, allow_none=True)
        self.max_position_embeddings = mpe
        if base is not None:
            theta = scaling.get("rope_theta")
            if theta is not None and float(theta) != float(base):
                raise ValueError(f"base={base!r} disagrees with scaling['rope_theta']={theta!r}: pass one of them")
            scaling["rope_theta"] = base
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        self.rope_type = {"mrope": "default", "su": "longrope"}.get(rope_type, rope_type)

        if rotary_dim is not None and partial_rotary_factor is not None:
            raise ValueError("pass rotary_dim or partial_rotary_factor, not both")
        if partial_rotary_factor is None:
            partial_rotary_factor = scaling.get("partial_rotary_factor")
        if rotary_dim is None:
            if self.rope_type == "proportional" or partial_rotary_factor is None:
                rotary_dim = head_dim
            else:
                f = partial_rotary_factor
                if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f <= 1):
                    raise ValueError(f"partial_rotary_factor must be in (0, 1], got {f!r}")
                rotary_dim = int(head_dim * f)
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even int, got {rotary_dim!r}")
        if rotary_dim > head_dim:
            raise ValueError(f"rotary_dim ({rotary_dim}) must not exceed head_dim ({head_dim})")
        if self.rope_type == "proportional" and partial_rotary_factor is not None:
            scaling["partial_rotary_factor"] = partial_rotary_factor

        self.head_dim, self.rotary_dim, self.scaling = head_dim, rotary_dim, scaling
        check_flags(interleaved=interleaved, cache=cache, exact=exact)
        self.interleaved, self.cache, self.exact = bool(interleaved), bool(cache), bool(exact)
        self._freq_dtype = torch.float64 if self.exact else torch.float32

        # rope_frequencies validates the schedule here, at construction (type, keys, values, base).
        inv_freq, self.attention_factor = self._schedule(None)
        self.base = float(scaling.get("rope_theta") or 10000.0)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

        # Length-dependent schedules (HF's dynamic_rope_update).
        if self.rope_type == "dynamic":
            if self.max_position_embeddings is None:
                original = scaling.get("original_max_position_embeddings")
                if original is None:
                    raise ValueError("rope_type 'dynamic' needs max_position_embeddings (its original length)")
                self.max_position_embeddings = _positive_int("scaling['original_max_position_embeddings']", original)
            self._dynamic_cached = self.max_position_embeddings  # HF's max_seq_len_cached
            self.register_buffer("original_inv_freq", inv_freq.clone().to(device), persistent=False)
        if self.rope_type == "longrope":
            original = scaling.get("original_max_position_embeddings") or self.max_position_embeddings
            if original is None:
                raise ValueError(
                    "rope_type 'longrope' needs scaling['original_max_position_embeddings'] (or max_position_embeddings)"
                )
            self._longrope_original = _positive_int("original_max_position_embeddings", original)
            long_inv, _ = self._schedule(self._longrope_original + 1)
            self.register_buffer("long_inv_freq", long_inv.to(device), persistent=False)

        # M-RoPE.
        mrope_section = scaling.get("mrope_section") if mrope_section is None else mrope_section
        self.mrope_section = None if mrope_section is None else [int(s) for s in mrope_section]
        if mrope_interleaved is None:
            mrope_interleaved = scaling.get("mrope_interleaved", False)
        check_flag("mrope_interleaved", mrope_interleaved)
        self.mrope_interleaved = bool(mrope_interleaved)
        if self.mrope_section is not None:
            if sum(self.mrope_section) != rotary_dim // 2:
                raise ValueError(
                    f"mrope_section {self.mrope_section} must sum to rotary_dim / 2 = {rotary_dim // 2}, "
                    f"got {sum(self.mrope_section)}"
                )
            axis_map = mrope_axis_map(self.mrope_section, interleaved=self.mrope_interleaved, device=device)
            self.register_buffer("axis_map", axis_map, persistent=False)
        else:
            self.axis_map = None

        # Tables, grown on demand: "cos_cached"/"sin_cached" (and "*_long_cached" for longrope's long set).
        longrope = self.rope_type == "longrope"
        for name in ["cos_cached", "sin_cached"] + ["cos_long_cached", "sin_long_cached"] * longrope:
            empty = torch.empty(0, rotary_dim // 2, dtype=torch.float32, device=device)
            self.register_buffer(name, empty, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute every buffer (frequencies, the M-RoPE axis map; tables emptied, to regrow on demand)
        from the module's settings, on the device its buffers are on, as ``nn.Linear.reset_parameters`` does
        for its weights. For a module built under ``torch.device("meta")`` and moved with ``to_empty()``,
        whose buffers hold uninitialised memory:

        >>> import torch
        >>> from posenc_kernels import RotaryEmbedding
        >>> with torch.device("meta"):
        ...     rope = RotaryEmbedding(64, base=500000.0)
        >>> rope = rope.to_empty(device="cpu")
        >>> rope.reset_parameters()
        >>> torch.equal(rope.inv_freq, RotaryEmbedding(64, base=500000.0).inv_freq)
        True
        """
        device = self.inv_freq.device
        inv_freq, self.attention_factor = self._schedule(None)
        self.inv_freq = inv_freq.to(device)
        if self.rope_type == "dynamic":
            self._dynamic_cached = self.max_position_embeddings
            self.original_inv_freq = inv_freq.clone().to(device)
        if self.rope_type == "longrope":
            self.long_inv_freq = self._schedule(self._longrope_original + 1)[0].to(device)
        if self.mrope_section is not None:
            self.axis_map = mrope_axis_map(self.mrope_section, interleaved=self.mrope_interleaved, device=device)
        for name in [n for n in self._buffers if n.endswith("_cached")]:
            self._buffers[name] = torch.empty(0, self.rotary_dim // 2, dtype=torch.float32, device=device)

    @classmethod
    def from_config(cls, config: Any, *, layer_type: Optional[str] = None, **overrides: Any) -> "RotaryEmbedding":
        """Build from an HF ``PretrainedConfig`` (transformers 5 ``rope_parameters``; 4.x ``rope_scaling`` +
        ``rope_theta`` too).

        Reads ``head_dim`` (or ``hidden_size // num_attention_heads``), ``rope_parameters`` (with
        ``rope_theta``, ``rope_type``, ``partial_rotary_factor``, ``mrope_section``, ``mrope_interleaved``),
        the config-level ``rope_theta`` / ``partial_rotary_factor`` / ``rotary_dim`` (GPT-J) /
        ``original_max_position_embeddings`` (Phi-3) and ``max_position_embeddings``. A composite
        (vision-language) config contributes its text config. Per-layer ``rope_parameters`` (Gemma 3/4:
        ``{"full_attention": {...}, "sliding_attention": {...}}``) need ``layer_type``. GPT-J and CodeGen
        configs get ``interleaved=True``, Qwen3-VL ``mrope_interleaved=True``. ``overrides`` go to the
        constructor (``cache``, ``exact``, ``device``, or any of the values read here).

        >>> from types import SimpleNamespace  # any object with an HF config's attributes, e.g. LlamaConfig
        >>> from posenc_kernels import RotaryEmbedding
        >>> cfg = SimpleNamespace(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072,
        ...     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
        ...     "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        >>> rope = RotaryEmbedding.from_config(cfg)
        >>> rope.head_dim, rope.rotary_dim, rope.rope_type, rope.base
        (64, 64, 'llama3', 500000.0)
        """
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        params = getattr(config, "rope_parameters", None)
        if params is None:
            params = getattr(config, "rope_scaling", None)
        params = dict(params or {})
        nested = [key for key, v in params.items() if isinstance(v, Mapping)]
        if nested:
            if layer_type is None:
                raise ValueError(f"this config has rope_parameters per layer type {nested}: pass layer_type=")
            if layer_type not in params:
                raise ValueError(f"layer_type {layer_type!r} not in the config's rope_parameters (has {nested})")
            params = dict(params[layer_type] or {})
        elif layer_type is not None:
            raise ValueError(f"layer_type={layer_type!r} given but the config's rope_parameters are not per layer")

        theta = params.get("rope_theta")
        if theta is None:
            theta = getattr(config, "rope_theta", None) or getattr(config, "default_theta", None) or 10000.0
            params["rope_theta"] = theta
        if params.get("partial_rotary_factor") is None and getattr(config, "partial_rotary_factor", None) is not None:
            params["partial_rotary_factor"] = config.partial_rotary_factor
        rope_type = params.get("rope_type", params.get("type", "default"))
        config_original = getattr(config, "original_max_position_embeddings", None)
        if rope_type in ("llama3", "yarn", "longrope", "su") and config_original is not None:
            params["original_max_position_embeddings"] = config_original  # HF: the config attribute wins (Phi-3)

        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        model_type = getattr(config, "model_type", "")
        kwargs: dict = dict(
            head_dim=head_dim,
            scaling=params,
            max_position_embeddings=getattr(config, "max_position_embeddings", None),
            interleaved=model_type in _INTERLEAVED_MODEL_TYPES or bool(getattr(config, "rope_interleave", False)),
        )
        rotary_dim = getattr(config, "rotary_dim", None)
        if isinstance(rotary_dim, int) and not isinstance(rotary_dim, bool):
            kwargs["rotary_dim"] = rotary_dim
        if model_type in _MROPE_INTERLEAVED_MODEL_TYPES and params.get("mrope_section") is not None:
            kwargs["mrope_interleaved"] = True
        kwargs.update(overrides)
        return cls(**kwargs)

    def _schedule(self, seq_len: Optional[int]) -> tuple[torch.Tensor, float]:
        with torch.device("cpu"):  # host math, whatever the default device (meta init included)
            return rope_frequencies(
                self.rotary_dim,
                scaling=self.scaling,
                seq_len=seq_len,
                max_position_embeddings=self.max_position_embeddings,
                dtype=self._freq_dtype,
            )

    def _frequencies(self, seq_len: Optional[int]) -> tuple[torch.Tensor, str, bool]:
        """``(inv_freq, table prefix, table usable)`` for a call whose largest position is ``seq_len - 1``,
        updating the dynamic-NTK state as HF's ``dynamic_frequency_update`` does."""
        if self.rope_type == "dynamic":
            original = self.max_position_embeddings
            if seq_len > self._dynamic_cached:  # growth
                inv, _ = self._schedule(seq_len)
                self.inv_freq = inv.to(self.inv_freq.device)
                self._dynamic_cached = seq_len
            if seq_len < original and self._dynamic_cached > original:  # back to the original frequencies
                self.inv_freq = self.original_inv_freq.clone()
                self._dynamic_cached = original
            return self.inv_freq, "", self._dynamic_cached <= original
        if self.rope_type == "longrope" and seq_len is not None and seq_len > self._longrope_original:
            return self.long_inv_freq, "_long", True
        return self.inv_freq, "", True

    def _table(self, inv_freq: torch.Tensor, suffix: str, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = getattr(self, f"cos{suffix}_cached"), getattr(self, f"sin{suffix}_cached")
        if cos.shape[0] < needed:
            rows = _table_rows(needed)
            if self.exact:
                cos, sin = self._exact_table(inv_freq, rows)
            else:
                cos, sin = rope_cos_sin(rows, inv_freq, attention_factor=self.attention_factor, dtype=torch.float32)
            setattr(self, f"cos{suffix}_cached", cos)
            setattr(self, f"sin{suffix}_cached", sin)
        return cos, sin

    def _exact_table(self, inv_freq: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 tables nearest ``af * cos/sin(pos * inv_freq)``: float64 angles, chunked to bound memory."""
        dev, half = inv_freq.device, inv_freq.shape[0]
        cos = torch.empty(rows, half, dtype=torch.float32, device=dev)
        sin = torch.empty(rows, half, dtype=torch.float32, device=dev)
        inv = inv_freq.to(torch.float64)
        for p0 in range(0, rows, _EXACT_TABLE_CHUNK):
            p1 = min(rows, p0 + _EXACT_TABLE_CHUNK)
            angle = torch.arange(p0, p1, dtype=torch.float64, device=dev)[:, None] * inv[None, :]
            cos[p0:p1] = angle.cos() * self.attention_factor
            sin[p0:p1] = angle.sin() * self.attention_factor
        return cos, sin

    def cos_sin(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin tables ``[>= seq_len, R/2]`` (fp32, attention factor folded in) this module uses for
        a call whose largest position is ``seq_len - 1`` (growing the cache; updating dynamic-NTK state)."""
        seq_len = _positive_int("seq_len", seq_len)
        inv, suffix, _ = self._frequencies(seq_len)
        if not self.cache or (self.rope_type == "dynamic" and self._dynamic_cached > self.max_position_embeddings):
            if self.exact:
                return self._exact_table(inv, seq_len)
            return rope_cos_sin(seq_len, inv, attention_factor=self.attention_factor, dtype=torch.float32)
        return self._table(inv, suffix, seq_len)

    # Keep the frequencies and tables in their own precision under .to(dtype) / .half() / .double().
    def _apply(self, fn, recurse=True):
        saved = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers.get(name)
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _seq_len(self, q, positions, offsets, cu_seqlens) -> int:
        """Largest position + 1 (HF's ``seq_len``); a host sync when it comes from a tensor."""
        packed = q.dim() == 3
        if cu_seqlens is not None:
            cu = cu_seqlens.to(torch.int64)
            lengths = cu[1:] - cu[:-1]
            start = offsets.to(torch.int64) if isinstance(offsets, torch.Tensor) else _start(offsets)
            last = (start + lengths - 1)[lengths > 0] if lengths.numel() else lengths
            return max(int(last.max()) if last.numel() else 0, 0) + 1
        if positions is not None:
            return (int(positions.max()) + 1) if positions.numel() else 1
        S = q.shape[0] if packed else q.shape[1]
        if isinstance(offsets, torch.Tensor):
            return (int(offsets.max()) if offsets.numel() else 0) + S
        return _start(offsets) + S

    def forward(
        self,
        q: torch.Tensor,
        k: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        offsets: Union[int, torch.Tensor] = 0,
        cu_seqlens: Optional[torch.Tensor] = None,
        *,
        seq_len: Optional[int] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rotate ``q`` ``[B, S, Hq, D]`` (or packed ``[T, Hq, D]``) and ``k`` in place; returns ``(q, k)``.

        Positions as in :func:`posenc_kernels.apply_rope_`: ``positions`` ``[B, S]`` / ``[S]`` / ``[T]``, else
        ``offsets + s`` (int or ``[B]``), or packed sequences with ``cu_seqlens`` ``[N + 1]`` and ``offsets``
        int or ``[N]``. With M-RoPE, ``positions`` is ``[A, B, S]`` for ``[B, S, H, D]`` inputs and ``[A, T]`` for
        packed ones (one row per axis); plain positions (``[B, S]``, ``[S]``, ``[T]``, or none) mean the same
        position on every axis (HF's text-only case), which is plain RoPE.

        ``seq_len``: the largest position + 1 when the caller knows it; it skips the host sync that tensor
        positions/offsets/cu_seqlens otherwise cost for cache growth and for ``dynamic``/``longrope``. It
        must be the true value for those two schedules (HF semantics), at least it for the cache. (The
        kernel call's own value checks still read tensor positions once while they are on; they are off
        under CUDA-graph capture or with ``set_value_checks(False)``.)
        """
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.dim() not in (3, 4):
            raise ValueError(f"q must be [B, S, H, D] or packed [T, H, D], got shape {tuple(q.shape)}")
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q's head dim (last) must be head_dim = {self.head_dim}, got {q.shape[-1]}")
        if q.device != self.inv_freq.device:
            raise ValueError(
                f"q is on {q.device} but this RotaryEmbedding's buffers are on {self.inv_freq.device}: "
                f"move the module with .to({str(q.device)!r})"
            )
        axis_map = self.axis_map
        if axis_map is not None and (positions is None or positions.dim() <= q.dim() - 2):
            axis_map = None  # plain positions: every axis at the same position, which is plain RoPE

        length_dependent = self.rope_type in ("dynamic", "longrope")
        if seq_len is None and (self.cache or length_dependent):
            seq_len = self._seq_len(q, positions, offsets, cu_seqlens)
        elif seq_len is not None:
            seq_len = _positive_int("seq_len", seq_len)
        inv_freq, suffix, table_ok = self._frequencies(seq_len)

        kw = dict(positions=positions, offsets=offsets, cu_seqlens=cu_seqlens, axis_map=axis_map)
        kw["interleaved"] = self.interleaved
        if self.cache and table_ok:
            cos, sin = self._table(inv_freq, suffix, seq_len)
            return apply_rope_(q, k, cos, sin, **kw)
        return apply_rope_(q, k, inv_freq=inv_freq, attention_factor=self.attention_factor, exact=self.exact, **kw)

    def extra_repr(self) -> str:
        s = f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base:g}, rope_type={self.rope_type!r}"
        if self.attention_factor != 1.0:
            s += f", attention_factor={self.attention_factor:.6g}"
        if self.interleaved:
            s += ", interleaved=True"
        if self.mrope_section is not None:
            s += f", mrope_section={self.mrope_section}, mrope_interleaved={self.mrope_interleaved}"
        return s + f", cache={self.cache}, exact={self.exact}"
