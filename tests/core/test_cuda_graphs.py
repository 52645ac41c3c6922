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


@pytest.mark.parametrize("norm", ["head", "heads"])
def test_qk_norm_rope_cuda_graph_capture_and_replay(norm):
    """qk_norm_rope_ captured once (positions are a tensor: no host sync under capture), replayed with new
    positions and new q/k: each replay equals the float64 reference within the dtype-tied bound."""
    from posenc_kernels.ops.qknorm.reference import qk_norm_rope_hf_eager, qk_norm_rope_reference

    dev = torch.device("cuda")
    Hq, Hk = (32, 8) if norm == "head" else (40, 40)
    q = torch.randn(4, 1, Hq, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(4, 1, Hk, 128, device=dev, dtype=torch.bfloat16)
    n = 128 if norm == "head" else None
    qw = torch.rand(n or Hq * 128, device=dev, dtype=torch.bfloat16) + 0.5
    kw = torch.rand(n or Hk * 128, device=dev, dtype=torch.bfloat16) + 0.5
    cos, sin = pk.rope_cos_sin(4096, pk.rope_frequencies(128, 1e6)[0].to(dev))
    pos = torch.tensor([[3], [100], [4000], [0]], device=dev)
    static_q, static_k = q.clone(), k.clone()
    pk.qk_norm_rope_(static_q.clone(), static_k.clone(), qw, kw, cos, sin, norm=norm, positions=pos)  # warm-up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pk.qk_norm_rope_(static_q, static_k, qw, kw, cos, sin, norm=norm, positions=pos)
    for step in range(3):
        new_pos = torch.randint(0, 4096, (4, 1), device=dev)
        q.normal_()
        pos.copy_(new_pos)
        static_q.copy_(q)
        static_k.copy_(k)
        g.replay()
        tq, tk = qk_norm_rope_reference(q, k, qw, kw, cos, sin, norm=norm, positions=new_pos)
        eq, ek = qk_norm_rope_hf_eager(q, k, qw, kw, cos, sin, norm=norm, positions=new_pos)
        assert (static_q.double() - tq).abs().max() <= 2 * (eq.double() - tq).abs().max() + 1e-2
        assert (static_k.double() - tk).abs().max() <= 2 * (ek.double() - tk).abs().max() + 1e-2


def peak_extra_bytes(fn) -> int:
    """Bytes allocated above the starting level during one call of ``fn`` (after a warm-up call)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("op", ["rope", "sinusoidal", "qknorm"])
def test_inplace_ops_allocate_nothing_proportional(op):
    dev = torch.device("cuda")
    q = torch.randn(1, 8192, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8192, 8, 128, device=dev, dtype=torch.bfloat16)
    cos, sin = pk.rope_cos_sin(8192, pk.rope_frequencies(128)[0].to(dev))
    x = torch.randn(4, 8192, 1024, device=dev, dtype=torch.bfloat16)
    w = torch.rand(128, device=dev, dtype=torch.bfloat16)
    fn = {
        "rope": lambda: pk.apply_rope_(q, k, cos, sin),
        "sinusoidal": lambda: pk.add_sinusoidal_(x),
        "qknorm": lambda: pk.qk_norm_rope_(q, k, w, w, cos, sin),
    }[op]
    assert peak_extra_bytes(fn) < 1 << 20, "in-place op allocated memory"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    dev = torch.device("cuda:1")
    q = torch.randn(2, 5, 4, 64, device=dev)
    cos, sin = pk.rope_cos_sin(5, pk.rope_frequencies(64)[0].to(dev))
    out, _ = pk.apply_rope(q, None, cos, sin)
    truth, _ = ref.rope_reference(q, None, cos, sin)
    assert (out.double() - truth).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# Serving paths under CUDA graphs: decode with an offsets tensor, packed varlen with cu_seqlens, on-the-fly
# angles; the fused-QKV op allocates nothing. (Value checks are skipped automatically under capture.)
# ----------------------------------------------------------------------------------------------
_P = 4096  # table rows / largest position


def _angle_sources(dev):
    inv32 = pk.rope_frequencies(128, 500000.0)[0].to(dev)
    inv64 = pk.rope_frequencies(128, 500000.0, dtype=torch.float64)[0].to(dev)
    cos, sin = pk.rope_cos_sin(_P, inv32)
    cos64, sin64 = ref.rope_cos_sin_reference(torch.arange(_P, device=dev), inv64)  # the float64 truth
    kw = {
        "table": dict(cos=cos, sin=sin),
        "onthefly": dict(inv_freq=inv32),
        "exact": dict(inv_freq=inv64, exact=True),
    }
    return kw, (cos, sin), (cos64, sin64)


def _capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compilation) off the capture stream
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _assert_close_to_truth(out, truth, eager, what):
    err = (out.double() - truth).abs().max().item()
    base = (eager.double() - truth).abs().max().item()
    assert err <= 2 * base + 1e-2, f"{what}: error {err:.3g} > 2 x eager bf16 error {base:.3g} + 1e-2"


@pytest.mark.parametrize("angles", ["table", "onthefly", "exact"])
def test_rope_cuda_graph_decode_offsets_tensor(angles):
    """Decode: B sequences x 1 new token, each at its own KV length (offsets [B]); replayed with new
    offsets and activations written into the captured buffers."""
    dev = torch.device("cuda")
    kw, (cos, sin), (cos64, sin64) = _angle_sources(dev)
    B = 64
    offsets = torch.randint(0, _P, (B,), device=dev)
    sq = torch.randn(B, 1, 32, 128, device=dev, dtype=torch.bfloat16)
    sk = torch.randn(B, 1, 8, 128, device=dev, dtype=torch.bfloat16)
    g = _capture(lambda: pk.apply_rope_(sq, sk, offsets=offsets, **kw[angles]))
    for step in range(3):
        q = torch.randn_like(sq)
        k = torch.randn_like(sk)
        new = torch.randint(0, _P, (B,), device=dev)
        new[0] = _P - 1
        offsets.copy_(new)
        sq.copy_(q)
        sk.copy_(k)
        g.replay()
        torch.cuda.synchronize()
        pos = new[:, None]
        tq, tk = ref.rope_reference(q, k, cos64, sin64, positions=pos)
        eq, ek = ref.rope_hf_eager(q, k, cos, sin, positions=pos)
        _assert_close_to_truth(sq, tq, eq, f"{angles} q step {step}")
        _assert_close_to_truth(sk, tk, ek, f"{angles} k step {step}")


@pytest.mark.parametrize("angles", ["table", "onthefly"])
def test_rope_cuda_graph_varlen_cu_seqlens(angles):
    """Packed varlen batch in a padded graph bucket of T tokens: cu_seqlens [N+1] and offsets [N] change
    between replays (same N); tokens past cu_seqlens[-1] take position 0 (identity)."""
    dev = torch.device("cuda")
    kw, (cos, sin), (cos64, sin64) = _angle_sources(dev)
    N, T = 5, 256
    cu = torch.zeros(N + 1, device=dev, dtype=torch.int32)
    offsets = torch.zeros(N, device=dev, dtype=torch.int64)
    sq = torch.randn(T, 32, 128, device=dev, dtype=torch.bfloat16)
    sk = torch.randn(T, 8, 128, device=dev, dtype=torch.bfloat16)
    cu.copy_(torch.tensor([0, 10, 10, 50, 120, 200], device=dev, dtype=torch.int32))
    g = _capture(lambda: pk.apply_rope_(sq, sk, cu_seqlens=cu, offsets=offsets, **kw[angles]))
    for lengths in ([1, 1, 1, 1, 1], [7, 0, 100, 33, 90], [1, 60, 2, 3, 190]):
        q, k = torch.randn_like(sq), torch.randn_like(sk)
        new_cu = torch.tensor([0] + lengths, device=dev).cumsum(0).to(torch.int32)
        new_off = torch.randint(0, _P - 256, (N,), device=dev)
        cu.copy_(new_cu)
        offsets.copy_(new_off)
        sq.copy_(q)
        sk.copy_(k)
        g.replay()
        torch.cuda.synchronize()
        pos = pk.positions_from_cu_seqlens(new_cu, T, offsets=new_off)[None]  # [1, T]
        tq, tk = ref.rope_reference(q[None], k[None], cos64, sin64, positions=pos)
        eq, ek = ref.rope_hf_eager(q[None], k[None], cos, sin, positions=pos)
        _assert_close_to_truth(sq[None], tq, eq, f"{angles} q {lengths}")
        _assert_close_to_truth(sk[None], tk, ek, f"{angles} k {lengths}")
        used = int(new_cu[-1])
        assert torch.equal(sq[used:], q[used:]), "padded tokens past cu_seqlens[-1] must stay unrotated"


@pytest.mark.parametrize("angles", ["table", "onthefly"])
def test_rope_qkv_allocates_nothing(angles):
    dev = torch.device("cuda")
    kw, _, _ = _angle_sources(dev)
    qkv = torch.randn(1, _P, 32 + 2 * 8, 128, device=dev, dtype=torch.bfloat16)
    v = qkv[:, :, 40:].clone()
    fn = lambda: pk.apply_rope_qkv_(qkv, num_heads_q=32, num_heads_kv=8, **kw[angles])  # noqa: E731
    assert peak_extra_bytes(fn) < 1 << 20, "apply_rope_qkv_ allocated memory"
    assert torch.equal(qkv[:, :, 40:], v), "v heads must be untouched"


def test_rope_qkv_cuda_graph_decode():
    """The fused-QKV op captured for decode (offsets [B]) matches apply_rope_ on copies of q and k."""
    dev = torch.device("cuda")
    kw, _, _ = _angle_sources(dev)
    B = 8
    offsets = torch.randint(0, _P, (B,), device=dev)
    sqkv = torch.randn(B, 1, 48, 128, device=dev, dtype=torch.bfloat16)
    g = _capture(lambda: pk.apply_rope_qkv_(sqkv, num_heads_q=32, num_heads_kv=8, offsets=offsets, **kw["table"]))
    qkv = torch.randn_like(sqkv)
    offsets.copy_(torch.randint(0, _P, (B,), device=dev))
    sqkv.copy_(qkv)
    g.replay()
    torch.cuda.synchronize()
    q, k = qkv[:, :, :32].clone(), qkv[:, :, 32:40].clone()
    pk.apply_rope_(q, k, offsets=offsets, **kw["table"])
    assert torch.equal(sqkv[:, :, :32], q) and torch.equal(sqkv[:, :, 32:40], k)
    assert torch.equal(sqkv[:, :, 40:], qkv[:, :, 40:])
