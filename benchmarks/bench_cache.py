"""RoPE + KV-cache write benchmarks (issue 19): the fused ``rope_and_cache_`` / ``mla_rope_and_cache_`` (one
launch) against the unfused sequences call sites run today. extra_info family: "cache".

Providers (the summary's baseline is ``posenc_unfused``; ours is ``posenc_fused``):

* ``posenc_fused``: ``pk.rope_and_cache_`` (paged: ``slot_mapping`` + ``positions``; HF static cache:
  ``cache_positions`` + ``offsets``, ``kv_layout="HND"``), or ``pk.mla_rope_and_cache_`` for the MLA shape.
* ``posenc_unfused``: ``pk.apply_rope_`` then the cache write in torch: vLLM's ``reshape_and_cache`` written
  in torch for a paged cache (``index_copy_`` into the ``[num_blocks * block_size, Hk, D]`` view of the cache),
  HF's ``index_copy_`` along the sequence dimension for a contiguous one, MLA's ``concat_and_cache``
  (``cat([kv_c, k_pe])`` then ``index_copy_``); FP8 caches quantise first (``x / scale``, clamped, cast).
* ``hf_eager``: HF's ``apply_rotary_pos_emb`` (transformers' own when it is installed, else the package's
  copy of it) on HF's ``[B, H, S, D]`` view, then the same torch cache write (not for MLA).
* ``hf_static_cache``: ``apply_rotary_pos_emb`` then transformers' ``StaticCache.update`` (a one-layer
  Llama-3-8B-shaped cache, HND ``[B, Hk, S_max, D]``), contiguous bf16 only (HF has no FP8 static cache). Its
  layer's ``cumulative_length`` is set back with one ``fill_`` per call so repeated calls stay in range (one
  one-op aten call more than a model's step: see the ``aten_mul_`` row).
* ``rope_only``: a plain ``pk.apply_rope_`` on the same q/k (the issue's GPU target: a fused decode call
  costs <= 1.2x a plain RoPE call); its bytes are its own (q and k read and written).
* ``copy``: a device-to-device copy of the fused call's byte count: the copy-bandwidth row (the other rows'
  copy% is already against a same-run copy of their own bytes).
* ``aten_mul_`` (decode, 1 token only): ``x.mul_(1.0)``, the one-op host-cost yardstick.

Shapes (the labels: ``llama3 paged 64t bf16`` = Llama-3-8B, paged cache, 64 tokens, bf16 q/k/v and cache;
``... bf16 kv fp8_e4m3``: an FP8 cache): Llama-3-8B (32 q / 8 kv heads x 128) with a paged NHD cache (block
size 16, slots scattered over the cache) and with HF's contiguous static cache (HND); an MLA shape (DeepSeek-V3: 128 heads, q = 128 nope + 64
rope, kv_lora_rank 512 + rope 64, paged latent cache ``[num_blocks, 16, 576]``, interleaved pairs). Decode at
1, 8, 64 and 256 tokens (one token per sequence, each at its own position; static cache: every sequence at
position 100, as HF's ``cache_position`` is shared) and prefill at 4k tokens. Cache dtypes: bf16 and
float8_e4m3fn (scale 0.5 for k and v); activations bf16.

Bytes (minimal traffic): q and k read and written, v read, the cache rows written (k and v, in the cache's
dtype); MLA: q_pe and k_pe read and written, kv_c read, the 576-wide latent rows written. Positions, slots and
tables are not counted. cos/sin are built once outside the timing (HF providers: gathered per token and
duplicated in bf16, as HF's rotary module does once per forward).

Every call runs with the package's default value checks (slot ranges and duplicates, positions): on CUDA
that is a host sync per eager call, part of the figure; under a CUDA graph they are skipped (the GPU check
times the graph). Host cost per call (CUDA) is in each row's ``host_us`` (``_harness.host_us_per_call``).

CPU (2 cores): a short default (decode 1 and 64, prefill 4k, one FP8 and one MLA row, the static cache at
decode 1); ``POSENC_BENCH_FULL=1`` runs the whole grid there too. On a shared, noisy CPU the ratios of
``python benchmarks/bench_cache.py [--rounds N] [--full]`` are steadier: the providers of a case called in
turn, round after round (interleaved), one thread, the median of each, printed as a markdown table. CUDA runs the whole grid. On CPU the fused
op runs the backend the registry picks for it (today the torch implementation: the native kernel has not
landed), while ``apply_rope_`` runs its native C++ kernel: ``backend`` in extra_info names each.
"""

import itertools
import os

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops import registry

from _harness import DEVICE, IS_CUDA, run

DT = torch.bfloat16
FP8 = torch.float8_e4m3fn
SCALE = 0.5
BLOCK = 16
OFFSET = 100  # the static cache's decode position
MAX_POS = 8192
LLAMA = (32, 8, 128, 500000.0)  # Hq, Hk, D, theta
MLA = (128, 128, 64, 512, 10000.0)  # heads, qk_nope, rope dim, kv_lora_rank, theta

SHAPES = ("llama3 paged", "llama3 static HND", "mla paged")  # short: the summary prints 25 characters of a shape
TOKENS = [("decode", 1), ("decode", 8), ("decode", 64), ("decode", 256), ("prefill", 4096)]
CACHE_DTYPES = ("bf16", "fp8_e4m3")
PROVIDERS = ["posenc_fused", "posenc_unfused", "hf_eager", "hf_static_cache", "rope_only", "copy", "aten_mul_"]

_FULL = [(s, t, c) for s, t, c in itertools.product(SHAPES, TOKENS, CACHE_DTYPES)]
if IS_CUDA or os.environ.get("POSENC_BENCH_FULL") == "1":
    CASES = _FULL
else:  # 2-core CPU: the headline cases and one of each other kind, kept few
    P, S_, M = SHAPES
    CASES = [(P, ("decode", 1), "bf16"), (P, ("decode", 64), "bf16"), (P, ("prefill", 4096), "bf16"),
             (P, ("decode", 1), "fp8_e4m3"), (S_, ("decode", 1), "bf16"), (M, ("decode", 1), "bf16")]  # fmt: skip

# The summary's headline shapes: Llama-3-8B paged, bf16 cache, at decode 1 and at prefill.
HEADLINE = {("llama3 paged", ("decode", 1), "bf16"), ("llama3 paged", ("prefill", 4096), "bf16")}

_tables = {}


def _tables_for(dim, theta):
    key = (dim, theta)
    if key not in _tables:
        inv = pk.rope_frequencies(dim, theta)[0].to(DEVICE)
        _tables[key] = pk.rope_cos_sin(MAX_POS, inv)
    return _tables[key]


def _hf_rope():
    """transformers' own apply_rotary_pos_emb when it is installed, else the package's copy of it."""
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb
    except ImportError:
        from posenc_kernels.reference import hf_apply_rotary_pos_emb

        return hf_apply_rotary_pos_emb


def _hf_tables(cos, sin, positions):
    """HF's rotary-module output for ``positions`` ``[B, S]``: ``[B, S, D]`` in the activations' dtype."""
    c, s = cos[positions], sin[positions]
    return torch.cat((c, c), -1).to(DT), torch.cat((s, s), -1).to(DT)


def _quantise(x, dtype):
    """What a cache of ``dtype`` stores (the unfused providers' quantisation, as call sites write it)."""
    if dtype != FP8:
        return x
    fmax = torch.finfo(FP8).max
    return (x.float() / SCALE).clamp(-fmax, fmax).to(FP8)


def _write(cache, dim, index, x, dtype):
    """``cache.index_copy_(dim, index, x)`` after quantising for FP8, through a uint8 view there (as vLLM keeps
    FP8 caches: ``index_copy_`` has no float8 kernel on CPU)."""
    if dtype != FP8:
        cache.index_copy_(dim, index, x)
    else:
        cache.view(torch.uint8).index_copy_(dim, index, _quantise(x, dtype).view(torch.uint8))


def _scales(cache_dtype):
    return dict(k_scale=SCALE, v_scale=SCALE) if cache_dtype == FP8 else {}


def _slots(T, n_slots, phase, g):
    """Decode: one slot per sequence, scattered over the cache; prefill: whole blocks in a shuffled order."""
    if phase == "decode":
        return torch.randperm(n_slots, generator=g)[:T].to(DEVICE)
    blocks = torch.randperm(n_slots // BLOCK, generator=g)[: (T + BLOCK - 1) // BLOCK]
    return (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:T].to(DEVICE)


def _backend(name):
    return registry.backend_for(registry.spec(name), DEVICE.type)


def _llama_paged(phase, T, cache_dtype, provider, g):
    Hq, Hk, D, theta = LLAMA
    cos, sin = _tables_for(D, theta)
    q = torch.randn(T, Hq, D, generator=g).to(DEVICE, DT)
    k = torch.randn(T, Hk, D, generator=g).to(DEVICE, DT)
    v = torch.randn(T, Hk, D, generator=g).to(DEVICE, DT)
    n_slots = max(4096, 2 * T) // BLOCK * BLOCK
    kc = torch.zeros(n_slots // BLOCK, BLOCK, Hk, D, device=DEVICE, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    slots = _slots(T, n_slots, phase, g)
    pos = (torch.randint(0, MAX_POS, (T,), generator=g) if phase == "decode" else torch.arange(T)).to(DEVICE)
    nbytes = 2 * (q.nbytes + k.nbytes) + v.nbytes + 2 * k.numel() * kc.element_size()
    kf, vf = kc.view(-1, Hk, D), vc.view(-1, Hk, D)  # reshape_and_cache's view: [num_blocks * block_size, Hk, D]
    s64 = slots.to(torch.int64)
    info = {}
    if provider == "posenc_fused":
        info["backend"] = _backend("rope_and_cache_")
        fn = lambda: pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, slot_mapping=slots, positions=pos,  # noqa: E731
                                        **_scales(cache_dtype))  # fmt: skip
    elif provider == "posenc_unfused":
        info["backend"] = _backend("rope_")

        def fn():
            pk.apply_rope_(q, k, cos, sin, positions=pos)
            _write(kf, 0, s64, k, cache_dtype)
            _write(vf, 0, s64, v, cache_dtype)
    elif provider == "hf_eager":
        rope = _hf_rope()
        c, s = _hf_tables(cos, sin, pos[None])
        qh, kh = q[None].transpose(1, 2), k[None].transpose(1, 2)  # [1, H, T, D] views of the projection

        def fn():
            qo, ko = rope(qh, kh, c, s)
            _write(kf, 0, s64, ko[0].transpose(0, 1), cache_dtype)
            _write(vf, 0, s64, v, cache_dtype)
            return qo
    elif provider == "rope_only":
        info["backend"] = _backend("rope_")
        nbytes = 2 * (q.nbytes + k.nbytes)
        fn = lambda: pk.apply_rope_(q, k, cos, sin, positions=pos)  # noqa: E731
    else:
        return None
    return fn, nbytes, info


def _llama_static(phase, T, cache_dtype, provider, g):
    Hq, Hk, D, theta = LLAMA
    cos, sin = _tables_for(D, theta)
    B, S = (T, 1) if phase == "decode" else (1, T)
    off = OFFSET if phase == "decode" else 0
    s_max = off + S + (28 if phase == "decode" else 0)  # decode: a 128-row cache (its length costs nothing here)
    q = torch.randn(B, S, Hq, D, generator=g).to(DEVICE, DT)
    k = torch.randn(B, S, Hk, D, generator=g).to(DEVICE, DT)
    v = torch.randn(B, S, Hk, D, generator=g).to(DEVICE, DT)
    kc = torch.zeros(B, Hk, s_max, D, device=DEVICE, dtype=cache_dtype)  # HF's static cache, HND
    vc = torch.zeros_like(kc)
    cpos = torch.arange(off, off + S, device=DEVICE)
    nbytes = 2 * (q.nbytes + k.nbytes) + v.nbytes + 2 * k.numel() * kc.element_size()
    info = {}
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # HF's [B, H, S, D] views
    if provider == "posenc_fused":
        info["backend"] = _backend("rope_and_cache_")
        fn = lambda: pk.rope_and_cache_(q, k, v, kc, vc, cos, sin, cache_positions=cpos, kv_layout="HND",  # noqa: E731
                                        offsets=off, **_scales(cache_dtype))  # fmt: skip
    elif provider == "posenc_unfused":
        info["backend"] = _backend("rope_")

        def fn():
            pk.apply_rope_(q, k, cos, sin, offsets=off)
            _write(kc, 2, cpos, kh, cache_dtype)
            _write(vc, 2, cpos, vh, cache_dtype)
    elif provider in ("hf_eager", "hf_static_cache"):
        rope = _hf_rope()
        c, s = _hf_tables(cos, sin, cpos[None].expand(B, -1))
        if provider == "hf_eager":
            def fn():
                qo, ko = rope(qh, kh, c, s)
                _write(kc, 2, cpos, ko, cache_dtype)
                _write(vc, 2, cpos, vh, cache_dtype)
                return qo
        else:
            if cache_dtype == FP8:
                pytest.skip("HF's StaticCache has no FP8 storage (index_copy_ needs the cache's dtype)")
            cache = _static_cache(B, s_max)
            layer = cache.layers[0]

            def fn():
                layer.cumulative_length.fill_(off)
                qo, ko = rope(qh, kh, c, s)
                return qo, cache.update(ko, vh, 0)
    elif provider == "rope_only":
        info["backend"] = _backend("rope_")
        nbytes = 2 * (q.nbytes + k.nbytes)
        fn = lambda: pk.apply_rope_(q, k, cos, sin, offsets=off)  # noqa: E731
    else:
        return None
    return fn, nbytes, info


def _static_cache(B, s_max):
    """transformers' StaticCache for a one-layer Llama-3-8B-shaped config, allocated up front."""
    try:
        from transformers import LlamaConfig
        from transformers.cache_utils import StaticCache
    except ImportError as e:
        pytest.skip(f"transformers is not installed ({e})")
    Hq, Hk, D, _ = LLAMA
    cfg = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hk, head_dim=D,
                      num_hidden_layers=1, vocab_size=16, intermediate_size=16)  # fmt: skip
    cache = StaticCache(config=cfg, max_cache_len=s_max)
    cache.early_initialization(batch_size=B, num_heads=Hk, head_dim=D, dtype=DT, device=DEVICE)
    return cache


def _mla(phase, T, cache_dtype, provider, g):
    H, nope, R, rank, theta = MLA
    cos, sin = _tables_for(R, theta)
    q = torch.randn(T, H, nope + R, generator=g).to(DEVICE, DT)
    q_pe = q[..., nope:]  # the strided rope slice of q, rotated in place
    k_pe = torch.randn(T, R, generator=g).to(DEVICE, DT)
    kv_c = torch.randn(T, rank, generator=g).to(DEVICE, DT)
    n_slots = max(4096, 2 * T) // BLOCK * BLOCK
    cache = torch.zeros(n_slots // BLOCK, BLOCK, rank + R, device=DEVICE, dtype=cache_dtype)
    slots = _slots(T, n_slots, phase, g)
    pos = (torch.randint(0, MAX_POS, (T,), generator=g) if phase == "decode" else torch.arange(T)).to(DEVICE)
    esz = DT.itemsize
    nbytes = 2 * (T * H * R * esz + k_pe.nbytes) + kv_c.nbytes + T * (rank + R) * cache.element_size()
    cf, s64 = cache.view(-1, rank + R), slots.to(torch.int64)
    scale = dict(scale=SCALE) if cache_dtype == FP8 else {}
    info = {}
    if provider == "posenc_fused":
        info["backend"] = _backend("rope_and_cache_")
        fn = lambda: pk.mla_rope_and_cache_(q_pe, k_pe, kv_c, cache, cos, sin, slot_mapping=slots,  # noqa: E731
                                            positions=pos, **scale)  # fmt: skip
    elif provider == "posenc_unfused":  # rope, then vLLM's concat_and_cache_mla in torch
        info["backend"] = _backend("rope_")

        def fn():
            pk.apply_rope_(q_pe, k_pe[:, None], cos, sin, positions=pos, interleaved=True)
            _write(cf, 0, s64, torch.cat((kv_c, k_pe), -1), cache_dtype)
    elif provider == "rope_only":
        info["backend"] = _backend("rope_")
        nbytes = 2 * (T * H * R * esz + k_pe.nbytes)
        fn = lambda: pk.apply_rope_(q_pe, k_pe[:, None], cos, sin, positions=pos, interleaved=True)  # noqa: E731
    else:
        return None
    return fn, nbytes, info


BUILD = {"llama3 paged": _llama_paged, "llama3 static HND": _llama_static, "mla paged": _mla}


def _case_id(c):
    shape, (phase, n), cdt = c
    return f"{shape.replace(' ', '-')}-{phase}{n}-{cdt}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cache(benchmark, case, provider):
    shape, (phase, n), cdt = case
    cache_dtype = FP8 if cdt == "fp8_e4m3" else DT
    if provider == "aten_mul_" and (phase, n) != ("decode", 1):
        pytest.skip("the host-cost yardstick runs at decode 1 only")
    if provider in ("hf_eager", "hf_static_cache") and shape.startswith("mla"):
        pytest.skip("no HF eager MLA provider here (the unfused torch sequence is the baseline)")
    if provider == "hf_static_cache" and "static" not in shape:
        pytest.skip("HF's StaticCache is a contiguous cache")
    g = torch.Generator().manual_seed(n)
    ref = BUILD[shape](phase, n, cache_dtype, "posenc_fused", g)
    fused_bytes = ref[1]
    info = {}
    if provider == "copy":
        src = torch.empty(max(1, fused_bytes // 2), dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        fn, nbytes = (lambda: dst.copy_(src)), fused_bytes
    elif provider == "aten_mul_":
        x = torch.randn(8, device=DEVICE)
        fn, nbytes = (lambda: x.mul_(1.0)), 0
    else:
        fn, nbytes, info = ref if provider == "posenc_fused" else BUILD[shape](phase, n, cache_dtype, provider, g)
    label = f"{shape} {n}t {'bf16' if cdt == 'bf16' else 'bf16 kv ' + cdt}"  # "4096t": 4096 tokens
    op = ("mla_rope_and_cache_ " if shape.startswith("mla") else "rope_and_cache_ ") + phase
    if case in HEADLINE:
        info["headline"] = True
    with torch.no_grad():
        run(benchmark, fn, op=op, shape=label, provider=provider, nbytes=nbytes, family="cache",
            baseline="posenc_unfused", also=["rope_only", "hf_eager"], cache_dtype=cdt, phase=phase,
            tokens=n, **info)  # fmt: skip


def interleaved(cases, providers, rounds: int):
    """``{(case, provider): median us}``: per case every provider called once per round, in turn."""
    import time

    out = {}
    for case in cases:
        shape, (phase, n), cdt = case
        cache_dtype = FP8 if cdt == "fp8_e4m3" else DT
        fns = {}
        for p in providers:
            if (p == "hf_static_cache" and ("static" not in shape or cache_dtype == FP8)) or (
                    p.startswith("hf") and shape.startswith("mla")):  # fmt: skip
                continue
            built = BUILD[shape](phase, n, cache_dtype, p, torch.Generator().manual_seed(n))
            if built is not None:
                fns[p] = built[0]
        times = {p: [] for p in fns}
        with torch.no_grad():
            for p, fn in fns.items():  # warm-up
                fn()
            for _ in range(rounds):
                for p, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[p].append(time.perf_counter() - t0)
        for p, ts in times.items():
            out[(case, p)] = sorted(ts)[len(ts) // 2] * 1e6
    return out


def main(argv=None) -> int:
    import argparse
    import datetime
    import platform

    ap = argparse.ArgumentParser(description="bench_cache's providers, interleaved, one thread: medians and ratios")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--full", action="store_true", help="every shape and cache dtype (default: Llama-3-8B paged)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = _FULL if args.full else [c for c in _FULL if c[0] == SHAPES[0]]
    provs = ["posenc_fused", "posenc_unfused", "hf_eager", "hf_static_cache", "rope_only"]
    res = interleaved(cases, provs, args.rounds)
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "?"
    print(f"{platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}, "
          f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, load {' '.join(load)}, {args.rounds} interleaved rounds; "
          f"rope_and_cache_ backend: {_backend('rope_and_cache_')}, apply_rope_ backend: {_backend('rope_')}")  # fmt: skip
    print("\n| case | fused us | unfused / fused | hf_eager / fused | hf_static_cache / fused | rope_only / fused |")
    print("|---|---:|---:|---:|---:|---:|")
    for case in cases:
        f = res.get((case, "posenc_fused"))
        cells = [f"{res[(case, p)] / f:.3f}" if (case, p) in res else "-" for p in provs[1:]]
        print(f"| {_case_id(case)} | {f:.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":  # run as a script: its folder (benchmarks/, for _harness) is first on sys.path
    import sys

    sys.exit(main())
