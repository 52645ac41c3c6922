"""Model level: a patched HF model against the unpatched one, greedy ``generate`` in the same run.

    python -m pytest benchmarks/bench_model.py -s -p no:cacheprovider --benchmark-json=bench-results/model.json
    python benchmarks/bench_model.py            # the same figures, printed, without pytest

Tiny random-weight models (hidden 512, 4 layers, 8 query / 2 kv heads of 64, intermediate 1024, vocab
2048; fp32), CPU, one thread (``torch.set_num_threads(1)``), batch 1, a 16-token prompt, 32 new tokens
(greedy, dynamic KV cache, no EOS stop). ``hf_eager`` is the model as HF runs it (eager attention);
``posenc`` the same model under :func:`posenc_kernels.integrations.hf.patch`. The two are timed
**interleaved**: round ``i`` runs both (order alternating per round), so machine load drifts through both
alike; the figure is the median over rounds, and the ratio of medians is the one to quote. Each row also
says whether the generated tokens are identical.

The drop-in's decode call: ``hf.apply_rotary_pos_emb`` on one token of that model's attention (q ``[1, 8,
1, 64]``, k ``[1, 2, 1, 64]`` as HF's projections make them, HF's cos/sin ``[1, 1, 64]``) against the bare
out-of-place ``pk.apply_rope`` it wraps (``[1, 1, H, 64]`` views, the ``[1, 32]`` half tables) and HF's own
function, interleaved the same way (31 rounds of 200 calls, thread CPU time; the drop-in / bare ratio is also
given as the median of per-round ratios).

HF's static cache (``cache_implementation="static"``, a 48-row cache allocated at the prompt): the same
generate with both providers, plus ``posenc_fused``: the patched model with the cache write forced through the
fused op (``hf.set_cache_write("fused")``: RoPE / QK-norm + RoPE and the k/v write in one
``posenc::rope_and_cache_`` call per layer). ``posenc`` is what a user gets (``"auto"``: the fused op where it
has a kernel for the device, else the rotation op and HF's update); the three are interleaved the same way.

Rows carry ``extra_info`` ``family="model"`` (report grouping), ``op``, ``shape``, ``provider``, ``median_us``
and ``ratio_vs_hf_eager`` (hf_eager time / this time: above 1 is faster).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the harness beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

# A CPU benchmark (one thread, the host cost of a step is what it measures): not run on a CUDA machine.
pytestmark = [] if __name__ == "__main__" else __import__("pytest").mark.skipif(
    torch.cuda.is_available(), reason="CPU model-level benchmark (bench_rope.py and the GPU check cover CUDA)"
)

MODELS = ("llama", "qwen3")
NEW_TOKENS, PROMPT = 32, 16
COMMON = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=64, vocab_size=2048, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
SHAPE = "h512 L4 8/2x64 fp32, prompt 16, 32 new tokens, 1 thread"


def build(name: str):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[name]
    torch.manual_seed(0)
    config = cls(**COMMON)
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


CACHES = ("dynamic", "static")


def _generate(model, ids, cache: str = "dynamic"):
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              use_cache=True, pad_token_id=0, **kw)  # fmt: skip


def providers_of(cache: str) -> tuple:
    return ("hf_eager", "posenc", "posenc_fused") if cache == "static" else ("hf_eager", "posenc")


class _Provider:
    """The model as ``provider`` runs it, inside the block: unpatched, patched, or patched with the static
    cache written by the fused op."""

    def __init__(self, model, provider: str):
        self.model, self.provider, self.handle = model, provider, None

    def __enter__(self):
        from posenc_kernels.integrations import hf

        if self.provider != "hf_eager":
            hf.set_cache_write("fused" if self.provider == "posenc_fused" else "auto")
            self.handle = hf.patch(self.model)
        return self

    def __exit__(self, *exc):
        from posenc_kernels.integrations import hf

        if self.handle is not None:
            self.handle.unpatch()
            hf.set_cache_write("auto")


def measure_generate(name: str, rounds: int = 9, cache: str = "dynamic") -> dict:
    """Median seconds per generate for each provider of ``cache``, interleaved (the order rotates per round);
    each ratio against hf_eager as the median of per-round ratios too; and whether the tokens are identical."""
    model = build(name)
    ids = torch.randint(3, COMMON["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
    providers = providers_of(cache)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    wall = {p: [] for p in providers}
    cpu = {p: [] for p in providers}
    tokens = {}
    try:
        for provider in providers:  # warm-up, every path
            with _Provider(model, provider):
                tokens[provider] = _generate(model, ids, cache)
        for i in range(rounds):
            order = providers[i % len(providers):] + providers[: i % len(providers)]
            for provider in order if i % 2 == 0 else order[::-1]:
                with _Provider(model, provider):
                    c0, t0 = time.thread_time(), time.perf_counter()
                    _generate(model, ids, cache)
                    wall[provider].append(time.perf_counter() - t0)
                    cpu[provider].append(time.thread_time() - c0)
    finally:
        torch.set_num_threads(threads)
    want = tokens["hf_eager"]
    out = {"identical": all(bool(torch.equal(t, want)) for t in tokens.values()), "rounds": rounds,
           "providers": providers}  # fmt: skip
    for kind, t in (("wall", wall), ("cpu", cpu)):
        out[f"{kind}_s"] = {p: statistics.median(v) for p, v in t.items()}
        # each round's runs are adjacent in time: the median of the per-round ratios resists load drift
        per_round = {p: [h / x for h, x in zip(t["hf_eager"], t[p])] for p in providers}
        out[f"{kind}_ratio"] = {p: statistics.median(r) for p, r in per_round.items()}
        out[f"{kind}_ratio_range"] = {p: (min(r), max(r)) for p, r in per_round.items()}
    return out


def measure_dropin_decode(rounds: int = 31, iters: int = 200) -> dict:
    """Median microseconds (thread CPU time) per call: the HF drop-in, the bare op it wraps, HF's function;
    interleaved."""
    import posenc_kernels as pk
    from posenc_kernels.integrations import hf
    from posenc_kernels.reference import hf_apply_rotary_pos_emb

    B, S, Hq, Hk, D = 1, 1, 8, 2, 64
    q = torch.randn(B, S, Hq * D).view(B, S, Hq, D).transpose(1, 2)  # as HF's projections make them
    k = torch.randn(B, S, Hk * D).view(B, S, Hk, D).transpose(1, 2)
    inv = pk.rope_frequencies(D)[0]
    ang = torch.tensor([[[100.0]]]) * inv
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos(), emb.sin()  # HF's rotary output [1, 1, 64]
    qb, kb = q.transpose(1, 2), k.transpose(1, 2)
    tc, ts = cos[0, :, : D // 2], sin[0, :, : D // 2]
    fns = {
        "hf_dropin": lambda: hf.apply_rotary_pos_emb(q, k, cos, sin),
        "apply_rope_bare": lambda: pk.apply_rope(qb, kb, tc, ts),
        "hf_eager": lambda: hf_apply_rotary_pos_emb(q, k, cos, sin),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {p: [] for p in fns}
    try:
        with torch.no_grad():
            for f in fns.values():
                for _ in range(50):
                    f()
            order = list(fns)
            for i in range(rounds):
                for p in order if i % 2 == 0 else order[::-1]:
                    f = fns[p]
                    t0 = time.thread_time()  # CPU time of this thread: time spent descheduled is not counted
                    for _ in range(iters):
                        f()
                    times[p].append((time.thread_time() - t0) / iters)
    finally:
        torch.set_num_threads(threads)
    out = {p: statistics.median(t) * 1e6 for p, t in times.items()}
    # adjacent in time, like measure_generate's rounds: the median of per-round ratios resists load drift
    out["paired_ratio"] = statistics.median(a / b for a, b in zip(times["hf_dropin"], times["apply_rope_bare"]))
    return out


# ---------------------------------------------------------------------------------------------- pytest rows
_GENERATE: dict = {}  # (model, cache) -> measure_generate's result, measured once for all its providers
_DECODE: dict = {}


def _bench_once(benchmark, fn):
    """pytest-benchmark records a row only when its fixture runs: one timed call (its own stats are not the
    figure; the interleaved measurement is)."""
    benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)


def _generate_row(benchmark, model_name, provider, cache):
    from _harness import record

    key = (model_name, cache)
    if key not in _GENERATE:
        _GENERATE[key] = measure_generate(model_name, cache=cache)
    r = _GENERATE[key]
    model = build(model_name)
    ids = torch.randint(3, COMMON["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))

    def fn():
        with _Provider(model, provider):
            _generate(model, ids, cache)

    _bench_once(benchmark, fn)
    ratio = r["wall_s"]["hf_eager"] / r["wall_s"][provider]
    # the summary prints 23 characters of an op: "generate static (qwen3)" keeps the cache and the model visible
    op = f"generate {NEW_TOKENS} tok ({model_name})" if cache == "dynamic" else f"generate {cache} ({model_name})"
    shape = SHAPE if cache == "dynamic" else SHAPE.replace("prompt", f"{cache} cache, prompt")
    record(
        benchmark, op=op, shape=shape, provider=provider, nbytes=0,
        median_us=r["wall_s"][provider] * 1e6, copy_us=0.0, family="model",
        timing=f"wall clock, median of {r['rounds']} rounds interleaved with the other providers",
        cpu_median_us=round(r["cpu_s"][provider] * 1e6, 1), ratio_vs_hf_eager=round(ratio, 4),
        paired_wall_ratio=round(r["wall_ratio"][provider], 4), paired_cpu_ratio=round(r["cpu_ratio"][provider], 4),
        paired_wall_ratio_range=[round(x, 4) for x in r["wall_ratio_range"][provider]],
        tokens_identical=r["identical"], cache=cache,
    )  # fmt: skip


def test_generate(benchmark, model_name, provider):
    _generate_row(benchmark, model_name, provider, "dynamic")


def test_generate_static_cache(benchmark, model_name, static_provider):
    _generate_row(benchmark, model_name, static_provider, "static")


def test_dropin_decode(benchmark, dropin_provider):
    from _harness import record

    if not _DECODE:
        _DECODE.update(measure_dropin_decode())
    us = _DECODE[dropin_provider]
    _bench_once(benchmark, lambda: None)
    record(
        benchmark, op="hf apply_rotary_pos_emb decode", shape="q [1,8,1,64] k [1,2,1,64] fp32, 1 thread",
        provider=dropin_provider, nbytes=0, median_us=us, copy_us=0.0, family="model",
        timing="thread CPU time, median of 31 interleaved rounds of 200 calls",
        ratio_vs_bare_op=round(us / _DECODE["apply_rope_bare"], 4),
        paired_ratio_dropin_vs_bare=round(_DECODE["paired_ratio"], 4),
    )  # fmt: skip


def pytest_generate_tests(metafunc):  # picked up by pytest for this module's tests
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", MODELS)
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", providers_of("dynamic"))
    if "static_provider" in metafunc.fixturenames:
        metafunc.parametrize("static_provider", providers_of("static"))
    if "dropin_provider" in metafunc.fixturenames:
        metafunc.parametrize("dropin_provider", ["hf_dropin", "apply_rope_bare", "hf_eager"])


def main() -> int:
    from _harness import device_name

    print(f"{device_name()}, torch {torch.__version__}; {SHAPE}")
    for cache in CACHES:
        for name in MODELS:
            r = measure_generate(name, cache=cache)
            for kind in ("cpu", "wall"):
                m = r[f"{kind}_s"]
                times = ", ".join(f"{p} {m[p] * 1e3:.1f} ms" for p in r["providers"])
                ratios = "; ".join(
                    f"{p} {r[f'{kind}_ratio'][p]:.3f}x (range {r[f'{kind}_ratio_range'][p][0]:.3f}-"
                    f"{r[f'{kind}_ratio_range'][p][1]:.3f})" for p in r["providers"][1:]
                )  # fmt: skip
                print(f"{name}, {cache} cache ({kind} time): {times}; as fast as hf_eager (median of {r['rounds']} "
                      f"paired rounds): {ratios}; tokens identical: {r['identical']}")  # fmt: skip
    d = measure_dropin_decode()
    print(f"decode call: drop-in {d['hf_dropin']:.1f} us, bare apply_rope {d['apply_rope_bare']:.1f} us "
          f"({d['hf_dropin'] / d['apply_rope_bare']:.2f}x the bare op; median of paired rounds {d['paired_ratio']:.2f}x), "
          f"HF's function {d['hf_eager']:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
