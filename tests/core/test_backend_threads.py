"""Backend selection under threads: kernels are registered once, at import, and the backend is read per call,
so a thread that switches backends (``use_backend``, ``set_backend``) while others call ops never crashes
the process, never mis-dispatches and never finds a kernel missing.

Before the registry registered kernels once, a thread in ``use_backend("torch")`` beside a thread calling
``apply_rope_`` crashed the process (SIGSEGV) in 2 of 3 runs, or raised "expected at most 4 argument(s) but
received 14" / "Could not run 'posenc::rope_' with arguments from the 'CPU' backend". The calling thread
also switches its own override and checks where each call ran (torch: a Python kernel; native: none). Each
case runs in a subprocess (a crash must fail the test, not kill the suite), on the default path (no
interpreter: the native C++ kernels when the extension is loaded) and on the interpreter path
(TRITON_INTERPRET=1).
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import contextlib, sys, threading
    import torch
    import posenc_kernels as pk
    from posenc_kernels.ops import registry

    CALLS = int(sys.argv[1])
    main, python_calls = threading.get_ident(), [0]
    run_python = registry.run_python

    def counting(*a):  # counts this thread's calls that reached a Python kernel
        if threading.get_ident() == main:
            python_calls[0] += 1
        return run_python(*a)

    registry.run_python = counting
    torch.manual_seed(0)
    q0, k0 = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 2, 16)
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(16)[0])
    x0, table, pos = torch.randn(3, 16), torch.randn(8, 16), torch.tensor([5, 0, 7])
    with pk.use_backend("torch"):  # the expected values, from the pure-torch implementation
        want = dict(zip("qk", pk.apply_rope(q0, k0, cos, sin, offsets=2)))
        want["x"] = pk.add_position_embedding(x0, table, pos)
        want["pe"] = pk.sinusoidal_table(5, 16)
    # The main thread cycles through no override and its own overrides: under "torch" every call must reach a
    # Python kernel, under "native" none (the C++ chooser runs it), whatever the other thread sets.
    overrides = (None, "torch") + (("native",) if pk._native.available() else ())
    stop, errors, toggles = threading.Event(), [], [0]

    def toggle():
        while not stop.is_set():
            try:
                with pk.use_backend("torch"):
                    pk.apply_rope(q0, k0, cos, sin, offsets=2)
                    pk.set_backend(("auto", "torch", "native" if pk._native.available() else "auto")[toggles[0] % 3])
            except Exception as e:  # noqa: BLE001 - any error is a failure
                errors.append(f"toggler: {type(e).__name__}: {e}")
            toggles[0] += 1

    t = threading.Thread(target=toggle)
    t.start()
    try:
        for i in range(CALLS):
            backend = overrides[i % len(overrides)]
            q, k, x = q0.clone(), k0.clone(), x0.clone()
            before = python_calls[0]
            with pk.use_backend(backend) if backend else contextlib.nullcontext():
                pk.apply_rope_(q, k, cos, sin, offsets=2)
                pk.add_position_embedding_(x, table, pos)
                pe = pk.sinusoidal_table(5, 16)
            if backend is not None and (python_calls[0] > before) != (backend == "torch"):
                errors.append(f"call {i}: mis-dispatched under use_backend({backend!r})")
            for name, got in (("q", q), ("k", k), ("x", x), ("pe", pe)):
                if not torch.allclose(got, want[name], atol=1e-5, rtol=1e-5):
                    errors.append(f"call {i}: {name} differs by {(got - want[name]).abs().max().item()}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"caller: {type(e).__name__}: {e}")
    finally:
        stop.set()
        t.join()
        pk.set_backend("auto")
    if not toggles[0]:
        errors.append("the other thread never switched")
    print("\\n".join(errors[:10]) or f"ok {CALLS}")
    sys.exit(1 if errors else 0)
    """
)


@pytest.mark.parametrize("path", ["default", "interpreter"])
def test_switching_backends_in_another_thread(path, tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if path == "interpreter":
        env["TRITON_INTERPRET"] = "1"
    calls = 2000
    script = tmp_path / "threads.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(calls)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"rc {run.returncode} (negative: killed by a signal)\n{run.stdout}\n{run.stderr[-3000:]}"
    assert run.stdout.strip() == f"ok {calls}"
