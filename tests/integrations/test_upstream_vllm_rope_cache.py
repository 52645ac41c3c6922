"""vLLM's tests of the fused RoPE + flash-layout KV-cache write, ported to CPU and run against our drop-in
:func:`posenc_kernels.integrations.vllm.fused_rope_and_reshape_cache_flash`.

Upstream (github.com/vllm-project/vllm), three files; the code here is ours:

1. ``tests/kernels/attention/test_fused_rope_kvcache.py`` at commit 386e7cf0fecb17aee753bfbaa91e7f2b66b6e62c
   (the test of ``ops.fused_rope_and_reshape_cache_flash``, PR #43355): kept its parametrisation (bf16 / fp16
   inputs with an ``"auto"`` or ``"fp8_e4m3"`` cache, MHA 32/32/128 and GQA 32/8/128, NeoX and GPT-J pairs),
   its inputs (random q/k/v, a random ``[4096, rot_dim]`` cos_sin_cache, random positions, a random
   permutation of slots with slot 0 set to -1 from 4 tokens on, k_scale 0.7 and v_scale 1.3, seed 0) and its
   reference: ``rotary_embedding`` then ``reshape_and_cache_flash``, whose semantics we restate in torch
   (vLLM's CUDA rotation rounds ``x*cos``, ``y*sin`` and their difference in the input dtype, three roundings;
   the cache stores ``key`` / ``value``, or for FP8 ``x / scale`` saturated and rounded to nearest).
2. ``tests/kernels/attention/test_cache.py::test_reshape_and_cache_flash`` at commit
   00228592456192abf9bea6f7ac937fa367f007a3: kept key and value as strided views (``qkv.unbind(1)``), the two
   physical cache layouts (``"NHC"`` and ``"HNC"``: a ``[num_blocks, block_size, H, D]`` view of storage laid
   out ``[num_blocks, H, block_size, D]``), per-tensor and per-head (``"attn_head"``) scales ``amax / 64``,
   an ``"auto"`` and an ``"fp8"`` cache (uint8 storage, as vLLM allocates it), head sizes 64 / 80 / 256,
   block sizes 8 / 16 / 32, bf16 and fp32, the slot sample, and the checks (exact for ``"auto"``; for FP8
   both caches dequantised and compared with ``atol=1e-3, rtol=0.1``). The op under test also rotates k (with
   vLLM's cos/sin cache): the rotated k is checked by the rule below, and upstream's loop reference writes the
   k the op rotated (upstream's check is of the cache write; a reference rotated in bf16 can cancel to an
   exact 0 where the fp32 rotation is not, which FP8's ``atol=1e-3`` does not absorb).
3. The test of ``fused_rope_and_reshape_cache_flash_q_out`` from PR #52363 (``CASES`` with the six
   ``KVCacheLayout`` stride orders LBNHC, LBHNC, BLNHC, LHBNC, BLHNC, BHLNC, page padding, partial rotary, MQA,
   GQA, head size 256, and ``slot_mapping`` shorter than the tokens (CUDA-graph padding) with slot 1 = -1):
   kept its cases, its packed-QKV views, and its cache views: ``packed.transpose(1, 2).split(head_size, -1)``
   of a cross-layer physical buffer. Our op is the in-place one (q and k rotated in place: the q_out variant's
   "query_out, inputs untouched" contract is not mirrored); the checks kept: the caches against the unfused
   reference, and the whole physical buffer (the other layer, page padding) against the reference's.

Where the check differs, by rule: upstream asserts bit-identity with vLLM's own unfused kernels, whose rotation
rounds three times in the input dtype; ours rounds the fp32 rotation once. So each rotated value (q, k, and
the cache rows written from k) is accepted when equal to the reference or, failing that, when ours is at least
as close to the float64 truth (the same inputs rotated in float64) as vLLM's reference, by largest absolute
error. Two exact checks replace the cross-kernel bit-identity: the cache rows hold exactly our rotated k
(quantised for FP8 as vLLM quantises), and the v cache (no rotation involved) equals vLLM's bytes.

Changes for CPU: tokens [1, 8, 128, 2048] -> [1, 11] and 256 blocks -> 4 (file 1); 42 tokens -> 21 (the
upstream halving), 1024 / 10000 blocks -> 6 / 11, and of the 288 cases (head size x block size x blocks x
dtype x cache dtype x layout x scale type) a covering sample of 16 (file 2: ``random.Random(0)``, checked to
cover every value; its rotation, not upstream's, uses a 512-row cos/sin cache and NeoX pairs except at head
size 80); 8 blocks kept (file 3).
Not ported: the NVFP4 cache and the Triton-implementation rows of file 2 (other kernels of vLLM's), opcheck.

The last section is not upstream's: ``"fp8_e5m2"`` through uint8 storage with per-head scales and flat
``[T, H*D]`` inputs, and refusals that write nothing.
"""

import itertools
import random

import pytest
import torch

import posenc_kernels as pk

from posenc_kernels.integrations.vllm import fused_rope_and_reshape_cache_flash

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


# ----------------------------------------------------------------------------------------------
# vLLM's unfused semantics, restated in torch
# ----------------------------------------------------------------------------------------------


def rotate_like_vllm(positions, x, cos_sin_cache, is_neox, compute_dtype=None):
    """vLLM's ``rotary_embedding`` on ``x`` ``[T, H, D]`` (the first ``rot_dim`` channels): computed in x's
    dtype (``compute_dtype`` float64: the truth). Returns a new tensor."""
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)
    dt = compute_dtype or x.dtype
    t, cos, sin = x.to(dt), cos.to(dt)[:, None], sin.to(dt)[:, None]
    r = t[..., :rot]
    x1, x2 = (r.chunk(2, dim=-1)) if is_neox else (r[..., ::2], r[..., 1::2])
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    out = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((out, t[..., rot:]), dim=-1)


def quantise_like_vllm(x, scale, fp8):
    """``scaled_convert``: fp32 ``x / scale`` (per tensor, or per head ``[H]``), saturated to the finite
    range, rounded to nearest even."""
    s = scale.float().reshape(-1)
    s = s[:, None] if s.numel() > 1 else s
    fmax = torch.finfo(fp8).max
    return (x.float() / s).clamp(-fmax, fmax).to(fp8)


def reshape_and_cache_flash_like_vllm(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale,
                                      v_scale):  # fmt: skip
    """vLLM's ``reshape_and_cache_flash`` (its loop reference): token ``i < len(slot_mapping)`` with a slot
    ``>= 0`` goes to ``[slot // block_size, slot % block_size]``. Caches ``[NB, BS, H, D]`` (any strides;
    uint8 storage read as the FP8 dtype)."""
    fp8 = FP8.get(kv_cache_dtype)
    kc = key_cache.view(fp8) if fp8 is not None and key_cache.dtype == torch.uint8 else key_cache
    vc = value_cache.view(fp8) if fp8 is not None and value_cache.dtype == torch.uint8 else value_cache
    bs = kc.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        b, o = divmod(slot, bs)
        kc[b, o] = quantise_like_vllm(key[i], k_scale, fp8) if fp8 is not None else key[i]
        vc[b, o] = quantise_like_vllm(value[i], v_scale, fp8) if fp8 is not None else value[i]


# The Triton interpreter's fp32 -> bf16 cast truncates (a GPU's rounds to nearest): see
# test_upstream_vllm_pos_encoding.py, which meets the same cast.
TRUNCATING_BF16 = pk.interpreter_enabled() and pk.get_backend() in ("auto", "triton")


def assert_rotation_like_vllm(out, ref, truth, what):
    """Upstream's bit-identity; failing it, ours at least as close to the float64 truth as vLLM's reference."""
    if torch.equal(out, ref):
        return
    if out.dtype == torch.bfloat16 and TRUNCATING_BF16:
        # Ours went through the interpreter's truncating cast, which no GPU build has: it must be the fp32
        # rotation truncated, to within one bf16 step (the kernel's fp32 value is the truth's within an fp32
        # ulp or two). How a GPU's rounding compares with vLLM's reference cannot be seen here; that the
        # kernel's rotation is apply_rope_'s bit for bit is tests/cache's.
        trunc = (truth.float().contiguous().view(torch.int32) & -65536).view(torch.float32)
        torch.testing.assert_close(out.float(), trunc, atol=1e-5, rtol=2 ** -7)
        return
    ours = (out.double() - truth).abs().max().item()
    theirs = (ref.double() - truth).abs().max().item()
    assert ours <= theirs, f"{what}: differs from vLLM's reference and is farther from the truth ({ours:.3g} > {theirs:.3g})"


def as_bytes(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def written_rows(cache, slot_mapping):
    """The cache rows ``[n_written, H, D]`` of the valid slots, in slot_mapping order."""
    s = slot_mapping[slot_mapping >= 0].long()
    return cache[s // cache.shape[1], s % cache.shape[1]]


def check_cache_holds_our_k(key_cache, key_out, slot_mapping, kv_cache_dtype, k_scale):
    """Exact: the cache rows hold our rotated k (quantised as vLLM quantises, for FP8)."""
    n = slot_mapping.shape[0]
    keep = slot_mapping >= 0
    want = key_out[:n][keep]
    fp8 = FP8.get(kv_cache_dtype)
    got = written_rows(key_cache.view(fp8) if fp8 is not None and key_cache.dtype == torch.uint8 else key_cache,
                       slot_mapping)  # fmt: skip
    if fp8 is not None:
        assert torch.equal(as_bytes(got), as_bytes(quantise_like_vllm(want, k_scale, fp8))), "k cache != quantised k"
    else:
        assert torch.equal(got, want), "k cache rows != our rotated k"


# ----------------------------------------------------------------------------------------------
# 1. test_fused_rope_kvcache.py
# ----------------------------------------------------------------------------------------------

DTYPE_CACHE = [(torch.bfloat16, "auto"), (torch.float16, "auto"), (torch.bfloat16, "fp8_e4m3"),
               (torch.float16, "fp8_e4m3")]  # fmt: skip
HEAD_CONFIGS = [(32, 32, 128), (32, 8, 128)]
IS_NEOX = [True, False]
NUM_TOKENS = [1, 11]  # upstream: [1, 8, 128, 2048]
BLOCK_SIZE, NUM_BLOCKS, MAX_POS, SEED = 16, 4, 4096, 0  # upstream NUM_BLOCKS 256


@pytest.mark.parametrize("dtype_cache", DTYPE_CACHE, ids=lambda c: f"{str(c[0])[6:]}-{c[1]}")
@pytest.mark.parametrize("head_config", HEAD_CONFIGS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("is_neox", IS_NEOX)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@torch.inference_mode()
def test_fused_rope_and_reshape_cache_flash(dtype_cache, head_config, is_neox, num_tokens):
    dtype, kv_cache_dtype = dtype_cache
    num_q_heads, num_kv_heads, head_size = head_config
    rot_dim = head_size
    torch.manual_seed(SEED)
    query = torch.randn(num_tokens, num_q_heads, head_size, dtype=dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_size, dtype=dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_size, dtype=dtype)
    cos_sin_cache = torch.randn(MAX_POS, rot_dim, dtype=dtype)
    positions = torch.randint(0, MAX_POS, (num_tokens,), dtype=torch.long)
    slot_mapping = torch.randperm(NUM_BLOCKS * BLOCK_SIZE)[:num_tokens].to(torch.long)
    if num_tokens >= 4:
        slot_mapping[0] = -1  # the padded-slot branch
    cache_dtype = FP8[kv_cache_dtype] if kv_cache_dtype != "auto" else dtype
    key_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_size, dtype=cache_dtype)
    value_cache = torch.zeros_like(key_cache)
    k_scale = torch.tensor([0.7], dtype=torch.float32)
    v_scale = torch.tensor([1.3], dtype=torch.float32)

    q_ref = rotate_like_vllm(positions, query, cos_sin_cache, is_neox)
    k_ref = rotate_like_vllm(positions, key, cos_sin_cache, is_neox)
    q_true = rotate_like_vllm(positions, query, cos_sin_cache, is_neox, torch.float64)
    k_true = rotate_like_vllm(positions, key, cos_sin_cache, is_neox, torch.float64)
    kc_ref, vc_ref = key_cache.clone(), value_cache.clone()
    reshape_and_cache_flash_like_vllm(k_ref, value, kc_ref, vc_ref, slot_mapping, kv_cache_dtype, k_scale, v_scale)

    out = fused_rope_and_reshape_cache_flash(query, key, value, positions, cos_sin_cache, is_neox, key_cache,
                                             value_cache, slot_mapping, k_scale, v_scale, kv_cache_dtype)  # fmt: skip
    assert out[0] is query and out[1] is key
    assert_rotation_like_vllm(query, q_ref, q_true, "query")
    assert_rotation_like_vllm(key, k_ref, k_true, "key")
    check_cache_holds_our_k(key_cache, key, slot_mapping, kv_cache_dtype, k_scale)
    assert torch.equal(as_bytes(value_cache), as_bytes(vc_ref)), "value_cache bytes differ"
    # every other row of the k cache untouched (zeros), as in the reference
    untouched = torch.ones(key_cache.shape[:2], dtype=torch.bool)
    s = slot_mapping[slot_mapping >= 0]
    untouched[s // BLOCK_SIZE, s % BLOCK_SIZE] = False
    assert not as_bytes(key_cache)[untouched].any()
    if kv_cache_dtype == "auto":  # the written rows, by the rotation rule
        keep = slot_mapping >= 0
        assert_rotation_like_vllm(written_rows(key_cache, slot_mapping), k_ref[keep], k_true[keep], "key_cache")


# ----------------------------------------------------------------------------------------------
# 2. test_cache.py::test_reshape_and_cache_flash
# ----------------------------------------------------------------------------------------------

CACHE_DTYPES = [torch.bfloat16, torch.float]
NUM_HEADS = [8]
HEAD_SIZES = [64, 80, 256]
BLOCK_SIZES = [8, 16, 32]
NUM_BLOCKS_2 = [6, 11]  # upstream: [1024, 10000]
KV_CACHE_DTYPE = ["auto", "fp8"]
CACHE_LAYOUTS = ["NHC", "HNC"]
KV_SCALE_TYPES = ["tensor", "attn_head"]


def vllm_cos_sin_cache(rotary_dim, max_position, base, dtype):
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


def flashinfer_cache(num_blocks, block_size, num_heads, head_size, kv_cache_dtype, dtype, layout):
    """vLLM's ``kv_cache_factory_flashinfer`` for one layer: ``[NB, BS, H, D]`` views of ``[NB, 2, ...]``
    storage in the physical order ``layout`` (NHC, or HNC: heads before slots), uint8 for FP8, random data."""
    storage_dtype = torch.uint8 if kv_cache_dtype == "fp8" else dtype
    if layout == "NHC":
        shape, perm = (num_blocks, 2, block_size, num_heads, head_size), (0, 1, 2, 3, 4)
    else:
        shape, perm = (num_blocks, 2, num_heads, block_size, head_size), (0, 1, 3, 2, 4)
    if storage_dtype == torch.uint8:
        data = torch.randn(shape).clamp(-8, 8).to(torch.float8_e4m3fn).view(torch.uint8)  # finite FP8 values
    else:
        data = torch.randn(shape, dtype=dtype)
    kv = data.permute(*perm)
    return kv[:, 0], kv[:, 1]


def _grid_2():
    names = ("num_heads", "head_size", "block_size", "num_blocks", "dtype", "kv_cache_dtype", "kv_cache_layout",
             "kv_scale_type")  # fmt: skip
    values = (NUM_HEADS, HEAD_SIZES, BLOCK_SIZES, NUM_BLOCKS_2, CACHE_DTYPES, KV_CACHE_DTYPE, CACHE_LAYOUTS,
              KV_SCALE_TYPES)  # fmt: skip
    grid = list(itertools.product(*values))
    cases = [grid[i] for i in sorted(random.Random(0).sample(range(len(grid)), 16))]
    for j, vals in enumerate(values):
        assert {c[j] for c in cases} == set(vals), f"the sample misses a value of {names[j]}"
    return ",".join(names), cases


@pytest.mark.parametrize(*_grid_2())
@torch.inference_mode()
def test_reshape_and_cache_flash(num_heads, head_size, block_size, num_blocks, dtype, kv_cache_dtype,
                                 kv_cache_layout, kv_scale_type, num_tokens=42, seed=0):  # fmt: skip
    random.seed(seed)
    torch.manual_seed(seed)
    num_tokens //= 2
    num_slots = block_size * num_blocks
    slot_mapping = torch.tensor(random.sample(range(num_slots), num_tokens), dtype=torch.long)
    qkv = torch.randn(num_tokens, 3, num_heads, head_size, dtype=dtype)
    query, key, value = qkv.unbind(dim=1)
    key_cache, value_cache = flashinfer_cache(num_blocks, block_size, num_heads, head_size, kv_cache_dtype, dtype,
                                              kv_cache_layout)  # fmt: skip
    if kv_scale_type == "tensor":
        k_scale = (key.amax() / 64.0).to(torch.float32)
        v_scale = (value.amax() / 64.0).to(torch.float32)
    else:
        k_scale = (key.amax(dim=(0, 2)) / 64.0).to(torch.float32)
        v_scale = (value.amax(dim=(0, 2)) / 64.0).to(torch.float32)
    positions = torch.randint(0, 512, (num_tokens,))
    cos_sin_cache = vllm_cos_sin_cache(head_size, 512, 10000, dtype)
    is_neox = head_size != 80  # both pair styles over the sample

    def dequant(cache, scale):  # upstream's convert_fp8_local, to fp16
        f = cache.view(torch.float8_e4m3fn).to(torch.float16)
        return f * (scale.view(1, 1, -1, 1).to(torch.float16) if scale.numel() > 1 else scale.to(torch.float16))

    k_ref = rotate_like_vllm(positions, key, cos_sin_cache, is_neox)
    k_true = rotate_like_vllm(positions, key, cos_sin_cache, is_neox, torch.float64)
    if kv_cache_dtype == "fp8":
        cloned_key_cache, cloned_value_cache = dequant(key_cache, k_scale), dequant(value_cache, v_scale)
    else:
        cloned_key_cache, cloned_value_cache = key_cache.clone(), value_cache.clone()

    fused_rope_and_reshape_cache_flash(query, key, value, positions, cos_sin_cache, is_neox, key_cache, value_cache,
                                       slot_mapping, k_scale, v_scale, kv_cache_dtype)  # fmt: skip

    # the rotation by the rule above; upstream's cache check on the key the op rotated (k, in place)
    assert_rotation_like_vllm(key, k_ref, k_true, "key")
    for i, slot in enumerate(slot_mapping.tolist()):  # upstream's loop reference
        b, o = divmod(slot, block_size)
        cloned_key_cache[b, o] = key[i]
        cloned_value_cache[b, o] = value[i]

    if kv_cache_dtype == "fp8":
        torch.testing.assert_close(dequant(key_cache, k_scale), cloned_key_cache, atol=0.001, rtol=0.1)
        torch.testing.assert_close(dequant(value_cache, v_scale), cloned_value_cache, atol=0.001, rtol=0.1)
    else:
        torch.testing.assert_close(key_cache, cloned_key_cache)
        assert torch.equal(value_cache, cloned_value_cache)
    check_cache_holds_our_k(key_cache, key, slot_mapping, kv_cache_dtype, k_scale)


# ----------------------------------------------------------------------------------------------
# 3. PR #52363's q_out test: the six KVCacheLayout stride orders, page padding, short slot_mapping
# ----------------------------------------------------------------------------------------------

NUM_BLOCKS_3 = 8
CASES = [  # dtype, Hq, Hk, D, rotary_dim, block_size, rope tokens, cache tokens, layout, page padding, is_neox
    pytest.param(torch.float16, 4, 4, 64, 64, 16, 1, 1, "LBNHC", 0, True, id="mha-full-rope"),
    pytest.param(torch.bfloat16, 8, 2, 128, 64, 16, 8, 5, "LBHNC", 0, False, id="gqa-partial-rope-short-mapping"),
    pytest.param(torch.float16, 8, 1, 80, 80, 32, 32, 32, "BLNHC", 256, False,
                 id="mqa-interleaved-cross-layer-padded-page"),  # fmt: skip
    pytest.param(torch.float16, 8, 2, 128, 128, 16, 8, 8, "LHBNC", 0, True, id="gqa-fp16-head-block-layout"),
    pytest.param(torch.bfloat16, 8, 2, 128, 128, 16, 8, 8, "BLHNC", 0, True, id="gqa-bf16-cross-layer"),
    pytest.param(torch.bfloat16, 32, 8, 256, 128, 32, 17, 13, "BHLNC", 0, True,
                 id="gqa-head256-multicycle-block-head-layer-layout"),  # fmt: skip
]


def layer_cache_views(layout, num_kv_heads, head_size, block_size, dtype, page_padding_bytes, num_layers=2):
    """One physical buffer for ``num_layers`` layers laid out in the physical order ``layout`` (L layer, B
    block, N slot, H head, C = the [k | v] channels, 2 * head_size), each block's page padded by
    ``page_padding_bytes``; random contents. Returns the last layer's ``(key_cache, value_cache)``, vLLM's
    ``packed.transpose(1, 2).split(head_size, dim=-1)`` of its ``[B, H, N, C]`` view, and the buffer."""
    sizes = {"L": num_layers, "B": NUM_BLOCKS_3, "N": block_size, "H": num_kv_heads, "C": 2 * head_size}
    pad = page_padding_bytes // torch.empty((), dtype=dtype).element_size()
    strides, extent = {}, 1
    for letter in reversed(layout):
        strides[letter] = extent + (pad if letter == "B" else 0)
        extent = strides[letter] * sizes[letter]
    physical = torch.randn(extent, dtype=dtype)
    logical = physical.as_strided([sizes[c] for c in "LBHNC"], [strides[c] for c in "LBHNC"])
    key_cache, value_cache = logical[-1].transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache, physical


@pytest.mark.parametrize(
    "dtype,num_q_heads,num_kv_heads,head_size,rotary_dim,block_size,num_rope_tokens,num_cache_tokens,layout,"
    "page_padding,is_neox",
    CASES,
)
@torch.inference_mode()
def test_fused_rope_and_reshape_cache_flash_layouts(dtype, num_q_heads, num_kv_heads, head_size, rotary_dim,
                                                    block_size, num_rope_tokens, num_cache_tokens, layout,
                                                    page_padding, is_neox):  # fmt: skip
    torch.manual_seed(0)
    widths = [num_q_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size]
    packed_qkv = torch.randn(num_rope_tokens, sum(widths), dtype=dtype)
    query, key, value = (t.view(num_rope_tokens, -1, head_size) for t in packed_qkv.split(widths, dim=-1))
    cos_sin_cache = torch.randn(4096, rotary_dim, dtype=dtype)
    positions = torch.randperm(4096)[:num_rope_tokens]
    slot_mapping = torch.randperm(NUM_BLOCKS_3 * block_size)[:num_cache_tokens].to(torch.long)
    if num_cache_tokens >= 4:
        slot_mapping[1] = -1
    key_cache, value_cache, physical = layer_cache_views(layout, num_kv_heads, head_size, block_size, dtype,
                                                         page_padding)  # fmt: skip
    physical_ref = physical.clone()
    kc_ref, vc_ref = key_cache.clone(), value_cache.clone()

    q_ref = rotate_like_vllm(positions, query, cos_sin_cache, is_neox)
    k_ref = rotate_like_vllm(positions, key, cos_sin_cache, is_neox)
    q_true = rotate_like_vllm(positions, query, cos_sin_cache, is_neox, torch.float64)
    k_true = rotate_like_vllm(positions, key, cos_sin_cache, is_neox, torch.float64)
    reshape_and_cache_flash_like_vllm(k_ref, value, kc_ref, vc_ref, slot_mapping, "auto", None, None)
    value_before = value.clone()

    fused_rope_and_reshape_cache_flash(query, key, value, positions, cos_sin_cache, is_neox, key_cache, value_cache,
                                       slot_mapping)  # fmt: skip

    assert_rotation_like_vllm(query, q_ref, q_true, "query")
    assert_rotation_like_vllm(key, k_ref, k_true, "key")
    assert torch.equal(value, value_before)
    check_cache_holds_our_k(key_cache, key, slot_mapping, "auto", None)
    assert torch.equal(value_cache, vc_ref)
    keep = slot_mapping >= 0
    assert_rotation_like_vllm(written_rows(key_cache, slot_mapping), k_ref[:num_cache_tokens][keep],
                              k_true[:num_cache_tokens][keep], "key_cache")  # fmt: skip
    # the whole buffer: only the written rows of this layer's k and v changed (other layer, padding untouched)
    flags = torch.zeros(physical.numel(), dtype=torch.bool)
    s = slot_mapping[keep]
    for view in (key_cache, value_cache):
        flags.as_strided(view.shape, view.stride(), view.storage_offset())[s // block_size, s % block_size] = True
    assert torch.equal(physical[~flags], physical_ref[~flags]), "an element outside the written rows changed"


# ----------------------------------------------------------------------------------------------
# Not upstream's: fp8_e5m2 through uint8 storage with per-head scales, flat [T, H*D] inputs, refusals
# ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_fp8_e5m2_uint8_flat_inputs_per_head_scales():
    torch.manual_seed(0)
    T, Hq, Hk, D, rot = 5, 4, 2, 32, 16  # partial rotary
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, dtype=torch.bfloat16)
    query, key, value = qkv.split([Hq * D, Hk * D, Hk * D], dim=-1)  # flat [T, H*D] views
    cos_sin_cache = vllm_cos_sin_cache(rot, 64, 10000, torch.float32)
    positions = torch.randint(0, 64, (T,))
    kv_cache = torch.zeros(3, 2, 4, Hk, D, dtype=torch.uint8)
    key_cache, value_cache = kv_cache.unbind(1)
    slot_mapping = torch.tensor([3, -1, 7, 0])  # the last token is padding
    k_scale, v_scale = torch.tensor([0.02, 0.05]), torch.tensor([0.03, 0.01])
    k_in = key.view(T, Hk, D).clone()
    k_true = rotate_like_vllm(positions, k_in, cos_sin_cache, True, torch.float64)
    vc_ref = value_cache.clone()
    reshape_and_cache_flash_like_vllm(k_in, value.view(T, Hk, D), key_cache.clone(), vc_ref, slot_mapping, "fp8_e5m2",
                                      k_scale, v_scale)  # fmt: skip
    fused_rope_and_reshape_cache_flash(query, key, value, positions, cos_sin_cache, True, key_cache, value_cache,
                                       slot_mapping, k_scale, v_scale, "fp8_e5m2")  # fmt: skip
    k_out = key.view(T, Hk, D)
    assert (k_out.double() - k_true).abs().max() < 2 ** -7 * 8  # rotated in place (bf16, |k| < 8)
    check_cache_holds_our_k(key_cache, k_out, slot_mapping, "fp8_e5m2", k_scale)
    assert torch.equal(value_cache, vc_ref)
    written = torch.zeros(3, 4, dtype=torch.bool)
    written[[0, 1, 0], [3, 3, 0]] = True  # slots 3, 7 and 0; -1 and the padding token are not written
    assert not kv_cache.transpose(1, 2)[~written].any() and kv_cache.transpose(1, 2)[written].any(-1).all()


def test_refusals_before_any_write():
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    cos_sin_cache = torch.randn(16, 8)
    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    q0, k0 = q.clone(), k.clone()
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        fused_rope_and_reshape_cache_flash(q, k, v, torch.arange(2), cos_sin_cache, True, kc, vc, torch.arange(2),
                                           kv_cache_dtype="fp8_inc")  # fmt: skip
    with pytest.raises(TypeError, match="key_cache must be uint8"):  # an fp32 cache is not FP8 storage
        fused_rope_and_reshape_cache_flash(q, k, v, torch.arange(2), cos_sin_cache, True, kc, vc, torch.arange(2),
                                           torch.tensor(1.0), torch.tensor(1.0), "fp8")  # fmt: skip
    with pytest.raises(ValueError, match="slot_mapping"):  # slot 8 is past 2 blocks of 4
        fused_rope_and_reshape_cache_flash(q, k, v, torch.arange(2), cos_sin_cache, True, kc, vc, torch.tensor([0, 8]))
    assert torch.equal(q, q0) and torch.equal(k, k0) and not kc.any() and not vc.any()
