"""posenc_kernels.integrations.hf.patch on tiny, randomly initialised HF models (no download).

For every supported architecture: the patched model's logits and parameter gradients against the float64
unpatched model (the truth) are within 2x the unpatched model's own error in the same dtype; greedy
generation with a KV cache gives the same tokens; the kernel path really runs (a spy counts kernel calls,
so a silent fallback to HF's math would fail); and unpatch restores HF's functions. One model also runs
under torch.compile.
"""

import importlib

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.integrations import hf as hf_int

from conftest import assert_dtype_tolerance

transformers = pytest.importorskip("transformers")

COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def _phi3_config():
    # Partial rotary (half of head_dim 16 = 8 channels) with longrope: short/long factors of R/2 = 4 entries;
    # original_max 8 < the test lengths, so the long factors and attention_scaling != 1 are exercised.
    rope = {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.1, 1.3, 1.7], "long_factor": [1.0, 2.0, 4.0, 8.0],
        "original_max_position_embeddings": 8,
    }  # fmt: skip
    return transformers.Phi3Config(**COMMON, rope_parameters=rope, original_max_position_embeddings=8)


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=16),
    # QK-norm models (the fused qk_norm_rope path): Gemma 3 with a sliding and a full layer (two rope
    # parameter sets through one rotary module), OLMo 2 with its norm over all heads.
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON, head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=4
    ),
    "olmo2": lambda: transformers.Olmo2Config(**COMMON),
    "phi3": _phi3_config,
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=64, rotary_pct=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),  # fmt: skip
    "gptj": lambda: transformers.GPTJConfig(
        n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=128, n_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),  # fmt: skip
}
ARCHS = list(CONFIGS)
assert set(ARCHS) == set(hf_int.SUPPORTED_ARCHITECTURES)


def build(arch, dtype=torch.float32):
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return model


def hf_function(arch):
    mod_name, fn_name, _ = hf_int.SUPPORTED_ARCHITECTURES[arch]
    return getattr(importlib.import_module(mod_name), fn_name)


@pytest.fixture(autouse=True)
def _never_leak_a_patch():
    originals = {a: hf_function(a) for a in ARCHS}
    yield
    hf_int.unpatch()
    for a in ARCHS:
        assert hf_function(a) is originals[a], f"{a}: patch leaked out of the test"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the kernel calls the HF entry points make (a fallback to HF's math makes none; the QK-norm
    models make one fused call per layer and no other)."""
    calls = []
    for name in ("_rope_out", "apply_rope_", "_qk_norm_rope_call", "_inplace_fast"):
        real = getattr(hf_int, name)

        def spy(*a, _real=real, _name=name, **kw):
            out = _real(*a, **kw)
            if _name != "_inplace_fast" or out:  # the in-place fast path counts when it ran the op
                calls.append(1)
            return out

        monkeypatch.setattr(hf_int, name, spy)
    return calls


def forward_backward(model, ids, upstream):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.double() * upstream).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def inputs(B=2, S=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (B, S), generator=g)
    upstream = torch.randn(B, S, 128, generator=g, dtype=torch.float64)
    return ids, upstream


def norm_err(x, truth):
    return (x.double() - truth).norm().item()


# fp32: every architecture. bf16: one model per rotary variant (full, partial + longrope, partial, interleaved).
MODEL_CASES = [(a, torch.float32) for a in ARCHS]
MODEL_CASES += [(a, torch.bfloat16) for a in ("llama", "phi3", "gpt_neox", "gptj")]


@pytest.mark.parametrize("arch,dtype", MODEL_CASES, ids=[f"{a}-{str(d)[6:]}" for a, d in MODEL_CASES])
def test_patched_model_matches(backend, arch, dtype, kernel_calls):
    ids, upstream = inputs()
    truth_logits, truth_grads = forward_backward(build(arch, torch.float64), ids, upstream)
    model = build(arch, dtype)
    hf_logits, hf_grads = forward_backward(model, ids, upstream)
    with hf_int.patch(model) as handle:
        assert handle.architectures == (arch,)
        assert hf_function(arch) is hf_int.SUPPORTED_ARCHITECTURES[arch][2]
        logits, grads = forward_backward(model, ids, upstream)
    # One call per layer (GPT-J: one for q, one for k per layer), never the fallback.
    assert len(kernel_calls) == 2 * (2 if arch == "gptj" else 1), kernel_calls
    assert_dtype_tolerance(logits, truth_logits, hf_logits, what=f"{arch} logits")
    assert grads.keys() == hf_grads.keys()
    fused = arch in hf_int._QK_NORM
    for name in grads:
        if dtype == torch.float32 and not fused:
            assert_dtype_tolerance(grads[name], truth_grads[name], hf_grads[name], what=f"{arch} grad {name}")
        else:
            # bf16 gradients through two layers: single elements are dominated by chaotic rounding paths, so
            # the rule is applied to the error norm of each gradient tensor (2x HF's own + 1/256 of the norm).
            # The same holds in fp32 for the QK-norm models, whose fused backward sums RMSNorm's reductions in
            # another (fixed) order than autograd: there the floor is 2**-20 of the norm.
            ours, base = norm_err(grads[name], truth_grads[name]), norm_err(hf_grads[name], truth_grads[name])
            floor = 2.0**-20 if dtype == torch.float32 else 1 / 256
            limit = 2 * base + truth_grads[name].norm().item() * floor
            assert ours <= limit, f"{arch} grad {name}: error norm {ours:.3g} > 2 x HF's {base:.3g} + {floor:.3g} norm"


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_generation_is_identical(backend, arch, kernel_calls):
    model = build(arch)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        with hf_int.patch(architectures=[arch]):
            got = model.generate(ids, **kw)
    assert len(kernel_calls) >= 6 * 2, "every decoding step must run the kernels"
    assert torch.equal(got, want), (got, want)


def test_patch_api():
    h1 = hf_int.patch(architectures="llama")
    h2 = hf_int.patch(architectures=["llama", "gptj"])
    assert hf_function("llama") is hf_int.apply_rotary_pos_emb
    assert hf_function("gptj") is hf_int.apply_rotary_pos_emb_gptj
    h1.unpatch()
    assert hf_function("llama") is hf_int.apply_rotary_pos_emb, "still patched while h2 is active"
    h2.unpatch()
    h2.unpatch()  # idempotent
    assert hf_function("llama") is not hf_int.apply_rotary_pos_emb and "undone" in repr(h2)
    everything = hf_int.patch()
    assert set(everything.architectures) == set(ARCHS)
    hf_int.unpatch()
    assert not everything.active
    with pytest.raises(ValueError, match="^architectures: unknown architecture 'bert'"):
        hf_int.patch(architectures=["llama", "bert"])
    assert hf_function("llama") is not hf_int.apply_rotary_pos_emb, "a failed patch must install nothing"
    with pytest.raises(TypeError, match="not both"):
        hf_int.patch(torch.nn.Linear(2, 2), architectures="llama")
    with pytest.raises(ValueError, match="contains no module of a supported architecture"):
        hf_int.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="^model must be"):
        hf_int.patch("llama")


def test_unpatch_leaves_a_later_replacement(monkeypatch):
    mod = importlib.import_module(hf_int.SUPPORTED_ARCHITECTURES["qwen2"][0])
    original = mod.apply_rotary_pos_emb
    h = hf_int.patch(architectures="qwen2")

    def someone_else(*a, **k):
        return original(*a, **k)

    mod.apply_rotary_pos_emb = someone_else
    with pytest.warns(RuntimeWarning, match="replaced by someone else"):
        h.unpatch()
    assert mod.apply_rotary_pos_emb is someone_else
    mod.apply_rotary_pos_emb = original


@pytest.mark.slow
def test_patched_model_under_torch_compile(backend, kernel_calls):
    """Llama, patched, under torch.compile(fullgraph=True): logits match the eager unpatched model."""
    torch._dynamo.reset()
    model = build("llama")
    ids, _ = inputs(B=2, S=7)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        truth = build("llama", torch.float64)(input_ids=ids).logits
        with hf_int.patch(model):
            compiled = torch.compile(model, fullgraph=True)
            got = compiled(input_ids=ids).logits
    assert kernel_calls, "the patched function must be traced"
    assert_dtype_tolerance(got, truth, want, what="compiled llama logits")
    torch._dynamo.reset()


# Every rope type of HF's rotary modules through the patched rotary path (inv_freq + positions): the module's
# frequency update (dynamic, longrope) still runs, attention_scaling (yarn, longrope) reaches the op. The
# sequence (11 prompt + 8 new tokens = 19) passes max_position_embeddings / original_max 16, so dynamic grows
# its frequencies and longrope switches to its long factors mid-generation. What is tested is the patch's
# rotary path, so one backend runs (torch: the kernels are compared per backend by the tests above).
ROPE_TYPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0, 2.5],
                 "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}  # fmt: skip


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_patched_rope_types(rope_type, kernel_calls):
    rope = {"rope_theta": 10000.0, **ROPE_TYPES[rope_type]}
    common = {**COMMON, "max_position_embeddings": 16}
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**common, rope_parameters=rope)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    long_ids = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad(), pk.use_backend("torch"):
        want_tokens = model.generate(ids, **kw)
        want_logits = model(long_ids).logits
        rotary = model.model.rotary_emb
        with hf_int.patch(model):
            angles = rotary(model.model.embed_tokens(long_ids), torch.arange(19)[None])
            assert isinstance(angles, hf_int.RotaryAngles)
            got_logits = model(long_ids).logits
            got_tokens = model.generate(ids, **kw)
        hf_cos, hf_sin = rotary(model.model.embed_tokens(long_ids), torch.arange(19)[None])
    assert len(kernel_calls) >= 2 * 9, "every forward must run the kernel"
    # the patched module still hands HF's own tensors to whoever asks
    torch.testing.assert_close(angles.cos_sin(), (hf_cos, hf_sin), rtol=0, atol=0)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens), (got_tokens, want_tokens)


def test_rotary_angles_fall_back_to_hf_tensors():
    """A RotaryAngles reaching the drop-in with inputs HF's attention would not pass (promotion to another
    dtype) gives HF's result through HF's own cos/sin."""
    model = build("llama")
    x = torch.randn(2, 5, 64)
    q, k = torch.randn(2, 4, 5, 16, dtype=torch.float64), torch.randn(2, 2, 5, 16, dtype=torch.float64)
    with hf_int.patch(model):
        angles = model.model.rotary_emb(x, torch.arange(5)[None])
        got = hf_int.apply_rotary_pos_emb(q, k, angles, angles)
    cos, sin = angles.cos_sin()
    want = hf_function("llama")(q, k, cos, sin)
    assert got[0].dtype == want[0].dtype == torch.float64
    torch.testing.assert_close(got, want)


def test_patched_qk_norm_model_under_torch_compile(kernel_calls):
    """Qwen3, patched, under torch.compile(fullgraph=True, aot_eager): the traced attention takes the fused
    op with HF's cos/sin (the rotary module returns tensors when compiling); logits and gradients match the
    eager unpatched model."""
    torch._dynamo.reset()
    ids, upstream = inputs(B=2, S=7)
    upstream = upstream[:, :7]
    truth_logits, truth_grads = forward_backward(build("qwen3", torch.float64), ids, upstream)
    model = build("qwen3")
    hf_logits, hf_grads = forward_backward(model, ids, upstream)
    with hf_int.patch(model):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        logits, grads = forward_backward(compiled, ids, upstream)
    torch._dynamo.reset()
    grads = {n.removeprefix("_orig_mod."): g for n, g in grads.items()}
    assert grads.keys() == hf_grads.keys()
    assert kernel_calls, "the fused op must be traced"
    assert_dtype_tolerance(logits, truth_logits, hf_logits, what="compiled qwen3 logits")
    for name in grads:
        ours, base = norm_err(grads[name], truth_grads[name]), norm_err(hf_grads[name], truth_grads[name])
        assert ours <= 2 * base + truth_grads[name].norm().item() * 2.0**-20, name
