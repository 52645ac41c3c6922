"""integrations.vllm: the rotary op against vLLM's forward_native: values, packed qkv, gradients, bad input.
"""

import pytest
import torch

from posenc_kernels import reference as ref
from posenc_kernels.integrations import vllm as vllm_int

from conftest import DTYPES, assert_dtype_tolerance

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------------------------
# vLLM rotary_embedding
# ----------------------------------------------------------------------------------------------


def _vllm_rotate(positions, query, key, head_size, cos_sin_cache, is_neox, dtype):
    """vLLM's semantics through the one RoPE reference: tokens [T] x heads, the cache's first half cos, the
    second sin, the row of token t positions[t]; ``is_neox`` pairs (i, i + R/2), else (2i, 2i + 1)."""
    half = cos_sin_cache.shape[1] // 2
    cos, sin = cos_sin_cache[:, :half], cos_sin_cache[:, half:]
    rows = positions.reshape(1, -1)

    def one(x):
        x4 = x.reshape(1, positions.numel(), -1, head_size)
        return ref.rotate_reference(x4, cos, sin, rows, interleaved=not is_neox, dtype=dtype).reshape(x.shape)

    return one(query), (one(key) if key is not None else None)


def vllm_reference(positions, query, key, head_size, cos_sin_cache, is_neox):
    """The float64 truth (out of place)."""
    return _vllm_rotate(positions, query, key, head_size, cos_sin_cache, is_neox, torch.float64)


def vllm_in_dtype(positions, query, key, head_size, cos_sin_cache, is_neox):
    """The same rotation done by torch in the input dtype (the tolerance rule's baseline)."""
    return _vllm_rotate(positions, query, key, head_size, cos_sin_cache, is_neox, query.dtype)


def vllm_cache(max_pos, rot_dim, dtype):
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
    freqs = torch.arange(max_pos, dtype=torch.float)[:, None] * inv_freq
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize(
    "pos_shape,Hq,Hk,D,rot,q_layout",
    [
        ((13,), 4, 2, 16, 16, "flat"),
        ((7,), 2, 1, 80, 32, "heads"),  # partial rotary, head_dim 80, [T, H, D]
        ((2, 5), 3, 3, 16, 8, "flat"),  # [B, S] positions
        ((6,), 4, 0, 8, 8, "flat"),  # key None
    ],
)
def test_vllm_matches_reference(backend, dtype, is_neox, pos_shape, Hq, Hk, D, rot, q_layout):
    cache = vllm_cache(40, rot, dtype)
    positions = torch.randint(0, 40, pos_shape)
    shape = lambda H: (*pos_shape, H * D) if q_layout == "flat" else (*pos_shape, H, D)  # noqa: E731
    query = torch.randn(shape(Hq), dtype=dtype)
    key = torch.randn(shape(Hk), dtype=dtype) if Hk else None
    args = (positions, query, key, D, cache, is_neox)
    truth = vllm_reference(*args)
    same = vllm_in_dtype(*args)
    ptr = query.data_ptr()
    q_out, k_out = vllm_int.rotary_embedding(*args)
    assert q_out is query and k_out is key and query.data_ptr() == ptr
    assert_dtype_tolerance(query, truth[0].to(torch.float64), same[0], what="vllm query")
    if key is not None:
        assert_dtype_tolerance(key, truth[1], same[1], what="vllm key")


@pytest.mark.parametrize("is_neox", [True, False])
def test_vllm_rope_native_reference_partial_rotary(is_neox):
    """posenc_kernels.reference.vllm_rope_native (the benchmarks' vLLM provider) with rotary_dim < head_size
    (it crashed there, issue 21) agrees with our op, and passes the channels past rotary_dim through."""
    T, Hq, Hk, D, rot = 7, 3, 2, 32, 16
    g = torch.Generator().manual_seed(21)
    cache = vllm_cache(40, rot, torch.float32)
    positions = torch.randint(0, 40, (T,), generator=g)
    query, key = torch.randn(T, Hq * D, generator=g), torch.randn(T, Hk * D, generator=g)
    want_q, want_k = ref.vllm_rope_native(positions, query, key, cache, D, is_neox_style=is_neox)
    got_q, got_k = vllm_int.rotary_embedding(positions, query.clone(), key.clone(), D, cache, is_neox)
    torch.testing.assert_close(want_q, got_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want_k, got_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(want_q.view(T, Hq, D)[..., rot:], query.view(T, Hq, D)[..., rot:])
    assert not torch.allclose(want_q.view(T, Hq, D)[..., :rot], query.view(T, Hq, D)[..., :rot])
    assert ref.vllm_rope_native(positions, query, None, cache, D)[1] is None


def test_vllm_packed_qkv_slices(backend):
    """query/key as column slices of one fused qkv projection (vLLM's split): rotated through the views."""
    T, Hq, Hk, D = 9, 4, 2, 16
    qkv = torch.randn(T, (Hq + 2 * Hk) * D)
    v0 = qkv[:, (Hq + Hk) * D :].clone()
    query, key, _ = qkv.split([Hq * D, Hk * D, Hk * D], dim=-1)
    positions = torch.arange(T) * 3
    cache = vllm_cache(32, D, torch.float32)
    truth = vllm_reference(positions, query, key, D, cache, True)
    vllm_int.rotary_embedding(positions, query, key, D, cache, True)
    torch.testing.assert_close(qkv[:, : Hq * D].double(), truth[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv[:, Hq * D : (Hq + Hk) * D].double(), truth[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, (Hq + Hk) * D :], v0), "v must be untouched"


def test_vllm_gradient(backend):
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    cache = vllm_cache(8, 6, torch.float64)  # partial: 6 of 8 channels
    pos = torch.tensor([3, 7, 1])

    def f(t):
        q = t * 1.0
        vllm_int.rotary_embedding(pos, q, None, 8, cache, False)
        return q

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(head_size=12), ValueError, "^query's last dim must be a multiple of head_size"),
        (lambda a: a.update(head_size=0), ValueError, "^head_size"),
        (lambda a: a.update(cos_sin_cache=vllm_cache(16, 32, torch.float32)), ValueError, "^cos_sin_cache"),
        (lambda a: a.update(cos_sin_cache=torch.zeros(16, 7)), ValueError, "^cos_sin_cache"),
        (lambda a: a.update(positions=torch.zeros(5)), TypeError, "^positions must be an integer"),
        (lambda a: a.update(positions=torch.arange(4)), ValueError, "^query must have the leading dims"),
        (lambda a: a.update(key=torch.randn(5, 2, 4)), ValueError, "^key is \\[..., H, D\\]"),
        (lambda a: a.update(positions=torch.tensor([0, 1, 2, 3, 16])), ValueError, "positions"),
        (lambda a: a.update(is_neox=1), TypeError, "^is_neox"),
    ],
)
def test_vllm_bad_input_raises_before_writing(mutate, exc, match):
    args = dict(
        positions=torch.arange(5), query=torch.randn(5, 32), key=torch.randn(5, 16), head_size=8,
        cos_sin_cache=vllm_cache(16, 8, torch.float32), is_neox=True,
    )  # fmt: skip
    mutate(args)
    q0 = args["query"].clone()
    k0 = args["key"].clone()
    with pytest.raises(exc, match=match):
        vllm_int.rotary_embedding(**args)
    assert torch.equal(args["query"], q0) and torch.equal(args["key"], k0)
