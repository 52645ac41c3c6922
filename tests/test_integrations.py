"""Drop-in entry points (posenc_kernels.integrations) against independent references.

HF entry points: HF's own functions are the reference (imported at collection, before any patch).
vLLM / flash-attn: literal per-token transcriptions of their documented semantics, in float64, below.
Every comparison follows the tolerance rule: error vs the float64 truth <= 2 x torch-in-dtype error.
"""

import inspect

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref
from posenc_kernels.integrations import flash_attn as fa_int
from posenc_kernels.integrations import hf as hf_int
from posenc_kernels.integrations import vllm as vllm_int

from conftest import DTYPES, assert_dtype_tolerance

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as hf_neox  # noqa: E402
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as hf_gptj  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_llama  # noqa: E402
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as hf_phi3  # noqa: E402

HAS_CU_SEQLENS = "cu_seqlens" in inspect.signature(pk.apply_rope_).parameters


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def hf_cos_sin(batch, S, R, dtype, *, base=100.0, scaling=1.0, offsets=None):
    """HF rotary-module output: cat(freqs, freqs) per token, scaled, cast to the activation dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.float) / R))
    pos = torch.arange(S)[None, :].repeat(batch, 1)
    if offsets is not None:
        pos = pos + torch.as_tensor(offsets)[:, None]
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def hf_qk(B, Hq, Hk, S, D, dtype, layout):
    """q/k as HF attention makes them: projections viewed [B, S, H, D] then transposed to [B, H, S, D]."""
    if layout == "proj":
        q = torch.randn(B, S, Hq * D, dtype=dtype).view(B, S, Hq, D).transpose(1, 2)
        k = torch.randn(B, S, Hk * D, dtype=dtype).view(B, S, Hk, D).transpose(1, 2)
    elif layout == "contiguous":  # [B, H, S, D] contiguous: not flattenable to [1, B*S, H, D]
        q = torch.randn(B, Hq, S, D, dtype=dtype)
        k = torch.randn(B, Hk, S, D, dtype=dtype)
    elif layout == "qkv":  # GPT-NeoX: one fused projection, chunked
        qkv = torch.randn(B, S, Hq, 3 * D, dtype=dtype).transpose(1, 2)
        q, k, _ = qkv.chunk(3, dim=-1)
    return q, k


def check_pair(out, hf_fn, args64, hf_args, what):
    """out (ours, in dtype) vs HF in float64 (truth) and HF in the input dtype (torch-in-dtype)."""
    truth = hf_fn(*args64)
    same = hf_fn(*hf_args)
    for o, t, s, name in zip(out, truth, same, ("q", "k")):
        assert o.dtype == s.dtype and o.shape == s.shape, (name, o.dtype, s.dtype, o.shape, s.shape)
        assert_dtype_tolerance(o, t.to(o.dtype) if o.dtype == torch.float64 else t, s, what=f"{what} {name}")


def to64(*ts):
    return tuple(t.double() if isinstance(t, torch.Tensor) else t for t in ts)


# ----------------------------------------------------------------------------------------------
# HF apply_rotary_pos_emb
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,Hq,Hk,S,D,cos_batch,layout",
    [
        (2, 4, 2, 13, 16, "B", "proj"),  # HF's usual: flattenable, per-sequence cos rows
        (2, 4, 1, 5, 80, 1, "proj"),  # head_dim 80, one kv head, cos shared by the batch
        (3, 2, 2, 7, 32, "B", "contiguous"),  # not flattenable: explicit positions
        (1, 3, 3, 1, 64, "B", "proj"),  # one token (decode)
    ],
)
def test_hf_matches_llama(backend, dtype, B, Hq, Hk, S, D, cos_batch, layout):
    q, k = hf_qk(B, Hq, Hk, S, D, dtype, layout)
    offsets = [3 * b for b in range(B)] if cos_batch == "B" else None
    cos, sin = hf_cos_sin(B if cos_batch == "B" else 1, S, D, dtype, offsets=offsets)
    q0, k0 = q.clone(), k.clone()
    out = hf_int.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0), "out of place: inputs must be untouched"
    check_pair(out, hf_llama, to64(q, k, cos, sin), (q, k, cos, sin), "llama")


@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_unsqueeze_dim_2(backend, dtype):
    B, S, Hq, Hk, D = 2, 9, 4, 2, 16
    q = torch.randn(B, S, Hq, D, dtype=dtype)
    k = torch.randn(B, S, Hk, D, dtype=dtype)
    cos, sin = hf_cos_sin(B, S, D, dtype, offsets=[0, 5])
    out = hf_int.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    hf = lambda *a: hf_llama(*a, unsqueeze_dim=2)  # noqa: E731
    check_pair(out, hf, to64(q, k, cos, sin), (q, k, cos, sin), "unsqueeze_dim=2")


@pytest.mark.parametrize("hf_fn", [hf_phi3, hf_neox], ids=["phi3", "gpt_neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["proj", "qkv"])
def test_hf_partial_rotary(backend, hf_fn, dtype, layout):
    B, Hq, S, D, R = 2, 3, 11, 32, 8
    q, k = hf_qk(B, Hq, Hq, S, D, dtype, layout)
    cos, sin = hf_cos_sin(B, S, R, dtype, scaling=1.19, offsets=[0, 2])
    out = hf_int.apply_rotary_pos_emb(q, k, cos, sin)
    check_pair(out, hf_fn, to64(q, k, cos, sin), (q, k, cos, sin), "partial")
    assert torch.equal(out[0][..., R:], q[..., R:]), "pass-through channels must be copied exactly"


def test_hf_promotes_like_hf(backend):
    """bf16 q with fp32 cos (autocast-style) gives fp32, as HF's broadcasting does."""
    q, k = hf_qk(2, 2, 1, 6, 16, torch.bfloat16, "proj")
    cos, sin = hf_cos_sin(2, 6, 16, torch.float32)
    out = hf_int.apply_rotary_pos_emb(q, k, cos, sin)
    check_pair(out, hf_llama, to64(q, k, cos, sin), (q, k, cos, sin), "promote")
    assert out[0].dtype == torch.float32


def test_hf_gradients(backend):
    B, Hq, Hk, S, D = 2, 4, 2, 7, 16
    cos, sin = hf_cos_sin(B, S, D, torch.float64, offsets=[1, 4])
    results = []
    for fn in (hf_int.apply_rotary_pos_emb, hf_llama):
        torch.manual_seed(1)
        xq = torch.randn(B, S, Hq * D, dtype=torch.float64, requires_grad=True)
        xk = torch.randn(B, S, Hk * D, dtype=torch.float64, requires_grad=True)
        q = xq.view(B, S, Hq, D).transpose(1, 2)
        k = xk.view(B, S, Hk, D).transpose(1, 2)
        qo, ko = fn(q, k, cos, sin)
        gq, gk = torch.randn_like(qo), torch.randn_like(ko)
        (qo * gq).sum().add((ko * gk).sum()).backward()
        results.append((xq.grad, xk.grad))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_hf_gradcheck(backend):
    q = torch.randn(1, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = hf_cos_sin(1, 3, 4, torch.float64)  # partial: 4 of 6 channels
    assert torch.autograd.gradcheck(lambda a, b: hf_int.apply_rotary_pos_emb(a, b, cos, sin), (q, k), fast_mode=True)


def test_hf_tables_requiring_grad_take_hf_math(backend):
    """The kernel gives no gradient for cos/sin: tables that require grad take HF's math, so cos.grad is HF's."""
    q, k = hf_qk(1, 2, 2, 4, 8, torch.float64, "proj")
    c0, s0 = hf_cos_sin(1, 4, 8, torch.float64)
    grads = []
    for fn in (hf_int.apply_rotary_pos_emb, hf_llama):
        cos, sin = c0.clone().requires_grad_(), s0.clone().requires_grad_()
        qo, ko = fn(q, k, cos, sin)
        (qo.sum() + ko.sum()).backward()
        grads.append((cos.grad, sin.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_hf_kernel_path_taken(backend, monkeypatch):
    """The common HF shapes must reach the kernel (not the fallback), with no copy of q/k beyond the output."""
    calls = []
    real = hf_int.apply_rope

    def spy(q, k, cos, sin, **kw):
        calls.append((q, k, cos, sin, kw))
        return real(q, k, cos, sin, **kw)

    monkeypatch.setattr(hf_int, "apply_rope", spy)
    q, k = hf_qk(2, 4, 2, 5, 16, torch.float32, "proj")
    cos, sin = hf_cos_sin(2, 5, 16, torch.float32)
    hf_int.apply_rotary_pos_emb(q, k, cos, sin)
    (qv, kv, tc, ts, kw) = calls[-1]
    assert qv.data_ptr() == q.data_ptr() and kv.data_ptr() == k.data_ptr(), "q/k must reach the kernel as views"
    assert tc.data_ptr() == cos.data_ptr() and tc.shape == (10, 8), "the cos table must be a view of HF's cos"
    assert kw["positions"] is None, "flattenable q/k need no positions tensor"
    q, k = hf_qk(2, 4, 2, 5, 16, torch.float32, "contiguous")
    hf_int.apply_rotary_pos_emb(q, k, cos, sin)
    assert calls[-1][4]["positions"] is not None and len(calls) == 2


@pytest.mark.parametrize(
    "case",
    ["cos_2d", "odd_R", "R_gt_D", "unsqueeze_0", "k_dtype", "q_3d"],
)
def test_hf_structure_mismatch_is_hf(backend, case):
    """Inputs that do not fit the kernel's mapping give exactly what HF's function gives (value or error)."""
    q, k = hf_qk(1, 2, 2, 4, 8, torch.float32, "proj")
    cos, sin = hf_cos_sin(1, 4, 8, torch.float32)
    ud = 1
    if case == "cos_2d":  # [S, R] with B == 1: broadcasts in HF with unsqueeze_dim=0
        cos, sin, ud = cos[0], sin[0], 0
    elif case == "odd_R":
        cos, sin = cos[..., :7], sin[..., :7]
        q, k = q[..., :7], k[..., :7]
    elif case == "R_gt_D":
        q, k = q[..., :6], k[..., :6]
    elif case == "unsqueeze_0":
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, B=1, S, D] with cos [1, S, R] unsqueezed at 0
        ud = 0
    elif case == "k_dtype":
        k = k.double()
    elif case == "q_3d":
        q, k, cos, sin = q[0], k[0], cos[0], sin[0]
        ud = 0
    try:
        want = hf_phi3(q, k, cos, sin, ud)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            hf_int.apply_rotary_pos_emb(q, k, cos, sin, ud)
        return
    got = hf_int.apply_rotary_pos_emb(q, k, cos, sin, ud)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_hf_bad_arguments_named():
    cos, sin = hf_cos_sin(1, 4, 8, torch.float32)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="^q must"):
        hf_int.apply_rotary_pos_emb(q.numpy(), q, cos, sin)
    with pytest.raises(TypeError, match="^k must"):
        hf_int.apply_rotary_pos_emb(q, [1], cos, sin)
    with pytest.raises(TypeError, match="^sin must"):
        hf_int.apply_rotary_pos_emb(q, q, cos, None)
    with pytest.raises(TypeError, match="^tensor must"):
        hf_int.apply_rotary_pos_emb_gptj(None, sin, cos)


# ----------------------------------------------------------------------------------------------
# HF GPT-J
# ----------------------------------------------------------------------------------------------


def gptj_sin_cos(batch, S, R, dtype, offsets=None):
    """GPT-J's rotary module: a [max_pos, R] sin|cos table gathered per token, split in two."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.int64) / R))
    table = torch.arange(64, dtype=torch.int64).float()[:, None] * inv_freq
    sincos = torch.cat((torch.sin(table), torch.cos(table)), dim=1)
    pos = torch.arange(S)[None, :].repeat(batch, 1)
    if offsets is not None:
        pos = pos + torch.as_tensor(offsets)[:, None]
    sc = sincos[pos].to(dtype)
    return torch.split(sc, sc.shape[-1] // 2, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_batch", [1, "B"])
def test_hf_gptj(backend, dtype, cos_batch):
    B, S, H, D, R = 2, 9, 3, 24, 8
    x = torch.randn(B, S, H * D, dtype=dtype).view(B, S, H, D)
    sin, cos = gptj_sin_cos(B if cos_batch == "B" else 1, S, R, dtype, offsets=[4, 1] if cos_batch == "B" else None)
    rot = x[..., :R]  # GPT-J's attention slices rotary_dim itself
    out = hf_int.apply_rotary_pos_emb_gptj(rot, sin, cos)
    truth = hf_gptj(*to64(rot, sin, cos))
    same = hf_gptj(rot, sin, cos)
    assert out.dtype == same.dtype
    assert_dtype_tolerance(out, truth, same, what="gptj")
    # Superset: the whole head, the tail passing through, equals HF's slice + cat.
    full = hf_int.apply_rotary_pos_emb_gptj(x, sin, cos)
    assert torch.equal(full[..., :R], out) and torch.equal(full[..., R:], x[..., R:])


def test_hf_gptj_gradients(backend):
    x = torch.randn(2, 3, 1, 6, dtype=torch.float64, requires_grad=True)
    sin, cos = gptj_sin_cos(2, 3, 6, torch.float64, offsets=[0, 3])
    assert torch.autograd.gradcheck(lambda t: hf_int.apply_rotary_pos_emb_gptj(t, sin, cos), (x,))
    g = torch.randn(2, 3, 1, 6, dtype=torch.float64)
    ours = torch.autograd.grad(hf_int.apply_rotary_pos_emb_gptj(x, sin, cos), x, g)[0]
    ref = torch.autograd.grad(hf_gptj(x, sin, cos), x, g)[0]
    torch.testing.assert_close(ours, ref)


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


# ----------------------------------------------------------------------------------------------
# flash-attn apply_rotary_emb
# ----------------------------------------------------------------------------------------------


def _flash_rows(x, seqlen_offsets, cu_seqlens):
    """flash-attn's table row per token: sequence b's token s reads seqlen_offsets[b] + s (an int: the same
    for every sequence); packed inputs restart at each cu_seqlens boundary. ``[B, S]`` (packed: ``[1, T]``)."""
    from posenc_kernels.ops.positions import cu_seqlens_positions, token_positions

    offs_t = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
    off = 0 if offs_t is not None else int(seqlen_offsets)
    if cu_seqlens is not None:
        return cu_seqlens_positions(cu_seqlens, offs_t, off, x.shape[0])[None]
    return token_positions(None, offs_t, off, x.shape[0], x.shape[1], x.device)


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


def test_integrations_import_without_the_mirrored_libraries():
    import subprocess
    import sys

    code = (
        "import sys; import posenc_kernels.integrations as i; "
        "assert 'transformers' not in sys.modules and 'vllm' not in sys.modules and 'flash_attn' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
