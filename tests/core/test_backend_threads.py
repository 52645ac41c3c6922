"""Backend selection under threads: kernels are registered once, at import, and the backend is read per call,
so a thread that switches backends (``use_backend``, ``set_backend``) while others call ops never crashes
the process, never mis-dispatches and never finds a kernel missing.

Before the registry registered kernels once, a thread in ``use_backend("torch")`` beside a thread calling
``apply_rope_`` crashed the process (SIGSEGV) in 2 of 3 runs, or raised "expected at most 4 argument(s) but
received 14" / "Could not run 'posenc::rope_' with arguments from the 'CPU' backend". Each case runs in a
subprocess (a crash must fail the test, not kill the suite), on the default path (no interpreter: the native
C++ kernels when the extension is loaded) and on the interpreter path (TRITON_INTERPRET=1).
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, threading
    import torch
    import posenc_kernels as pk

    CALLS = int(sys.argv[1])
    torch.manual_seed(0)
    q0, k0 = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 2, 16)
    cos, sin = pk.rope_cos_sin(8, pk.rope_frequencies(16)[0])
    x0, table, pos = torch.randn(3, 16), torch.randn(8, 16), torch.tensor([5, 0, 7])
    with pk.use_backend("torch"):  # the expected values, from the pure-torch implementation
        want_q, want_k = pk.apply_rope(q0, k0, cos, sin, offsets=2)
        want_x = pk.add_position_embedding(x0, table, pos)
        want_pe = pk.sinusoidal_table(5, 16)

    stop, errors = threading.Event(), []

    def toggle():
        i = 0
        while not stop.is_set():
            try:
                if i % 2:
                    with pk.use_backend("torch"):
                        pk.apply_rope(q0, k0, cos, sin, offsets=2)
                else:
                    pk.set_backend(("auto", "torch")[(i // 2) % 2])
            except Exception as e:  # noqa: BLE001 - any error is a failure
                errors.append(f"toggler: {type(e).__name__}: {e}")
            i += 1
        pk.set_backend("auto")

    t = threading.Thread(target=toggle)
    t.start()
    try:
        for i in range(CALLS):
            q, k = q0.clone(), k0.clone()
            pk.apply_rope_(q, k, cos, sin, offsets=2)
            x = x0.clone()
            pk.add_position_embedding_(x, table, pos)
            pe = pk.sinusoidal_table(5, 16)
            for name, got, want in (("q", q, want_q), ("k", k, want_k), ("x", x, want_x), ("pe", pe, want_pe)):
                if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
                    errors.append(f"call {i}: {name} differs by {(got - want).abs().max().item()}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"caller: {type(e).__name__}: {e}")
    finally:
        stop.set()
        t.join()
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
