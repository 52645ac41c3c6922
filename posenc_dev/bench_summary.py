"""The benchmark report: what ``scripts/bench`` prints last (a summary of at most 25 lines, readable alone)
and the full table it writes beside the JSON, both from pytest-benchmark's JSON.

    python -m posenc_dev.bench_summary bench-results/benchmarks.json \\
        [--full bench-results/report.md] [--plot bench-results/summary.png] [--load-start 1.7]

Rows are the ``extra_info`` of each benchmark (``benchmarks/_harness.py`` writes ``family``, ``op``,
``shape``, ``provider``, ``median_us``, ``gbps``, ``copy_ratio``, ...). Everything here is generic over the
families and ops present, so a new benchmark file joins the summary by writing rows the same way:

* ``family``: the row's family (derived from ``op`` for rows that lack it, see :func:`family_of`);
* the baseline of an ``(op, shape)`` group: a row's ``baseline`` field (a provider name) if any row of the
  group sets one, else :data:`BASELINES` for the op, else the first of :data:`FALLBACK_BASELINES` present:
  the alternative a user would otherwise run;
* ours: the call a user of this package makes: the first of :data:`PRIMARY` present, else the first
  provider (in the order they ran) whose name starts with ``posenc`` or contains ``patched``, or that sets
  ``ours: true``; never the fastest of several (that would pick noise);
* the headline shape of an op: the shape whose rows set ``headline: true`` if any does (a benchmark file
  naming the case its issue is about), else the bf16 shape with the most bytes;
* more alternatives beside the baseline: a row's ``also`` field (a list of providers), each printed as its
  ratio to ours after the baseline's, as far as the line has room;
* a thread-scaling row (``scaling`` in its fields, ``benchmarks/bench_native_cpu.py``) is printed as the
  2-thread/1-thread time ratio of ours beside that of ``x.mul_(1.0)`` over the same bytes.

A ratio is the baseline's median time over ours (> 1: ours is faster). copy% is the effective bandwidth
(minimal bytes / median time) as a share of a same-run copy of the same bytes; a value above 100 % means the
data stayed in a cache the copy's working set did not (marked with ``*``). Standard library only (the plot
imports matplotlib through :mod:`posenc_kernels.plot`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

MAX_LINES = 25
WIDTH = 132  # a headline line's range is left out beyond this

# op -> family, for rows written before the harness recorded one (and the order families are listed in).
FAMILIES = {
    "apply_rope_": "rope",
    "apply_rope_ CPU": "rope",
    "apply_rope_ CPU decode": "rope",
    "apply_rope_ CPU threads": "rope",
    "apply_rope_ decode": "rope",
    "apply_rope_ decode CUDA graph": "rope",
    "apply_rope_ varlen": "rope",
    "apply_rope_qkv_": "rope",
    "add_sinusoidal_": "sinusoidal",
    "concat_sinusoidal": "sinusoidal",
    "absolute encodings CPU decode": "sinusoidal",
    "add_position_embedding_": "learned",
    "position_embedding_backward": "learned",
    "alibi_bias": "relative",
    "t5_relative_bias": "relative",
    "t5_relative_bias_fwd_bwd": "relative",
    "rope_and_cache_ decode": "cache",
    "rope_and_cache_ prefill": "cache",
    "mla_rope_and_cache_ decode": "cache",
    "mla_rope_and_cache_ prefill": "cache",
}
FAMILY_ORDER = ("model", "rope", "qknorm", "cache", "sinusoidal", "learned", "relative")

# op -> the provider a user would run instead (the summary's baseline for that op).
BASELINES = {
    "apply_rope_": "hf_eager",
    "apply_rope_ CPU": "hf_eager",
    "apply_rope_ CPU decode": "hf_eager",
    "apply_rope_ decode": "hf_eager",
    "apply_rope_ decode CUDA graph": "hf_eager",
    "apply_rope_ varlen": "hf_eager",
    "apply_rope_qkv_": "hf_eager",
    "add_sinusoidal_": "eager_buffer",
    "concat_sinusoidal": "eager_buffer",
    "add_position_embedding_": "eager",
    "position_embedding_backward": "eager",
    "alibi_bias": "eager",
    "t5_relative_bias": "eager",
    "t5_relative_bias_fwd_bwd": "eager",
}
# For ops not in BASELINES (a new benchmark file): the first of these present in the group.
FALLBACK_BASELINES = ("hf_eager", "eager", "eager_buffer", "unfused", "posenc_unfused", "torch_eager")

# Ours, in order of preference, where a group has several of this package's providers (the default call).
PRIMARY = ("posenc_inplace", "posenc_native", "posenc_table", "posenc_qkv", "posenc", "posenc_patched")

# Within a family, headline ops in this order first (the rest follow in the order they ran).
HEADLINE_ORDER = (
    "apply_rope_", "apply_rope_ decode CUDA graph", "apply_rope_ CPU threads", "apply_rope_ decode",
    "apply_rope_ CPU decode", "apply_rope_ varlen", "apply_rope_qkv_", "apply_rope_ CPU",
    "add_sinusoidal_", "add_position_embedding_", "alibi_bias", "t5_relative_bias",
    "rope_and_cache_ decode", "rope_and_cache_ prefill", "mla_rope_and_cache_ decode", "mla_rope_and_cache_ prefill",
)  # fmt: skip

# What each provider is, for the full table's legend (only those present are listed).
PROVIDERS = {
    "hf_eager": "HF transformers' code (apply_rotary_pos_emb / the unpatched model), eager, activations' dtype",
    "hf_compiled": "torch.compile of hf_eager",
    "eager": "the usual eager PyTorch code for the op",
    "eager_compiled": "torch.compile of eager",
    "eager_buffer": "a precomputed table buffer, sliced and added (the usual module)",
    "eager_buffer_compiled": "torch.compile of eager_buffer",
    "eager_compute": "the table computed in every call",
    "vllm_gather": "vLLM's RotaryEmbedding.forward_native (cache rows gathered in every call)",
    "liger": "Liger-Kernel's liger_rotary_pos_emb",
    "empty_custom_op": "a torch.library.custom_op with apply_rope_'s signature doing nothing (any Python op's cost)",
    "rope_op_bare": "torch.ops.posenc.rope_.default called directly (no Python wrapper)",
    "aten_mul_": "x.mul_(1.0): a one-op aten call, the host-cost yardstick",
    "posenc_unfused": "this package's unfused sequence (e.g. apply_rope_ then the cache write in torch)",
    "hf_static_cache": "HF's apply_rotary_pos_emb then transformers' StaticCache.update",
    "rope_only": "a plain apply_rope_ on the same q/k (no cache write): the fused op's floor",
    "copy": "a device-to-device copy of the same bytes (the bandwidth yardstick)",
}


def family_of(op: str) -> str:
    """The family of an op name (rows that carry no ``family`` field)."""
    if op in FAMILIES:
        return FAMILIES[op]
    low = op.lower()
    for key, fam in (("cache", "cache"), ("rope", "rope"), ("sinusoidal", "sinusoidal"), ("position_embedding", "learned"),
                     ("alibi", "relative"), ("t5", "relative"), ("qknorm", "qknorm"), ("generate", "model")):  # fmt: skip
        if key in low:
            return fam
    return low.split()[0] if low.split() else "other"


def load_rows(path) -> list[dict]:
    """The result rows (benchmarks' ``extra_info`` with ``median_us``) of a pytest-benchmark JSON file, each
    with its ``family`` filled in."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        r = dict(b.get("extra_info") or {})
        if "median_us" not in r or "op" not in r or "provider" not in r:
            continue
        r.setdefault("shape", "")
        r["family"] = r.get("family") or family_of(r["op"])
        rows.append(r)
    return rows


def is_ours(row: dict) -> bool:
    """This package's fused call: ``posenc*`` or ``*patched*`` (an ``*unfused*`` provider is a baseline even
    when it uses the package's ops), or a row with ``ours: true``."""
    p = row["provider"]
    return bool(row.get("ours")) or ((p.startswith("posenc") or "patched" in p) and "unfused" not in p)


def baseline_of(op: str, group: Sequence[dict]) -> Optional[str]:
    """The baseline provider of an ``(op, shape)`` group (None when the group has none)."""
    present = {r["provider"] for r in group}
    named = [r["baseline"] for r in group if r.get("baseline") in present]
    if named:
        return named[0]
    if BASELINES.get(op) in present:
        return BASELINES[op]
    return next((p for p in FALLBACK_BASELINES if p in present), None)


def compiled_of(baseline: str, group: Sequence[dict]) -> Optional[str]:
    """The compiled twin of a baseline present in the group (``hf_eager`` -> ``hf_compiled``, ``eager*`` ->
    ``eager*_compiled``), the other alternative a user would pick."""
    present = {r["provider"] for r in group}
    for cand in (baseline + "_compiled", baseline.replace("_eager", "_compiled")):
        if cand != baseline and cand in present:
            return cand
    return None


def copy_pct(row: dict) -> str:
    """copy% of a row, ``*`` marking a value over 100 % (cache-resident data); ``-`` when no bytes count."""
    ratio = row.get("copy_ratio") or 0.0
    if ratio <= 0:
        return "-"
    if ratio < 0.01:
        return "<1%"
    return f"{100 * ratio:.0f}%" + ("*" if ratio > 1.0 else "")


def fmt_us(us: float) -> str:
    if us >= 10_000:
        return f"{us / 1000:.0f} ms"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.1f} us" if us < 100 else f"{us:.0f} us"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


@dataclass
class Headline:
    family: str
    op: str
    shape: str
    ours: dict
    baseline: Optional[dict] = None
    compiled: Optional[dict] = None
    ratios: list = field(default_factory=list)  # ours-vs-baseline ratio of every shape of the op
    also: list = field(default_factory=list)  # rows of the group's ``also`` providers, in the order named
    scaling: Optional[list] = None  # thread-scaling rows (one per condition) instead of a ratio

    @property
    def ratio(self) -> Optional[float]:
        return self.baseline["median_us"] / self.ours["median_us"] if self.baseline else None


def _groups(rows):
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in rows:
        groups.setdefault((r["family"], r["op"], r["shape"]), []).append(r)
    return groups


def _headline_shape(shapes: list[str], by_shape: dict) -> str:
    """The shapes a row marks ``headline`` if any; among them bf16 shapes first (what models run), then the
    most bytes."""
    marked = [s for s in shapes if any(r.get("headline") for r in by_shape[s])]
    shapes = marked or shapes

    def key(s):
        r = by_shape[s][0]
        return ("bfloat16" in s or "bf16" in s, r.get("bytes", 0))

    return max(shapes, key=key)


def headlines(rows: Sequence[dict]) -> "OrderedDict[str, list[Headline]]":
    """Per family (in :data:`FAMILY_ORDER`, then as they ran), its headline rows: one per op that has ours
    and a baseline, at the op's headline shape, with the ratio range over its shapes."""
    per_op: "OrderedDict[tuple, dict]" = OrderedDict()
    for (fam, op, shape), group in _groups(rows).items():
        per_op.setdefault((fam, op), {})[shape] = group
    out: "OrderedDict[str, list[Headline]]" = OrderedDict()
    for (fam, op), by_shape in per_op.items():
        shapes = list(by_shape)
        scaling = {s: [r for r in by_shape[s] if r.get("scaling")] for s in shapes}
        if any(scaling.values()):  # one line per shape: the conditions side by side
            for s, rs in scaling.items():
                if rs:
                    out.setdefault(fam, []).append(Headline(fam, op, s, rs[0], scaling=rs))
            continue
        usable = {}
        for s in shapes:
            group = by_shape[s]
            base = baseline_of(op, group)
            ours = [r for r in group if is_ours(r) and r["provider"] != base]
            if base and ours:
                rank = {p: i for i, p in enumerate(PRIMARY)}
                usable[s] = (min(ours, key=lambda r: rank.get(r["provider"], len(rank))), base, group)
        if not usable:
            continue
        ratios = []
        for s, (ours, base, group) in usable.items():
            b = next(r for r in group if r["provider"] == base)
            ratios.append(b["median_us"] / ours["median_us"])
        s = _headline_shape(list(usable), by_shape)
        ours, base, group = usable[s]
        comp = compiled_of(base, group)
        named = [p for r in group for p in (r.get("also") or [])]
        also = [next(r for r in group if r["provider"] == p) for p in dict.fromkeys(named)
                if p not in (base, comp, ours["provider"]) and any(r["provider"] == p for r in group)]  # fmt: skip
        out.setdefault(fam, []).append(Headline(
            fam, op, s, ours, next(r for r in group if r["provider"] == base),
            next((r for r in group if r["provider"] == comp), None), ratios, also))  # fmt: skip
    order = {op: i for i, op in enumerate(HEADLINE_ORDER)}
    for fam in out:
        out[fam].sort(key=lambda h: order.get(h.op, len(order)))
    fams = sorted(out, key=lambda f: FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER))
    return OrderedDict((f, out[f]) for f in fams)


def _pick(heads: "OrderedDict[str, list[Headline]]", budget: int) -> "list[Headline]":
    """At most ``budget`` rows: every family's first headline, then second ones, ... (round robin)."""
    chosen, depth = [], 0
    while len(chosen) < budget and any(depth < len(v) for v in heads.values()):
        for hs in heads.values():
            if depth < len(hs) and len(chosen) < budget:
                chosen.append(hs[depth])
        depth += 1
    pos = {id(h): i for i, h in enumerate(h for hs in heads.values() for h in hs)}
    return sorted(chosen, key=lambda h: pos[id(h)])


def _short(s: str, n: int) -> str:
    s = s.replace("bfloat16", "bf16").replace("float32", "fp32").replace("float16", "fp16")
    return s if len(s) <= n else s[: n - 1] + "~"


def _scaling_text(h: Headline) -> str:
    n = h.scaling[0]["scaling"].get("threads", "N")
    parts = [f"ours {r['scaling']['ours']:.2f}, x.mul_ {r['scaling']['mul_']:.2f} ({r.get('condition', '?')})"
             for r in h.scaling]  # fmt: skip
    return f"{n}-thread/1-thread time: " + "; ".join(parts)


def _ratio_text(h: Headline, room: int) -> str:
    """``12.2x hf_eager, 5.07x compiled; 4 shapes 11.7-14.4x`` (the range only if it fits in ``room``)."""
    text = f"{fmt_ratio(h.ratio)} {h.baseline['provider']}"
    if h.compiled:
        text += f", {fmt_ratio(h.compiled['median_us'] / h.ours['median_us'])} compiled"
    for r in h.also:
        more = f", {fmt_ratio(r['median_us'] / h.ours['median_us'])} {r['provider']}"
        if len(text) + len(more) > room:
            break
        text += more
    if len(h.ratios) > 1:
        rng = f"; {len(h.ratios)} shapes {fmt_ratio(min(h.ratios))[:-1]}-{fmt_ratio(max(h.ratios))}"
        if len(text) + len(rng) <= room:
            text += rng
    return text


def _most_common(rows, key: str) -> str:
    values = Counter(r.get(key, "?") for r in rows).most_common(1)
    return values[0][0] if values else "?"


def summary_lines(rows: Sequence[dict], *, full_table: Optional[str] = None, json_path: Optional[str] = None,
                  plot: Optional[str] = None, log: Optional[str] = None, load_start: Optional[float] = None,
                  cores: Optional[int] = None, isa: Optional[str] = None) -> list[str]:  # fmt: skip
    """The summary, at most :data:`MAX_LINES` lines, readable alone: what ran where, the definitions, one
    line per headline op (as many as fit, every family first), then where the rest is."""
    cores = cores or os.cpu_count() or 1
    device, timing = _most_common(rows, "device"), _most_common(rows, "timing")
    head = [f"== posenc_kernels benchmarks: {device}" + (f", native CPU kernels {isa}" if isa else "") + " =="]
    head.append(f"timing (most rows): {timing}. One run: compare ratios, not absolute times.")
    if load_start is not None and load_start > cores / 2:
        head.append(f"WARNING: load average {load_start:.1f} on {cores} cores at the start (above half the cores): "
                    "other work shared the CPU, ratios are noisy.")  # fmt: skip
    head.append("x = the baseline's median time / ours (>1: ours faster). copy% = ours' GB/s (minimal bytes /")
    head.append("median) as % of a same-run copy of the same bytes; * = over 100%: the data stayed in cache.")
    cols = (f"{'family':<10} {'op':<23} {'headline shape':<25} {'ours':<14} {'median':>8} {'copy%':>5}  "
            "x baseline, x its torch.compile; range")  # fmt: skip
    foot = []
    if full_table:
        foot.append(f"full table (every op, shape and provider, definitions): {full_table}")
    where = [f"JSON: {json_path}" if json_path else "", f"plot: {plot}" if plot else "", f"log: {log}" if log else ""]
    if any(where):
        foot.append("   ".join(w for w in where if w))
    heads = headlines(rows)
    n_all = sum(len(v) for v in heads.values())
    budget = MAX_LINES - len(head) - 1 - len(foot) - 1  # the column line; one line kept for "more"
    chosen = _pick(heads, budget)
    body = [cols]
    for h in chosen:
        lead = f"{h.family:<10} {_short(h.op, 23):<23} {_short(h.shape, 25):<25}"
        if h.scaling:
            body.append(f"{lead} {_scaling_text(h)}")
        else:
            ours = h.ours
            line = f"{lead} {_short(ours['provider'], 14):<14} {fmt_us(ours['median_us']):>8} {copy_pct(ours):>5}  "
            body.append(line + _ratio_text(h, WIDTH - len(line)))
    if not chosen:
        body.append("(no group has both a posenc provider and a baseline)")
    if len(chosen) < n_all:
        body.append(f"... and {n_all - len(chosen)} more op(s) against a baseline in the full table")
    return head + body + foot


def full_table(rows: Sequence[dict]) -> str:
    """Every row, as markdown: one section per op naming its baseline, rows sorted by time within a shape."""
    lines = ["# Benchmark results", ""]
    lines += [f"Device: {_most_common(rows, 'device')}. Timing (most rows; the others name theirs in the JSON): "
              f"{_most_common(rows, 'timing')}.", "",
              "- **median**: the median time of one call.",
              "- **GB/s**: effective bandwidth, minimal bytes (each input read once, each output written once) / "
              "median; `-` for calls that count no bytes (host cost).",
              "- **copy%**: that bandwidth as a share of a device-to-device copy of the same bytes measured in the "
              "same run. `*` marks a value over 100 %: the data stayed in a cache (for example the CPU's L2/L3) "
              "that the copy's larger working set did not, so the op looks faster than memory allows.",
              "- **vs baseline**: the baseline's median / this row's (> 1: faster than the baseline); the baseline "
              "of each op is named in its heading.",
              "- **peak MiB**: memory allocated above the starting level during one call (CUDA only).",
              "- **host us**: host time per call, calls issued back to back without synchronising (CUDA only; on "
              "CPU the median is host time).", ""]  # fmt: skip
    present = {r["provider"] for r in rows}
    legend = [f"- `{p}`: {d}" for p, d in PROVIDERS.items() if p in present]
    if legend:
        lines += ["Providers: `posenc_*` are this package's.", *legend, ""]
    by_op: "OrderedDict[tuple, OrderedDict]" = OrderedDict()
    for (fam, op, shape), group in _groups(rows).items():
        by_op.setdefault((fam, op), OrderedDict())[shape] = group
    for (fam, op), shapes in sorted(by_op.items(), key=lambda kv: (
            FAMILY_ORDER.index(kv[0][0]) if kv[0][0] in FAMILY_ORDER else len(FAMILY_ORDER), kv[0][1])):  # fmt: skip
        scaling = [r for g in shapes.values() for r in g if r.get("scaling")]
        bases = {baseline_of(op, g) for g in shapes.values()} - {None}
        base_txt = ", ".join(f"`{b}`" + (f" ({PROVIDERS[b]})" if b in PROVIDERS else "") for b in sorted(bases))
        if scaling:
            base_txt = ("the same call on 1 thread; beside it `x.mul_(1.0)` over the same bytes, 1 and N threads "
                        "(times in us; N/1 below 1: the threads help)")  # fmt: skip
        lines += [f"## {op} ({fam})", "", f"Baseline: {base_txt}." if base_txt else "No baseline in these rows.", ""]
        if scaling:
            lines += ["| shape | condition | threads | ours 1 thread | ours N threads | ours N/1 | x.mul_ 1 thread "
                      "| x.mul_ N threads | x.mul_ N/1 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            for r in scaling:
                sc = r["scaling"]
                lines.append(f"| {r['shape']} | {r.get('condition', '')} | {sc['threads']} | {sc['ours_1_us']:.1f} | "
                             f"{sc['ours_n_us']:.1f} | {sc['ours']:.2f} | {sc['mul_1_us']:.1f} | "
                             f"{sc['mul_n_us']:.1f} | {sc['mul_']:.2f} |")  # fmt: skip
            lines.append("")
            continue
        lines += ["| shape | provider | median us | GB/s | copy% | vs baseline | peak MiB | host us |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for shape, group in shapes.items():
            base = baseline_of(op, group)
            b = next((r for r in group if r["provider"] == base), None)
            for r in sorted(group, key=lambda r: r["median_us"]):
                vs = f"{b['median_us'] / r['median_us']:.2f}x" if b and r["median_us"] > 0 else "-"
                gbps = f"{r['gbps']:.1f}" if r.get("gbps") else "-"
                peak = "-" if r.get("peak_extra_mb") is None else f"{r['peak_extra_mb']:.1f}"
                host = "-" if r.get("host_us") is None else f"{r['host_us']:.1f}"
                lines.append(f"| {shape} | {r['provider']} | {r['median_us']:.1f} | {gbps} | {copy_pct(r)} | {vs} | "
                             f"{peak} | {host} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot_summary(path, rows: Sequence[dict]):
    """The headline ratios as one picture (``posenc_kernels.plot.plot_speedups``); None without ratios."""
    from posenc_kernels.plot import plot_speedups

    items = []
    for fam, hs in headlines(rows).items():
        for h in hs:
            if h.ratio is not None:
                items.append((f"{fam}: {h.op}\n{_short(h.shape, 40)}", h.ratio, h.baseline["provider"]))
    if not items:
        return None
    return plot_speedups(path, items, title=f"posenc_kernels vs the baseline a user would run: "
                                            f"{_most_common(rows, 'device')}")  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posenc_dev.bench_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="?", default="bench-results/benchmarks.json")
    parser.add_argument("--full", help="write the full table (markdown) here")
    parser.add_argument("--plot", help="write the headline ratios' picture here (needs matplotlib)")
    parser.add_argument("--log", help="name the pytest log in the summary's last line")
    parser.add_argument("--load-start", type=float, help="the 1-minute load average when the run started")
    parser.add_argument("--isa", help="the CPU instruction set the native kernels picked")
    args = parser.parse_args(argv)
    if not Path(args.json).is_file():
        print(f"no benchmark results: {args.json} not found")
        return 1
    rows = load_rows(args.json)
    if not rows:
        print(f"no benchmark results in {args.json}")
        return 1
    if args.full:
        Path(args.full).parent.mkdir(parents=True, exist_ok=True)
        Path(args.full).write_text(full_table(rows) + "\n")
    plot = None
    if args.plot:
        try:
            plot = plot_summary(args.plot, rows)
        except ImportError as e:
            print(f"no plot: {e}", file=sys.stderr)
    lines = summary_lines(rows, full_table=args.full, json_path=args.json, plot=str(plot) if plot else None,
                          log=args.log, load_start=args.load_start, isa=args.isa)  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
