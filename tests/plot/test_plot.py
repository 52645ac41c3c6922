"""posenc_kernels.plot: every picture is written (a real PNG of plausible size), the numbers behind the RoPE
decay picture are right (its schedules are the package's rope_frequencies), and the command line works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (installed with matplotlib)

from posenc_kernels import plot  # noqa: E402
from posenc_kernels.ops.rope.schedules import rope_frequencies  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path, *, min_width=500, min_height=250, max_bytes=400_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert 5_000 < len(data) < max_bytes, f"{path}: {len(data)} bytes"
    with Image.open(path) as im:
        im.load()
        width, height = im.size
        colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert width >= min_width and height >= min_height, (width, height)
    assert colors is None or len(colors) > 20, "nearly blank picture"


# ----------------------------------------------------------------------------------------------
# Each picture, small sizes (the Triton interpreter runs the kernels behind them)
# ----------------------------------------------------------------------------------------------


def test_sinusoidal(tmp_path):
    out = plot.plot_sinusoidal(tmp_path / "s.png", length=24, dim=18)
    assert out == tmp_path / "s.png"
    check_png(out)


def test_rope_decay(tmp_path):
    out = plot.plot_rope_decay(
        tmp_path / "sub" / "r.png", head_dim=32, trained_length=64, max_distance=300, samples=4
    )
    check_png(out)


def test_alibi_non_power_of_two_heads(tmp_path):
    check_png(plot.plot_alibi(tmp_path / "a.png", num_heads=12, length=10, heads=(0, 11)))


def test_t5(tmp_path):
    check_png(plot.plot_t5(tmp_path / "t.png", length=40, num_buckets=8, max_distance=16))


def synthetic_bench_json(path: Path) -> Path:
    rows = []
    for op, shapes, providers in [
        ("apply_rope_", ["llama3-8b 512 tok bfloat16", "llama3-8b 4096 tok bfloat16"], ["posenc", "hf_eager"]),
        ("add_sinusoidal_", ["4x1024x1024 float32"], ["posenc", "eager_buffer", "eager_compute"]),
    ]:
        for i, shape in enumerate(shapes):
            for j, provider in enumerate(providers):
                gbps = 100.0 * (i + 1) / (j + 1)
                rows.append({"name": f"{op}-{shape}-{provider}", "extra_info": {
                    "op": op, "shape": shape, "provider": provider, "gbps": gbps, "median_us": 10.0 * (j + 1),
                    "copy_ratio": gbps / 300.0, "device": "Test GPU", "timing": "synthetic"}})  # fmt: skip
    rows.append({"name": "no-extra-info", "extra_info": {}})  # ignored, as benchmarks/report.py does
    path.write_text(json.dumps({"benchmarks": rows}))
    return path


def test_bench(tmp_path):
    src = synthetic_bench_json(tmp_path / "bench.json")
    check_png(plot.plot_benchmarks(tmp_path / "b.png", src))


# The smallest case bench_sinusoidal.py has on this device (its CASES differ between CPU and CUDA).
_BENCH_CASE = "1x4096x1024-bfloat16" if torch.cuda.is_available() else "4x1024x1024-float32"
BENCH_CASES = [f"benchmarks/bench_sinusoidal.py::test_add_sinusoidal[{_BENCH_CASE}-{provider}]"
               for provider in ("posenc_inplace", "eager_buffer")]  # fmt: skip


@pytest.fixture(scope="module")
def real_bench_json(tmp_path_factory):
    """A pytest-benchmark JSON written the way scripts/bench writes it, by a real run of two small cases of
    the repo's own benchmarks (~15 s on 2 cores): the plot must read what the benchmarks produce, not only
    a hand-written imitation of it. Like scripts/bench, without TRITON_INTERPRET (real implementations)."""
    if not (REPO / "benchmarks" / "bench_sinusoidal.py").exists():
        pytest.skip("no benchmarks/ beside the tests (an installed-package run)")
    out = tmp_path_factory.mktemp("bench") / "benchmarks.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *BENCH_CASES, "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return out


def test_bench_from_a_real_benchmark_run(tmp_path, real_bench_json):
    rows = json.loads(real_bench_json.read_text())["benchmarks"]
    assert sorted(r["extra_info"]["provider"] for r in rows) == ["eager_buffer", "posenc_inplace"]
    assert all(r["extra_info"]["op"] == "add_sinusoidal_" and r["extra_info"]["gbps"] > 0 for r in rows)
    check_png(plot.plot_benchmarks(tmp_path / "b.png", real_bench_json))


def test_bench_without_results_names_the_file(tmp_path):
    src = tmp_path / "empty.json"
    src.write_text(json.dumps({"benchmarks": [{"extra_info": {}}]}))
    with pytest.raises(ValueError, match="bench_json .*empty.json"):
        plot.plot_benchmarks(tmp_path / "b.png", src)


def test_missing_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `import matplotlib.figure` fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot.plot_alibi(tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_plotting_leaves_pyplot_state_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot.plot_alibi(tmp_path / "a.png", num_heads=4, length=6)
    assert matplotlib.get_backend() == before
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules, "plotting imported pyplot"


# ----------------------------------------------------------------------------------------------
# The numbers behind the RoPE picture
# ----------------------------------------------------------------------------------------------


def test_rope_decay_curves_match_closed_form():
    """Rotation preserves each pair's norm, so <R_m q, q> = sum_i |q_pair_i|^2 cos(m theta_i) exactly; the
    RoFormer bound at m = 0 is mean_j j = (d/2 + 1) / 2."""
    inv = rope_frequencies(16, 10000.0)[0]
    gen = torch.Generator().manual_seed(3)
    bound, score = plot._rope_decay_curves(inv, 50, 5, gen)
    q = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    q = (q / q.norm(dim=-1, keepdim=True)).double()
    pair_norm = q[:, :8] ** 2 + q[:, 8:] ** 2  # rotate-half layout: channel i pairs with i + d/2
    angles = torch.arange(51, dtype=torch.float64)[:, None] * inv.double()[None, :]
    want = (pair_norm[None, :, :] * angles.cos()[:, None, :]).sum(-1).mean(-1)
    assert torch.allclose(score, want, atol=1e-5)
    assert bound[0].item() == pytest.approx((8 + 1) / 2)
    s = torch.complex(angles.cos(), angles.sin()).cumsum(-1).abs().mean(-1)
    assert torch.allclose(bound, s, atol=1e-4)


@pytest.mark.parametrize("dim, base, factor, trained", [(128, 10000.0, 4.0, 4096), (128, 500000.0, 8.0, 8192), (32, 10000.0, 2.0, 2048)])
def test_rope_schedules_are_the_packages(dim, base, factor, trained):
    """The picture's schedules are rope_frequencies with HF rope_parameters (HF parity: tests/rope/test_schedules_hf.py)."""
    want = {
        "default": rope_frequencies(dim, base)[0],
        "linear": rope_frequencies(dim, base, scaling={"rope_type": "linear", "factor": factor})[0],
        "ntk": rope_frequencies(dim, base * factor ** (dim / (dim - 2)))[0],  # NTK-aware: only the base grows
        "yarn": rope_frequencies(dim, base, scaling={"type": "yarn", "factor": factor, "beta_fast": 32, "beta_slow": 1,
                                                     "original_max_position_embeddings": trained})[0],  # fmt: skip
        "llama3": rope_frequencies(dim, base, scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1,
                                                       "high_freq_factor": 4, "original_max_position_embeddings": trained})[0],  # fmt: skip
    }
    assert set(plot.ROPE_SCHEDULES) == set(want)
    got = {k: plot._rope_schedule(k, dim, base, factor, trained) for k in plot.ROPE_SCHEDULES}
    for kind in plot.ROPE_SCHEDULES:
        assert got[kind].dtype == torch.float32 and got[kind].shape == (dim // 2,)
        assert torch.equal(got[kind], want[kind]), kind
    # What the picture shows: PI divides every frequency by the factor; YaRN, Llama 3.1 and NTK-aware keep the
    # highest frequency and divide the lowest by the factor (NTK: base' ** -(d-2)/d = base ** -(d-2)/d / factor).
    default = got["default"].double()
    assert torch.allclose(got["linear"].double(), default / factor, rtol=1e-6, atol=0)
    for kind in ("yarn", "llama3", "ntk"):
        assert got[kind][0] == default[0]
        assert got[kind][-1].item() == pytest.approx(default[-1].item() / factor, rel=1e-6)


def test_rope_schedule_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of default, linear, ntk, yarn, llama3; got 'longrope'"):
        plot._rope_schedule("longrope", 64, 10000.0, 2.0, 1024)


# ----------------------------------------------------------------------------------------------
# ALiBi / T5 pictures
# ----------------------------------------------------------------------------------------------


def test_alibi_heads_validated(tmp_path):
    with pytest.raises(ValueError, match="heads must be a non-empty list of head indices"):
        plot.plot_alibi(tmp_path / "a.png", num_heads=4, heads=(5,))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def test_cli_subprocess(tmp_path):
    src = synthetic_bench_json(tmp_path / "bench.json")
    out = tmp_path / "images"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "posenc_kernels.plot", "bench", "--out", str(out), "--bench-json", str(src)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "bench.png")
    check_png(out / "bench.png")


def test_cli_in_process(tmp_path, capsys):
    assert plot.main(["alibi", "--out", str(tmp_path)]) == 0
    check_png(tmp_path / "alibi.png")
    with pytest.raises(SystemExit) as e:
        plot.main(["bench", "--out", str(tmp_path), "--bench-json", str(tmp_path / "missing.json")])
    assert e.value.code == 2
    assert "missing.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main(["nope", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------------------------
# The summary scripts/bench ends with (posenc_dev/bench_summary.py) and its picture
# ----------------------------------------------------------------------------------------------


def _row(family, op, shape, provider, median_us, copy_ratio=0.5, **extra):
    return {"name": f"{op}-{shape}-{provider}", "extra_info": {
        "family": family, "op": op, "shape": shape, "provider": provider, "median_us": median_us,
        "gbps": 10.0, "copy_ratio": copy_ratio, "bytes": 1000, "device": "Test CPU", "timing": "synthetic",
        **extra}}  # fmt: skip


def test_bench_summary_from_a_real_benchmark_run(tmp_path, real_bench_json, capsys):
    """What scripts/bench prints last, from what the benchmarks write: the baseline named, the ratio of this
    run, the definitions, where the full table, JSON, plot and log are; the full table and plot written."""
    from posenc_dev import bench_summary

    full, png = tmp_path / "report.md", tmp_path / "summary.png"
    assert bench_summary.main([str(real_bench_json), "--full", str(full), "--plot", str(png), "--log", "x.log"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 25
    rows = {r["extra_info"]["provider"]: r["extra_info"] for r in json.loads(real_bench_json.read_text())["benchmarks"]}
    assert all(r["family"] == "sinusoidal" for r in rows.values())  # the harness records it
    ratio = rows["eager_buffer"]["median_us"] / rows["posenc_inplace"]["median_us"]
    (line,) = [ln for ln in lines if ln.startswith("sinusoidal ")]
    assert "add_sinusoidal_" in line and "posenc_inplace" in line and f"{bench_summary.fmt_ratio(ratio)} eager_buffer" in line, line
    text = "\n".join(lines)
    assert "copy% = " in text and "over 100%" in text and "baseline's median time / ours" in text
    assert f"full table (every op, shape and provider, definitions): {full}" in text
    assert f"plot: {png}" in lines[-1] and "log: x.log" in lines[-1] and str(real_bench_json) in lines[-1]
    table = full.read_text()
    assert "## add_sinusoidal_ (sinusoidal)" in table and "Baseline: `eager_buffer`" in table
    assert "**copy%**" in table and "posenc_inplace" in table
    check_png(png, min_height=150)


def test_bench_summary_is_generic_and_fits_25_lines(tmp_path, capsys):
    """Rows of families this file does not know (a model-level and a qknorm benchmark) join the summary;
    many ops still fit in 25 lines, every family first; ours is the package's default call, not the fastest
    of its providers; copy% over 100 % is marked; a thread-scaling row prints both ratios; a busy machine is
    named."""
    from posenc_dev import bench_summary

    rows = [
        _row("model", "generate greedy", "tiny llama 32 new tok", "hf_eager", 3000.0),
        _row("model", "generate greedy", "tiny llama 32 new tok", "posenc_patched", 2500.0),
        _row("qknorm", "rms_norm_rope_", "llama3-8b 512 tok bf16", "posenc_unfused", 250.0),  # a baseline
        _row("qknorm", "rms_norm_rope_", "llama3-8b 512 tok bf16", "posenc_fused", 100.0, copy_ratio=1.4),
        _row("qknorm", "rms_norm_rope_", "llama3-8b 512 tok bf16", "hf_eager", 900.0),
        _row("rope", "apply_rope_", "llama3-8b 4096 tok bf16", "posenc_inplace", 200.0),
        _row("rope", "apply_rope_", "llama3-8b 4096 tok bf16", "posenc_outofplace", 150.0),  # noise: not picked
        _row("rope", "apply_rope_", "llama3-8b 4096 tok bf16", "hf_eager", 1000.0),
        _row("rope", "apply_rope_", "llama3-8b 4096 tok bf16", "hf_compiled", 400.0),
        _row("rope", "apply_rope_", "llama3-8b 512 tok bf16", "posenc_inplace", 20.0),
        _row("rope", "apply_rope_", "llama3-8b 512 tok bf16", "hf_eager", 60.0),
        _row("rope", "apply_rope_ CPU threads", "llama3-8b 512 tok bf16", "posenc_native", 400.0,
             condition="+2 busy procs", scaling={"threads": 2, "ours": 0.9, "mul_": 19.2, "ours_1_us": 440.0,
                                                 "ours_n_us": 400.0, "mul_1_us": 400.0, "mul_n_us": 7680.0}),
    ]  # fmt: skip
    rows += [_row("rope", f"rope op {i}", "s", p, t) for i in range(30) for p, t in (("posenc", 1.0), ("eager", 2.0))]
    src = tmp_path / "b.json"
    src.write_text(json.dumps({"benchmarks": rows + [{"name": "no-extra-info", "extra_info": {}}]}))
    assert bench_summary.main([str(src), "--load-start", "9.5", "--isa", "AVX2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 25
    text = "\n".join(lines)
    assert "AVX2" in lines[0] and "WARNING: load average 9.5" in text
    model = next(ln for ln in lines if ln.startswith("model "))
    assert "posenc_patched" in model and "1.20x hf_eager" in model, model
    qk = next(ln for ln in lines if ln.startswith("qknorm "))
    assert "posenc_fused" in qk and "9.00x hf_eager" in qk and "140%*" in qk, qk
    rope = next(ln for ln in lines if ln.startswith("rope ") and "apply_rope_ " in ln and "threads" not in ln)
    assert "posenc_inplace" in rope and "5.00x hf_eager, 2.00x compiled" in rope, rope
    threads = next(ln for ln in lines if "CPU threads" in ln)
    assert "ours 0.90, x.mul_ 19.20 (+2 busy procs)" in threads, threads
    assert "more op(s) against a baseline in the full table" in text
    assert bench_summary.family_of("apply_rope_ varlen") == "rope"
    assert bench_summary.family_of("alibi_bias") == "relative"


def test_bench_summary_cache_family_headlines(tmp_path, capsys):
    """benchmarks/bench_cache.py's rows: the cache family gets two headline lines, decode at the shape its rows
    mark ``headline`` (1 token, not the 64-token shape with more bytes) and prefill; the ratio is against the
    named baseline (the unfused sequence) with the ``also`` providers beside it; op names map to the family."""
    from posenc_dev import bench_summary

    also = dict(baseline="posenc_unfused", also=["rope_only", "hf_eager"])
    rows = []
    for op, shape, t, mark in (("rope_and_cache_ decode", "llama3 paged 1t bf16", 10.0, True),
                               ("rope_and_cache_ decode", "llama3 paged 64t bf16", 40.0, False),
                               ("rope_and_cache_ prefill", "llama3 paged 4096t bf16", 1000.0, True)):  # fmt: skip
        extra = dict(also, headline=True) if mark else also
        rows += [_row("cache", op, shape, "posenc_fused", t, **extra),
                 _row("cache", op, shape, "posenc_unfused", 2 * t, **extra),
                 _row("cache", op, shape, "hf_eager", 4 * t, **extra),
                 _row("cache", op, shape, "rope_only", 0.9 * t, **extra),
                 _row("cache", op, shape, "copy", 0.5 * t, **extra)]  # fmt: skip
    rows[5]["extra_info"]["bytes"] = 64000  # the 64-token shape moves more bytes: the mark must still win
    src = tmp_path / "b.json"
    src.write_text(json.dumps({"benchmarks": rows}))
    full = tmp_path / "report.md"
    assert bench_summary.main([str(src), "--full", str(full)]) == 0
    lines = capsys.readouterr().out.splitlines()
    cache = [ln for ln in lines if ln.startswith("cache ")]
    assert len(cache) == 2, lines
    decode, prefill = cache
    assert "rope_and_cache_ decode" in decode and "llama3 paged 1t bf16" in decode, decode
    assert "posenc_fused" in decode and "2.00x posenc_unfused, 0.90x rope_only" in decode, decode
    assert "hf_eager" not in decode, decode  # no room left on the line: the rest is in the full table
    assert "rope_and_cache_ prefill" in prefill and "2.00x posenc_unfused" in prefill, prefill
    table = full.read_text()
    assert "## rope_and_cache_ decode (cache)" in table and "Baseline: `posenc_unfused`" in table
    assert "| host us |" in table and "`rope_only`" in table
    assert bench_summary.family_of("mla_rope_and_cache_ decode") == "cache"
    assert bench_summary.family_of("some_cache_op") == "cache"


def test_bench_cache_rows_reach_the_summary(tmp_path, capsys):
    """A real run of benchmarks/bench_cache.py's headline decode case (fused, unfused, plain apply_rope_; one
    thread, ~10 s): its rows carry the cache family, the headline mark and the baseline, and the summary
    prints their ratio of this run."""
    if not (REPO / "benchmarks" / "bench_cache.py").exists():
        pytest.skip("no benchmarks/ beside the tests (an installed-package run)")
    from posenc_dev import bench_summary

    out = tmp_path / "cache.json"
    cases = [f"benchmarks/bench_cache.py::test_cache[llama3-paged-decode1-bf16-{p}]"
             for p in ("posenc_fused", "posenc_unfused", "rope_only")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", *cases, "-q", "-p", "no:cacheprovider",
                           f"--benchmark-json={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = {r["extra_info"]["provider"]: r["extra_info"] for r in json.loads(out.read_text())["benchmarks"]}
    assert set(rows) == {"posenc_fused", "posenc_unfused", "rope_only"}
    assert all(r["family"] == "cache" and r["headline"] and r["baseline"] == "posenc_unfused" for r in rows.values())
    assert rows["posenc_fused"]["bytes"] > rows["rope_only"]["bytes"] > 0  # the cache write and v are counted
    assert bench_summary.main([str(out)]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("cache ")]
    ratio = rows["posenc_unfused"]["median_us"] / rows["posenc_fused"]["median_us"]
    assert "rope_and_cache_ decode" in line and f"{bench_summary.fmt_ratio(ratio)} posenc_unfused" in line, line


def test_plot_speedups(tmp_path):
    items = [("rope: apply_rope_\nllama3-8b 4096 tok", 12.5, "hf_eager"), ("sinusoidal: add", 0.8, "eager_buffer")]
    check_png(plot.plot_speedups(tmp_path / "s.png", items, title="test"), min_height=150)
    with pytest.raises(ValueError, match="ratio of 'x' must be a positive finite number"):
        plot.plot_speedups(tmp_path / "t.png", [("x", float("nan"), "b")])
    with pytest.raises(ValueError, match="items is empty"):
        plot.plot_speedups(tmp_path / "t.png", [])
