"""sinusoidal_table: equal to the published implementations (the Transformer paper, tensor2tensor,
fairseq, diffusers), layouts and dtypes, every element written, the factory op, bad input.
"""

import pytest
import torch

import posenc_kernels as pk
from posenc_kernels import reference as ref
from posenc_kernels.ops.sinusoidal import op as sin_op

from conftest import DEVICE, DTYPES, assert_dtype_tolerance, max_err
from .common import CONV, truth_table, _launcher


NATIVE_OP = "add_sinusoidal_"  # these tests also run on the native C++ CPU kernels when built (conftest.py)


# ---------------------------------------------------------------------------------------------
# Published conventions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [512, 64, 6])  # the paper defines even d_model only
def test_transformer_paper(backend, dim):
    length = 300
    ours = pk.sinusoidal_table(length, dim, **CONV["transformer"], device=DEVICE)
    published = ref.published_transformer(length, dim)
    truth = truth_table(torch.arange(length), dim, **CONV["transformer"])
    assert_dtype_tolerance(ours.cpu(), truth, published, what="transformer")


@pytest.mark.parametrize("channels,min_ts,max_ts", [(512, 1.0, 1e4), (33, 1.0, 1e4), (4, 1.0, 1e4), (64, 2.0, 5e3)])
def test_tensor2tensor(backend, channels, min_ts, max_ts):
    length = 257
    # min_timescale != 1: base = max/min, and the angle is scaled by 1/min_timescale... as inv_timescales
    # are multiplied by min_timescale in the source, scale = min_timescale reproduces it.
    kw = dict(**CONV["tensor2tensor"], base=max_ts / min_ts, scale=min_ts)
    ours = pk.sinusoidal_table(length, channels, **kw, device=DEVICE)
    published = ref.published_tensor2tensor(length, channels, min_timescale=min_ts, max_timescale=max_ts)
    truth = truth_table(torch.arange(length), channels, **kw)
    assert_dtype_tolerance(ours.cpu(), truth, published, what="tensor2tensor")


@pytest.mark.parametrize("dim", [1024, 65, 10])
def test_fairseq(backend, dim):
    n = 130
    ours = pk.sinusoidal_table(n, dim, **CONV["fairseq"], device=DEVICE)
    published = ref.published_fairseq(n, dim)
    truth = truth_table(torch.arange(n), dim, **CONV["fairseq"])
    assert_dtype_tolerance(ours.cpu(), truth, published, what="fairseq")


@pytest.mark.parametrize(
    "dim,flip,shift,scale,max_period",
    [(320, True, 0, 1, 10000), (256, False, 1, 1, 10000), (33, True, 1, 1000.0, 10000), (128, False, 0, 1, 5000)],
)
def test_diffusers(backend, dim, flip, shift, scale, max_period):
    t = torch.cat([torch.tensor([0.0, 1.0, 999.0]), torch.rand(20) * 1000])  # float diffusion timesteps
    ours = pk.sinusoidal_table(
        t.to(DEVICE), dim, base=max_period, interleaved=False, cos_first=flip, freq_shift=shift, scale=scale
    )
    published = ref.published_diffusers(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale, max_period=max_period)
    truth = truth_table(t, dim, base=max_period, interleaved=False, cos_first=flip, freq_shift=shift, scale=scale)
    assert_dtype_tolerance(ours.cpu(), truth, published, what="diffusers")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved,cos_first", [(True, False), (True, True), (False, False), (False, True)])
def test_table_layouts_and_dtypes(backend, interleaved, cos_first, dtype):
    pos = torch.tensor([[0, 5, 17], [1023, 2, 70000]], device=DEVICE)  # any shape, large values
    kw = dict(interleaved=interleaved, cos_first=cos_first, base=500.0, freq_shift=0.5)
    ours = pk.sinusoidal_table(pos, 23, dtype=dtype, **kw)
    assert ours.shape == (2, 3, 23) and ours.dtype == dtype
    truth = truth_table(pos, 23, **kw)
    same_in_torch = ref.sinusoidal_table_reference(pos.float(), 23, dtype=torch.float32, **kw).to(dtype)
    assert_dtype_tolerance(ours, truth, same_in_torch)
    assert torch.all(ours[..., -1] == 0), "odd dim: the last column must be zero"


def test_table_empty_and_tiny(backend):
    assert pk.sinusoidal_table(0, 8, device=DEVICE).shape == (0, 8)
    assert pk.sinusoidal_table(torch.empty(0, 3, device=DEVICE), 8).shape == (0, 3, 8)
    one = pk.sinusoidal_table(3, 1, device=DEVICE)  # no frequency at all: the zero column only
    assert torch.equal(one.cpu(), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="device .* must match the positions' device"):
        pk.sinusoidal_table(torch.arange(3), 8, device="meta")


def test_table_writes_every_element(backend):
    launcher = _launcher(backend)
    for dim, inter in [(9, True), (9, False), (64, True)]:
        out = torch.full((1, 11, dim), float("nan"), device=DEVICE)
        sin_op.run_launcher(launcher, None, out, None, None, 3, 1.0, 10000.0, inter, False, 0.0, 1.0)
        truth = truth_table(torch.arange(3, 14), dim, interleaved=inter)
        assert not torch.isnan(out).any()
        assert max_err(out[0], truth) < 1e-4


def test_table_factory_op_routes_by_device(backend):
    """sinusoidal_table without positions has no tensor argument: its BackendSelect kernel picks the
    backend from ``device`` (the override of this thread included), and meta devices get shapes."""
    from posenc_kernels.ops import registry

    # the extension's chooser (it takes the device argument of a factory op) or, without it, Python's
    assert registry.registered_kernels("sinusoidal_table")["BackendSelect"] in ("factory", "chooser")
    ran = []
    spec = registry.spec("sinusoidal_table")
    impl = spec.impls.get(backend)
    if impl is not None:
        spec.impls[backend] = lambda *a: ran.append(backend) or impl(*a)
    try:
        pe = pk.sinusoidal_table(6, 8, device=DEVICE)
    finally:
        if impl is not None:
            spec.impls[backend] = impl
    assert ran == ([backend] if impl is not None else [])
    assert max_err(pe, truth_table(torch.arange(6), 8)) < 1e-5
    meta = torch.ops.posenc.sinusoidal_table.default(None, 5, 8, 1e4, True, False, 0.0, 1.0, torch.float16, "meta")
    assert meta.device.type == "meta" and meta.shape == (5, 8) and meta.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(dim=2, freq_shift=1.0), ValueError, "divides by zero"),
        (dict(dim=0), ValueError, "dim must be a positive int"),
        (dict(dim=8, base=0.0), ValueError, "base must be a positive finite"),
        (dict(dim=8, dtype=torch.int64), TypeError, "dtype must be a floating dtype"),
        (dict(dim=8, scale=float("inf")), ValueError, "scale must be finite"),
        (dict(dim=8, positions=torch.zeros(3, dtype=torch.bool)), TypeError, "positions must be an integer or floating"),
        (dict(dim=8, positions=-3), ValueError, "positions_or_length must be >= 0"),
        (dict(dim=8, positions="7"), TypeError, "positions_or_length must be an int or a tensor"),
    ],
)
def test_table_bad_input(kwargs, exc, msg):
    kwargs = dict(kwargs)
    pos = kwargs.pop("positions", 5)
    dim = kwargs.pop("dim")
    with pytest.raises(exc, match=msg):
        pk.sinusoidal_table(pos, dim, **kwargs)
