"""integrations.flash_attn: apply_rotary_emb against flash-attn's definition (offsets, varlen against
the position oracle), gradients, bad input, empty inputs of every integration.
"""

import inspect

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref
from posenc_kernels.integrations import flash_attn as fa_int
from posenc_kernels.integrations import hf as hf_int
from posenc_kernels.integrations import vllm as vllm_int

import positions_oracle as po
from conftest import DTYPES, assert_dtype_tolerance

transformers = pytest.importorskip("transformers")


HAS_CU_SEQLENS = "cu_seqlens" in inspect.signature(pk.apply_rope_).parameters


# ----------------------------------------------------------------------------------------------
# flash-attn apply_rotary_emb
# ----------------------------------------------------------------------------------------------


def _flash_rows(x, seqlen_offsets, cu_seqlens):
    """flash-attn's table row per token: sequence b's token s reads seqlen_offsets[b] + s (an int: the same
    for every sequence); packed inputs restart at each cu_seqlens boundary. ``[B, S]`` (packed: ``[1, T]``).
    From the position oracle (tests/positions_oracle.py), not the package's resolver."""
    offs_t = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
    off = 0 if offs_t is not None else int(seqlen_offsets)
    if cu_seqlens is not None:
        rows = [po.packed_positions(cu_seqlens, x.shape[0], offsets=offs_t, offset=off)]
    else:
        rows = po.token_positions(x.shape[0], x.shape[1], offsets=offs_t if offs_t is not None else off)
    return po.as_tensor(rows, device=x.device, dtype=torch.int64)


def flash_reference(x, cos, sin, interleaved=False, seqlen_offsets=0, cu_seqlens=None):
    """flash-attn's rotary semantics in float64, through the one RoPE reference."""
    rows = _flash_rows(x, seqlen_offsets, cu_seqlens)
    x4 = x.unsqueeze(0) if cu_seqlens is not None else x
    out = ref.rotate_reference(x4, cos, sin, rows, interleaved=interleaved)
    return out[0] if cu_seqlens is not None else out


def flash_in_dtype(x, cos, sin, interleaved, rows):
    """Torch in the input dtype, table rows ``rows`` (``[B, S]``, or ``[T]`` for packed x): the tolerance
    rule's baseline."""
    packed = rows.dim() == 1
    x4, r = (x.unsqueeze(0), rows[None]) if packed else (x, rows)
    out = ref.rotate_reference(x4, cos, sin, r, interleaved=interleaved, dtype=x.dtype)
    return out[0] if packed else out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("offsets", [0, 5, "tensor"])
def test_flash_matches_reference(backend, dtype, interleaved, inplace, offsets):
    B, S, H, D, R = 2, 7, 3, 24, 16
    seqlen_offsets = torch.tensor([2, 9]) if offsets == "tensor" else offsets
    angle = torch.arange(20.0)[:, None] * 0.3 ** torch.arange(R // 2.0)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    x = torch.randn(B, S, H, 2 * D, dtype=dtype)[..., :D]  # non-contiguous view
    x0 = x.clone()
    truth = flash_reference(x0, cos, sin, interleaved, seqlen_offsets)
    off = seqlen_offsets[:, None] if isinstance(seqlen_offsets, torch.Tensor) else seqlen_offsets
    rows = torch.arange(S)[None, :] + off
    same = flash_in_dtype(x0, cos, sin, interleaved, rows.expand(B, S))
    y = fa_int.apply_rotary_emb(x, cos, sin, interleaved=interleaved, inplace=inplace, seqlen_offsets=seqlen_offsets)
    if inplace:
        assert y is x
    else:
        assert torch.equal(x, x0) and y is not x
    assert torch.equal(y[..., R:], x0[..., R:])
    assert_dtype_tolerance(y, truth, same, what="flash")


@pytest.mark.skipif(not HAS_CU_SEQLENS, reason="needs apply_rope_(cu_seqlens=...) (rope.py extension in progress)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("offsets", [0, 3, "tensor"])
def test_flash_varlen_matches_reference(backend, dtype, interleaved, inplace, offsets):
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    T, H, D, R = 11, 2, 16, 12
    seqlen_offsets = torch.tensor([1, 0, 7]) if offsets == "tensor" else offsets
    angle = torch.arange(16.0)[:, None] * 0.3 ** torch.arange(R // 2.0)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    x = torch.randn(T, H, D, dtype=dtype)
    x0 = x.clone()
    truth = flash_reference(x0, cos, sin, interleaved, seqlen_offsets, cu)
    seq = torch.repeat_interleave(torch.arange(3), torch.diff(cu.long()))
    off = seqlen_offsets[seq] if isinstance(seqlen_offsets, torch.Tensor) else seqlen_offsets
    rows = torch.arange(T) - cu.long()[seq] + off
    same = flash_in_dtype(x0, cos, sin, interleaved, rows)
    y = fa_int.apply_rotary_emb(
        x, cos, sin, interleaved=interleaved, inplace=inplace, seqlen_offsets=seqlen_offsets, cu_seqlens=cu,
        max_seqlen=6,
    )  # fmt: skip
    assert (y is x) == inplace
    assert_dtype_tolerance(y, truth, same, what="flash varlen")


@pytest.mark.parametrize("inplace", [False, True])
def test_flash_gradients(backend, inplace):
    angle = torch.arange(12.0)[:, None] * 0.3 ** torch.arange(2.0)
    cos, sin = angle.cos().double(), angle.sin().double()
    offs = torch.tensor([0, 4])
    x = torch.randn(2, 3, 1, 6, dtype=torch.float64, requires_grad=True)  # partial: 4 of 6 channels

    def f(t):
        return fa_int.apply_rotary_emb(t * 1.0 if inplace else t, cos, sin, inplace=inplace, seqlen_offsets=offs)

    assert torch.autograd.gradcheck(f, (x,))
    g = torch.randn(2, 3, 1, 6, dtype=torch.float64)
    ours = torch.autograd.grad(f(x), x, g)[0]
    ref = torch.autograd.grad(flash_rotate_autograd(x, cos, sin, offs), x, g)[0]
    torch.testing.assert_close(ours, ref)


def flash_rotate_autograd(x, cos, sin, offs):
    """Differentiable torch rotation (non-interleaved) for the gradient comparison: the one reference, in
    x's dtype."""
    rows = torch.arange(x.shape[1])[None, :] + offs[:, None]
    return ref.rotate_reference(x, cos, sin, rows, dtype=x.dtype)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.randn(5, 2, 8)), ValueError, "^x must be \\[B, S, H, D\\]"),
        (dict(cu_seqlens=torch.tensor([0, 2, 3])), ValueError, "^x must be packed"),
        (dict(cos=torch.zeros(8, 3)), ValueError, "cos and sin"),
        (dict(cos=torch.zeros(8, 5), sin=torch.zeros(8, 5)), ValueError, "R"),
        (dict(seqlen_offsets=6), ValueError, "offsets"),
        (dict(seqlen_offsets=torch.tensor([0, 6])), ValueError, "offsets"),
        (dict(seqlen_offsets=1.5), TypeError, "offsets"),
        (dict(max_seqlen=-1), ValueError, "^max_seqlen"),
        (dict(inplace=1), TypeError, "^inplace"),
    ],
)
def test_flash_bad_input_raises_before_writing(kwargs, exc, match):
    args = dict(x=torch.randn(2, 3, 2, 8), cos=torch.zeros(8, 4), sin=torch.zeros(8, 4), inplace=True)
    args.update(kwargs)
    x0 = args["x"].clone()
    with pytest.raises(exc, match=match):
        fa_int.apply_rotary_emb(**args)
    assert torch.equal(args["x"], x0)


def test_empty_inputs(backend):
    q, k, c = torch.randn(2, 4, 0, 16), torch.randn(2, 2, 0, 16), torch.randn(2, 0, 16)
    qo, ko = hf_int.apply_rotary_pos_emb(q, k, c, c)
    assert qo.shape == q.shape and ko.shape == k.shape
    assert hf_int.apply_rotary_pos_emb_gptj(torch.randn(1, 0, 2, 8), c[:1, :, :4], c[:1, :, :4]).shape == (1, 0, 2, 8)
    x = torch.randn(0, 32)
    assert vllm_int.rotary_embedding(torch.zeros(0, dtype=torch.long), x, None, 16, torch.randn(4, 16), True)[0] is x
    tab = torch.randn(4, 4)
    assert fa_int.apply_rotary_emb(torch.randn(2, 0, 2, 8), tab, tab).shape == (2, 0, 2, 8)
    if HAS_CU_SEQLENS:
        y = fa_int.apply_rotary_emb(torch.randn(0, 2, 8), tab, tab, cu_seqlens=torch.tensor([0, 0]))
        assert y.shape == (0, 2, 8)
