"""flash-attn's ``test_flash_attn_kvcache``, its rotary + cache-append part, ported to CPU and run against our
drop-in :func:`posenc_kernels.integrations.flash_attn.rotary_and_append_kvcache_`.

Upstream: github.com/Dao-AILab/flash-attention, ``tests/test_flash_attn.py::test_flash_attn_kvcache`` (the
flash-attn 2 test with the ``has_leftpad`` / ``alibi`` / ``paged_kv_block_size`` parameters and the
``_generate_block_kvcache`` helper; the stored copy read did not name its commit), and its reference rotation
``flash_attn.layers.rotary.apply_rotary_emb``: an fp32 rotation of the low-precision inputs, rounded once,
restated here in torch (:func:`rotary_reference`). The code is ours; kept from upstream: the parametrisation
that concerns the rotary and the append (``d`` 32/59/64/80/128/256, ``rotary_fraction`` 0.5/1.0 with
``rotary_dim = floor(fraction * d / 16) * 16``, ``rotary_interleaved``, ``seqlen_new_eq_seqlen_q``,
``causal``, ``local``, ``mha_type`` mha/mqa/gqa with 6 heads and 6/1/3 kv heads, ``has_batch_idx``, paged and
contiguous caches, fp16 and bf16, batch 2, seed 0), the inputs (random caches, ``cache_seqlens`` drawn so that
cos/sin and the cache are long enough, a random ``[seqlen_k (or num_blocks * block), rotary_dim / 2]``
angle table cast to the dtype, ``cache_batch_idx`` a random permutation of twice the batch, a random
``block_table``), the reference (``q_ro``: rotated at ``cache_seqlens + s`` when causal or local, else every
token at ``cache_seqlens``, by upstream's ``b s h d -> b 1 (s h) d`` rearrangement; ``k_ro`` at
``cache_seqlens + s``; ``k_cache_ref[update_mask] = k_ro``, ``v_cache_ref[update_mask] = v``), and the
checks: ``torch.allclose(k_cache_select, k_cache_ref, rtol=1e-3, atol=1e-3)`` and
``torch.equal(v_cache_select, v_cache_ref)``, with upstream's ``k_cache_select`` for paged and batch-indexed
caches. Upstream checks q only through the attention output; here the rotated q that the drop-in returns is
checked against ``q_ro`` with the cache's tolerance. Added (ours): cache rows not selected by
``cache_batch_idx`` are unchanged.

Not ported: ``rotary_fraction`` 0.0 and ``new_kv`` False (no rotary, no append: the attention-only cases),
``alibi``, ``num_splits``, ``has_leftpad`` (``cache_leftpad`` is refused) and the attention output itself.

Changes for CPU: ``(seqlen_q, seqlen_k)`` pairs scaled down ([(1, 128), (1, 339), (3, 1024), (64, 800),
(64, 256), (3, 799), (64, 2048), (16, 20000), (1, 128k), (16, 128k), (128, 128)] -> [(1, 128), (1, 339),
(3, 99), (13, 80), (16, 64), (3, 97), (16, 128)]), paged block size 256 -> 16, ``local`` window drawn as
upstream; of the grid a fixed sample of 48 cases (``random.Random(0)``, checked to cover every value).
Under the Triton interpreter (CPU), whose fp32 -> bf16 cast truncates where a GPU rounds to nearest, a bf16
value is accepted when it passes upstream's check against the reference rounded either way (the same fp32
rotation, one rounding).
"""

import itertools
import math
import random

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.integrations.flash_attn import rotary_and_append_kvcache_

TRUNCATING_BF16 = pk.interpreter_enabled() and pk.get_backend() in ("auto", "triton")


def rotary_reference(x, cos, sin, seqlen_offsets, interleaved):
    """flash-attn's ``apply_rotary_emb(x, cos, sin, seqlen_offsets=..., interleaved=...)``: ``x``
    ``[B, S, H, D]``, token ``(b, s)`` at row ``seqlen_offsets[b] + s``; the first ``rotary_dim`` channels
    rotate. Returns the fp32 rotation (the caller rounds it once)."""
    B, S = x.shape[:2]
    idx = seqlen_offsets.long()[:, None] + torch.arange(S)[None]
    c, s = cos[idx].float().unsqueeze(-2), sin[idx].float().unsqueeze(-2)  # [B, S, 1, R/2]
    ro = cos.shape[-1] * 2
    xf = x.float()
    r = xf[..., :ro]
    if interleaved:
        x1, x2 = r[..., ::2], r[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = r[..., : ro // 2], r[..., ro // 2 :]
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((out, xf[..., ro:]), dim=-1)


def rounded(t32, dtype):
    """The fp32 reference rounded once, as a GPU rounds; plus, under the interpreter, truncated (bf16)."""
    out = [t32.to(dtype)]
    if dtype == torch.bfloat16 and TRUNCATING_BF16:
        out.append((t32.contiguous().view(torch.int32) & -65536).view(torch.float32).to(dtype))
    return out


def assert_allclose_upstream(got, refs, what):
    assert not torch.isnan(got.float()).any(), f"{what}: NaN"
    assert any(torch.allclose(got, r, rtol=1e-3, atol=1e-3) for r in refs), (
        f"{what}: max diff {(got.float() - refs[0].float()).abs().max().item():.3g} (upstream: allclose rtol=atol=1e-3)"
    )


def generate_block_kvcache(seqlen_k, block_size, batch_size, nheads_k, d, dtype):
    """Upstream's ``_generate_block_kvcache``: a paged cache of random pages, a random ``block_table`` and
    the contiguous view of each sequence's pages."""
    num_blocks = math.ceil(seqlen_k / block_size) * batch_size * 3
    k_cache_paged = torch.randn(num_blocks, block_size, nheads_k, d, dtype=dtype)
    v_cache_paged = torch.randn(num_blocks, block_size, nheads_k, d, dtype=dtype)
    block_table = torch.randperm(num_blocks, dtype=torch.int32).view(batch_size, -1)
    k_cache = k_cache_paged[block_table.long().flatten()].unflatten(0, (batch_size, -1)).flatten(1, 2)[:, :seqlen_k]
    v_cache = v_cache_paged[block_table.long().flatten()].unflatten(0, (batch_size, -1)).flatten(1, 2)[:, :seqlen_k]
    return k_cache, v_cache, block_table, k_cache_paged, v_cache_paged, num_blocks


def _grid():
    names = ("seqlen_q,seqlen_k", "d", "has_batch_idx", "paged_kv_block_size", "rotary_fraction",
             "rotary_interleaved", "seqlen_new_eq_seqlen_q", "causal", "local", "mha_type", "dtype")  # fmt: skip
    values = (
        [(1, 128), (1, 339), (3, 99), (13, 80), (16, 64), (3, 97), (16, 128)],
        [32, 59, 64, 80, 128, 256], [False, True], [None, 16], [0.5, 1.0], [False, True], [True, False],
        [False, True], [False, True], ["mha", "mqa", "gqa"], [torch.float16, torch.bfloat16],
    )  # fmt: skip
    grid = [c for c in itertools.product(*values) if not (c[2] and c[3] is not None)]  # upstream skips these
    grid = [c for c in grid if int(c[4] * c[1]) // 16 * 16 > 0]  # rotary_dim 0 (d 32 at 0.5) has no rotary
    cases = [grid[i] for i in sorted(random.Random(0).sample(range(len(grid)), 48))]
    for j, vals in enumerate(values):
        assert {str(c[j]) for c in cases} == {str(v) for v in vals}, f"the sample misses a value of {names[j]}"
    flat = [(*c[0], *c[1:]) for c in cases]
    return "seqlen_q,seqlen_k," + ",".join(names[1:]), flat


@pytest.mark.parametrize(*_grid())
@torch.inference_mode()
def test_flash_attn_kvcache(seqlen_q, seqlen_k, d, has_batch_idx, paged_kv_block_size, rotary_fraction,
                            rotary_interleaved, seqlen_new_eq_seqlen_q, causal, local, mha_type, dtype):  # fmt: skip
    torch.random.manual_seed(0)
    batch_size = 2
    batch_size_cache = batch_size if not has_batch_idx else batch_size * 2
    nheads = 6
    rotary_dim = math.floor(int(rotary_fraction * d) / 16) * 16
    nheads_k = nheads if mha_type == "mha" else (1 if mha_type == "mqa" else 3)
    window_size = (-1, -1) if not local else torch.randint(0, seqlen_k, (2,))
    q = torch.randn(batch_size, seqlen_q, nheads, d, dtype=dtype)
    seqlen_new = seqlen_q if seqlen_new_eq_seqlen_q else torch.randint(1, seqlen_q + 1, (1,)).item()
    k = torch.randn(batch_size, seqlen_new, nheads_k, d, dtype=dtype)
    v = torch.randn(batch_size, seqlen_new, nheads_k, d, dtype=dtype)
    if paged_kv_block_size is None:
        k_cache = torch.randn(batch_size_cache, seqlen_k, nheads_k, d, dtype=dtype)
        v_cache = torch.randn(batch_size_cache, seqlen_k, nheads_k, d, dtype=dtype)
        block_table = None
    else:
        k_cache, v_cache, block_table, k_cache_paged, v_cache_paged, num_blocks = generate_block_kvcache(
            seqlen_k, paged_kv_block_size, batch_size, nheads_k, d, dtype
        )
    cache_seqlens = torch.randint(
        0,
        # If we don't use seqlen_q in the case of causal and rotary, cos/sin won't be long enough
        seqlen_k - (seqlen_q if (causal or local) and rotary_dim > 1 else seqlen_new) + 1,
        (batch_size,),
        dtype=torch.int32,
    )
    arange = torch.arange(seqlen_k)[None]
    cache_seqlens_expanded = cache_seqlens[:, None]
    cache_batch_idx = torch.randperm(batch_size_cache, dtype=torch.int32)[:batch_size] if has_batch_idx else None
    angle = torch.rand(seqlen_k if paged_kv_block_size is None else num_blocks * paged_kv_block_size,
                       rotary_dim // 2) * 2 * math.pi  # fmt: skip
    cos, sin = torch.cos(angle).to(dtype=dtype), torch.sin(angle).to(dtype=dtype)
    if causal or local:
        q_ro32 = rotary_reference(q, cos, sin, cache_seqlens, rotary_interleaved)
    else:  # upstream: rearrange(q, "b s h d -> b 1 (s h) d"), rotated, and back
        q_ro32 = rotary_reference(q.flatten(1, 2)[:, None], cos, sin, cache_seqlens, rotary_interleaved)
        q_ro32 = q_ro32[:, 0].unflatten(1, (seqlen_q, nheads))
    k_ro32 = rotary_reference(k, cos, sin, cache_seqlens, rotary_interleaved)  # before the call: k rotates in place
    k_ro = k_ro32.to(dtype)
    k_cache_ref = (k_cache if not has_batch_idx else k_cache[cache_batch_idx.long()]).clone()
    v_cache_ref = (v_cache if not has_batch_idx else v_cache[cache_batch_idx.long()]).clone()
    update_mask = torch.logical_and(cache_seqlens_expanded <= arange, arange < cache_seqlens_expanded + seqlen_new)
    k_cache_ref[update_mask] = k_ro.flatten(0, 1)
    v_cache_ref[update_mask] = v.flatten(0, 1)
    k_cache_before = k_cache.clone()

    q_out = rotary_and_append_kvcache_(
        q,
        k_cache if paged_kv_block_size is None else k_cache_paged,
        v_cache if paged_kv_block_size is None else v_cache_paged,
        k,
        v,
        rotary_cos=cos,
        rotary_sin=sin,
        cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx,
        block_table=block_table,
        causal=causal,
        window_size=window_size,
        rotary_interleaved=rotary_interleaved,
    )

    assert q_out is q
    assert_allclose_upstream(q_out, rounded(q_ro32, dtype), "q")
    if paged_kv_block_size is None:
        k_cache_select = k_cache if not has_batch_idx else k_cache[cache_batch_idx.long()]
        v_cache_select = v_cache if not has_batch_idx else v_cache[cache_batch_idx.long()]
    else:
        k_cache_select = k_cache_paged[block_table.long().flatten()].unflatten(0, (batch_size, -1)).flatten(1, 2)
        v_cache_select = v_cache_paged[block_table.long().flatten()].unflatten(0, (batch_size, -1)).flatten(1, 2)
        k_cache_select, v_cache_select = k_cache_select[:, :seqlen_k], v_cache_select[:, :seqlen_k]
    k_refs = []
    for r in rounded(k_ro32, dtype):  # the reference cache with the new rows rounded either way
        kr = k_cache_ref.clone()
        kr[update_mask] = r.flatten(0, 1)
        k_refs.append(kr)
    assert_allclose_upstream(k_cache_select, k_refs, "k_cache")
    assert torch.equal(v_cache_select, v_cache_ref)
    if has_batch_idx:  # ours: the rows no sequence selects are untouched
        others = torch.ones(batch_size_cache, dtype=torch.bool)
        others[cache_batch_idx.long()] = False
        assert torch.equal(k_cache[others], k_cache_before[others])


# ----------------------------------------------------------------------------------------------
# Not upstream's: an int cache_seqlens, and refusals before anything is written
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_int_cache_seqlens_matches_tensor(causal):
    """``cache_seqlens=5`` gives what ``torch.full((B,), 5)`` gives (q, k and the caches, bit for bit)."""
    torch.manual_seed(0)
    angle = torch.rand(32, 8) * 2 * math.pi
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    kc, vc = torch.randn(2, 32, 2, 16), torch.randn(2, 32, 2, 16)
    outs = []
    for seqlens in (5, torch.full((2,), 5, dtype=torch.int32)):
        q2, k2, kc2, vc2 = q.clone(), k.clone(), kc.clone(), vc.clone()
        rotary_and_append_kvcache_(q2, kc2, vc2, k2, v, angle.cos(), angle.sin(), seqlens, causal=causal)
        outs.append((q2, k2, kc2, vc2))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0][2], kc)  # something was written


def test_refusals_write_nothing():
    torch.manual_seed(0)
    angle = torch.rand(32, 8)
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    kc, vc = torch.zeros(4, 8, 2, 16), torch.zeros(4, 8, 2, 16)
    q0 = q.clone()
    with pytest.raises(NotImplementedError, match="cache_leftpad"):
        rotary_and_append_kvcache_(q, kc[:2], vc[:2], k, v, angle.cos(), angle.sin(), 0,
                                   cache_leftpad=torch.zeros(2, dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="past the cache's length"):  # 6 + 3 - 1 >= 8: would run into row b + 1
        rotary_and_append_kvcache_(q, kc, vc, k, v, angle.cos(), angle.sin(), torch.tensor([6, 0]),
                                   cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="cache_positions"):  # the contiguous cache: the op's own check
        rotary_and_append_kvcache_(q, kc[:2], vc[:2], k, v, angle.cos(), angle.sin(), torch.tensor([6, 0]))
    assert torch.equal(q, q0) and not kc.any() and not vc.any()
