"""Thread-safety repro of issue 17 (run as a script, in its own process): one thread toggles the backend
(``use_backend("torch")`` blocks and ``set_backend``) in a loop while the main thread calls
``pk.apply_rope_`` 2,000 times on CPU, cycling through no override (whatever the process default is),
its own ``use_backend("native")`` and ``use_backend("torch")``.
Before the once-registration this crashed (SIGSEGV: kernels registered and destroyed under running calls).
Checks: no crash; every result equals the first one (native and torch agree to 1e-6 in fp32); under the main thread's native override no
call reached a Python kernel, under its torch override every call did (no mis-dispatch). Prints one line,
exits 0 when all holds."""

import sys
import threading

import torch

import posenc_kernels as pk
from posenc_kernels.ops import registry

CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
main = threading.get_ident()
python_calls = [0]
run_python = registry.run_python


def counting(*a):
    if threading.get_ident() == main:
        python_calls[0] += 1
    return run_python(*a)


registry.run_python = counting

stop = threading.Event()
toggles = [0]


def toggler():
    names = ("native", "torch", "auto")
    while not stop.is_set():
        with pk.use_backend("torch"):
            pk.set_backend(names[toggles[0] % 3])
        toggles[0] += 1


torch.manual_seed(0)
inv = pk.rope_frequencies(8)[0]
cos, sin = pk.rope_cos_sin(64, inv)
q0, k0 = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8)
offs = torch.tensor([7])

t = threading.Thread(target=toggler)
t.start()
bad, misdispatch = 0, 0
try:
    expected = None
    for i in range(CALLS):
        backend = (None, "native", "torch")[i % 3]
        q, k = q0.clone(), k0.clone()
        before = python_calls[0]
        if backend is None:
            pk.apply_rope_(q, k, cos, sin, offsets=offs)
        else:
            with pk.use_backend(backend):
                pk.apply_rope_(q, k, cos, sin, offsets=offs)
        went_python = python_calls[0] > before
        misdispatch += backend is not None and went_python != (backend == "torch")
        if expected is None:
            expected = (q.clone(), k.clone())
        bad += not (torch.allclose(q, expected[0], atol=1e-6) and torch.allclose(k, expected[1], atol=1e-6))
finally:
    stop.set()
    t.join()
pk.set_backend("auto")
print(f"calls {CALLS}, toggles {toggles[0]}, wrong results {bad}, mis-dispatched {misdispatch}")
sys.exit(1 if bad or misdispatch or toggles[0] == 0 else 0)
