"""Hypothesis profiles of the property suite (tests/properties/), chosen by ``POSENC_HYPOTHESIS_PROFILE``.

* ``ci`` (default): derandomized (a fixed seed: every run draws the same examples), each test's fixed
  example budget (``common.examples``), no deadline (the Triton interpreter's first call of a kernel
  compiles it), no example database; a failure prints the shrunk example, whose repr is a runnable
  reproducer (each test ``note()``\\ s the command).
* ``nightly``: ten times each budget (``POSENC_HYPOTHESIS_EXAMPLES=N`` sets N for every test instead) and
  random seeds (``--hypothesis-seed=S`` replays a run; a failure also prints ``@reproduce_failure``).

See docs/testing.md.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(
    deadline=None,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", derandomize=True, **_common)
settings.register_profile("nightly", derandomize=False, **_common)
_profile = os.environ.get("POSENC_HYPOTHESIS_PROFILE", "ci")
if _profile not in ("ci", "nightly"):
    raise ValueError(f"POSENC_HYPOTHESIS_PROFILE must be 'ci' or 'nightly', got {_profile!r}")
settings.load_profile(_profile)
