"""CUDA-only checks: CUDA-graph capture, no allocation in the in-place ops, the device guard.

These need a GPU and run in benchmarks/gpu_check.sh on a CUDA machine; on a CPU machine they report as
skipped (the CPU suite covers the same kernels through the interpreter).
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu_check.sh)")


def test_rope_cuda_graph_capture_and_replay():
    dev = torch.device("cuda")
    q = torch.randn(4, 1, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(4, 1, 8, 128, device=dev, dtype=torch.bfloat16)
    cos, sin = pk.rope_cos_sin(4096, pk.rope_frequencies(128, 500000.0)[0].to(dev))
    pos = torch.tensor([[3], [100], [4000], [0]], device=dev)
    static_q, static_k = q.clone(), k.clone()
    pk.apply_rope_(static_q.clone(), static_k.clone(), cos, sin, positions=pos)  # warm-up (compilation)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pk.apply_rope_(static_q, static_k, cos, sin, positions=pos)
    for step in range(3):
        new_pos = torch.randint(0, 4096, (4, 1), device=dev)
        pos.copy_(new_pos)
        static_q.copy_(q)
        static_k.copy_(k)
        g.replay()
        tq, tk = ref.rope_reference(q, k, cos, sin, positions=new_pos)
        eq, ek = ref.rope_hf_eager(q, k, cos, sin, positions=new_pos)
        assert (static_q.double() - tq).abs().max() <= 2 * (eq.double() - tq).abs().max() + 1e-2
        assert (static_k.double() - tk).abs().max() <= 2 * (ek.double() - tk).abs().max() + 1e-2


@pytest.mark.parametrize("op", ["rope", "sinusoidal"])
def test_inplace_ops_allocate_nothing_proportional(op):
    dev = torch.device("cuda")
    q = torch.randn(1, 8192, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8192, 8, 128, device=dev, dtype=torch.bfloat16)
    cos, sin = pk.rope_cos_sin(8192, pk.rope_frequencies(128)[0].to(dev))
    x = torch.randn(4, 8192, 1024, device=dev, dtype=torch.bfloat16)
    fn = (lambda: pk.apply_rope_(q, k, cos, sin)) if op == "rope" else (lambda: pk.add_sinusoidal_(x))
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 1 << 20, "in-place op allocated memory"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    dev = torch.device("cuda:1")
    q = torch.randn(2, 5, 4, 64, device=dev)
    cos, sin = pk.rope_cos_sin(5, pk.rope_frequencies(64)[0].to(dev))
    out, _ = pk.apply_rope(q, None, cos, sin)
    truth, _ = ref.rope_reference(q, None, cos, sin)
    assert (out.double() - truth).abs().max() < 1e-5
