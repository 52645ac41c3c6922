"""rope_and_cache_ under every way it is run: opcheck; torch.compile(fullgraph=True) with aot_eager and
inductor, static and dynamic shapes, the caches mutated as in eager (graph inputs, and MLA's two views of
one cache); no_grad and inference mode; the profiler names the op; autograd refused with a clear error
(never a silent None), forward AD too."""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import _native

from cache.common import angles, bits, clone_all, contiguous, paged, same_bits
from conftest import DEVICE

NATIVE_OP = "rope_and_cache_"
# inductor treats the op as opaque: it runs once, on the CPU default (native where built, else torch)
INDUCTOR_ON = "native" if "rope_and_cache_" in _native.ops_for("CPU") else "torch"


def _op_args(q, k, v, kc, vc, cos, sin, slots=None, cache_pos=None, layout=0, pos=None, offset=0, norm=-1, qw=None,
             kw=None):  # fmt: skip
    return (q, k, v, kc, vc, None, slots, cache_pos, layout, None, None, None, None, None, None, qw, kw, 1e-6, norm,
            0.0, cos, sin, None, pos, None, offset, None, None, 1.0, False, False, False)  # fmt: skip


def test_opcheck(backend):
    q, k, v, kc, vc = paged(T=3)
    kc.zero_(), vc.zero_()  # opcheck compares outputs: no NaN
    cos, sin = angles(16)
    slots, pos = torch.tensor([1, -1, 6], device=DEVICE), torch.tensor([0, 3, 5], device=DEVICE)
    torch.library.opcheck(torch.ops.posenc.rope_and_cache_.default, _op_args(q, k, v, kc, vc, cos, sin, slots, pos=pos))
    if backend == "triton" and DEVICE.type == "cpu":
        return  # the registration is backend-independent; the interpreter makes the functional opcheck slow
    q, k, v, kc, vc = contiguous()
    kc.zero_(), vc.zero_()
    qw, kw = torch.rand(16, device=DEVICE), torch.rand(16, device=DEVICE)
    torch.library.opcheck(
        torch.ops.posenc.rope_and_cache.default,
        _op_args(q, k, v, kc, vc, cos, sin, cache_pos=torch.tensor([2, 3, 4], device=DEVICE), layout=1, offset=2,
                 norm=0, qw=qw, kw=kw),
    )  # fmt: skip


def _step(q, k, v, kc, vc, cos, sin, cache_pos):
    """A decode step as HF's static cache runs it: fresh projections, the fused write, attention reads the cache."""
    q = q * 1.0
    k = k * 1.0
    pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, cache_positions=cache_pos, kv_layout="HND", offsets=cache_pos[:1])
    att = torch.einsum("bshd,bhtd->bhst", q[:, :, :2], kc)
    return att.softmax(-1) @ vc


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_mutates_the_cache(backend, compile_backend):
    if compile_backend == "inductor" and (backend != INDUCTOR_ON or DEVICE.type != "cpu"):
        pytest.skip(f"inductor runs once, on {INDUCTOR_ON}; aot_eager runs on every backend")
    torch._dynamo.reset()
    cos, sin = angles(16)
    compiled = torch.compile(_step, fullgraph=True, backend=compile_backend, dynamic=compile_backend == "aot_eager")
    for S, start in ((3, 0), (1, 3), (2, 4)):  # prefill, then decode steps of other lengths: dynamic shapes
        q, k, v, kc, vc = contiguous(B=1, S=S, Hq=2, Hk=2)
        kc.zero_(), vc.zero_()
        pos = torch.arange(start, start + S, device=DEVICE)
        a, b = clone_all(q, k, v, kc, vc), clone_all(q, k, v, kc, vc)
        out_e = _step(*a, cos, sin, pos)
        out_c = compiled(*b, cos, sin, pos)
        assert same_bits(b[3], a[3]) and same_bits(b[4], a[4]), "the compiled call left other cache contents"
        torch.testing.assert_close(out_c, out_e)


def _mla(q_pe, k_pe, kv_c, cache, cos, sin, slots, pos):
    pk.mla_rope_and_cache_(q_pe, k_pe, kv_c, cache, cos, sin, slot_mapping=slots, positions=pos)
    return q_pe.sum() + k_pe.sum()


def test_torch_compile_two_views_of_one_cache(backend):
    """MLA writes two column ranges of one tensor (k and v caches are views of one base)."""
    torch._dynamo.reset()
    cos, sin = angles(8)
    compiled = torch.compile(_mla, fullgraph=True, backend="aot_eager", dynamic=True)
    for T in (3, 2):
        q = torch.randn(T, 2, 8, device=DEVICE)
        k_pe, kv_c = torch.randn(T, 8, device=DEVICE), torch.randn(T, 16, device=DEVICE)
        cache = torch.zeros(2, 4, 24, device=DEVICE)
        slots, pos = torch.arange(T, device=DEVICE) * 3, torch.arange(T, device=DEVICE)
        a, b = clone_all(q, k_pe, kv_c, cache), clone_all(q, k_pe, kv_c, cache)
        _mla(*a, cos, sin, slots, pos)
        compiled(*b, cos, sin, slots, pos)
        for x, y in zip(a, b):
            assert same_bits(x, y)


def test_no_grad_inference_mode_and_profiler(backend):
    cos, sin = angles(16)
    with torch.inference_mode():
        q, k, v, kc, vc = paged(T=2)
        pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, slot_mapping=torch.tensor([0, 1], device=DEVICE))
        assert torch.equal(kc[0, :2], k)
    q, k, v, kc, vc = paged(T=2)
    with torch.profiler.profile() as prof:
        pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, slot_mapping=torch.tensor([0, 1], device=DEVICE))
    assert any(e.name == "posenc::rope_and_cache_" for e in prof.events())


def test_autograd_is_refused_before_any_write(backend):
    q, k, v, kc, vc = paged(T=2)
    cos, sin = angles(16)
    slots = torch.tensor([0, 1], device=DEVICE)
    for name, t in (("q", q), ("v", v), ("k_cache", kc)):
        x = t.clone().requires_grad_()
        args = {"q": q, "k": k, "v": v, "k_cache": kc, "v_cache": vc, name: x}
        k0, kc0 = bits(k.clone()), bits(kc.clone())
        with pytest.raises(ValueError, match=f"{name} requires grad, but posenc::rope_and_cache is not differentiable"):
            pk.rope_and_cache_(*args.values(), cos, sin, slot_mapping=slots)
        assert torch.equal(bits(k), k0) and torch.equal(bits(kc), kc0)
    with torch.autograd.forward_ad.dual_level():
        qd = torch.autograd.forward_ad.make_dual(q.clone(), torch.ones_like(q))
        with pytest.raises(NotImplementedError, match="forward-mode AD is not supported by posenc::rope_and_cache"):
            pk.rope_and_cache_(qd, k, v, kc, vc, cos, sin, slot_mapping=slots)
