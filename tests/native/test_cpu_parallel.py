"""The CPU kernels' parallel split (csrc/cpu_parallel.h): a call moving more than twice kMinTaskBytes (8 MiB)
of memory traffic is split over threads, a smaller one runs inline on the calling thread. Either way every
element is computed as on one thread: outputs with 2 threads equal those with 1 bitwise, and the
out-of-place outputs are NaN-poisoned at allocation, so an element no task wrote fails. Sizes on both
sides of the threshold, with item counts that do not divide evenly."""

import pytest
import torch

import posenc_kernels as pk

from .native_common import *  # noqa: F401,F403  (the shared helpers: native_common.__all__)

MIB = 2**20


def _on_threads(n, fn):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(prev)


def _same_on_1_and_2_threads(fn):
    with nan_poisoned_allocations():
        one, two = _on_threads(1, fn), _on_threads(2, fn)
    for a, b in zip(one, two):
        assert not a.isnan().any()
        assert torch.equal(a, b)


# Llama-3-8B heads in fp32: 40,960 bytes of traffic per token; 400 tokens = 15.6 MiB (inline), 1031 = 40 MiB.
@pytest.mark.parametrize("tokens", [400, 1031])
def test_rope(tokens):
    q, k = make(1, tokens, 32, 8, 128, torch.float32)
    assert (2 * (q.nbytes + k.nbytes) > 16 * MIB) == (tokens > 400)
    cos, sin = tables(tokens + 3, 128)
    args = op_args(cos, sin, offset=3)
    _same_on_1_and_2_threads(lambda: rope(q, k, *args))
    q2, k2 = q.clone(), k.clone()  # in place on 2 threads: the out-of-place result
    _on_threads(2, lambda: rope_(q2, k2, *args))
    want = rope(q, k, *args)
    assert torch.equal(q2, want[0]) and torch.equal(k2, want[1])


def test_sinusoidal_and_learned():
    """[4, 1031, 1024] fp32: 32 MiB (sinusoidal add: x read, out written) and 48 MiB (learned add: x and
    the table rows read, out written), so both split."""
    x = torch.randn(4, 1031, 1024)
    table = torch.randn(1100, 1024)
    positions = torch.randint(0, 1100, (4, 1031))
    _same_on_1_and_2_threads(lambda: (pk.add_sinusoidal(x, offsets=torch.tensor([0, 5, 9, 2])),))
    _same_on_1_and_2_threads(lambda: (pk.add_position_embedding(x, table, positions),))
