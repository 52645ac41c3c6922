"""Print the results table from a pytest-benchmark JSON file.

    python benchmarks/report.py bench-results/benchmarks.json [--markdown]
"""

import json
import sys
from collections import defaultdict

BASELINES = {
    "apply_rope_": "hf_eager",
    "apply_rope_ decode": "hf_eager",
    "apply_rope_ decode CUDA graph": "hf_eager",
    "apply_rope_ varlen": "hf_eager",
    "apply_rope_qkv_": "hf_eager",
    "qk_norm_rope_": "hf_eager",
    "apply_rope_ CPU": "hf_eager",
    "apply_rope_ CPU decode": "empty_custom_op",
    "add_sinusoidal_": "eager_buffer",
    "concat_sinusoidal": "eager_buffer",
    "add_position_embedding_": "eager",
    "position_embedding_backward": "eager",
    "alibi_bias": "eager",
    "t5_relative_bias": "eager",
    "t5_relative_bias_fwd_bwd": "eager",
}


def main(path: str) -> int:
    with open(path) as f:
        data = json.load(f)
    rows = [b["extra_info"] for b in data["benchmarks"] if "median_us" in b.get("extra_info", {})]
    if not rows:
        print("no benchmark results in", path)
        return 1
    groups = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["shape"])].append(r)
    print(f"\nDevice: {rows[0]['device']}  |  timing: {rows[0]['timing']}")
    print("copy% = effective GB/s as a share of a device-to-device copy of the same bytes, same run")
    print("peak MiB = memory allocated above the starting level during one call (CUDA only)\n")
    w_op = max(16, *(len(r["op"]) for r in rows))
    w_shape = max(30, *(len(r["shape"]) for r in rows))
    header = f"| {'op':<{w_op}} | {'shape':<{w_shape}} | {'provider':<22} | {'median us':>11} | {'GB/s':>8} | {'copy%':>6} | {'vs eager':>8} | {'peak MiB':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for (op, shape), rs in groups.items():
        base = next((r for r in rs if r["provider"] == BASELINES.get(op)), None)
        for r in sorted(rs, key=lambda r: r["median_us"]):
            speed = f"{base['median_us'] / r['median_us']:.2f}x" if base else "-"
            peak = "-" if r.get("peak_extra_mb") is None else f"{r['peak_extra_mb']:.1f}"
            print(
                f"| {op:<{w_op}} | {shape:<{w_shape}} | {r['provider']:<22} | {r['median_us']:>11.1f} | {r['gbps']:>8.1f} | "
                f"{100 * r['copy_ratio']:>5.1f}% | {speed:>8} | {peak:>8} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench-results/benchmarks.json"))
