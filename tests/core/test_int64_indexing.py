"""The 64-bit indexing builds of the Triton kernels (IDX64), taken only when an element offset can pass 2**31.

Real tensors that large do not fit this machine, so the launchers' threshold is lowered for a test: the
IDX64 build then runs on small inputs, under the interpreter (or on a GPU), and must give exactly what the
32-bit build gives. The choice itself is tested on meta tensors of the sizes that need it. The static test
(tests/static/test_kernel_sass.py) compiles both builds for sm_90 and checks the 64-bit one costs more
instructions, which is why it is not the default.
"""

import pytest
import torch
from conftest import DEVICE, TRITON_RUNS

import posenc_kernels as pk
import posenc_kernels.ops.learned.kernel as learned_kernel
import posenc_kernels.ops.rope.kernel as rope_kernel
import posenc_kernels.ops.sinusoidal.kernel as sinusoidal_kernel
from posenc_kernels.ops.checks import I32_MAX, max_element_offset

needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs the Triton kernels (CUDA or TRITON_INTERPRET=1)")


def test_offsets_past_2_31_need_int64_and_model_sizes_do_not():
    big = torch.empty(1, 1 << 20, 32, 128, device="meta")  # a million tokens of Llama-3-8B q: 2**32 elements
    assert max_element_offset(big) > I32_MAX
    llama_128k = torch.empty(1, 131072, 32, 128, device="meta")[..., :64]  # 2**29 elements: 32-bit is enough
    assert max_element_offset(llama_128k) <= I32_MAX
    packed = torch.empty(4, 131072, 40, 128, device="meta")  # qkv of 4 x 128k tokens: 2.7e9 elements
    assert max_element_offset(packed[:, :, 32:]) > I32_MAX  # a view's strides span its base: k needs int64


def _launch_flags(module, name, fn):
    """Run ``fn`` with ``module.name`` recording the constexprs it is launched with (then launching it)."""
    seen = []
    jit = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs.get("IDX64"))
                return jit[grid](*args, **kwargs)

            return launch

    setattr(module, name, Spy())
    try:
        fn()
    finally:
        setattr(module, name, jit)
    return seen


@needs_triton
@pytest.mark.parametrize("positions", [False, True])
def test_rope_int64_build_matches_int32(monkeypatch, positions):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 13, 4, 64, generator=g).to(DEVICE, torch.bfloat16)
    k = torch.randn(2, 13, 2, 64, generator=g).to(DEVICE, torch.bfloat16)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32, device=DEVICE) / 64))
    cos, sin = pk.rope_cos_sin(32, inv_freq)
    pos = torch.randint(0, 32, (2, 13), generator=g).to(DEVICE) if positions else None
    with pk.use_backend("triton"):
        monkeypatch.setattr(rope_kernel, "I32_MAX", 2**31 - 1)
        q32, k32 = q.clone(), k.clone()
        flags = _launch_flags(rope_kernel, "_rope_kernel", lambda: pk.apply_rope_(q32, k32, cos, sin, positions=pos))
        assert flags == [False]
        monkeypatch.setattr(rope_kernel, "I32_MAX", -1)
        q64, k64 = q.clone(), k.clone()
        flags = _launch_flags(rope_kernel, "_rope_kernel", lambda: pk.apply_rope_(q64, k64, cos, sin, positions=pos))
        assert flags == [True]
    assert torch.equal(q64, q32) and torch.equal(k64, k32)


@needs_triton
def test_sinusoidal_int64_build_matches_int32(monkeypatch):
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    outs = []
    with pk.use_backend("triton"):
        for limit, want in ((2**31 - 1, False), (-1, True)):
            monkeypatch.setattr(sinusoidal_kernel, "I32_MAX", limit)
            y = x.clone()
            got = _launch_flags(sinusoidal_kernel, "_sinusoidal_kernel", lambda y=y: pk.add_sinusoidal_(y, offsets=5))
            assert got == [want]
            outs.append(y)
    assert torch.equal(outs[0], outs[1])


@needs_triton
def test_learned_int64_build_matches_int32(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 40, generator=g).to(DEVICE)
    table = torch.randn(16, 40, generator=g).to(DEVICE)
    pos = torch.randint(0, 16, (2, 7), generator=g).to(DEVICE)
    outs = []
    with pk.use_backend("triton"):
        for limit, want in ((2**31 - 1, False), (-1, True)):
            monkeypatch.setattr(learned_kernel, "I32_MAX", limit)
            y = x.clone()
            got = _launch_flags(learned_kernel, "_pe_add_kernel", lambda y=y: pk.add_position_embedding_(y, table, pos))
            assert got == [want]
            outs.append(y)
    assert torch.equal(outs[0], outs[1])
