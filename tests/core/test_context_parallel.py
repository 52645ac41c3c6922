"""Context parallelism: RoPE applied to sequence shards with their global positions equals RoPE applied to
the whole sequence in one process, bit for bit.

Two CPU ranks (torch.distributed, gloo, a file:// rendezvous in a temporary directory) each hold a shard of
the sequence of q/k ``[B, S, H, D]``:

* contiguous: rank r holds tokens ``[r L, (r + 1) L)``, rotated with ``positions`` = its global positions,
  or with ``offsets = r L``;
* zigzag (load-balanced causal attention, as in ring/zigzag attention): the sequence is cut into
  ``2 W`` chunks and rank r holds chunks ``r`` and ``2 W - 1 - r``, rotated with one ``positions`` tensor
  for both chunks, or chunk by chunk with ``offsets``.

Each rank applies ``apply_rope_`` in place, the shards are all-gathered and re-assembled, and rank 0
compares them with ``torch.equal`` to the single-process result, for cos/sin tables, on-the-fly angles
(fp32 ``inv_freq``) and exact on-the-fly angles (float64 ``inv_freq``), in fp32 and bf16, with every backend
this machine runs: torch, the native C++ extension when it loads, and the Triton kernels through the
interpreter when ``TRITON_INTERPRET=1`` (bf16 only there:
the interpreter is slow). The ranks use CPU tensors on every machine.

The ranks are separate Python processes started with the same environment (so ``TRITON_INTERPRET`` is seen
before ``posenc_kernels`` is imported, as in the parent); all cases share one launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

WORLD = 2
B, CHUNK, HQ, HK, D = 2, 8, 4, 2, 64
S = 2 * WORLD * CHUNK  # zigzag needs 2 * world chunks
LAYOUTS = ["contiguous-positions", "contiguous-offsets", "zigzag-positions", "zigzag-offsets"]
ANGLES = ["table", "onthefly", "exact"]
DTYPES = ["float32", "bfloat16"]
# The interpreter is slow: the Triton kernel runs bf16 only (fp32 math, cast on store: the same code path).
TRITON_DTYPES = ["bfloat16"]
TIMEOUT_S = 120


def _dist_available() -> tuple[bool, str]:
    try:
        import torch.distributed as dist
    except ImportError as e:  # pragma: no cover - builds without distributed
        return False, f"torch.distributed cannot be imported: {e}"
    if not dist.is_available():
        return False, "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return False, "the gloo backend is not available in this torch build"
    return True, ""


_OK, _WHY = _dist_available()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY or "torch.distributed unavailable")


# ----------------------------------------------------------------------------------------------
# What one rank holds
# ----------------------------------------------------------------------------------------------


def _chunks_of(layout: str, rank: int) -> list[int]:
    """Indices of the CHUNK-token chunks rank ``rank`` holds, in its local order."""
    if layout.startswith("contiguous"):
        per = 2  # S / WORLD tokens = 2 chunks
        return [rank * per + i for i in range(per)]
    return [rank, 2 * WORLD - 1 - rank]


def _local_positions(layout: str, rank: int) -> torch.Tensor:
    return torch.cat([torch.arange(c * CHUNK, (c + 1) * CHUNK) for c in _chunks_of(layout, rank)])


def _angle_kwargs(angles: str, pk):
    if angles == "table":
        cos, sin = pk.rope_cos_sin(S, pk.rope_frequencies(D)[0])
        return dict(cos=cos, sin=sin)
    if angles == "onthefly":
        return dict(inv_freq=pk.rope_frequencies(D)[0])
    return dict(inv_freq=pk.rope_frequencies(D, dtype=torch.float64)[0], exact=True)


def _rotate_shard(pk, q, k, layout: str, rank: int, kw) -> None:
    """Rotate this rank's shard in place (q/k ``[B, L, H, D]``) with its global positions."""
    if layout == "contiguous-positions" or layout == "zigzag-positions":
        pk.apply_rope_(q, k, positions=_local_positions(layout, rank), **kw)
    elif layout == "contiguous-offsets":
        pk.apply_rope_(q, k, offsets=_chunks_of(layout, rank)[0] * CHUNK, **kw)
    else:  # zigzag, chunk by chunk, each with its own offset (views: in place into the shard)
        for i, c in enumerate(_chunks_of(layout, rank)):
            sl = slice(i * CHUNK, (i + 1) * CHUNK)
            pk.apply_rope_(q[:, sl], k[:, sl], offsets=c * CHUNK, **kw)


def _assemble(layout: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Put every rank's ``[B, L, H, D]`` shard back at its global positions."""
    out = torch.empty(shards[0].shape[0], S, *shards[0].shape[2:], dtype=shards[0].dtype)
    for rank, x in enumerate(shards):
        for i, c in enumerate(_chunks_of(layout, rank)):
            out[:, c * CHUNK : (c + 1) * CHUNK] = x[:, i * CHUNK : (i + 1) * CHUNK]
    return out


# ----------------------------------------------------------------------------------------------
# The rank process (this file run as a script)
# ----------------------------------------------------------------------------------------------


def _all_gather(dist, x: torch.Tensor) -> list[torch.Tensor]:
    # Gathered as raw bytes: exact for every dtype, whatever gloo supports.
    raw = x.contiguous().view(torch.uint8)
    out = [torch.empty_like(raw) for _ in range(dist.get_world_size())]
    dist.all_gather(out, raw)
    return [o.view(x.dtype) for o in out]


def _rank_main(rank: int, init_file: str, result_file: str, native: bool) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    import posenc_kernels as pk

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))  # fmt: skip
    backends = ["torch"] + (["native"] if native else []) + (["triton"] if pk.interpreter_enabled() else [])
    results = {}
    try:
        for backend in backends:
            for dtype_name in TRITON_DTYPES if backend == "triton" else DTYPES:
                dtype = getattr(torch, dtype_name)
                g = torch.Generator().manual_seed(1234)  # every rank draws the same full q/k
                q_full = torch.randn(B, S, HQ, D, generator=g).to(dtype)
                k_full = torch.randn(B, S, HK, D, generator=g).to(dtype)
                for angles in ANGLES:
                    for layout in LAYOUTS:
                        case = f"{backend}-{dtype_name}-{angles}-{layout}"
                        err = None
                        try:
                            with pk.use_backend(backend):
                                kw = _angle_kwargs(angles, pk)
                                idx = _local_positions(layout, rank)
                                q, k = q_full[:, idx].clone(), k_full[:, idx].clone()
                                _rotate_shard(pk, q, k, layout, rank, kw)
                                ref_q, ref_k = pk.apply_rope_(q_full.clone(), k_full.clone(), **kw)
                        except Exception as e:  # noqa: BLE001 - reported per case; the collective still runs
                            err = f"{type(e).__name__}: {e}"
                            q = torch.zeros(B, S // WORLD, HQ, D, dtype=dtype)
                            k = torch.zeros(B, S // WORLD, HK, D, dtype=dtype)
                        gq, gk = _all_gather(dist, q), _all_gather(dist, k)
                        if rank == 0:
                            if err is not None:
                                results[case] = {"ok": False, "why": err}
                                continue
                            aq, ak = _assemble(layout, gq), _assemble(layout, gk)
                            ok = torch.equal(aq, ref_q) and torch.equal(ak, ref_k)
                            diff = max((aq.double() - ref_q.double()).abs().max().item(),
                                       (ak.double() - ref_k.double()).abs().max().item())  # fmt: skip
                            # The rotation must have happened: position 0 is the identity, the others not.
                            moved = not torch.equal(aq[:, 1:], q_full[:, 1:])
                            results[case] = {"ok": ok and moved, "max_diff": diff, "rotated": moved}
                        elif err is not None:
                            results[case] = {"ok": False, "why": err}
    finally:
        dist.barrier()
        dist.destroy_process_group()
    with open(result_file, "w") as f:
        json.dump(results, f)


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cp_results():
    """Launch the two ranks once for every case; returns rank 0's results (rank 1's errors merged in) and
    whether the native extension ran (loaded here first, so no rank builds it)."""
    from posenc_kernels import _native

    native = _native.available() and _native.has_op("rope", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        env = dict(os.environ)
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), str(r), init_file, os.path.join(tmp, f"rank{r}.json"),
                 str(int(native))],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            for r in range(WORLD)
        ]
        logs = []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=TIMEOUT_S)
                logs.append(out)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s")
        for r, p in enumerate(procs):
            if p.returncode != 0:
                pytest.fail(f"rank {r} exited with {p.returncode}:\n{logs[r][-4000:]}")
        with open(os.path.join(tmp, "rank0.json")) as f:
            results = json.load(f)
        with open(os.path.join(tmp, "rank1.json")) as f:
            for case, r in json.load(f).items():
                results[case] = r
    return results, native, _native.load_error()


def _cases():
    interp = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    for backend in ["torch", "native"] + (["triton"] if interp else []):
        for dtype in TRITON_DTYPES if backend == "triton" else DTYPES:
            for angles in ANGLES:
                for layout in LAYOUTS:
                    yield f"{backend}-{dtype}-{angles}-{layout}"


@pytest.mark.parametrize("case", list(_cases()))
def test_sharded_rope_equals_single_process(cp_results, case):
    cp_results, native, native_error = cp_results
    if case.startswith("native-") and not native:
        pytest.skip(f"the native extension is unavailable: {native_error}")
    assert case in cp_results, f"no result for {case}: {sorted(cp_results)[:5]}..."
    r = cp_results[case]
    assert "why" not in r, f"{case}: {r['why']}"
    assert r["rotated"], f"{case}: the re-assembled result equals the input: nothing was rotated"
    assert r["ok"], f"{case}: sharded result differs from the single-process one by up to {r['max_diff']:.3g}"


def test_zigzag_layout_covers_the_sequence_once():
    held = sorted(int(p) for r in range(WORLD) for p in _local_positions("zigzag-positions", r))
    assert held == list(range(S))
    assert _local_positions("zigzag-positions", 0)[:CHUNK].tolist() == list(range(CHUNK))
    assert _local_positions("zigzag-positions", 0)[CHUNK:].tolist() == list(range(S - CHUNK, S))


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3], bool(int(sys.argv[4])))
