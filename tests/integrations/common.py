"""Helpers of the integration tests.
"""

import pytest
import torch

from conftest import assert_dtype_tolerance

transformers = pytest.importorskip("transformers")


def check_pair(out, hf_fn, args64, hf_args, what):
    """out (ours, in dtype) vs HF in float64 (truth) and HF in the input dtype (torch-in-dtype)."""
    truth = hf_fn(*args64)
    same = hf_fn(*hf_args)
    for o, t, s, name in zip(out, truth, same, ("q", "k")):
        assert o.dtype == s.dtype and o.shape == s.shape, (name, o.dtype, s.dtype, o.shape, s.shape)
        assert_dtype_tolerance(o, t.to(o.dtype) if o.dtype == torch.float64 else t, s, what=f"{what} {name}")


def to64(*ts):
    return tuple(t.double() if isinstance(t, torch.Tensor) else t for t in ts)
