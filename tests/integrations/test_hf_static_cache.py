"""HF's static cache (``generate(..., cache_implementation="static")``) through the patched attention: RoPE
(Qwen3: QK-norm + RoPE) and the cache write in one call of ``posenc::rope_and_cache_``, into the
``StaticLayer``'s own tensors.

Checked, on tiny random-weight models: greedy tokens identical to the unpatched model's, logits and the
final cache contents within the tolerance rule of the float64 unpatched model (2x the fp32 unpatched
model's own error, in ulps), the fused call bit for bit the rotation op followed by HF's update on the same
backend; the profiler sees the fused op and neither a separate rotation op nor HF's ``index_copy_``; under
``torch.compile(fullgraph=True)`` (HF's compiled decoding) the traced in-place op writes the cache with no
whole-cache copy; sliding-window layers, gradient recording and caches the op cannot take go to HF's update.
"""

import collections
import contextlib

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.integrations import hf as hf_int

from conftest import assert_dtype_tolerance

transformers = pytest.importorskip("transformers")
from transformers import CompileConfig, StaticCache  # noqa: E402

COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    # the same code path: plain RoPE (Mistral, Qwen2, Gemma) and QK-norm (OLMo 2 over all heads, Gemma 3 with
    # a sliding layer, which HF's update keeps, and a full one)
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=16),
    "olmo2": lambda: transformers.Olmo2Config(**COMMON),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON, head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=4
    ),
}
SLIDING = lambda: transformers.MistralConfig(**COMMON, sliding_window=4)  # noqa: E731  (every layer sliding)
NEW = 6
GEN = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, cache_implementation="static",
           return_dict_in_generate=True, output_logits=True)  # fmt: skip
ROTATION_OPS = ("posenc::rope_", "posenc::qk_norm_rope_", "posenc::rope", "posenc::qk_norm_rope")


def build(arch, dtype=torch.float32):
    torch.manual_seed(0)
    config = CONFIGS[arch]() if arch in CONFIGS else SLIDING()
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


def prompt(B=2, S=5, seed=2):
    return torch.randint(3, 128, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _restore():
    yield
    hf_int.unpatch()
    hf_int.set_cache_write("auto")


def cache_tensors(out):
    return [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]


def op_counts(prof):
    return collections.Counter(e.name for e in prof.events() if e.name.startswith(("posenc::", "aten::index_copy")))


def generate(model, ids, mode=None, patched=True, new=NEW, **kw):
    """greedy generate (patched with cache-write ``mode``, or unpatched) and the profiler's op counts."""
    kw = {**GEN, "max_new_tokens": new, "min_new_tokens": new, **kw}
    with torch.no_grad(), torch.profiler.profile() as prof:
        if patched:
            hf_int.set_cache_write(mode)
            with hf_int.patch(model):
                out = model.generate(ids, **kw)
        else:
            out = model.generate(ids, **kw)
    return out, op_counts(prof)


def left_padded(B=2, S=5, pad=2):
    """A batch whose second sequence is left-padded by ``pad`` tokens, and its attention mask."""
    ids, mask = prompt(B, S), torch.ones(B, S, dtype=torch.int64)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


def truth_of(arch, sequences, max_len):
    """The float64 unpatched model's logits and static cache for generated sequences without padding (one
    forward; in float64 HF's padding mask turns a padded query row into NaN)."""
    model = build(arch, torch.float64)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad():
        out = model(sequences[:, :-1], cache=cache, use_cache=True)
    return out.logits, [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_static_cache_generate(arch):
    """The fused write: tokens identical to the unpatched model's; logits and every cache tensor within the
    tolerance rule of the float64 model; one rope_and_cache_ per layer and step, nothing else."""
    model, ids = build(arch), prompt()
    want, _ = generate(model, ids, patched=False)
    got, ops = generate(model, ids, "fused")
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    steps, layers = NEW, COMMON["num_hidden_layers"]
    assert ops["posenc::rope_and_cache_"] == steps * layers, ops
    assert not any(ops[n] for n in ROTATION_OPS + ("aten::index_copy_",)), ops
    truth_logits, truth_cache = truth_of(arch, got.sequences, got.sequences.shape[1] - 1)
    S = ids.shape[1]
    for t, (ours, hf) in enumerate(zip(got.logits, want.logits)):
        assert_dtype_tolerance(ours, truth_logits[:, S - 1 + t], hf, what=f"{arch} logits of step {t}")
    for i, (ours, hf, truth) in enumerate(zip(cache_tensors(got), cache_tensors(want), truth_cache)):
        assert ours.shape == hf.shape == truth.shape
        assert_dtype_tolerance(ours, truth, hf, what=f"{arch} cache layer {i // 2} {'kv'[i % 2]}")
    # the first layer's values come straight from the embeddings: written bit for bit as HF writes them
    assert torch.equal(cache_tensors(got)[1], cache_tensors(want)[1])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_write_is_rotation_then_hf_update(arch):
    """On one backend the fused call is bit for bit the rotation op followed by HF's StaticLayer.update:
    same tokens, logits and cache contents as the patched model with the cache write left to HF. A
    left-padded batch: per-sequence RoPE positions, cache rows shared by the batch."""
    model, (ids, mask) = build(arch), left_padded()
    want, _ = generate(model, ids, patched=False, attention_mask=mask)
    with pk.use_backend("torch"):
        fused, ops = generate(model, ids, "fused", attention_mask=mask)
        split, split_ops = generate(model, ids, "hf", attention_mask=mask)
    assert ops["posenc::rope_and_cache_"] and not split_ops["posenc::rope_and_cache_"], (ops, split_ops)
    assert split_ops["aten::index_copy_"] == 2 * (NEW * COMMON["num_hidden_layers"]), split_ops
    assert torch.equal(fused.sequences, want.sequences), (fused.sequences, want.sequences)
    assert torch.equal(fused.sequences, split.sequences)
    for a, b in zip(fused.logits, split.logits):
        assert torch.equal(a, b)
    for a, b in zip(cache_tensors(fused), cache_tensors(split)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma", "olmo2", "gemma3"])
def test_fused_static_cache_other_architectures(arch):
    """Every attention the patch restates takes the same path; Gemma 3's sliding layer keeps HF's update
    (StaticSlidingWindowLayer), its full layer is fused."""
    model, ids = build(arch), prompt(B=1, S=4)
    want, _ = generate(model, ids, patched=False, new=3)
    got, ops = generate(model, ids, "fused", new=3)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    fused_layers = 1 if arch == "gemma3" else COMMON["num_hidden_layers"]
    assert ops["posenc::rope_and_cache_"] == 3 * fused_layers, ops
    for ours, hf in zip(got.logits, want.logits):
        torch.testing.assert_close(ours, hf, rtol=1e-4, atol=1e-5)


def test_auto_mode_takes_the_fused_op_where_it_has_a_kernel():
    """``auto`` fuses where the op's backend for the device is a kernel (Triton, native C++), not where it
    would run its pure-torch composite; ``fused``/``hf`` force one way; bad modes are refused."""
    spec = pk.ops.registry.spec("rope_and_cache_")
    assert hf_int.get_cache_write() == "auto"
    assert hf_int._fuse_cache_write("cpu") == (pk.ops.registry.backend_for(spec, "cpu") != "torch")
    with pk.use_backend("torch"):
        assert not hf_int._fuse_cache_write("cpu")
    with pk.use_backend("triton"):  # forced where the fused op may have no Triton kernel: never an error here
        triton_here = "triton" in spec.impls and pk.interpreter_enabled()
        assert hf_int._fuse_cache_write("cpu") == triton_here
    with pk.use_backend("torch"):
        hf_int.set_cache_write("fused")
        assert hf_int._fuse_cache_write("cpu")
    hf_int.set_cache_write("hf")
    assert not hf_int._fuse_cache_write("cpu")
    with pytest.raises(ValueError, match="^mode must be one of"):
        hf_int.set_cache_write("always")
    # whichever way auto goes, generation is HF's
    model, ids = build("qwen3"), prompt(B=1, S=4)
    want, _ = generate(model, ids, patched=False, new=3)
    got, ops = generate(model, ids, "auto", new=3)
    assert torch.equal(got.sequences, want.sequences)
    fused = hf_int._fuse_cache_write("cpu")
    assert (ops["posenc::rope_and_cache_"] > 0) == fused and (ops["posenc::qk_norm_rope_"] > 0) != fused, ops
    if pk.interpreter_enabled():  # Triton forced: the rotation op has a Triton kernel, the write follows it
        with pk.use_backend("triton"):
            got, _ = generate(model, ids, "auto", new=3)
        assert torch.equal(got.sequences, want.sequences)


def test_fallbacks_to_hf_update():
    """HF's update runs (no fused call, HF's results) for a sliding-window cache, under autocast, for a
    forward that records gradients, for a cache whose tensors have another dtype than the activations and for
    an offloading cache."""
    hf_int.set_cache_write("fused")
    # sliding window: every layer is a StaticSlidingWindowLayer
    model, ids = build("mistral-sliding"), prompt(B=1, S=6)
    want, _ = generate(model, ids, patched=False, new=3)
    got, ops = generate(model, ids, "fused", new=3)
    assert type(got.past_key_values.layers[0]).__name__ == "StaticSlidingWindowLayer"
    assert torch.equal(got.sequences, want.sequences) and not ops["posenc::rope_and_cache_"], ops
    # autocast: the patched attention leaves the whole step to HF
    model, ids = build("llama"), prompt(B=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = generate(model, ids, patched=False, new=3)
        got, ops = generate(model, ids, "fused", new=3)
    assert torch.equal(got.sequences, want.sequences) and not ops["posenc::rope_and_cache_"], ops
    # gradients: the op writes buffers and refuses autograd, so the differentiable rotation and HF's update run
    model = build("qwen3")
    cache = StaticCache(config=model.config, max_cache_len=8)
    with hf_int.patch(model), torch.profiler.profile() as prof:
        logits = model(ids, cache=cache, use_cache=True).logits
    logits.sum().backward()
    assert not op_counts(prof)["posenc::rope_and_cache_"]
    assert model.model.layers[0].self_attn.q_norm.weight.grad is not None
    # a cache allocated in another dtype: HF's update (whose own error, here index_copy_'s, is what the user sees)
    layer = transformers.cache_utils.StaticLayer(max_cache_len=8)
    k = torch.zeros(1, 3, 2, 16)
    layer.lazy_initialization(k.transpose(1, 2).double(), k.transpose(1, 2).double())
    cache = transformers.cache_utils.Cache(layers=[layer])
    classes = hf_int._static_cache_classes()
    assert hf_int._static_layer(cache, 0, k, k, (k,), classes) is None
    assert hf_int._static_layer(cache, 0, k.double(), k.double(), (k,), classes) is layer
    cache.offloading = True
    assert hf_int._static_layer(cache, 0, k.double(), k.double(), (k,), classes) is None
    for patched in (False, True):  # the unpatched model fails on it too
        with torch.no_grad(), hf_int.patch(model) if patched else contextlib.nullcontext():
            with pytest.raises(RuntimeError):
                model(ids, cache=_cache_of_dtype(model, torch.float64), use_cache=True)


def _cache_of_dtype(model, dtype):
    cache = StaticCache(config=model.config, max_cache_len=8)
    cache.early_initialization(1, model.config.num_key_value_heads, model.config.head_dim, dtype, torch.device("cpu"))
    return cache


@pytest.mark.slow
@pytest.mark.parametrize("arch,backend_name", [("qwen3", "inductor"), ("llama", "aot_eager")])
def test_fused_static_cache_under_torch_compile(arch, backend_name):
    """HF's compiled decoding (``compile_config``: the decode steps through ``torch.compile(fullgraph=True)``)
    with the patched attention: the traced in-place op writes the cache; tokens identical to the unpatched
    eager model, caches within the tolerance rule of the float64 model. With inductor the functionalised op
    is re-inplaced: no whole-cache copy runs (aot_eager, which has no such pass, copies the result back)."""
    torch._dynamo.reset()
    model, ids = build(arch), prompt()
    want, _ = generate(model, ids, patched=False)
    cc = CompileConfig(fullgraph=True, dynamic=False, backend=backend_name, mode="default")
    cc._compile_all_devices = True  # HF compiles on accelerators only unless asked
    hf_int.set_cache_write("fused")
    try:
        with torch.no_grad(), hf_int.patch(model):
            model.generate(ids, compile_config=cc, **GEN)  # compiles
            with torch.profiler.profile(record_shapes=True) as prof:
                got = model.generate(ids, compile_config=cc, **GEN)
    finally:
        torch._dynamo.reset()
    assert hasattr(model, "_compiled_call"), "HF did not take its compiled decoding path"
    events = [e for e in prof.events()]
    compiled = sum(e.name.startswith("Torch-Compiled Region") for e in events)
    assert compiled == NEW - 1, f"{compiled} compiled decode steps (want {NEW - 1}: the prefill runs eager)"
    ops = collections.Counter(e.name for e in events)
    assert ops["posenc::rope_and_cache_"] == NEW * COMMON["num_hidden_layers"], ops
    cache_shape = tuple(cache_tensors(got)[0].shape)
    copies = [e.name for e in events if e.name in ("aten::copy_", "aten::clone", "aten::index_copy_", "aten::index_put_")
              and any(tuple(s) == cache_shape for s in e.input_shapes if s)]  # fmt: skip
    if backend_name == "inductor":
        assert not copies, f"the compiled graph copies whole caches: {collections.Counter(copies)}"
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    _, truth_cache = truth_of(arch, got.sequences, got.sequences.shape[1] - 1)
    for i, (ours, hf, truth) in enumerate(zip(cache_tensors(got), cache_tensors(want), truth_cache)):
        assert_dtype_tolerance(ours, truth, hf, what=f"compiled {arch} cache layer {i // 2} {'kv'[i % 2]}")
