"""RotaryEmbedding's own behaviour: cos/sin tables, the cache (growth, hints, no host reads), exact far
positions, packed batches, gradcheck, buffers, errors, torch.compile.
"""

import pytest
import torch

import posenc_kernels as pk

from posenc_kernels.ops.rope import rope_cos_sin
from posenc_kernels.ops.rope.module import RotaryEmbedding
from posenc_kernels.ops.rope.schedules import rope_frequencies

from conftest import gradcheck_kw

from .rotary_common import EPS32, truth_rotate, truth_angles, llama_config, LLAMA_TYPES, qk

transformers = pytest.importorskip("transformers")


def test_cos_sin_tables(backend):
    scaling = LLAMA_TYPES["yarn"]
    rope = RotaryEmbedding(64, scaling=scaling)
    inv, af = rope_frequencies(64, scaling=scaling)
    cos, sin = rope.cos_sin(100)
    want_cos, want_sin = rope_cos_sin(256, inv, attention_factor=af)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    cos, sin = RotaryEmbedding(64, scaling=scaling, cache=False).cos_sin(100)
    assert torch.equal(cos, want_cos[:100]) and torch.equal(sin, want_sin[:100])


# ----------------------------------------------------------------------------------------------
# Angle sources: table vs on the fly vs exact
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["default", "yarn", "llama3"])
def test_cache_and_on_the_fly_agree(backend, kind):
    cfg = llama_config(max_pos=256, **LLAMA_TYPES[kind])
    q, k = qk()
    a = RotaryEmbedding.from_config(cfg, cache=True)(q.clone(), k.clone(), offsets=torch.tensor([3, 500]))
    b = RotaryEmbedding.from_config(cfg, cache=False)(q.clone(), k.clone(), offsets=torch.tensor([3, 500]))
    # Same fp32 angle product, cos/sin in the table kernel vs in registers.
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=0, atol=4 * EPS32 * 4), (x - y).abs().max()


@pytest.mark.parametrize("cache", [True, False], ids=["exact-table", "exact-on-the-fly"])
def test_exact_far_positions(backend, cache):
    """exact=True: float64 frequencies and angles, accurate at positions where an fp32 angle is not."""
    scaling = dict(LLAMA_TYPES["yarn"])
    rope = RotaryEmbedding(64, scaling=scaling, cache=cache, exact=True)
    assert rope.inv_freq.dtype == torch.float64
    q, k = qk(B=1, S=5)
    start = (1 << 20) + 12345 if not cache else 5000  # keep the exact table small under the interpreter
    got_q, got_k = rope(q.clone(), k.clone(), offsets=start)
    inv64, af = rope_frequencies(64, scaling=scaling, dtype=torch.float64)
    angle = truth_angles(torch.arange(start, start + 5)[None], inv64)
    for got, x in ((got_q, q), (got_k, k)):
        err = (got.double() - truth_rotate(x, angle, af)).abs().max().item()
        assert err <= 8 * EPS32 * x.abs().max().item() * af, err
    if not cache:
        fp32 = RotaryEmbedding(64, scaling=scaling, cache=False)(q.clone(), k.clone(), offsets=start)[0]
        err32 = (fp32.double() - truth_rotate(q, angle, af)).abs().max().item()
        assert err32 > 10 * err, "the fp32 angle product loses accuracy this far out; exact must not"


# ----------------------------------------------------------------------------------------------
# Cache growth, positions, packed input
# ----------------------------------------------------------------------------------------------


def test_cache_grows_on_demand_and_never_shrinks(backend):
    rope = RotaryEmbedding(32, base=10000.0)
    assert rope.cos_cached.shape == (0, 16)
    q, k = qk(B=1, S=3, D=32)
    rope(q, k)
    assert rope.cos_cached.shape == (256, 16)
    rope(q, k, offsets=1000)  # needs 1003 rows
    assert rope.cos_cached.shape == (1024, 16)
    rope(q, k, positions=torch.tensor([[5, 3000, 7]]))  # tensor positions: read on the host
    assert rope.cos_cached.shape == (4096, 16)
    rope(q, k)
    assert rope.cos_cached.shape == (4096, 16)
    cos, sin = rope_cos_sin(4096, rope_frequencies(32)[0])
    assert torch.equal(rope.cos_cached, cos) and torch.equal(rope.sin_cached, sin)
    # Per-sequence offsets.
    rope(q, k.new_empty(1, 3, 0, 32), offsets=torch.tensor([5000]))
    assert rope.cos_cached.shape == (8192, 16)


def test_seq_len_hint_skips_the_host_read(backend, monkeypatch):
    rope = RotaryEmbedding(32)
    monkeypatch.setattr(rope, "_seq_len", lambda *a: pytest.fail("read positions on the host despite seq_len"))
    q, k = qk(B=2, S=4, D=32)
    pos = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    ref_q = RotaryEmbedding(32)(q.clone(), k.clone(), positions=pos)[0]
    got_q = rope(q.clone(), k.clone(), positions=pos, seq_len=14)[0]
    assert torch.equal(got_q, ref_q)


def test_cache_false_never_reads_positions_for_static_schedules(backend, monkeypatch):
    rope = RotaryEmbedding(32, cache=False, scaling={"rope_type": "linear", "factor": 2.0})
    monkeypatch.setattr(rope, "_seq_len", lambda *a: pytest.fail("no host read needed"))
    q, k = qk(B=2, S=4, D=32)
    rope(q, k, positions=torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]]))
    assert rope.cos_cached.numel() == 0


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_packed_cu_seqlens_equals_padded(backend, cache):
    rope = RotaryEmbedding(64, scaling=LLAMA_TYPES["llama3"], max_position_embeddings=256, cache=cache)
    lengths, offs = [5, 1, 7], [0, 300, 12]
    q, k = qk(B=3, S=7)
    packed_q = torch.cat([q[i, : lengths[i]] for i in range(3)])
    packed_k = torch.cat([k[i, : lengths[i]] for i in range(3)])
    cu = torch.tensor([0, 5, 6, 13])
    got_q, got_k = rope(packed_q.clone(), packed_k.clone(), offsets=torch.tensor(offs), cu_seqlens=cu)
    pad_q, pad_k = rope(q.clone(), k.clone(), offsets=torch.tensor(offs))
    want_q = torch.cat([pad_q[i, : lengths[i]] for i in range(3)])
    want_k = torch.cat([pad_k[i, : lengths[i]] for i in range(3)])
    assert torch.allclose(got_q, want_q, rtol=0, atol=1e-6) and torch.allclose(got_k, want_k, rtol=0, atol=1e-6)
    if cache:
        assert rope.cos_cached.shape[0] == 512  # largest position 300 -> 301 rows -> 512


def test_gradcheck_float64(backend):
    rope = RotaryEmbedding(8, scaling={"rope_type": "linear", "factor": 2.0}, cache=False)
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, dtype=torch.float64, requires_grad=True)

    def f(q, k):
        return rope(q.clone(), k.clone(), offsets=5)

    assert torch.autograd.gradcheck(f, (q, k), **gradcheck_kw(backend))


# ----------------------------------------------------------------------------------------------
# Module plumbing: devices, dtypes, state dict, from_config
# ----------------------------------------------------------------------------------------------


def test_buffers_follow_device_and_keep_their_dtype():
    rope = RotaryEmbedding(32, scaling={"rope_type": "longrope", "original_max_position_embeddings": 8,
                                        "short_factor": [1.0] * 16, "long_factor": [2.0] * 16, "factor": 4.0})  # fmt: skip
    exact = RotaryEmbedding(32, exact=True)
    q, k = qk(B=1, S=3, D=32)
    rope(q, k, offsets=20)  # builds the long table
    for m in (rope, exact):
        before = {n: b.dtype for n, b in m.named_buffers()}
        m.to(torch.bfloat16)
        m.half()
        assert {n: b.dtype for n, b in m.named_buffers()} == before, "frequencies and tables keep their precision"
        m.to("meta")
        assert all(b.device.type == "meta" for _, b in m.named_buffers())
        assert {n: b.dtype for n, b in m.named_buffers()} == before
    assert rope.state_dict() == {} and exact.state_dict() == {}
    with pytest.raises(ValueError, match=r"q is on cpu but this RotaryEmbedding's buffers are on meta: move the module with .to\('cpu'\)"):
        rope(q, k)


def test_proportional_rotates_only_the_leading_pairs(backend):
    rope = RotaryEmbedding(32, scaling={"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25})
    q, k = qk(B=1, S=4, D=32)
    got_q, _ = rope(q.clone(), k.clone(), offsets=3)
    untouched = torch.cat([torch.arange(4, 16), torch.arange(20, 32)])
    assert torch.equal(got_q[..., untouched], q[..., untouched])
    assert not torch.equal(got_q[:, 1:, :, :4], q[:, 1:, :, :4])


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(head_dim=0), ValueError, r"head_dim must be a positive int, got 0"),
        (dict(head_dim=64, rotary_dim=80), ValueError, r"rotary_dim \(80\) must not exceed head_dim \(64\)"),
        (dict(head_dim=64, rotary_dim=15), ValueError, r"rotary_dim must be a positive even int, got 15"),
        (dict(head_dim=64, rotary_dim=16, partial_rotary_factor=0.5), ValueError, r"pass rotary_dim or partial_rotary_factor, not both"),
        (dict(head_dim=64, partial_rotary_factor=1.5), ValueError, r"partial_rotary_factor must be in \(0, 1\], got 1.5"),
        (dict(head_dim=64, base=1e4, scaling={"rope_theta": 5e5}), ValueError, r"base=10000.0 disagrees with scaling\['rope_theta'\]"),
        (dict(head_dim=64, scaling={"rope_type": "xpos"}), ValueError, r"unknown rope_type 'xpos'"),
        (dict(head_dim=64, scaling={"rope_type": "linear"}), ValueError, r"scaling\['factor'\] is required for rope_type 'linear'"),
        (dict(head_dim=64, scaling={"rope_type": "dynamic", "factor": 2.0}), ValueError,
         r"original_max_position_embeddings'\] is required .*max_position_embeddings"),
        (dict(head_dim=64, mrope_section=[8, 8, 8]), ValueError, r"mrope_section \[8, 8, 8\] must sum to rotary_dim / 2 = 32, got 24"),
        (dict(head_dim=64, max_position_embeddings=0), ValueError, r"max_position_embeddings must be a positive int"),
        (dict(head_dim=64, scaling="linear"), TypeError, r"scaling must be a dict"),
    ],
)
def test_constructor_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        RotaryEmbedding(**kwargs)


@pytest.mark.parametrize(
    "args, kwargs, exc, msg",
    [
        (("q",), {}, TypeError, r"q must be a torch.Tensor, got str"),
        ((torch.randn(2, 3, 64),), {"positions": None, "seq_len": 0}, ValueError, r"seq_len must be a positive int, got 0"),
        ((torch.randn(3, 64),), {}, ValueError, r"q must be \[B, S, H, D\] or packed \[T, H, D\], got shape \(3, 64\)"),
        ((torch.randn(1, 3, 2, 32),), {}, ValueError, r"q's head dim \(last\) must be head_dim = 64, got 32"),
        ((torch.randn(1, 3, 2, 64), torch.randn(1, 4, 2, 64)), {}, ValueError, r"k must be \[B, S, Hk, D\]"),
        ((torch.randn(1, 3, 2, 64),), {"positions": torch.tensor([[0, 1, -1]])}, ValueError, r"positions|rows"),
    ],
)
def test_forward_errors_leave_inputs_unchanged(backend, args, kwargs, exc, msg):
    rope = RotaryEmbedding(64)
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(exc, match=msg):
        rope(*args, **kwargs)
    for b, a in zip(before, [a for a in args if isinstance(a, torch.Tensor)]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cache", [True, False])
def test_module_under_torch_compile_fullgraph(cache):
    """int offsets need no host value: the module traces without graph breaks (cache growth is Python)."""
    rope = RotaryEmbedding(head_dim=64, base=10000.0, max_position_embeddings=256, cache=cache)

    def f(x, y):
        q, k = x * 1, y * 1
        rope(q, k, offsets=3)
        return q, k

    x, y = torch.randn(2, 8, 4, 64), torch.randn(2, 8, 2, 64)
    want = f(x, y)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


@pytest.mark.parametrize("kw", [
    dict(head_dim=16, scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
    dict(head_dim=16, scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                               "original_max_position_embeddings": 8}, max_position_embeddings=32, rotary_dim=8),
    dict(head_dim=16, mrope_section=[2, 2, 4], exact=True),
], ids=["dynamic", "longrope", "mrope-exact"])  # fmt: skip
def test_meta_init_then_reset_parameters_matches_eager(kw):
    """Built under torch.device("meta"), moved with to_empty() (uninitialised buffers: outputs were off by
    5.25), then reset_parameters(): every buffer and the output equal an eagerly built module's."""
    eager = RotaryEmbedding(**kw)
    with torch.device("meta"):
        meta = RotaryEmbedding(**kw)
    meta = meta.to_empty(device="cpu")
    for buf in meta.buffers():
        buf.fill_(float("nan")) if buf.is_floating_point() else buf.fill_(-1)  # what to_empty may leave
    meta.reset_parameters()
    for (name, a), (_, b) in zip(eager.named_buffers(), meta.named_buffers()):
        assert torch.equal(a, b), name
    mrope = "mrope_section" in kw
    positions = torch.arange(12).expand(3, 1, 12) if mrope else None
    q = torch.randn(1, 12, 2, 16)
    with pk.use_backend("torch"):
        want = eager(q.clone(), positions=positions)[0]
        got = meta(q.clone(), positions=positions)[0]
    assert torch.equal(got, want)
