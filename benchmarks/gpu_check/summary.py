"""GPU check: the summary, built from whatever the stages left in $OUT (so a cut run still gets one).

Prints the stage table, the smoke table, the headline table (Triton and CUDA C++ side by side), how far the
test suite got, and a block ready to paste into benchmarks/RESULTS.md (card, date, commit, figures, and the
static figures of each kernel beside its time when benchmarks/static_figures.json exists). Also writes it to
$OUT/summary.md. Pure standard library: it must run even when torch does not import.

    python benchmarks/gpu_check/summary.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import re
import sys
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATIC = os.environ.get("GPU_CHECK_STATIC_FIGURES", os.path.join(REPO, "benchmarks", "static_figures.json"))


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_env(out):
    env = {}
    try:
        for line in open(os.path.join(out, "env.txt")):
            if ":" in line:
                k, v = line.split(":", 1)
                env.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return env


def stage_table(out):
    lines = ["| stage | budget s | used s | status |", "|---|---:|---:|---|"]
    try:
        for line in open(os.path.join(out, "stages.tsv")):
            name, budget, used, rc, status = line.rstrip("\n").split("\t")
            lines.append(f"| {name} | {budget} | {used} | {status} (rc {rc}) |")
    except (OSError, ValueError):
        lines.append("| (no stages.tsv) | | | |")
    return lines


def smoke_table(out):
    d = load_json(os.path.join(out, "smoke.json"))
    if not d:
        return ["smoke: no results"]
    rows = d["rows"]
    ok = sum(1 for r in rows if r.get("ok"))
    head = f"smoke ({d['device']}; {d.get('backend')}; {d.get('rule')}): {ok}/{len(rows)} passed" + (
        "" if d.get("complete") else " (INCOMPLETE: cut)"
    )
    lines = [head, "", "| family | check | shape | dtype | max err | bound | ok |", "|---|---|---|---|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('family')} | {r['check']} | | | | | ERROR {r['error']} |")
            continue
        lines.append(f"| {r['family']} | {r['check']} | {r['shape']} | {r['dtype']} | {r['err']:.3g} | {r['bound']:.3g} |"
                     f" {'ok' if r['ok'] else 'FAIL'} |")  # fmt: skip
    return lines


def static_figures(triton_version=None):
    """The figures of the Triton release the GPU machine ran (env.txt), else the file's default."""
    d = load_json(STATIC)
    if not isinstance(d, dict):
        return None
    by = d.get("by_triton") or {}
    figs = by.get(triton_version) or d.get("kernels", d)
    return figs if isinstance(figs, dict) else None


STATIC_FIELDS = (("registers", "regs {}"), ("rounds", "rounds {}"), ("instructions_per_byte", "{} instr/B"),
                 ("blocks_per_sm", "{} blocks/SM"), ("in_flight_bytes", "{} B in flight"))  # fmt: skip


def static_for(static, kernel):
    """``regs 94, rounds 1, 0.0535 instr/B, 5 blocks/SM, 160 B in flight`` for one static case."""
    if static is None or not kernel:
        return ""
    v = static.get(kernel)
    if not isinstance(v, dict):
        return "-"
    return ", ".join(fmt.format(v[k]) for k, fmt in STATIC_FIELDS if k in v)


def headline_table(out, static):
    tri = load_json(os.path.join(out, "headline_triton.json"))
    nat = load_json(os.path.join(out, "headline_native.json"))
    if not tri and not nat:
        return ["headline: no results"], []
    src = tri or nat
    base = {}
    for r in (tri or {}).get("rows", []):
        if "us" in r and r["provider"] in ("hf_eager", "eager_buffer", "unfused"):
            base[(r["op"], r["shape"])] = r["us"]
    native = {(r["op"], r["shape"]): r for r in (nat or {}).get("rows", []) if r.get("provider") == "posenc" and "us" in r}
    notes = [f"device: {src['device']}", f"timing: {src['timing']}", f"decode rows: {src.get('graph_timing')}"]
    for name, d in (("triton", tri), ("cuda c++", nat)):
        if d and not d.get("complete"):
            notes.append(f"{name} headline INCOMPLETE (cut or failed): rows measured before the cut are shown")
    head = ("| op | shape | provider | us | GB/s | copy% | vs eager | peak MiB | cuda c++ us | c++ copy% | c++/triton time |"
            + (" static figures |" if static is not None else ""))  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = (tri or {}).get("rows", []) or []
    seen = {(r["op"], r["shape"]) for r in rows if r.get("provider") == "posenc"}
    rows = rows + [r for k, r in native.items() if k not in seen]  # native-only rows when the triton stage was cut
    for r in rows:
        if "skipped" in r or "error" in r:
            what = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR {r['error']}"
            lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | {what} |" + " |" * (head.count("|") - 5))
            continue
        b = base.get((r["op"], r["shape"]))
        vs = f"{b / r['us']:.2f}x" if b else "-"
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        n = native.get((r["op"], r["shape"])) if r["provider"] == "posenc" else None
        ncols = (f"{n['us']:.1f} | {100 * n['copy_ratio']:.0f}% | {n['us'] / r['us']:.2f}" if n and r in (tri or {}).get("rows", [])
                 else (f"{n['us']:.1f} | {100 * n['copy_ratio']:.0f}% | -" if n else "- | - | -"))  # fmt: skip
        us = f"{r['us']:.1f}" if r in (tri or {}).get("rows", []) else "-"
        line = f"| {r['op']} | {r['shape']} | {r['provider']} | {us} | {r['gbps']:.0f} | {100 * r['copy_ratio']:.0f}% | {vs} | {peak} | {ncols} |"
        if static is not None:
            line += f" {static_for(static, r.get('kernel')) if r['provider'] == 'posenc' else ''} |"
        lines.append(line)
    return notes, lines


def cache_targets(out):
    """RoPE + KV-cache write (issue 19), from the Triton headline rows: decode fused / apply_rope_ alone (the
    target: <= 1.2x) and / unfused, and the 4k prefill share of copy bandwidth."""
    tri = load_json(os.path.join(out, "headline_triton.json"))
    rows = [r for r in (tri or {}).get("rows", []) if str(r.get("op", "")).startswith("rope_and_cache_")]
    if not rows:
        return []
    by = {}
    for r in rows:
        by.setdefault(r["shape"], {})[r["provider"]] = r
    lines = ["RoPE + KV-cache write (issue 19; fused = rope_and_cache_, backend named per row):"]
    for shape, p in by.items():
        f, rope, unf = p.get("posenc"), p.get("rope_only"), p.get("unfused")
        if f is None or "us" not in f:
            why = (f or {}).get("skipped") or (f or {}).get("error") or "no fused row"
            lines.append(f"- {shape}: fused not measured ({why})")
            continue
        parts = [f"fused {f['us']:.1f} us ({f.get('backend', '?')}), {100 * f['copy_ratio']:.0f}% of copy"]
        if rope and "us" in rope:
            x = f["us"] / rope["us"]
            parts.append(f"{x:.2f}x apply_rope_ alone (target <= {f.get('target', 1.2)}x: "
                         f"{'met' if x <= f.get('target', 1.2) else 'NOT met'})")  # fmt: skip
        if unf and "us" in unf:
            parts.append(f"unfused / fused = {unf['us'] / f['us']:.2f}x")
        lines.append(f"- {shape}: " + ", ".join(parts))
    return lines


def tests_progress(out):
    xml = os.path.join(out, "tests.xml")
    log = os.path.join(out, "tests.log")
    if os.path.exists(xml):
        try:
            cases = list(ET.parse(xml).iter("testcase"))
            bad = sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None)
            skipped = sum(1 for c in cases if c.find("skipped") is not None)
            return f"tests: finished: {len(cases)} run, {len(cases) - bad - skipped} passed, {bad} failed, {skipped} skipped"
        except ET.ParseError:
            pass
    try:
        text = open(log, errors="replace").read()
    except OSError:
        return "tests: not run"
    collected = re.search(r"collected (\d+) items?", text)
    counts = {}
    failed = []
    last = None
    for m in re.finditer(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b.*?(?:\[\s*(\d+)%\])?$", text, re.M):
        counts[m.group(2)] = counts.get(m.group(2), 0) + 1
        last = m.group(1)
        if m.group(2) in ("FAILED", "ERROR"):
            failed.append(m.group(1))
    done = sum(counts.values())
    total = int(collected.group(1)) if collected else None
    where = f"{done}/{total}" if total else f"{done}"
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    got = ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items()))
    s = f"tests: cut by the deadline after {where} tests{pct}: {got or 'none finished'}; last: {last}"
    if failed:
        s += "\n  failed: " + ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else "")
    return s


def main(out) -> int:
    env = read_env(out)
    m = re.search(r"triton (\S+)", env.get("versions", ""))
    static = static_figures(m.group(1) if m else None)
    notes, table = headline_table(out, static)
    native_log = os.path.join(out, "native_build.log")
    native = open(native_log, errors="replace").read().strip().splitlines()[-2:] if os.path.exists(native_log) else []
    parts = ["", "==================== GPU check summary ====================", ""]
    if env.get("dry_run") == "1":
        parts += ["DRY RUN (CPU, Triton interpreter, tiny shapes): code paths only, no figure here is a GPU figure.", ""]
    parts += stage_table(out) + [""] + smoke_table(out) + [""]
    parts += ["native build: " + (" / ".join(native) if native else "not run"), tests_progress(out), ""]
    paste = [
        f"## GPU: {env.get('card', '?')}, {env.get('date', '?')}, commit {env.get('commit', '?')}",
        "",
        f"Command: `benchmarks/gpu_check.sh` ({env.get('versions', '?')}); peers: {env.get('peers', 'none')}.",
        *notes,
        "copy% = effective GB/s (minimal bytes / median time) as a share of a device-to-device copy of the same "
        "bytes, same run; vs eager = the HF-style eager row's time (eager buffer add for the sinusoidal op, the "
        "unfused sequence for the cache rows) / this row's; peak MiB = allocated above the starting level during one call.",
        (f"static figures: sm_90 SASS read without a GPU ({os.path.relpath(STATIC, REPO)}, scripts/static_figures): "
         "registers, serialised load rounds per program, warp-instructions per DRAM byte, blocks per SM, load bytes "
         "in flight per thread" if static is not None
         else f"static figures: not available ({os.path.relpath(STATIC, REPO)} absent)"),
        "",
        *table,
        *([""] + cache_targets(out) if cache_targets(out) else []),
    ]
    parts += ["---------- paste into benchmarks/RESULTS.md ----------", *paste, "---------- end ----------"]
    text = "\n".join(parts) + "\n"
    try:
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(text)
    except OSError:
        pass
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "bench-results")))
