"""Position-id builders against literal transcriptions of the code they reproduce (Hugging Face generation,
Hugging Face OPT, fairseq), on random padded batches (left, right, holes), prefill chunks and decode loops."""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels.ops.positions import (
    fairseq_positions,
    opt_positions,
    position_ids_from_attention_mask,
    positions_from_cu_seqlens,
)

from conftest import DEVICE

# ----------------------------------------------------------------------------------------------
# Transcriptions of the upstream code (the oracles)
# ----------------------------------------------------------------------------------------------


def hf_generation_position_ids(attention_mask, current_input_length=None):
    """transformers GenerationMixin.prepare_inputs_for_generation, steps 4-5: position_ids from the mask,
    then (with a cache) the last ``current_input_length`` columns."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    if current_input_length is not None:
        position_ids = position_ids[:, -current_input_length:]
    return position_ids


def hf_update_attention_mask(attention_mask):
    """transformers GenerationMixin._update_model_kwargs_for_generation: one new real token per step."""
    return torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)


def hf_opt_position_ids(attention_mask, past_key_values_length=0):
    """transformers OPTLearnedPositionalEmbedding.forward: the indices it looks up (offset 2 included)."""
    position_ids = torch.cumsum(attention_mask, dim=1)
    position_ids = (position_ids * attention_mask - 1).long()
    position_ids = position_ids[:, past_key_values_length:]
    return position_ids + 2


def fairseq_make_positions(tensor, padding_idx):
    """fairseq.utils.make_positions."""
    mask = tensor.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


def cu_seqlens_reference(lengths, offsets=None, total=None):
    parts = [torch.arange(n) + (0 if offsets is None else int(offsets[i])) for i, n in enumerate(lengths)]
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    if total is not None and total > out.numel():
        out = torch.cat([out, torch.zeros(total - out.numel(), dtype=torch.int64)])
    return out


# ----------------------------------------------------------------------------------------------
# Random padded batches
# ----------------------------------------------------------------------------------------------


def padded_mask(batch, length, side, generator, dtype=torch.int64):
    """Masks with random real lengths (0 and ``length`` included); ``holes`` also zeroes random slots."""
    n = torch.randint(0, length + 1, (batch,), generator=generator)
    n[0], n[-1] = length, 0 if batch > 1 else length
    col = torch.arange(length)
    if side == "left":
        mask = col[None, :] >= (length - n)[:, None]
    elif side == "right":
        mask = col[None, :] < n[:, None]
    else:  # holes: any pattern
        mask = torch.rand(batch, length, generator=generator) < 0.7
    return mask.to(dtype).to(DEVICE)


SIDES = ["left", "right", "holes"]
MASK_DTYPES = [torch.int64, torch.int32, torch.bool, torch.float32]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", MASK_DTYPES)
def test_hf_generation_prefill(side, dtype):
    g = torch.Generator().manual_seed(1)
    for batch, length in [(1, 1), (3, 7), (5, 13), (4, 64)]:
        mask = padded_mask(batch, length, side, g, dtype)
        got = position_ids_from_attention_mask(mask)
        want = hf_generation_position_ids(mask)
        assert got.dtype == torch.int64 and got.device == mask.device
        assert torch.equal(got, want), (mask, got, want)


@pytest.mark.parametrize("side", SIDES)
def test_hf_generation_decode_loop(side):
    """Prefill, then each generate() step appends a real token and passes only the new one."""
    g = torch.Generator().manual_seed(2)
    mask = padded_mask(4, 9, side, g)
    assert torch.equal(position_ids_from_attention_mask(mask), hf_generation_position_ids(mask))
    for _ in range(6):
        mask = hf_update_attention_mask(mask)
        past = mask.shape[1] - 1
        got = position_ids_from_attention_mask(mask, past_length=past)
        assert got.shape == (4, 1)
        assert torch.equal(got, hf_generation_position_ids(mask, current_input_length=1))


@pytest.mark.parametrize("side", SIDES)
def test_hf_generation_chunked_prefill(side):
    g = torch.Generator().manual_seed(3)
    mask = padded_mask(3, 20, side, g)
    for past in (0, 1, 7, 19):
        got = position_ids_from_attention_mask(mask, past_length=past)
        assert torch.equal(got, hf_generation_position_ids(mask, current_input_length=20 - past))
    assert position_ids_from_attention_mask(mask, past_length=20).shape == (3, 0)


def test_hf_generation_left_padding_does_not_shift_real_tokens():
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]], device=DEVICE)
    got = position_ids_from_attention_mask(mask)
    assert got[0, 3:].tolist() == [0, 1] and got[1].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", MASK_DTYPES)
def test_opt_positions(side, dtype):
    g = torch.Generator().manual_seed(4)
    for batch, length in [(1, 1), (3, 7), (5, 13)]:
        mask = padded_mask(batch, length, side, g, dtype)
        for past in sorted({0, 1, length // 2, length - 1, length}):
            got = opt_positions(mask, past_length=past)
            want = hf_opt_position_ids(mask, past)
            assert got.dtype == torch.int64
            assert torch.equal(got, want), (mask, past, got, want)


@pytest.mark.parametrize("side", SIDES)
def test_opt_positions_decode_loop(side):
    g = torch.Generator().manual_seed(5)
    mask = padded_mask(3, 6, side, g)
    for _ in range(4):
        mask = hf_update_attention_mask(mask)
        past = mask.shape[1] - 1
        assert torch.equal(opt_positions(mask, past_length=past), hf_opt_position_ids(mask, past))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("padding_idx", [0, 1, 5])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_fairseq_positions(side, padding_idx, dtype):
    g = torch.Generator().manual_seed(6)
    for batch, length in [(1, 1), (3, 7), (6, 31)]:
        real = padded_mask(batch, length, side, g).bool()
        tokens = torch.randint(0, 50, (batch, length), generator=g).to(DEVICE)
        tokens = tokens.masked_fill(tokens == padding_idx, padding_idx + 1)  # real tokens are never pads
        tokens = tokens.masked_fill(~real, padding_idx).to(dtype)
        got = fairseq_positions(tokens, padding_idx)
        want = fairseq_make_positions(tokens, padding_idx)
        assert got.dtype == torch.int64
        assert torch.equal(got, want), (tokens, got, want)


def test_fairseq_positions_numbering():
    tokens = torch.tensor([[1, 1, 9, 9], [9, 9, 9, 1]], device=DEVICE)
    assert fairseq_positions(tokens, 1).tolist() == [[1, 1, 2, 3], [2, 3, 4, 1]]


# ----------------------------------------------------------------------------------------------
# Packed sequences
# ----------------------------------------------------------------------------------------------

LENGTHS = [[5], [3, 1, 4], [0, 2, 0, 3, 0], [1, 1, 1, 1], [7, 0], [0]]


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cu_seqlens(lengths, dtype):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=dtype, device=DEVICE)
    total = sum(lengths)
    want = cu_seqlens_reference(lengths).to(DEVICE)
    got = positions_from_cu_seqlens(cu)
    assert got.dtype == torch.int64 and got.device == cu.device
    assert torch.equal(got, want)
    assert torch.equal(positions_from_cu_seqlens(cu, total), want)


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_cu_seqlens_offsets(lengths):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=DEVICE)
    offsets = torch.randint(0, 100, (len(lengths),), dtype=torch.int32, device=DEVICE)
    want = cu_seqlens_reference(lengths, offsets.cpu()).to(DEVICE)
    assert torch.equal(positions_from_cu_seqlens(cu, sum(lengths), offsets=offsets), want)
    want_int = cu_seqlens_reference(lengths, [11] * len(lengths)).to(DEVICE)
    assert torch.equal(positions_from_cu_seqlens(cu, offsets=11), want_int)


def test_cu_seqlens_decode_step_equals_offsets():
    """Decode: one token per sequence, each at its cache length."""
    cache_lens = torch.tensor([5, 0, 17], device=DEVICE)
    cu = torch.arange(4, device=DEVICE, dtype=torch.int32)
    assert positions_from_cu_seqlens(cu, 3, offsets=cache_lens).tolist() == [5, 0, 17]


def test_cu_seqlens_padded_bucket():
    cu = torch.tensor([0, 2, 5], device=DEVICE)
    got = positions_from_cu_seqlens(cu, 8, offsets=torch.tensor([10, 20], device=DEVICE))
    assert got.tolist() == [10, 11, 20, 21, 22, 0, 0, 0]
    assert positions_from_cu_seqlens(torch.tensor([0], device=DEVICE), 3).tolist() == [0, 0, 0]


def test_cu_seqlens_matches_padded_mask_layout():
    """Packing the real tokens of a right-padded batch gives the same positions HF computes for them."""
    g = torch.Generator().manual_seed(7)
    mask = padded_mask(5, 11, "right", g)
    lengths = mask.sum(1).cpu()
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(DEVICE)
    packed = positions_from_cu_seqlens(cu, int(lengths.sum()))
    assert torch.equal(packed, hf_generation_position_ids(mask)[mask.bool()])


def test_cu_seqlens_traces_without_graph_breaks():
    """With total_tokens given, nothing reads a device value: torch.compile(fullgraph=True) traces it
    (a .item()/.tolist() or a data-dependent branch would break the graph and raise)."""
    torch._dynamo.reset()
    fn = torch.compile(
        lambda cu, off: positions_from_cu_seqlens(cu, 9, offsets=off), fullgraph=True, backend="aot_eager"
    )
    cu = torch.tensor([0, 3, 5, 9], device=DEVICE)
    off = torch.tensor([1, 2, 3], device=DEVICE)
    assert fn(cu, off).tolist() == [1, 2, 3, 2, 3, 3, 4, 5, 6]
    mask_fn = torch.compile(
        lambda m: (position_ids_from_attention_mask(m, past_length=2), opt_positions(m, past_length=2)),
        fullgraph=True,
        backend="aot_eager",
    )
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]], device=DEVICE)
    got_hf, got_opt = mask_fn(mask)
    assert torch.equal(got_hf, hf_generation_position_ids(mask, 2))
    assert torch.equal(got_opt, hf_opt_position_ids(mask, 2))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host syncs and graph capture exist on CUDA only")
def test_cuda_no_sync_and_graph_capture():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]], device="cuda")
    tokens = torch.tensor([[1, 4, 5, 6]], device="cuda")
    cu = torch.tensor([0, 3, 5, 9], device="cuda", dtype=torch.int32)
    off = torch.tensor([1, 2, 3], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        position_ids_from_attention_mask(mask, past_length=1)
        opt_positions(mask, past_length=1)
        fairseq_positions(tokens, 1)
        pk.set_value_checks(False)
        positions_from_cu_seqlens(cu, 9, offsets=off)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        pk.set_value_checks(True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # value checks are skipped during capture
        out = positions_from_cu_seqlens(cu, 9, offsets=off)
    cu.copy_(torch.tensor([0, 4, 4, 9], dtype=torch.int32))
    graph.replay()
    assert out.tolist() == [1, 2, 3, 4, 3, 4, 5, 6, 7]


# ----------------------------------------------------------------------------------------------
# Errors name the argument
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: position_ids_from_attention_mask([[1, 1]]), TypeError, "attention_mask must be a torch.Tensor"),
        (lambda: position_ids_from_attention_mask(torch.ones(2, 3, 4)), ValueError, "attention_mask must have 2"),
        (lambda: position_ids_from_attention_mask(torch.ones(3), past_length=0), ValueError, "attention_mask"),
        (lambda: position_ids_from_attention_mask(torch.ones(2, 3), past_length=4), ValueError, "past_length"),
        (lambda: position_ids_from_attention_mask(torch.ones(2, 3), past_length=-1), ValueError, "past_length"),
        (lambda: position_ids_from_attention_mask(torch.ones(2, 3), past_length=1.0), TypeError, "past_length"),
        (lambda: position_ids_from_attention_mask(torch.ones(2, 3), past_length=True), TypeError, "past_length"),
        (lambda: opt_positions(torch.ones(2, 3, dtype=torch.complex64)), TypeError, "attention_mask must have dtype"),
        (lambda: opt_positions(torch.ones(2, 3), past_length=5), ValueError, "past_length"),
        (lambda: fairseq_positions(torch.ones(2, 3), 1), TypeError, "tokens must have dtype"),
        (lambda: fairseq_positions(torch.ones(3, dtype=torch.long), 1), ValueError, "tokens must have 2"),
        (lambda: fairseq_positions(torch.ones(2, 3, dtype=torch.long), 1.5), TypeError, "padding_idx"),
        (lambda: positions_from_cu_seqlens(torch.tensor([0.0, 2.0])), TypeError, "cu_seqlens must have dtype"),
        (lambda: positions_from_cu_seqlens(torch.tensor([True, False])), TypeError, "cu_seqlens must be an integer"),
        (lambda: positions_from_cu_seqlens(torch.tensor([[0, 2]])), ValueError, "cu_seqlens must have 1"),
        (lambda: positions_from_cu_seqlens(torch.zeros(0, dtype=torch.long)), ValueError, "cu_seqlens must have B"),
        (lambda: positions_from_cu_seqlens(torch.tensor([1, 3])), ValueError, "cu_seqlens must start at 0"),
        (lambda: positions_from_cu_seqlens(torch.tensor([0, 3, 2]), 3), ValueError, "cu_seqlens must start at 0 and never decrease"),
        (lambda: positions_from_cu_seqlens(torch.tensor([0, -2])), ValueError, "cu_seqlens must start at 0 and never decrease"),
        (lambda: positions_from_cu_seqlens(torch.tensor([0, 3, 5]), 4), ValueError, "total_tokens"),
        (lambda: positions_from_cu_seqlens(torch.tensor([0, 3]), -1), ValueError, "total_tokens"),
        (lambda: positions_from_cu_seqlens(torch.tensor([0, 3]), 3.0), TypeError, "total_tokens"),
        (lambda: positions_from_cu_seqlens(torch.tensor([0, 3]), offsets=torch.zeros(2, dtype=torch.long)),
         ValueError, r"offsets must have shape \[B\] = \[1\]"),
        (lambda: positions_from_cu_seqlens(torch.tensor([0, 3]), offsets=torch.zeros(1)), TypeError, "offsets"),
        (lambda: positions_from_cu_seqlens(torch.tensor([0, 3]), offsets=1.5), TypeError, "offsets"),
    ],
)  # fmt: skip
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_value_checks_can_be_turned_off():
    """With value checks off nothing reads cu_seqlens' values; bad input then gives garbage, not an error
    and not an out-of-bounds read (every gather index stays in range)."""
    pk.set_value_checks(False)
    try:
        out = positions_from_cu_seqlens(torch.tensor([0, 3, 2]), 3)
        assert out.shape == (3,)
        out = positions_from_cu_seqlens(torch.tensor([0, 3, 5]), 4, offsets=torch.tensor([1, 2]))
        assert out.tolist() == [1, 2, 3, 2]  # truncated: total_tokens wins
    finally:
        pk.set_value_checks(True)
