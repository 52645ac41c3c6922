"""The Hugging Face kernels-hub layer (``python -m posenc_kernels.hub OUTDIR``), used as a user would.

The repository is built once per module. A subprocess in which ``posenc_kernels`` cannot be imported (an
import hook refuses it: the package is installed in the test environment) kernelizes a tiny random Llama
from it with ``kernels`` and runs four checks, each reported separately: the logits against the unpatched
model (the suite's rule: within twice the unpatched fp32 model's error against float64), with the profiler
showing the hub copy's op (``kernels`` silently falls back to HF's math when a layer fails to load, so
equal logits alone prove nothing); the parameter gradients of a model kernelized for training, by the same
rule; values and gradients of the layer on partial rotary against a float64 reference; the layer under
``torch.compile`` with inductor against eager. In this process: the hub copy
and the installed package side by side (two op namespaces, same results), and the build id's rules.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import hub
from posenc_kernels.integrations import hf as hf_int

pytest.importorskip("transformers")
kernels = pytest.importorskip("kernels")

# Runs in a fresh interpreter: argv[1] the repository, argv[2] the build id. Prints one JSON line.
USER_SCRIPT = textwrap.dedent(
    r'''
    import copy, importlib.abc, json, sys, traceback

    class _NoPosencKernels(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "posenc_kernels" or name.startswith("posenc_kernels."):
                raise ImportError(f"{name} must not be imported by the hub layer")

    sys.meta_path.insert(0, _NoPosencKernels())

    import logging
    from pathlib import Path
    import torch
    from kernels import LocalLayerRepository, Mode, get_local_kernel, kernelize, use_kernel_mapping
    from transformers import LlamaConfig, LlamaForCausalLM

    logging.getLogger("kernels").setLevel(logging.ERROR)  # "no mapping for RMSNorm/SiLU": expected
    repo, build = Path(sys.argv[1]), sys.argv[2]
    results = {}

    def ops_run(fn, calls=None):
        with torch.profiler.profile() as prof:
            out = fn()
        names = [e.name for e in prof.events() if e.name.startswith(build + "::")]
        if calls is not None:
            calls.append(len(names))
        return out, sorted(set(names))

    def section(name):
        def wrap(fn):
            try:
                results[name] = fn() or "ok"
            except Exception:
                results[name] = "FAILED\n" + traceback.format_exc()
        return wrap

    @section("logits")
    def _():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config).eval()
        ids = torch.randint(0, 128, (2, 7))
        with torch.no_grad():
            want = model(ids).logits
            truth = copy.deepcopy(model).double()(ids).logits  # the unpatched model in float64
            # The user's three lines: the mapping, kernelize, and checking that the layer loaded.
            mapping = {"rotary_pos_emb": {"cpu": LocalLayerRepository(repo_path=repo,
                                                                      layer_name="apply_rotary_transformers")}}
            with use_kernel_mapping(mapping):
                model = kernelize(model, device="cpu", mode=Mode.INFERENCE)
            assert build in sys.modules, f"kernelize did not load {build}"
            calls = []
            got, ops = ops_run(lambda: model(ids).logits, calls)
        assert ops == [build + "::rope"], f"the hub layer did not run (ops seen: {ops})"
        assert calls == [config.num_hidden_layers], calls  # q and k in one op call per layer
        # The suite's tolerance rule: within 2x the unpatched fp32 model's own error, plus half an ulp.
        err, base = ((x.double() - truth).abs().max().item() for x in (got, want))
        limit = 2 * base + 0.5 * torch.finfo(torch.float32).eps * truth.abs().max().item()
        assert err <= limit, f"logits error {err:.3g} > {limit:.3g} (unpatched fp32: {base:.3g})"

    @section("training")
    def _():
        torch.manual_seed(2)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config).train()
        unpatched, truth = copy.deepcopy(model), copy.deepcopy(model).double()
        ids = torch.randint(0, 128, (2, 7))
        mapping = {"rotary_pos_emb": {"cpu": LocalLayerRepository(repo_path=repo,
                                                                  layer_name="apply_rotary_transformers")}}
        with use_kernel_mapping(mapping):  # a mode that needs has_backward and can_torch_compile
            model = kernelize(model, device="cpu", mode=Mode.TRAINING | Mode.TORCH_COMPILE)
        _, ops = ops_run(lambda: model(ids, labels=ids).loss.backward())
        assert ops == [build + "::rope"], f"the hub layer did not run (ops seen: {ops})"
        for m in (unpatched, truth):
            m(ids, labels=ids).loss.backward()
        for (name, p), u, t in zip(model.named_parameters(), unpatched.parameters(), truth.parameters()):
            err, base = ((g.double() - t.grad).abs().max().item() for g in (p.grad, u.grad))
            limit = 2 * base + 0.5 * torch.finfo(torch.float32).eps * t.grad.abs().max().item()
            assert err <= limit, f"grad of {name}: error {err:.3g} > {limit:.3g} (unpatched fp32: {base:.3g})"

    def reference(q, k, cos, sin):  # HF's partial-rotary function (Phi-3, GPT-NeoX), unsqueeze_dim=1
        cos, sin, R = cos.unsqueeze(1), sin.unsqueeze(1), cos.shape[-1]
        def rot(x):
            xr, xp = x[..., :R], x[..., R:]
            half = torch.cat((-xr[..., R // 2:], xr[..., : R // 2]), dim=-1)
            return torch.cat((xr * cos + half * sin, xp), dim=-1)
        return rot(q), rot(k)

    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)  # GQA, head_dim 16
    angle = torch.arange(5.0)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    emb = torch.cat((angle, angle), dim=-1)[None]  # [1, S, R = 8]: partial rotary, R < D
    cos, sin = emb.cos(), emb.sin()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    layer = get_local_kernel(repo).layers.apply_rotary_transformers()

    def grads(fn, q, k):
        q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
        qo, ko = fn(q, k)
        torch.autograd.backward((qo, ko), (gq.to(qo.dtype), gk.to(ko.dtype)))
        return qo.detach(), ko.detach(), q.grad, k.grad

    @section("gradients")
    def _():
        (qo, ko, dq, dk), ops = ops_run(lambda: grads(lambda a, b: layer(a, b, cos, sin), q, k))
        assert ops == [build + "::rope"], ops
        want = grads(lambda a, b: reference(a, b, cos.double(), sin.double()), q.double(), k.double())
        for o, w, name in zip((qo, ko, dq, dk), want, ("q", "k", "dq", "dk")):
            assert o.dtype == torch.float32, (name, o.dtype)
            torch.testing.assert_close(o, w.float(), msg=name)
        assert torch.equal(qo[..., 8:], q[..., 8:]), "the channels past R pass through"

    @section("inductor")
    def _():
        compiled = torch.compile(lambda a, b, c, s: layer(a, b, c, s), backend="inductor", fullgraph=True)
        got = grads(lambda a, b: compiled(a, b, cos, sin), q, k)
        want = grads(lambda a, b: layer(a, b, cos, sin), q, k)
        for o, w, name in zip(got, want, ("q", "k", "dq", "dk")):
            torch.testing.assert_close(o, w, rtol=0, atol=0, msg=name)

    results["posenc_kernels imported"] = "posenc_kernels" in sys.modules
    print(json.dumps(results))
    '''
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("hub")
    assert hub.main([str(out)]) == 0  # the command users run: python -m posenc_kernels.hub OUTDIR
    return out


@pytest.fixture(scope="module")
def build_id(repo):
    return json.loads((repo / "build" / "torch-universal" / "metadata.json").read_text())["id"]


@pytest.fixture(scope="module")
def user_run(repo, build_id, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cwd = tmp_path_factory.mktemp("elsewhere")  # not the checkout: the package is not on the path by cwd
    proc = subprocess.run([sys.executable, "-c", USER_SCRIPT, str(repo), build_id], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_repository_layout(repo, build_id):
    variant = repo / "build" / "torch-universal"
    meta = kernels.Metadata.read_from_file(variant / "metadata.json")  # kernels' own parser
    assert str(meta.name) == "posenc-rotary" and meta.python_depends == []
    assert build_id.startswith("posenc_rotary_")
    pkg = variant / "posenc_rotary"
    # Vendored verbatim: one definition of the math (only the namespace line of the registry differs).
    for rel in ("ops/rope/kernel.py", "ops/rope/torch_impl.py", "integrations/hf.py", "layers.py"):
        assert (pkg / rel).read_text() == (hub._package_dir() / rel).read_text(), rel
    assert f'NAMESPACE = "{build_id}"' in (pkg / "ops" / "registry.py").read_text()
    assert not (pkg / "ops" / "sinusoidal").exists()  # only the RoPE family travels


@pytest.mark.slow  # a subprocess that imports transformers and compiles with inductor
@pytest.mark.parametrize("check", ["logits", "training", "gradients", "inductor"])
def test_kernelized_without_posenc_kernels(user_run, check):
    assert user_run[check] == "ok", user_run[check]
    assert user_run["posenc_kernels imported"] is False


def test_beside_installed_package(repo, build_id):
    """The hub copy and posenc_kernels in one process: separate op namespaces, the same results."""
    mod = kernels.get_local_kernel(repo)
    assert mod.BUILD_ID == build_id and mod.__name__ == build_id
    assert hasattr(torch.ops.posenc, "rope") and hasattr(getattr(torch.ops, build_id), "rope")
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16)
    freqs = torch.arange(5.0)[:, None] * 0.5 ** torch.arange(6.0)
    emb = torch.cat((freqs, freqs), -1)[None]
    with torch.profiler.profile() as prof:
        ours = hf_int.apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
        theirs = mod.layers.apply_rotary_transformers()(q, k, emb.cos(), emb.sin())
    names = {e.name for e in prof.events()}
    assert {"posenc::rope", f"{build_id}::rope"} <= names, sorted(n for n in names if "rope" in n)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert kernels.get_local_kernel(repo) is mod  # a second load reuses the imported build


def test_build_id_follows_the_sources(tmp_path):
    sources = hub.vendored_sources()
    base = hub.build_id(sources, pk.__version__)
    assert hub.build_id(dict(sources), pk.__version__) == base
    changed = dict(sources, **{"ops/rope/kernel.py": sources["ops/rope/kernel.py"] + "\n"})
    assert hub.build_id(changed, pk.__version__) != base
    assert hub.build_id(sources, "9.9.9") != base


def test_refuses_a_foreign_folder(tmp_path, capsys):
    variant = tmp_path / "build" / "torch-universal"
    variant.mkdir(parents=True)
    (variant / "keep.txt").write_text("not ours")
    assert hub.main([str(tmp_path)]) == 2
    assert "outdir" in capsys.readouterr().err and (variant / "keep.txt").is_file()
