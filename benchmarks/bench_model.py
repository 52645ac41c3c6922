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


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              use_cache=True, pad_token_id=0)  # fmt: skip


def measure_generate(name: str, rounds: int = 9) -> dict:
    """Median seconds per generate, patched and not, interleaved; and whether the tokens are identical."""
    from posenc_kernels.integrations import hf

    model = build(name)
    ids = torch.randint(3, COMMON["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    wall = {"hf_eager": [], "posenc": []}
    cpu = {"hf_eager": [], "posenc": []}
    try:
        want = _generate(model, ids)  # warm-up, both paths
        with hf.patch(model):
            got = _generate(model, ids)
        for i in range(rounds):
            for provider in (("hf_eager", "posenc") if i % 2 == 0 else ("posenc", "hf_eager")):
                handle = hf.patch(model) if provider == "posenc" else None
                c0, t0 = time.thread_time(), time.perf_counter()
                _generate(model, ids)
                wall[provider].append(time.perf_counter() - t0)
                cpu[provider].append(time.thread_time() - c0)
                if handle is not None:
                    handle.unpatch()
    finally:
        torch.set_num_threads(threads)
    out = {"identical": bool(torch.equal(got, want)), "rounds": rounds}
    for kind, t in (("wall", wall), ("cpu", cpu)):
        out[f"{kind}_s"] = {p: statistics.median(v) for p, v in t.items()}
        # each round's two runs are adjacent in time: the median of the per-round ratios resists load drift
        out[f"{kind}_ratio"] = statistics.median(h / p for h, p in zip(t["hf_eager"], t["posenc"]))
        out[f"{kind}_ratio_range"] = (min(h / p for h, p in zip(t["hf_eager"], t["posenc"])),
                                      max(h / p for h, p in zip(t["hf_eager"], t["posenc"])))  # fmt: skip
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
_GENERATE: dict = {}  # model -> measure_generate's result, measured once for both providers
_DECODE: dict = {}


def _bench_once(benchmark, fn):
    """pytest-benchmark records a row only when its fixture runs: one timed call (its own stats are not the
    figure; the interleaved measurement is)."""
    benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)


def test_generate(benchmark, model_name, provider):
    from _harness import record

    if model_name not in _GENERATE:
        _GENERATE[model_name] = measure_generate(model_name)
    r = _GENERATE[model_name]
    model = build(model_name)
    ids = torch.randint(3, COMMON["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
    if provider == "posenc":
        from posenc_kernels.integrations import hf

        def fn():
            with hf.patch(model):
                _generate(model, ids)
    else:
        def fn():
            _generate(model, ids)
    _bench_once(benchmark, fn)
    ratio = r["wall_s"]["hf_eager"] / r["wall_s"][provider]
    record(
        benchmark, op=f"generate {NEW_TOKENS} tok ({model_name})", shape=SHAPE, provider=provider, nbytes=0,
        median_us=r["wall_s"][provider] * 1e6, copy_us=0.0, family="model",
        timing=f"wall clock, median of {r['rounds']} rounds interleaved with the other provider",
        cpu_median_us=round(r["cpu_s"][provider] * 1e6, 1), ratio_vs_hf_eager=round(ratio, 4),
        paired_wall_ratio=round(r["wall_ratio"], 4), paired_cpu_ratio=round(r["cpu_ratio"], 4),
        tokens_identical=r["identical"],
    )  # fmt: skip


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
        metafunc.parametrize("provider", ["hf_eager", "posenc"])
    if "dropin_provider" in metafunc.fixturenames:
        metafunc.parametrize("dropin_provider", ["hf_dropin", "apply_rope_bare", "hf_eager"])


def main() -> int:
    from _harness import device_name

    print(f"{device_name()}, torch {torch.__version__}; {SHAPE}")
    for name in MODELS:
        r = measure_generate(name)
        for kind in ("cpu", "wall"):
            m, lo_hi = r[f"{kind}_s"], r[f"{kind}_ratio_range"]
            print(f"{name} ({kind} time): hf_eager {m['hf_eager'] * 1e3:.1f} ms, posenc {m['posenc'] * 1e3:.1f} ms; "
                  f"patched {r[f'{kind}_ratio']:.3f}x as fast (median of {r['rounds']} paired rounds, range "
                  f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}); tokens identical: {r['identical']}")  # fmt: skip
    d = measure_dropin_decode()
    print(f"decode call: drop-in {d['hf_dropin']:.1f} us, bare apply_rope {d['apply_rope_bare']:.1f} us "
          f"({d['hf_dropin'] / d['apply_rope_bare']:.2f}x the bare op; median of paired rounds {d['paired_ratio']:.2f}x), "
          f"HF's function {d['hf_eager']:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
