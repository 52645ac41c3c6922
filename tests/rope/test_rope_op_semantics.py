"""The RoPE op's contract beyond values: opcheck of the newer modes, value checks skipped in backward,
autograd and dispatch semantics of eager calls, strided metadata, from_config, forward-mode AD refused.
"""

import pytest
import torch

import posenc_kernels as pk

from conftest import DEVICE

NATIVE_OP = "rope_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


def test_opcheck_new_modes(backend):
    inv, _ = pk.rope_frequencies(16)
    inv = inv.to(DEVICE)
    inv64 = pk.rope_frequencies(16, dtype=torch.float64)[0].to(DEVICE)
    cos, sin = pk.rope_cos_sin(20, inv)
    x = torch.randn(9, 3, 16, device=DEVICE)
    k = torch.randn(9, 1, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 9], device=DEVICE)
    pos3 = torch.randint(0, 20, (3, 1, 9), device=DEVICE)
    amap = pk.mrope_axis_map([4, 2, 2], device=DEVICE)
    cases = [
        (x.clone(), k.clone(), None, None, inv, None, None, 0, cu, None, 1.5, False, False, False),
        (x.clone(), k.clone(), None, None, inv64, None, torch.tensor([3, 5], device=DEVICE), 0, cu, None, 1.0, True, False, True),
        (x.clone()[None], k.clone()[None], cos, sin, None, pos3, None, 0, None, amap, 1.0, False, True, False),
    ]  # fmt: skip
    for args in cases:
        torch.library.opcheck(torch.ops.posenc.rope_.default, args)
        torch.library.opcheck(torch.ops.posenc.rope.default, args)


def test_backward_skips_the_value_checks_forward_did(monkeypatch):
    """The value checks (a host sync on CUDA) run once per forward, never again in backward: backward
    rotates with the very tensors forward checked."""
    calls = []  # reads of the position values (a host sync on CUDA)
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    cos, sin = pk.rope_cos_sin(16, pk.rope_frequencies(16)[0].to(DEVICE))
    pos = torch.randint(0, 16, (2, 5), device=DEVICE)
    q = torch.randn(2, 5, 2, 16, device=DEVICE, requires_grad=True)
    out, _ = pk.apply_rope(q, None, cos, sin, positions=pos)
    assert len(calls) == 1
    out.sum().backward()
    assert len(calls) == 1, "backward re-checked position values"
    x = q.detach() * 1
    x.requires_grad_()
    y = x * 2
    pk.apply_rope_(y, None, cos, sin, positions=pos)
    y.sum().backward()
    assert len(calls) == 2
    with pytest.raises(ValueError, match="positions must lie in"):  # the checks still run in forward
        pk.apply_rope(q, None, cos, sin, positions=pos + 16)


def test_eager_calls_keep_autograd_and_dispatch_semantics(backend):
    """Eager calls without autograd go through the dispatcher like any other: the write bumps version
    counters (so autograd catches a rotated tensor that a graph saved), and dispatch modes / subclasses
    see the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(16)[0].to(DEVICE))
    q, k = torch.randn(1, 4, 2, 16, device=DEVICE), torch.randn(1, 4, 1, 16, device=DEVICE)
    vq, vk = q._version, k._version
    pk.apply_rope_(q, k, cos, sin)
    assert q._version > vq and k._version > vk
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    y = q * w  # saves q for backward
    pk.apply_rope_(q, None, cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as mode:
        pk.apply_rope_(q, k, cos, sin)
        pk.apply_rope(q, k, cos, sin)
    assert "posenc.rope_.default" in mode.ops and "posenc.rope.default" in mode.ops


def test_review_fixes_strided_metadata_and_guards(backend):
    """Strided cu_seqlens and axis_map are read through their strides; tables that require grad, meta
    tensors, jit tracing and inference tensors are handled explicitly."""
    cos, sin = pk.rope_cos_sin(16, pk.rope_frequencies(16)[0].to(DEVICE))
    q = torch.randn(12, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 99, 3, 99, 7, 99, 12, 99], dtype=torch.int32, device=DEVICE)[::2]
    want, _ = pk.apply_rope(q, None, cos, sin, cu_seqlens=cu.contiguous())
    got, _ = pk.apply_rope(q, None, cos, sin, cu_seqlens=cu)
    assert torch.equal(got, want)
    am = pk.mrope_axis_map([4, 2, 2], device=DEVICE)
    am_strided = torch.stack([am, am], 1)[:, 0]
    pos = torch.randint(0, 16, (3, 2, 5), device=DEVICE)
    x = torch.randn(2, 5, 2, 16, device=DEVICE)
    want, _ = pk.apply_rope(x, None, cos, sin, positions=pos, axis_map=am)
    got, _ = pk.apply_rope(x, None, cos, sin, positions=pos, axis_map=am_strided)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="cos requires grad"):
        pk.apply_rope(x, None, cos.clone().requires_grad_(), sin)
    with torch.no_grad():  # no gradient is being recorded: fine
        pk.apply_rope(x, None, cos.clone().requires_grad_(), sin)
    with torch.inference_mode():
        inf = torch.randn(2, 5, 2, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="inference tensor"):
        pk.apply_rope_(inf, None, cos, sin)
    with torch.inference_mode():
        pk.apply_rope_(inf, None, cos, sin)
    meta = torch.empty(2, 5, 2, 16, device="meta")
    out, _ = pk.apply_rope(meta, None, cos.to("meta"), sin.to("meta"), positions=pos[0].to("meta"))
    assert out.shape == meta.shape and out.device.type == "meta"
    traced = torch.jit.trace(lambda t: pk.apply_rope(t, None, cos, sin)[0], (x,), check_trace=False)
    assert "posenc::rope" in str(traced.graph)


def test_from_config_interleaved_model_types():
    from transformers import CohereConfig, GlmConfig

    glm = GlmConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=1)
    assert pk.RotaryEmbedding.from_config(glm).interleaved
    coh = CohereConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    assert pk.RotaryEmbedding.from_config(coh).interleaved


def test_forward_mode_ad_is_the_rotated_tangent_never_a_dropped_one():
    """RoPE is linear in q: the tangent is the rotated tangent, in place and out of place; a tangent on the
    tables (not differentiated) is an error naming it, never dropped."""
    import torch.autograd.forward_ad as fwAD

    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(16)[0].to(DEVICE))
    p, t = torch.randn(1, 4, 2, 16, device=DEVICE), torch.randn(1, 4, 2, 16, device=DEVICE)
    want = pk.apply_rope(t, None, cos, sin)[0]
    with fwAD.dual_level():
        q = fwAD.make_dual(p, t)
        out = pk.apply_rope(q, None, cos, sin)[0]
        assert torch.equal(fwAD.unpack_dual(out).tangent, want)
        y = q * 1
        pk.apply_rope_(y, None, cos, sin)
        assert torch.equal(fwAD.unpack_dual(y).tangent, want)
        dual_cos = fwAD.make_dual(cos, torch.ones_like(cos))
        with pytest.raises(NotImplementedError, match="forward-mode AD.*cos"):
            pk.apply_rope(p, None, dual_cos, sin)
