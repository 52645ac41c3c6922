"""Deployment: ``torch.export`` (strict and non-strict, the sequence length dynamic) and AOTInductor
packaging of a small attention front end that uses ``apply_rope`` (out of place), ``apply_rope_`` (in place,
on views of the projections' outputs) and ``RotaryEmbedding`` (in place, partial rotary).

Each artifact is compared with the eager module, bitwise (the same kernels run), at the length it was
exported with and at a second one, after a round trip through its file (``torch.export.save``/``load``;
``aoti_compile_and_package``/``aoti_load_package``); a length whose positions pass the fixed tables raises
in the loaded program, as in eager code. One AOTInductor package is built (it compiles C++).
"""

import pytest
import torch
from torch import nn

import posenc_kernels as pk

H, HK, D, MODEL = 4, 2, 16, 32


class RopeFrontEnd(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(MODEL, H * D, bias=False)
        self.wk = nn.Linear(MODEL, HK * D, bias=False)
        self.rope = pk.RotaryEmbedding(D, rotary_dim=8)  # partial rotary, cached tables
        cos, sin = pk.rope_cos_sin(64, pk.rope_frequencies(D, base=500000.0)[0])
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, H, D)
        k = self.wk(x).view(B, S, HK, D)
        q1, k1 = pk.apply_rope(q, k, self.cos, self.sin)  # new tensors
        pk.apply_rope_(q, k, self.cos, self.sin, offsets=3)  # q, k rotated in place
        q2, k2 = self.rope(q1, k1)  # q1, k1 rotated in place
        return q + q2, k + k2


@pytest.fixture(scope="module")
def module_and_inputs():
    torch.manual_seed(0)
    m = RopeFrontEnd().eval()
    # The module's table is grown on demand; grown while tracing, it would fix the length (docs/deploying.md).
    m.rope.cos_sin(64)
    xs = [torch.randn(2, 7, MODEL), torch.randn(2, 11, MODEL)]  # the export length, then another
    with torch.no_grad():
        want = [m(x) for x in xs]
    return m, xs, want


def _export(m, x, strict):
    seq = torch.export.Dim("seq", min=2, max=64)
    return torch.export.export(m, (x,), dynamic_shapes={"x": {1: seq}}, strict=strict)


def _same(got, want, what):
    for g, w, name in zip(got, want, ("q", "k")):
        assert g.shape == w.shape and torch.equal(g, w), f"{what} {name}: max diff {(g - w).abs().max().item()}"


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_dynamic_seq(module_and_inputs, strict, tmp_path):
    m, xs, want = module_and_inputs
    ep = _export(m, xs[0], strict)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.posenc.rope.default) == 3, ops  # in place is functionalized to the twin
    path = tmp_path / "front_end.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        for x, w in zip(xs, want):
            _same(ep.module()(x), w, f"exported, S={x.shape[1]}")
            _same(loaded(x), w, f"saved and loaded, S={x.shape[1]}")
        with pytest.raises(ValueError, match="table has 64 rows"):  # offsets 3 + 63 tokens: past the buffers
            loaded(torch.randn(2, 63, MODEL))


@pytest.mark.slow
def test_aoti_package(module_and_inputs, tmp_path):
    m, xs, want = module_and_inputs
    ep = _export(m, xs[0], strict=False)
    # The wrapper at -O0 and no precompiled headers: the package compiles once, so these only save time.
    configs = {"aot_inductor.compile_wrapper_opt_level": "O0", "aot_inductor.precompile_headers": False}
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "front_end.pt2"),
                                                    inductor_configs=configs)  # fmt: skip
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for x, w in zip(xs, want):
            _same(runner(x), w, f"AOTInductor package, S={x.shape[1]}")
