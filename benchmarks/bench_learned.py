"""Learned position embedding benchmarks.

* ``add_position_embedding_``: x <- x + table[positions] in one pass vs eager ``x + table[positions]`` (a
  gathered temporary, then an add) and torch.compile of it. Positions are ``arange(S)`` shared by the batch
  (GPT-2's ``wpe``). Minimal bytes: x read and written once, the S table rows used read once.
* ``position_embedding_backward``: the table gradient, atomic and deterministic paths, vs PyTorch's
  ``embedding_dense_backward`` (what nn.Embedding runs). Positions ``[B, S]`` (every sequence its own rows,
  so rows repeat B times). Minimal bytes: the upstream gradient read once, the table gradient written once.
"""

import pytest
import torch

from posenc_kernels import add_position_embedding, add_position_embedding_

from _harness import DEVICE, IS_CUDA, run

if IS_CUDA:
    CASES = [((8, 1024, 768), torch.bfloat16), ((4, 4096, 4096), torch.bfloat16), ((64, 512, 768), torch.float32)]
    GRAD_CASES = [((8, 1024, 768), torch.bfloat16), ((4, 4096, 4096), torch.bfloat16)]
else:
    CASES = [((4, 1024, 1024), torch.float32), ((4, 1024, 1024), torch.bfloat16)]
    GRAD_CASES = [((4, 1024, 1024), torch.float32)]

PROVIDERS = ["posenc_inplace", "posenc_outofplace", "eager", "eager_compiled"]
GRAD_PROVIDERS = ["posenc_atomic", "posenc_deterministic", "eager"]

_compiled = None


def _eager(x, table, positions):
    return x + table[positions]


def _case_id(c):
    return "x".join(map(str, c[0])) + "-" + str(c[1]).replace("torch.", "")


def _shape_str(shape, dtype):
    return f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_add_position_embedding(benchmark, case, provider):
    global _compiled
    (B, S, D), dtype = case
    x = torch.randn(B, S, D, device=DEVICE, dtype=dtype)
    table = torch.randn(max(S, 1024), D, device=DEVICE, dtype=dtype)
    pos = torch.arange(S, device=DEVICE)
    if provider == "posenc_inplace":
        fn = lambda: add_position_embedding_(x, table, pos)  # noqa: E731
    elif provider == "posenc_outofplace":
        fn = lambda: add_position_embedding(x, table, pos)  # noqa: E731
    elif provider == "eager":
        fn = lambda: _eager(x, table, pos)  # noqa: E731
    else:
        if _compiled is None:
            _compiled = torch.compile(_eager, dynamic=False)
        fn = lambda: _compiled(x, table, pos)  # noqa: E731
    nbytes = 2 * x.nbytes + S * D * table.element_size() + pos.nbytes
    run(benchmark, fn, op="add_position_embedding_", shape=_shape_str((B, S, D), dtype), provider=provider,
        nbytes=nbytes, positions="arange(S), shared by the batch")  # fmt: skip


@pytest.mark.parametrize("provider", GRAD_PROVIDERS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_position_embedding_backward(benchmark, case, provider):
    (B, S, D), dtype = case
    P = max(S, 1024)
    g = torch.randn(B, S, D, device=DEVICE, dtype=dtype)
    pos = torch.randint(0, S, (B, S), device=DEVICE)
    if provider == "eager":
        g2, pos1 = g.reshape(-1, D), pos.reshape(-1)
        fn = lambda: torch.ops.aten.embedding_dense_backward(g2, pos1, P, -1, False)  # noqa: E731
    else:
        det = provider == "posenc_deterministic"
        fn = lambda: torch.ops.posenc.position_embedding_backward(g, pos, P, None, det, dtype)  # noqa: E731
    nbytes = g.nbytes + P * D * g.element_size() + pos.nbytes
    run(benchmark, fn, op="position_embedding_backward", shape=_shape_str((B, S, D), dtype), provider=provider,
        nbytes=nbytes, positions="random [B, S] in [0, S)")  # fmt: skip
