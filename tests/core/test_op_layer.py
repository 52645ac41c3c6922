"""The op layer (posenc_kernels/ops/registry.py): one schema per op, kernels per dispatch key, the backend
override read in one place, every call visible to the profiler, and the in-place ops correct under
torch.compile (values and gradients) for graph inputs, leaves and views of one base."""

import threading

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops import registry

from conftest import DEVICE

ROPE_OPS = ("rope_", "rope", "rope_cos_sin")


def _tables(n=8, d=16):
    return pk.rope_cos_sin(n, pk.rope_frequencies(d)[0].to(DEVICE))


# ---------------------------------------------------------------------------------------------
# torch.compile: the two silent wrong results flash-attn's suite found
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_inplace_on_a_leaf_clone_keeps_the_backward(compile_backend):
    """``f(x): apply_rope_(x); return x`` on ``leaf.clone()``: the gradient reaching the leaf is the rotation
    by -theta of the upstream gradient, as in eager (PyTorch dropped it from the traced autograd.Function)."""
    cos, sin = _tables()

    def f(x):
        pk.apply_rope_(x, None, cos, sin)
        return x

    leaf = torch.randn(1, 8, 4, 16, device=DEVICE, requires_grad=True)
    g = torch.randn(1, 8, 4, 16, device=DEVICE)
    eager_leaf = leaf.detach().clone().requires_grad_()
    want = f(eager_leaf.clone())
    want.backward(g)
    got = torch.compile(f, backend=compile_backend, fullgraph=True)(leaf.clone())
    got.backward(g)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.equal(leaf.grad, g), "the rotation was dropped from backward"
    assert torch.allclose(leaf.grad, eager_leaf.grad, atol=1e-6)


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_packed_qkv_views(dynamic, requires_grad):
    """q and k as head slices of one fused projection, compiled with static and dynamic shapes: values
    (and gradients) as in eager (PyTorch regenerated the k view at storage offset 0 under dynamic shapes)."""
    cos, sin = _tables()

    def h(qkv):
        b, s, three, nh, d = qkv.shape
        pk.apply_rope_qkv_(qkv.view(b, s, 3 * nh, d), cos, sin, num_heads_q=nh, num_heads_kv=nh)
        return qkv

    def two_views(qkv):
        b, s, three, nh, d = qkv.shape
        flat = qkv.view(b, s, 3 * nh, d)
        pk.apply_rope_(flat[:, :, :nh], flat[:, :, nh : 2 * nh], cos, sin)
        return qkv

    base = torch.randn(2, 8, 3, 4, 16, device=DEVICE)
    g = torch.randn_like(base)
    for fn in (h, two_views):
        leaf_e = base.clone().requires_grad_(requires_grad)
        want = fn(leaf_e.clone())
        leaf_c = base.clone().requires_grad_(requires_grad)
        got = torch.compile(fn, backend="aot_eager", dynamic=dynamic, fullgraph=True)(leaf_c.clone())
        assert torch.allclose(got, want, atol=1e-6), fn.__name__
        if requires_grad:
            want.backward(g)
            got.backward(g)
            assert torch.allclose(leaf_c.grad, leaf_e.grad, atol=1e-6), fn.__name__


def test_compiled_graph_input_mutation_matches_eager():
    """The mutated tensor is a graph input (no grad): written in place, once."""
    cos, sin = _tables()

    def f(q, k):
        pk.apply_rope_(q, k, cos, sin, offsets=0)
        return q.sum() + k.sum()

    q, k = torch.randn(2, 8, 4, 16, device=DEVICE), torch.randn(2, 8, 2, 16, device=DEVICE)
    qe, ke = q.clone(), k.clone()
    f(qe, ke)
    torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)(q, k)
    assert torch.allclose(q, qe, atol=1e-6) and torch.allclose(k, ke, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dispatcher: one definition, kernels per key, no bypass
# ---------------------------------------------------------------------------------------------


def test_every_call_goes_through_the_op_and_shows_in_the_profiler():
    cos, sin = _tables()
    q, k = torch.randn(1, 4, 2, 16, device=DEVICE), torch.randn(1, 4, 1, 16, device=DEVICE)
    with torch.no_grad(), torch.profiler.profile() as prof:
        pk.apply_rope_(q, k, cos, sin)
        pk.apply_rope(q, k, cos, sin)
    names = {e.name for e in prof.events()}
    assert {"posenc::rope_", "posenc::rope"} <= names, names


def test_patched_hf_model_under_no_grad_shows_the_ops_in_the_profiler():
    """The case that had no posenc op in its trace: an HF Llama patched with integrations.hf, run under
    no_grad inside torch.profiler."""
    transformers = pytest.importorskip("transformers")
    from posenc_kernels.integrations import hf

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 7))
    with hf.patch(model):
        with torch.no_grad(), torch.profiler.profile() as prof:
            model(ids)
    names = [e.name for e in prof.events()]
    assert sum(n.startswith("posenc::") for n in names) >= cfg.num_hidden_layers, sorted(set(names))


def test_in_place_writes_bump_version_counters_through_the_dispatcher():
    cos, sin = _tables()
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    v = q._version
    torch.ops.posenc.rope_(q, None, cos, sin, None, None, None, 0, None, None, 1.0, False, False, False)
    assert q._version == v + 1


@pytest.mark.parametrize("name", ROPE_OPS)
def test_each_op_defined_once_with_kernels_for_its_keys(name):
    schema = registry.spec(name).schema
    assert schema.startswith(name + "(")
    for key in ("CPU", "CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"posenc::{name}", key), key


def test_use_backend_is_thread_local_with_a_process_default():
    seen = {}

    def other():
        seen["other"] = pk.get_backend()

    with pk.use_backend("torch"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        seen["here"] = pk.get_backend()
    assert seen == {"here": "torch", "other": "auto"}
    pk.set_backend("torch")
    try:
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen["other"] == "torch"
    finally:
        pk.set_backend("auto")
    # The overrides swapped no kernel (issue 17): the BackendSelect entry is the extension's chooser, or none.
    assert registry.registered_kernels("rope_")["BackendSelect"] in (None, "chooser")


def test_backend_override_routes_each_thread():
    """While one thread forces a backend, another thread's calls still run its own (the default)."""
    cos, sin = _tables()
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    ran = []
    torch_impl = registry.spec("rope").impls["torch"]

    def spy(*a):
        ran.append(threading.get_ident())
        return torch_impl(*a)

    spec = registry.spec("rope")
    spec.impls["torch"] = spy
    try:
        with pk.use_backend("torch"):
            pk.apply_rope(q, None, cos, sin)
            t = threading.Thread(target=lambda: pk.apply_rope(q, None, cos, sin))
            t.start()
            t.join()
    finally:
        spec.impls["torch"] = torch_impl
    default_is_torch = registry.backend_for(spec, DEVICE.type, "auto") == "torch"
    assert ran[0] == threading.get_ident()
    assert len(ran) == (2 if default_is_torch else 1)


def test_exact_angle_constants_have_one_value_everywhere():
    """One exact-angle algorithm: the Triton helper's literals and the C++ header's match the Python ones."""
    import inspect
    import pathlib

    from posenc_kernels.ops import angles

    consts = (repr(angles.INV_TWO_PI), repr(angles.TWO_PI_HI), repr(angles.TWO_PI_LO))
    if registry.HAS_TRITON:
        src = inspect.getsource(angles.exact_angle_tl.fn)
        for c in consts:
            assert c in src, c
    header = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "exact_angle.h"
    if header.exists():
        text = header.read_text()
        for c in consts:
            assert c in text, c


def test_position_mode_codes_have_one_value_everywhere():
    """One position resolver: the C++ helper's mode codes (csrc/positions.h, used by the CPU and CUDA
    kernels) are the Python PosMode's."""
    import pathlib
    import re

    from posenc_kernels.ops.positions import PosMode

    header = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "positions.h"
    if not header.exists():
        pytest.skip("no csrc/ beside the tests")
    codes = dict(re.findall(r"kPos(\w+) = (\d+)", header.read_text()))
    want = {"Offset": PosMode.OFFSET, "Offsets": PosMode.OFFSETS, "Positions": PosMode.POSITIONS,
            "CuSeqlens": PosMode.CU_SEQLENS}  # fmt: skip
    assert {k: int(v) for k, v in codes.items()} == {k: int(v) for k, v in want.items()}
