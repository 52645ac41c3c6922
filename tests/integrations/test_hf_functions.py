"""integrations.hf: the apply_rotary_pos_emb drop-ins against HF's own functions (Llama, GPT-NeoX,
Phi-3, GPT-J): values, partial rotary, promotion, gradients, the kernel path, structure mismatches.
"""

import pytest
import torch

from posenc_kernels.integrations import hf as hf_int

from conftest import DTYPES, assert_dtype_tolerance
from .common import to64, check_pair

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as hf_neox  # noqa: E402
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as hf_gptj  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_llama  # noqa: E402
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as hf_phi3  # noqa: E402


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
    real = hf_int._rope_out

    def spy(q, k, cos, sin, **kw):
        calls.append((q, k, cos, sin, kw))
        return real(q, k, cos, sin, **kw)

    monkeypatch.setattr(hf_int, "_rope_out", spy)
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


def test_integrations_import_without_the_mirrored_libraries():
    import subprocess
    import sys

    code = (
        "import sys; import posenc_kernels.integrations as i; "
        "assert 'transformers' not in sys.modules and 'vllm' not in sys.modules and 'flash_attn' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
