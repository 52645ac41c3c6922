"""``python -m posenc_kernels``: what this environment runs - the first thing to run on a new machine.

Prints the versions, whether the native extension loaded and from where (``aot`` or ``jit``), its kernels
per op and device, the instruction set its CPU kernels picked (AVX512, AVX2 or baseline), the JIT cache,
the CUDA toolkit and architectures, and why anything was skipped or failed (see
:func:`posenc_kernels._native.status`). Loading may build the extension (once, cached).

``--rebuild`` forgets this environment's just-in-time builds (a remembered failure included) and builds
them again; ``--json`` prints the same facts as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as e:  # noqa: BLE001 - report, don't fail
        return f"not importable ({type(e).__name__}: {e})"
    return getattr(mod, "__version__", "?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posenc_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="rebuild the just-in-time extension from scratch")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)

    import torch

    import posenc_kernels
    from posenc_kernels import _native

    removed = [str(d) for d in _native.forget_builds()] if args.rebuild else []
    if args.rebuild:
        os.environ["POSENC_NATIVE_RETRY"] = "1"
        if _native._mode() == "auto":  # a rebuild means the JIT build, even beside a prebuilt module
            os.environ["POSENC_NATIVE"] = "jit"
    st = _native.status()
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    facts = {
        "posenc_kernels": posenc_kernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(n_gpus)],
        "triton": _version("triton"),
        "removed": removed,
        **st,
    }
    code = 0 if st["source"] is not None or st["mode"] == "0" else 1
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return code

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    gpus = ", ".join(facts["gpus"]) if facts["gpus"] else "no GPU visible"
    print(f"posenc_kernels {facts['posenc_kernels']}  python {facts['python']}  torch {torch.__version__} "
          f"({cuda}; {gpus})  triton {facts['triton']}")  # fmt: skip
    for d in removed:
        print(f"rebuild: removed {d}")
    if st["source"] is None:
        print(f"native: not loaded ({st['error']}); the Triton/torch backends run")
    else:
        print(f"native: loaded ({st['source']}) from {st['library']}")
        for op, devices in st["kernels"].items():
            print(f"  {op:28s} {' '.join(d.upper() for d in devices) or 'no kernels'}")
        if st["cpu_isa"]:
            isas = sorted(set(st["cpu_isa"].values()))
            which = isas[0] if len(isas) == 1 else ", ".join(f"{f} {i}" for f, i in st["cpu_isa"].items())
            print(f"  CPU instruction set: {which} (the {' and '.join(st['cpu_isa'])} kernels; torch's CPU "
                  f"capability {st['torch_cpu_capability']})")  # fmt: skip
    if st["aot_build_info"]:
        b = st["aot_build_info"]
        print(f"  built for torch {b.get('torch')}, sources {b.get('source')}, "
              f"CUDA {b.get('cuda') or '-'} archs {b.get('archs') or '-'}")  # fmt: skip
    if torch.version.cuda is not None:
        if st["cuda_toolkit"]:
            archs, origin = st["cuda_archs"]
            print(f"CUDA toolkit: {st['cuda_toolkit_note']}; archs {archs} ({origin})")
        else:
            print(f"CUDA toolkit: none usable ({st['cuda_toolkit_note']})")
        if st["cuda_skipped"]:
            print(f"CUDA kernels skipped: {st['cuda_skipped']}")
    print(f"JIT cache: {st['cache']} (POSENC_NATIVE_CACHE moves it); sources: {st['csrc']}; "
          f"POSENC_NATIVE={os.environ.get('POSENC_NATIVE', '1')}")  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
