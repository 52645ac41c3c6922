"""Sinusoidal absolute position encodings: the public functions and the module. They coerce arguments and
call the ops; the ops validate and dispatch.

One parameterisation covers the published conventions. With ``half = dim // 2``:

    inv_freq[i] = base ** (-i / (half - freq_shift))          for i < half
    angle[p, i] = scale * (fp32(pos[p]) * inv_freq[i])
    interleaved=True:  PE[p, 2i] = sin, PE[p, 2i + 1] = cos    (cos_first swaps each pair)
    interleaved=False: PE[p, i] = sin, PE[p, half + i] = cos   (cos_first swaps the halves)
    odd dim: the last column is zero.

See ``SINUSOIDAL_CONVENTIONS`` for the settings that reproduce each source. The position of token
``(b, s)`` is ``positions[b, s]`` (or ``positions[s]``; int or float) when given, else ``offsets + s`` with
``offsets`` an int or a ``[B]`` tensor (see :mod:`posenc_kernels.ops.positions`). ``x`` may have any
strides, the channel one included.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..checks import check_flags, reraise_with_check, split_offsets
from .op import add_sinusoidal as _add
from .op import check_concat, check_convention, check_table, concat_sinusoidal_op, sinusoidal_table_op

__all__ = [
    "SINUSOIDAL_CONVENTIONS",
    "sinusoidal_table",
    "add_sinusoidal_",
    "add_sinusoidal",
    "concat_sinusoidal",
    "SinusoidalPositionalEncoding",
]

#: Keyword settings of :func:`sinusoidal_table` / :func:`add_sinusoidal_` that reproduce each source.
SINUSOIDAL_CONVENTIONS = {
    # Vaswani et al. 2017: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).
    "transformer": dict(interleaved=True, cos_first=False, freq_shift=0.0),
    # tensor2tensor get_timing_signal_1d: [sin | cos], log step log(max/min) / (channels//2 - 1); with a
    # min_timescale other than 1 add base=max_timescale/min_timescale, scale=min_timescale.
    "tensor2tensor": dict(interleaved=False, cos_first=False, freq_shift=1.0),
    # fairseq SinusoidalPositionalEmbedding.get_embedding: same as tensor2tensor (fairseq's module numbers
    # tokens from padding_idx + 1: pass those positions).
    "fairseq": dict(interleaved=False, cos_first=False, freq_shift=1.0),
    # diffusers get_timestep_embedding defaults (flip_sin_to_cos=False, downscale_freq_shift=1); its
    # flip_sin_to_cos maps to cos_first, downscale_freq_shift to freq_shift, max_period to base.
    "diffusers": dict(interleaved=False, cos_first=False, freq_shift=1.0),
}


def sinusoidal_table(
    positions_or_length: Union[int, torch.Tensor],
    dim: int,
    *,
    base: float = 10000.0,
    interleaved: bool = True,
    cos_first: bool = False,
    freq_shift: float = 0.0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Sinusoidal encodings ``[..., dim]`` for int or float positions of any shape (or ``0..P-1``).

    The defaults give the original Transformer's table; ``SINUSOIDAL_CONVENTIONS`` lists the settings of
    tensor2tensor, fairseq and diffusers (``scale`` multiplies the angle, as diffusers' does). Math in fp32
    (fp64 for ``dtype=torch.float64``). ``device`` places a table built from a length (default CPU); a
    tensor of positions gives its own device.

    >>> import torch, posenc_kernels as pk
    >>> pe = pk.sinusoidal_table(50, 16)                        # Vaswani et al.
    >>> pe.shape
    torch.Size([50, 16])
    >>> t = torch.tensor([0.5, 999.0])                          # diffusion timesteps
    >>> emb = pk.sinusoidal_table(t, 32, **{**pk.SINUSOIDAL_CONVENTIONS["diffusers"], "cos_first": True})
    >>> emb.shape
    torch.Size([2, 32])
    """
    if isinstance(positions_or_length, torch.Tensor):
        positions, length = positions_or_length, 0
        if device is not None and torch.device(device) != positions.device:
            raise ValueError(f"device ({device}) must match the positions' device ({positions.device}) or be None")
        device = positions.device
    elif isinstance(positions_or_length, (int, torch.SymInt)) and not isinstance(positions_or_length, bool):
        positions, length = None, positions_or_length
        device = torch.device("cpu") if device is None else torch.device(device)
    else:
        raise TypeError(f"positions_or_length must be an int or a tensor, got {type(positions_or_length).__name__}")
    check_flags(interleaved=interleaved, cos_first=cos_first)
    args = (positions, length, dim, float(base), bool(interleaved), bool(cos_first), float(freq_shift), float(scale),
            dtype, device)  # fmt: skip
    try:
        return sinusoidal_table_op(*args)
    except (RuntimeError, ValueError, TypeError) as e:
        reraise_with_check(e, check_table, *args)


def _add_args(positions, offsets, x_scale, base, interleaved, cos_first, freq_shift, scale) -> tuple:
    """The ops' arguments after x from the public keywords."""
    if type(interleaved) is not bool or type(cos_first) is not bool:
        check_flags(interleaved=interleaved, cos_first=cos_first)
    x_scale, freq_shift, scale = float(x_scale), float(freq_shift), float(scale)
    if type(offsets) is int:  # the common case, without split_offsets' checks
        offsets_t, offset = None, offsets
    else:
        offsets_t, offset = split_offsets(offsets)
    return (positions, offsets_t, offset, float(x_scale), float(base), bool(interleaved), bool(cos_first),
            float(freq_shift), float(scale))  # fmt: skip


def add_sinusoidal_(
    x: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    x_scale: float = 1.0,
    base: float = 10000.0,
    interleaved: bool = True,
    cos_first: bool = False,
    freq_shift: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """In place ``x <- x * x_scale + PE`` in one pass over ``x`` ``[B, S, D]`` or ``[T, D]`` (any strides).

    The position of token ``(b, s)`` is ``positions[b, s]`` (or ``positions[s]``; int or float) when given,
    else ``offsets + s`` with ``offsets`` an int or a ``[B]`` tensor. Returns ``x``. Differentiable w.r.t. x
    (PyTorch's in-place rules apply: a leaf that requires grad raises, as for ``x.mul_``).

    >>> import torch, posenc_kernels as pk
    >>> x = torch.zeros(2, 6, 8)
    >>> _ = pk.add_sinusoidal_(x, x_scale=8 ** 0.5)
    >>> torch.allclose(x[0], pk.sinusoidal_table(6, 8))
    True
    """
    _add.call_inplace(x, *_add_args(positions, offsets, x_scale, base, interleaved, cos_first, freq_shift, scale))
    return x


def add_sinusoidal(
    x: torch.Tensor,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    x_scale: float = 1.0,
    base: float = 10000.0,
    interleaved: bool = True,
    cos_first: bool = False,
    freq_shift: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Out-of-place twin of :func:`add_sinusoidal_`: returns ``x * x_scale + PE``, x untouched.

    >>> import torch, posenc_kernels as pk
    >>> y = pk.add_sinusoidal(torch.ones(10, 4), offsets=3)
    >>> y.shape
    torch.Size([10, 4])
    """
    return _add.call(x, *_add_args(positions, offsets, x_scale, base, interleaved, cos_first, freq_shift, scale))


def concat_sinusoidal(
    x: torch.Tensor,
    dim_pe: int,
    *,
    positions: Optional[torch.Tensor] = None,
    offsets: Union[int, torch.Tensor] = 0,
    base: float = 10000.0,
    interleaved: bool = True,
    cos_first: bool = False,
    freq_shift: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Concatenate instead of add: returns ``[x | PE]`` of shape ``[..., D + dim_pe]``.

    ``x`` is ``[B, S, D]`` or ``[T, D]``; positions/offsets and the convention keywords as in
    :func:`add_sinusoidal_`. x is read once and the output written once (its encoding part is computed in
    the kernel, never read from a table). Differentiable w.r.t. x. Compared with the add, the output is
    wider (D + dim_pe channels to write instead of D) and every layer after it grows with it.

    >>> import torch, posenc_kernels as pk
    >>> y = pk.concat_sinusoidal(torch.ones(2, 5, 8), 4)
    >>> y.shape, bool((y[..., :8] == 1).all())
    (torch.Size([2, 5, 12]), True)
    """
    positions, offsets_t, offset, _, *convention = _add_args(
        positions, offsets, 1.0, base, interleaved, cos_first, freq_shift, scale
    )
    if isinstance(dim_pe, bool) or not isinstance(dim_pe, (int, torch.SymInt)):  # before the schema's message
        raise TypeError(f"dim_pe must be an int, got {type(dim_pe).__name__}")
    args = (positions, offsets_t, offset, dim_pe, *convention)
    try:
        return concat_sinusoidal_op(x, *args)
    except (RuntimeError, ValueError, TypeError) as e:
        reraise_with_check(e, check_concat, x, *args)


class SinusoidalPositionalEncoding(torch.nn.Module):
    """``x * x_scale + PE`` as a module (no parameters, no buffers: encodings are computed in the kernel).

    >>> import torch, posenc_kernels as pk
    >>> enc = pk.SinusoidalPositionalEncoding(16, x_scale=4.0)
    >>> enc(torch.randn(2, 7, 16)).shape
    torch.Size([2, 7, 16])
    """

    def __init__(
        self,
        dim: int,
        *,
        x_scale: float = 1.0,
        base: float = 10000.0,
        interleaved: bool = True,
        cos_first: bool = False,
        freq_shift: float = 0.0,
        scale: float = 1.0,
        inplace: bool = False,
    ):
        super().__init__()
        check_convention(dim, base, freq_shift, scale)
        check_flags(interleaved=interleaved, cos_first=cos_first, inplace=inplace)
        self.dim, self.inplace = dim, inplace
        self.kwargs = dict(
            x_scale=x_scale, base=base, interleaved=interleaved, cos_first=cos_first, freq_shift=freq_shift, scale=scale
        )

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None, offsets=0) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have {self.dim} channels (the module's dim), got shape {tuple(x.shape)}")
        fn = add_sinusoidal_ if self.inplace else add_sinusoidal
        return fn(x, positions=positions, offsets=offsets, **self.kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, " + ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
