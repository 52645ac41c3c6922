"""How far RoPE's angles drift from the float64 truth at long positions, per frequency schedule.

    python benchmarks/angle_accuracy.py [--samples N] [--json PATH] [--no-verify]

For each schedule that :func:`posenc_kernels.rope_frequencies` supports (Llama-3's rotary dim 128 and base
500000) and each position range ``[0, P)`` with P in 2**10, 2**16, 2**20, 2**22, the package's ``apply_rope``
rotates unit pairs (x1 = 1, x2 = 0, fp32): the output pair is then exactly the fp32 (cos, sin) the kernel
used, scaled by the schedule's attention factor. Three angle sources are measured:

* ``table``: fp32 tables from ``rope_cos_sin`` (one fp32 product ``fp32(pos) * inv_freq``), gathered by row;
* ``on-the-fly``: ``inv_freq`` fp32, no table (the same fp32 product in the kernel: HF's numerics);
* ``exact``: ``inv_freq`` float64 with ``exact=True`` (float64 product reduced mod 2 pi, then fp32 cos/sin).

The truth is float64 ``pos * inv_freq64`` with the schedule's float64 frequencies, so the default paths'
error includes the rounding of ``inv_freq`` to fp32 (which grows with the position). Reported: the max
angle error ``|wrap(atan2(sin, cos) - truth)|`` in radians and the max abs error of cos/sin against
``attention_factor * cos/sin(truth)``, over a sample of positions in ``[0, P)``: the last 1024 positions
below P plus ``--samples`` uniformly drawn ones (seeded).

The main run uses the torch backend (fast on CPU). A second process with ``TRITON_INTERPRET=1`` then runs
the Triton kernel through the interpreter on a small sample and compares it with the torch backend on the
same inputs (figures and max output difference), so the table describes the kernel too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import torch

import posenc_kernels as pk

ROTARY_DIM = 128
BASE = 500000.0
POWERS = (10, 16, 20, 22)
SCHEDULES = {
    "default": None,
    "linear x4": {"rope_type": "linear", "factor": 4.0},
    "ntk x4": {"rope_type": "ntk", "factor": 4.0},
    "dynamic x4": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 8192},
    "llama3 x8": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "yarn x4": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}
PATHS = ("table", "on-the-fly", "exact")


def frequencies(scaling, seq_len):
    """(inv32, inv64, attention_factor), or None with the reason when the schedule is not supported."""
    kw = dict(scaling=scaling, seq_len=seq_len, max_position_embeddings=8192)
    try:
        inv32, af = pk.rope_frequencies(ROTARY_DIM, BASE, dtype=torch.float32, **kw)
        inv64, af64 = pk.rope_frequencies(ROTARY_DIM, BASE, dtype=torch.float64, **kw)
    except (NotImplementedError, ValueError, TypeError, KeyError) as e:
        return None, f"{type(e).__name__}: {e}"
    return (inv32, inv64, float(af)), None


def sample_positions(power: int, samples: int, tail: int = 1024, seed: int = 0) -> torch.Tensor:
    P = 1 << power
    g = torch.Generator().manual_seed(seed + power)
    tail = torch.arange(max(0, P - tail), P)
    rand = torch.randint(0, P, (samples,), generator=g)
    return torch.cat((tail, rand)).unique()


def rotate_units(path, pos, inv32, inv64, af):
    """fp32 (cos, sin) ``[n, R/2]`` as the package applies them, from unit pairs."""
    n, half = pos.shape[0], inv32.shape[0]
    q = torch.zeros(1, n, 1, 2 * half, dtype=torch.float32)
    q[..., :half] = 1.0
    if path == "table":
        cos, sin = pk.rope_cos_sin(pos, inv32, attention_factor=af)  # rows for the sampled positions only
        out, _ = pk.apply_rope(q, None, cos, sin, positions=torch.arange(n))
    elif path == "on-the-fly":
        out, _ = pk.apply_rope(q, None, inv_freq=inv32, attention_factor=af, positions=pos)
    else:
        out, _ = pk.apply_rope(q, None, inv_freq=inv64, attention_factor=af, exact=True, positions=pos)
    return out[0, :, 0, :half], out[0, :, 0, half:]


def errors(cos, sin, pos, inv64, af):
    truth = pos.to(torch.float64)[:, None] * inv64.to(torch.float64)[None, :]
    got = torch.atan2(sin.double(), cos.double())
    d = torch.remainder(got - truth + math.pi, 2 * math.pi) - math.pi
    angle_err = d.abs().max().item()
    cs_err = max((cos.double() - af * truth.cos()).abs().max().item(), (sin.double() - af * truth.sin()).abs().max().item())
    return angle_err, cs_err


def measure(samples: int, backend: str, schedules=None, powers=POWERS, tail: int = 1024):
    """{schedule: {path: {power: (angle_err, cos_sin_err)}}} plus the outputs (for comparisons)."""
    res, outs, skipped = {}, {}, {}
    with pk.use_backend(backend):
        for name, scaling in SCHEDULES.items():
            if schedules is not None and name not in schedules:
                continue
            for power in powers:
                f, why = frequencies(scaling, 1 << power)
                if f is None:
                    skipped[name] = why
                    break
                inv32, inv64, af = f
                pos = sample_positions(power, samples, tail)
                for path in PATHS:
                    c, s = rotate_units(path, pos, inv32, inv64, af)
                    res.setdefault(name, {}).setdefault(path, {})[power] = errors(c, s, pos, inv64, af)
                    outs[(name, path, power)] = torch.stack((c, s))
    return res, outs, skipped


def markdown(res, idx: int, what: str) -> str:
    head = "| schedule | angles | " + " | ".join(f"P = 2^{p}" for p in POWERS) + " |"
    lines = [f"Max {what} over positions in [0, P) (rotary dim {ROTARY_DIM}, base {BASE:g}):", "", head,
             "|" + "---|" * (2 + len(POWERS))]  # fmt: skip
    for name, paths in res.items():
        for path, by_p in paths.items():
            cells = " | ".join(f"{by_p[p][idx]:.1e}" if p in by_p else "-" for p in POWERS)
            lines.append(f"| {name} | {path} | {cells} |")
    return "\n".join(lines)


def verify_worker(samples: int) -> dict:
    """Run under TRITON_INTERPRET=1: the Triton kernel vs the torch backend on the same small sample."""
    if not pk.interpreter_enabled():
        raise SystemExit("--verify-worker needs TRITON_INTERPRET=1 set before import")
    names = ["default", "llama3 x8", "yarn x4"]
    tri, tri_out, _ = measure(samples, "triton", names, tail=64)
    tor, tor_out, _ = measure(samples, "torch", names, tail=64)
    diff = max((tri_out[key].double() - tor_out[key].double()).abs().max().item() for key in tri_out)
    worst = 0.0
    for name in tri:
        for path in tri[name]:
            for p in tri[name][path]:
                worst = max(worst, abs(tri[name][path][p][0] - tor[name][path][p][0]))
    return {"triton": tri, "torch": tor, "max_output_diff": diff, "max_angle_err_diff": worst, "samples": samples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2048, help="random positions per P besides the last 1024")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--no-verify", action="store_true", help="skip the Triton-interpreter cross-check")
    ap.add_argument("--verify-samples", type=int, default=16)
    ap.add_argument("--verify-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    if args.verify_worker:
        print(json.dumps(verify_worker(args.verify_samples)))
        return 0

    res, _, skipped = measure(args.samples, "torch")
    print(markdown(res, 0, "angle error (rad) vs float64 truth"))
    print()
    print(markdown(res, 1, "abs error of cos/sin (x attention_factor) vs float64"))
    for name, why in skipped.items():
        print(f"\nskipped {name}: {why}")
    out = {"torch": res, "skipped": skipped}

    if not args.no_verify:
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, os.path.abspath(__file__), "--verify-worker", "--verify-samples", str(args.verify_samples)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"\nTriton-interpreter cross-check FAILED (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            return 1
        v = json.loads(proc.stdout.strip().splitlines()[-1])
        for key in ("triton", "torch"):  # JSON made the powers strings
            v[key] = {n: {pa: {int(p): e for p, e in by_p.items()} for pa, by_p in d.items()} for n, d in v[key].items()}
        out["verify"] = v
        print(f"\nTriton kernel (TRITON_INTERPRET=1) vs torch backend, schedules {', '.join(v['triton'])}, "
              f"{v['samples']} random + the last 64 positions per P: max |output difference| "
              f"{v['max_output_diff']:.1e}, max difference of the max angle errors {v['max_angle_err_diff']:.1e} rad")  # fmt: skip
        print()
        print(markdown(v["triton"], 0, "angle error (rad), Triton kernel through the interpreter,"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
