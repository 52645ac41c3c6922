"""Pictures of the position encodings and of the benchmark results (the README's figures).

    python -m posenc_kernels.plot {sinusoidal,rope-decay,alibi,t5,bench,all} --out DIR [--bench-json PATH]

writes ``sinusoidal.png``, ``rope_decay.png``, ``alibi.png``, ``t5.png`` and ``bench.png`` into ``DIR``.
Each ``plot_*`` function writes one PNG and returns its path.

matplotlib is an optional dependency (``pip install matplotlib``, or the package's ``plot`` extra); it is
imported only when a picture is drawn, and only its object-oriented API is used (``Figure`` + the Agg
canvas): drawing never changes the pyplot backend or state of the calling program.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

PathLike = Union[str, Path]

__all__ = ["plot_sinusoidal", "plot_rope_decay", "plot_alibi", "plot_t5", "plot_benchmarks", "plot_speedups", "main"]

FILENAMES = {name: name.replace("-", "_") + ".png" for name in ("sinusoidal", "rope-decay", "alibi", "t5", "bench")}

_DPI = 110


def _figure(width: float, height: float):
    """A standalone Figure on an Agg canvas (no pyplot, so no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised only where matplotlib is absent
        raise ImportError(
            "posenc_kernels.plot needs matplotlib, an optional dependency: pip install matplotlib "
            "(or pip install 'posenc_kernels[plot]')"
        ) from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike) -> Path:
    """Write ``fig`` as a PNG with a 256-colour palette (a third of the RGB size, no visible change: the
    colormaps have 256 entries) so the README's pictures stay small."""
    from PIL import Image  # a dependency of matplotlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=_DPI, format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)
    return path


def plot_sinusoidal(path: PathLike, *, length: int = 128, dim: int = 128) -> Path:
    """Heatmaps (positions x channels) of :func:`posenc_kernels.sinusoidal_table` in the Transformer's
    interleaved layout and in the ``[sin | cos]`` layout of tensor2tensor/fairseq."""
    from .ops.sinusoidal import SINUSOIDAL_CONVENTIONS, sinusoidal_table

    fig = _figure(11, 4.6)
    axes = fig.subplots(1, 2, sharey=True)
    panels = [
        ("transformer", "Vaswani et al.: interleaved sin/cos pairs"),
        ("tensor2tensor", "tensor2tensor / fairseq: [sin | cos] halves"),
    ]
    for ax, (name, title) in zip(axes, panels):
        table = sinusoidal_table(length, dim, **SINUSOIDAL_CONVENTIONS[name])
        im = ax.imshow(table.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("channel")
    axes[0].set_ylabel("position")
    fig.colorbar(im, ax=axes, shrink=0.9, label="PE value")
    fig.suptitle(f"Sinusoidal position encodings: sinusoidal_table({length}, {dim})", fontsize=12)
    return _save(fig, path)


def _rope_scaling(kind: str, factor: float, trained_length: int) -> Optional[dict]:
    """HF ``rope_parameters`` of each pictured schedule at ``factor`` x ``trained_length`` (YaRN with its
    default beta_fast 32 / beta_slow 1; Llama 3.1 with low_freq_factor 1, high_freq_factor 4)."""
    if kind == "default":
        return None
    if kind in ("linear", "ntk"):  # position interpolation / static NTK-aware (a larger base)
        return {"rope_type": kind, "factor": factor}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": trained_length}
    if kind == "llama3":
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": trained_length}  # fmt: skip
    raise ValueError(f"kind must be one of {', '.join(ROPE_SCHEDULES)}; got {kind!r}")


def _rope_schedule(kind: str, head_dim: int, base: float, factor: float, trained_length: int) -> torch.Tensor:
    """Inverse frequencies of a context-extension schedule, fp32 ``[head_dim // 2]``, from the package's
    :func:`posenc_kernels.rope_frequencies`. The attention factor (YaRN's mscale) is left out: it scales every
    logit alike, not the rotation, and would only shift its curve."""
    from .ops.rope.schedules import rope_frequencies

    return rope_frequencies(head_dim, base, scaling=_rope_scaling(kind, factor, trained_length))[0]


ROPE_SCHEDULES = {"default": "default (no scaling)", "linear": "linear / PI", "ntk": "NTK-aware", "yarn": "YaRN",
                  "llama3": "Llama 3.1"}  # fmt: skip


def _rope_decay_curves(inv_freq: torch.Tensor, max_distance: int, samples: int, generator: torch.Generator):
    """For distances ``0..max_distance``: the RoFormer relative upper bound ``mean_j |S_j|`` with
    ``S_j = sum_{i<j} exp(1j * dist * theta_i)``, and the mean score ``<R(dist) q, R(0) q>`` over random unit
    ``q`` (a key with the query's content ``dist`` tokens away). Both rotate with the package's
    ``rope_cos_sin`` / ``apply_rope``."""
    from .ops.rope import apply_rope, rope_cos_sin

    half = inv_freq.shape[0]
    cos, sin = rope_cos_sin(max_distance + 1, inv_freq)  # row p = angles of distance p
    partial = torch.complex(cos.double(), sin.double()).cumsum(-1)
    bound = partial.abs().mean(-1)

    q = torch.randn(samples, 2 * half, generator=generator)
    q = q / q.norm(dim=-1, keepdim=True)
    score = torch.empty(max_distance + 1, dtype=torch.float64)
    chunk = max(1, (1 << 22) // (samples * 2 * half))
    for p0 in range(0, max_distance + 1, chunk):
        p1 = min(max_distance + 1, p0 + chunk)
        rows = q[None, None].expand(1, p1 - p0, samples, 2 * half).contiguous()  # [1, S, N, D]
        rotated, _ = apply_rope(rows, None, cos[p0:p1], sin[p0:p1])  # token p rotated by distance p
        score[p0:p1] = (rotated[0] * q[None]).sum(-1).mean(-1).double()  # key at distance 0: no rotation
    return bound, score


def _log_bins(values: torch.Tensor, n_bins: int):
    """Distances 1..len-1 grouped into ``n_bins`` log-spaced bins: (bin centre, mean, min, max), so that
    the curves stay readable where they oscillate faster than a pixel."""
    n = values.shape[0] - 1
    edges = torch.unique(torch.logspace(0, math.log10(n + 1), n_bins + 1).long().clamp(1, n + 1))
    pairs = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
    centre, bins = [math.sqrt(a * max(a, b - 1)) for a, b in pairs], [values[a:b] for a, b in pairs]
    return centre, [float(v.mean()) for v in bins], [float(v.min()) for v in bins], [float(v.max()) for v in bins]


def plot_rope_decay(
    path: PathLike,
    *,
    head_dim: int = 128,
    base: float = 10000.0,
    trained_length: int = 4096,
    factor: float = 4.0,
    max_distance: Optional[int] = None,
    samples: int = 32,
    n_bins: int = 100,
) -> Path:
    """RoPE's long-term decay with distance, for the default schedule and the context-extension schedules
    (linear/PI, NTK-aware, YaRN, Llama 3.1) at ``factor`` x the trained length: the RoFormer paper's
    relative upper bound and the mean attention score of a key that matches the query. Each curve is the
    mean over log-spaced distance bins; the band is the bin's min..max (the oscillation)."""
    max_distance = int(factor * trained_length) if max_distance is None else max_distance
    gen = torch.Generator().manual_seed(0)
    curves = {kind: _rope_decay_curves(_rope_schedule(kind, head_dim, base, factor, trained_length), max_distance,
                                       samples, gen) for kind in ROPE_SCHEDULES}  # fmt: skip

    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2)
    colors = {"default": "black", "linear": "C0", "ntk": "C1", "yarn": "C2", "llama3": "C3"}
    for kind, pair in curves.items():
        for ax, values in zip(axes, pair):
            x, mean, lo, hi = _log_bins(values, n_bins)
            ax.fill_between(x, lo, hi, color=colors[kind], alpha=0.10, lw=0)
            ax.plot(x, mean, color=colors[kind], lw=1.6 if kind == "default" else 1.2, label=ROPE_SCHEDULES[kind])
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlim(1, max_distance)
        ax.axvline(trained_length, color="0.4", ls="--", lw=1)
        ax.text(trained_length, 0.98, " trained length", transform=ax.get_xaxis_transform(), va="top",
                fontsize=8, color="0.3")  # fmt: skip
        ax.set_xlabel("relative distance m (tokens)")
        ax.grid(alpha=0.3, which="major", lw=0.5)
    axes[0].set_title("RoFormer upper bound: mean$_j$ |$\\sum_{i<j} e^{\\mathrm{i}\\,m\\theta_i}$|", fontsize=11)
    axes[0].set_ylabel("relative upper bound")
    axes[1].set_title("mean score $\\langle R_m q, q\\rangle$ over random unit q", fontsize=11)
    axes[1].set_ylabel("attention logit (unit q = k)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"RoPE long-term decay: head_dim {head_dim}, base {base:g}, trained on {trained_length} tokens, "
                 f"schedules scaled x{factor:g}", fontsize=12)  # fmt: skip
    return _save(fig, path)


def plot_alibi(
    path: PathLike, *, num_heads: int = 8, length: int = 24, heads: Optional[Sequence[int]] = None
) -> Path:
    """Causal ALiBi bias matrices ``slope_h * (key - query)`` for a few heads, and every head's slope."""
    from .ops import relative

    if heads is None:  # first, middle and last head
        heads = sorted({0, (num_heads - 1) // 2, num_heads - 1})
    bad = [h for h in heads if not 0 <= h < num_heads]
    if not heads or bad:
        raise ValueError(f"heads must be a non-empty list of head indices in [0, {num_heads}), got {list(heads)}")
    slopes = relative.alibi_slopes(num_heads)
    bias = relative.alibi_bias(slopes, length, length, causal=True).double()
    future = torch.arange(length)[None, :] > torch.arange(length)[:, None]
    bias = bias.masked_fill(future, float("nan"))  # masked (future) keys shown blank

    heads = list(heads)
    fig = _figure(3.0 * len(heads) + 3.6, 3.6)
    axes = fig.subplots(1, len(heads) + 1, gridspec_kw={"width_ratios": [1] * len(heads) + [1.15]})
    vmin = float(bias[heads].nan_to_num(0).min())
    for ax, h in zip(axes, heads):
        im = ax.imshow(bias[h].numpy(), cmap="viridis", vmin=vmin, vmax=0, interpolation="nearest")
        ax.set_title(f"head {h}: slope 2^{math.log2(float(slopes[h])):g}", fontsize=10)
        ax.set_xlabel("key position")
    axes[0].set_ylabel("query position")
    fig.colorbar(im, ax=list(axes[: len(heads)]), shrink=0.85, label="bias added to the logit")
    ax = axes[-1]
    ax.bar(range(num_heads), slopes.numpy(), color="C0")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("head")
    ax.set_ylabel("slope")
    ax.set_title(f"slopes, {num_heads} heads", fontsize=10)
    fig.suptitle(f"ALiBi: causal bias = slope x (key - query), {length} tokens", fontsize=12)
    return _save(fig, path)


def plot_t5(path: PathLike, *, length: int = 160, num_buckets: int = 32, max_distance: int = 128) -> Path:
    """T5's relative-position buckets (the row of the learned ``[num_buckets, H]`` table each query/key pair
    reads) for the bidirectional encoder and the causal decoder: exact near the diagonal, logarithmic
    further out, one shared bucket beyond ``max_distance``."""
    table = torch.arange(num_buckets, dtype=torch.float32)[:, None]  # one head whose bias is its bucket id
    from .ops import relative

    fig = _figure(11, 5.0)
    axes = fig.subplots(1, 2)
    for ax, bidirectional in zip(axes, (True, False)):
        b = relative.t5_relative_bias(table, length, length, bidirectional=bidirectional, max_distance=max_distance)
        b = b.reshape(length, length).double()
        im = ax.imshow(b.numpy(), cmap="turbo", vmin=0, vmax=num_buckets - 1, interpolation="nearest")
        kind = "encoder (bidirectional)" if bidirectional else "decoder (causal; future keys: bucket 0, masked)"
        ax.set_title(kind, fontsize=11)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        ax.axline((0, max_distance), slope=1, color="white", ls=":", lw=0.8)  # key = query - max_distance
        if bidirectional:
            ax.axline((max_distance, 0), slope=1, color="white", ls=":", lw=0.8)
    fig.colorbar(im, ax=list(axes), shrink=0.85, label="bucket (row of the learned bias table)")
    fig.suptitle(f"T5 relative position buckets: {num_buckets} buckets, max_distance {max_distance} (dotted), "
                 f"{length} tokens", fontsize=12)  # fmt: skip
    return _save(fig, path)


def _bench_rows(bench_json: PathLike) -> list:
    with open(bench_json) as f:
        data = json.load(f)
    rows = [b["extra_info"] for b in data.get("benchmarks", []) if "gbps" in b.get("extra_info", {})]
    if not rows:
        raise ValueError(f"bench_json {str(bench_json)!r} holds no benchmark with extra_info gbps")
    return rows


def plot_benchmarks(path: PathLike, bench_json: PathLike = "bench-results/benchmarks.json") -> Path:
    """Effective bandwidth (GB/s) per provider and shape, one panel per op, from the pytest-benchmark JSON
    that ``scripts/bench`` writes; a black tick marks a device-to-device copy of the same bytes. Ops that
    count no bytes (per-call overhead) are drawn as median time per call instead."""
    rows = _bench_rows(bench_json)
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}

    ops = list(by_op)
    n_shapes = [len(dict.fromkeys(r["shape"] for r in by_op[op])) for op in ops]
    # A grid of panels, at most 3 per row, so many ops stay readable.
    ncols = min(3, len(ops))
    nrows = -(-len(ops) // ncols)
    fig = _figure(max(7.0, 2.2 * max(n_shapes) * ncols + 2.0), 4.4 * nrows)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(ops):]:
        ax.set_visible(False)
    for ax, op in zip(axes, ops):
        op_rows = by_op[op]
        shapes = list(dict.fromkeys(r["shape"] for r in op_rows))
        op_providers = [p for p in providers if any(r["provider"] == p for r in op_rows)]
        width = 0.8 / len(op_providers)
        # Dispatch-bound ops (no bytes counted, e.g. per-call overhead) are drawn as time per call.
        metric = "gbps" if any(r.get("gbps", 0) > 0 for r in op_rows) else "median_us"
        for i, shape in enumerate(shapes):
            cell = {r["provider"]: r for r in op_rows if r["shape"] == shape}
            for j, p in enumerate(op_providers):
                if p in cell:
                    ax.bar(i - 0.4 + (j + 0.5) * width, cell[p][metric], width, color=colors[p],
                           label=p if i == 0 else None)  # fmt: skip
            copies = [r["gbps"] / r["copy_ratio"] for r in cell.values() if r.get("copy_ratio")]
            if copies:
                copy = sorted(copies)[len(copies) // 2]
                ax.hlines(copy, i - 0.45, i + 0.45, color="black", lw=2, label="copy, same bytes" if i == 0 else None)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([textwrap.fill(s, 16) for s in shapes], fontsize=8)
        ax.set_title(op, fontsize=11)
        ax.set_ylabel("effective GB/s (minimal bytes / median time)" if metric == "gbps" else "median µs per call")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    first = rows[0]
    fig.suptitle(f"{first.get('device', 'unknown device')}: {first.get('timing', '')}", fontsize=11)
    return _save(fig, path)


def plot_speedups(path: PathLike, items: Sequence[tuple], *, title: str = "") -> Path:
    """Horizontal bars of speed-up ratios, one per ``(label, ratio, baseline)`` item (ratio = the baseline's
    time / ours, so > 1 is faster), on a log axis with a line at 1x; each bar is labelled with its ratio and
    baseline. ``scripts/bench`` draws its headline ratios with it (``bench-results/summary.png``)."""
    if not items:
        raise ValueError("items is empty: nothing to plot")
    for label, ratio, _ in items:
        if not (isinstance(ratio, (int, float)) and ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"items: the ratio of {label!r} must be a positive finite number, got {ratio!r}")
    n = len(items)
    fig = _figure(10, 1.2 + 0.42 * n)
    ax = fig.subplots()
    ys = list(range(n))[::-1]
    ratios = [float(r) for _, r, _ in items]
    colors = ["C2" if r >= 1 else "C3" for r in ratios]
    ax.barh(ys, ratios, color=colors, height=0.6)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    lo, hi = min(ratios + [1.0]), max(ratios + [1.0])
    ax.set_xlim(lo / 1.6, hi * 8.0)
    ax.axvline(1.0, color="black", lw=1)
    for y, (_, r, base) in zip(ys, items):  # the label right of the bar, or of the 1x line for a ratio < 1
        ax.text(max(r, 1.0) * 1.05, y, f"{r:.2f}x vs {base}", va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([str(lbl) for lbl, _, _ in items], fontsize=8)
    ax.set_xlabel("speed-up: baseline median time / ours (log scale; > 1 is faster)")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(textwrap.fill(title, 100), fontsize=10)
    return _save(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posenc_kernels.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=list(FILENAMES) + ["all"], help="which picture (all: every one)")
    parser.add_argument("--out", default="docs/images", help="output folder (default: docs/images)")
    parser.add_argument("--bench-json", default="bench-results/benchmarks.json",
                        help="pytest-benchmark JSON for 'bench' (default: bench-results/benchmarks.json, what "
                        "scripts/bench writes)")  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    makers = {"sinusoidal": plot_sinusoidal, "rope-decay": plot_rope_decay, "alibi": plot_alibi, "t5": plot_t5,
              "bench": lambda p: plot_benchmarks(p, args.bench_json)}  # fmt: skip
    todo = list(FILENAMES) if args.what == "all" else [args.what]
    if args.what == "all" and not Path(args.bench_json).exists():
        print(f"skipping bench: {args.bench_json} not found (run scripts/bench first)", file=sys.stderr)
        todo.remove("bench")
    if args.what == "bench" and not Path(args.bench_json).exists():
        parser.error(f"--bench-json {args.bench_json} not found (run scripts/bench first)")
    try:
        for name in todo:
            print(makers[name](out / FILENAMES[name]))
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
