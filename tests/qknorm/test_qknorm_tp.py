"""Tensor parallelism: qk_norm_rope with norm="heads" on heads sharded over 2 gloo ranks (CPU), with
``group=``, equals the unsharded op: values (in place and out of place) and the gradients dq, dk, dq_weight,
dk_weight of each rank's shard, under a random upstream gradient, on every backend this machine runs.

Two CPU ranks (a file:// rendezvous in a temporary directory, as tests/core/test_context_parallel.py); q has
5 heads split 3 + 2 (uneven shards: the channel count is all-reduced too), k 2 heads split 1 + 1. Each rank
draws the same full tensors, works on its heads and its slice of the weights, and compares with the
unsharded op it also runs, to 1e-5 (fp32: the sums of squares are added in another order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

WORLD, B, S, HQ, HK, D = 2, 2, 3, 5, 2, 16
Q_SPLIT, K_SPLIT = [(0, 3), (3, 5)], [(0, 1), (1, 2)]
TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)


def _rank_main(rank: int, init_file: str, result_file: str, native: bool) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    import posenc_kernels as pk

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))  # fmt: skip
    backends = ["torch"] + (["native"] if native else []) + (["triton"] if pk.interpreter_enabled() else [])
    results = {}
    (q0, q1), (k0, k1) = Q_SPLIT[rank], K_SPLIT[rank]
    try:
        for backend in backends:
            with pk.use_backend(backend):
                g = torch.Generator().manual_seed(7)
                q_full = torch.randn(B, S, HQ, D, generator=g) * 3
                k_full = torch.randn(B, S, HK, D, generator=g)
                qw_full, kw_full = torch.rand(HQ * D, generator=g), torch.rand(HK * D, generator=g)
                gq_full, gk_full = torch.randn(B, S, HQ, D, generator=g), torch.randn(B, S, HK, D, generator=g)
                cos, sin = pk.rope_cos_sin(S + 2, pk.rope_frequencies(D)[0])
                kw = dict(norm="heads", weight_offset=0.5, offsets=1)
                leaves = [t.clone().requires_grad_() for t in (q_full, k_full, qw_full, kw_full)]
                ref_q, ref_k = pk.qk_norm_rope(*leaves, cos, sin, **kw)
                ref_g = torch.autograd.grad((ref_q, ref_k), leaves, (gq_full, gk_full))
                # this rank's shard
                mine = [q_full[:, :, q0:q1].clone(), k_full[:, :, k0:k1].clone(), qw_full[q0 * D : q1 * D].clone(),
                        kw_full[k0 * D : k1 * D].clone()]  # fmt: skip
                leaves = [t.clone().requires_grad_() for t in mine]
                oq, ok = pk.qk_norm_rope(*leaves, cos, sin, group=dist.group.WORLD, **kw)
                grads = torch.autograd.grad((oq, ok), leaves, (gq_full[:, :, q0:q1], gk_full[:, :, k0:k1]))
                iq, ik = mine[0].clone(), mine[1].clone()
                with torch.no_grad():
                    pk.qk_norm_rope_(iq, ik, mine[2], mine[3], cos, sin, group=dist.group.WORLD, **kw)
                want = [ref_q[:, :, q0:q1], ref_k[:, :, k0:k1]]
                want_g = [ref_g[0][:, :, q0:q1], ref_g[1][:, :, k0:k1], ref_g[2][q0 * D : q1 * D],
                          ref_g[3][k0 * D : k1 * D]]  # fmt: skip
                errs = {
                    "out": max((oq - want[0]).abs().max().item(), (ok - want[1]).abs().max().item()),
                    "inplace": max((iq - want[0]).abs().max().item(), (ik - want[1]).abs().max().item()),
                    "grads": max((a - b).abs().max().item() for a, b in zip(grads, want_g)),
                    # without group the local norm differs: the test would notice a no-op all-reduce
                    "local_differs": (pk.qk_norm_rope(*mine, cos, sin, **kw)[0] - want[0]).abs().max().item(),
                }
                results[backend] = errs
    finally:
        dist.barrier()
        dist.destroy_process_group()
    with open(result_file, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def tp_results():
    from posenc_kernels import _native

    native = _native.available() and _native.has_op("qk_norm_rope_", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        env = dict(os.environ)
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        procs = [
            subprocess.Popen([sys.executable, os.path.abspath(__file__), str(r), init_file,
                              os.path.join(tmp, f"rank{r}.json"), str(int(native))],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            for r in range(WORLD)
        ]
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s")
        for r, p in enumerate(procs):
            if p.returncode != 0:
                pytest.fail(f"rank {r} exited with {p.returncode}:\n{logs[r][-4000:]}")
        out = []
        for r in range(WORLD):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                out.append(json.load(f))
    return out


def test_sharded_heads_norm_equals_unsharded(tp_results):
    for rank, res in enumerate(tp_results):
        assert "torch" in res
        for backend, e in res.items():
            assert e["out"] < 1e-5 and e["inplace"] < 1e-5, (rank, backend, e)
            assert e["grads"] < 1e-5, (rank, backend, e)
            assert e["local_differs"] > 1e-3, (rank, backend, e)


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3], bool(int(sys.argv[4])))
