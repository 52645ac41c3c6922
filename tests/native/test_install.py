"""Installing and building the extension: what can be tested without a GPU and without a CUDA torch.

CUDA toolkit detection (an nvcc wrapper, a CUDA_HOME without headers), the default GPU architectures, the
content-based source hash (timestamps and locations do not matter), the prebuilt module's staleness check,
the just-in-time cache (a finished build is loaded without the compiler, a failed one is remembered) and
``python -m posenc_kernels``. The real CUDA-torch install paths run in CI: scripts/ci_cuda_wheel.
"""

import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from posenc_kernels import _build, _native


def _fake_toolkit(root: Path, version: str = "13.0") -> Path:
    """A folder that looks like a CUDA toolkit: bin/nvcc answering --version and -dryrun, the header."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("// fake\n")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in
          *--version*) echo "Cuda compilation tools, release {version}, V{version}.0" ;;
          *-dryrun*) echo "#\\$ TOP={root}/bin/.." >&2 ;;
        esac
        """))  # fmt: skip
    nvcc.chmod(0o755)
    return root


def _wrapper(bindir: Path, target: Path) -> None:
    """An nvcc wrapper script (not a symlink) in a folder without a toolkit, like /usr/local/bin/nvcc."""
    bindir.mkdir(parents=True)
    w = bindir / "nvcc"
    w.write_text(f'#!/bin/sh\nexec {target}/bin/nvcc "$@"\n')
    w.chmod(0o755)


def test_cuda_home_through_an_nvcc_wrapper(tmp_path, monkeypatch):
    kit = _fake_toolkit(tmp_path / "cuda-13.0")
    _wrapper(tmp_path / "local" / "bin", kit)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'local' / 'bin'}{os.pathsep}/usr/bin:/bin")
    home, how = _build.find_cuda_home()
    assert Path(home) == kit.resolve(), how  # not tmp/local, which has no include/cuda_runtime.h
    assert "runs" in how


def test_cuda_home_without_headers_is_passed_over(tmp_path, monkeypatch):
    kit = _fake_toolkit(tmp_path / "cuda")
    bare = tmp_path / "bare"
    (bare / "bin").mkdir(parents=True)
    shutil.copy(kit / "bin" / "nvcc", bare / "bin" / "nvcc")  # nvcc but no headers: torch would accept it
    monkeypatch.setenv("CUDA_HOME", str(bare))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{kit / 'bin'}{os.pathsep}/usr/bin:/bin")
    home, how = _build.find_cuda_home()
    assert Path(home) == kit.resolve(), how
    monkeypatch.setenv("CUDA_HOME", str(kit))
    assert _build.find_cuda_home() == (str(kit), "$CUDA_HOME")


def test_cuda_toolkit_of_another_major_version_is_refused(tmp_path, monkeypatch):
    kit = _fake_toolkit(tmp_path / "cuda", version="12.4")
    monkeypatch.setenv("CUDA_HOME", str(kit))
    assert _build.cuda_toolkit("12.8")[0] == str(kit)
    home, why = _build.cuda_toolkit("13.0")
    assert home is None and "major versions differ" in why
    assert _build.cuda_toolkit(None) == (None, "torch is a CPU build")


def test_default_cuda_archs(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    archs, origin = _build.cuda_arch_list([])
    assert archs == _build.DEFAULT_CUDA_ARCH_LIST == "8.0;9.0+PTX" and "no GPU" in origin
    assert _build.cuda_arch_list([(9, 0), (8, 6), (9, 0)])[0] == "8.6;9.0+PTX"  # torch's own choice
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    assert _build.cuda_arch_list([(9, 0)]) == ("7.5", "TORCH_CUDA_ARCH_LIST")  # the variable overrides


def _copy_csrc(dst: Path) -> Path:
    shutil.copytree(_native.CSRC, dst, ignore=shutil.ignore_patterns("compat"))
    return dst


def test_source_hash_ignores_timestamps_and_location(tmp_path):
    a = _copy_csrc(tmp_path / "a" / "csrc")
    h = _build.source_hash(a)
    assert h == _build.source_hash(_native.CSRC)
    for p in a.iterdir():
        os.utime(p, (1, 1))  # a reinstall: new timestamps (here: very old ones)
    b = _copy_csrc(tmp_path / "b" / "csrc")
    assert _build.source_hash(a) == _build.source_hash(b) == h
    (b / "bindings.cpp").write_text((b / "bindings.cpp").read_text() + "\n// edit\n")
    assert _build.source_hash(b) != h


def test_build_info_roundtrip(tmp_path):
    info = {"source": "0123abcd", "torch": torch.__version__, "cuda": "13.0", "archs": "8.0;9.0+PTX"}
    src = _build.build_info_source(info)
    assert "posenc_build_info" in src
    lib = tmp_path / "lib.so"
    # What the compiler leaves of the literal: the bytes between the quotes, unescaped, NUL-terminated.
    literal = json.loads(src[src.index("= ") + 2 : src.rindex(";")])
    lib.write_bytes(b"\x7fELF junk\0" + literal.encode() + b"\0more")
    assert _build.read_build_info(str(lib)) == info
    (tmp_path / "old.so").write_bytes(b"\x7fELF nothing")
    assert _build.read_build_info(str(tmp_path / "old.so")) is None


def test_prebuilt_module_staleness_is_content_based(tmp_path, monkeypatch):
    csrc = _copy_csrc(tmp_path / "csrc")
    monkeypatch.setattr(_native, "_checkout_csrc", lambda: csrc)

    def lib(**over):
        info = {"source": _build.source_hash(csrc), "torch": torch.__version__, "cuda": None, "archs": None, **over}
        src = _build.build_info_source(info)
        p = tmp_path / "_C.so"
        p.write_bytes(json.loads(src[src.index("= ") + 2 : src.rindex(";")]).encode() + b"\0")
        return str(p)

    fresh = lib()
    for p in csrc.iterdir():
        os.utime(p, None)  # sources newer than the module: still the same sources
    assert _native._aot_stale_reason(fresh) is None
    assert "other sources" in _native._aot_stale_reason(lib(source="0" * 16))
    assert "built against torch 1.0" in _native._aot_stale_reason(lib(torch="1.0"))
    (tmp_path / "_C.so").write_bytes(b"no info")
    assert "no build info" in _native._aot_stale_reason(str(tmp_path / "_C.so"))


def test_loaded_prebuilt_module_matches_the_sources():
    if not _native.available() or _native.source() != "aot":
        pytest.skip(f"no prebuilt module loaded ({_native.source()}, {_native.load_error()})")
    info = _build.read_build_info(_native.status()["library"])
    assert info["source"] == _build.source_hash(_native.CSRC) and info["torch"] == torch.__version__


def _tiny_csrc(root: Path, body: str) -> Path:
    """A csrc/ of one translation unit without torch headers: builds (or fails) in about a second."""
    root.mkdir(parents=True)
    (root / "bindings.cpp").write_text(body)
    return root


@pytest.fixture
def jit_sandbox(tmp_path, monkeypatch):
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        pytest.skip("needs a C++ compiler and ninja")
    monkeypatch.setenv("POSENC_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("POSENC_NATIVE_RETRY", raising=False)
    monkeypatch.setitem(_native._state, "library", _native._state["library"])  # restored afterwards
    # The tiny libraries are loaded with ctypes, not registered in torch.ops.loaded_libraries, where
    # tests/native/test_extension.py looks for the real extension by its name (posenc_native_<hash>.so).
    monkeypatch.setattr(torch.ops, "load_library", lambda path: ctypes.CDLL(path))
    # the tiny csrc/ is one translation unit: the build's explicit source list says so
    monkeypatch.setattr(_build, "CPU_SOURCES", ("bindings.cpp",))
    monkeypatch.setattr(_build, "CPU_ISA_VARIANTS", ())
    calls = []
    from torch.utils import cpp_extension

    real = cpp_extension.load

    def counting_load(**kw):
        calls.append(kw["build_directory"])
        return real(**kw)

    monkeypatch.setattr(cpp_extension, "load", counting_load)
    return tmp_path, calls


def test_failed_jit_build_is_remembered(jit_sandbox, monkeypatch):
    tmp_path, calls = jit_sandbox
    monkeypatch.setattr(_native, "CSRC", _tiny_csrc(tmp_path / "csrc", "#error deliberately broken\n"))
    with pytest.raises(Exception, match="deliberately broken|error"):
        _native._build_and_load(cuda=False)
    assert len(calls) == 1
    marker = Path(calls[0]) / "BUILD_FAILED"
    assert json.loads(marker.read_text())["torch"] == torch.__version__
    # A new attempt (a new process, in real life) does not compile again, and says how to retry.
    with pytest.raises(RuntimeError, match="earlier build .* failed.*POSENC_NATIVE_RETRY=1"):
        _native._build_and_load(cuda=False)
    assert len(calls) == 1
    monkeypatch.setenv("POSENC_NATIVE_RETRY", "1")
    with pytest.raises(Exception):
        _native._build_and_load(cuda=False)
    assert len(calls) == 2
    # Fixed sources are other sources: another cache folder, built at once.
    monkeypatch.delenv("POSENC_NATIVE_RETRY")
    monkeypatch.setattr(_native, "CSRC", _tiny_csrc(tmp_path / "fixed", 'extern "C" int posenc_fixed() { return 1; }\n'))
    _native._build_and_load(cuda=False)
    assert len(calls) == 3 and Path(calls[2]) != Path(calls[0])
    assert not (Path(calls[2]) / "BUILD_FAILED").exists()


def test_reinstalled_sources_load_the_cached_build(jit_sandbox, monkeypatch):
    """A reinstall lays the same sources anew (new folder, new timestamps): the cached library is loaded
    without calling the compiler (ninja would rebuild every source newer than its object)."""
    tmp_path, calls = jit_sandbox
    body = 'extern "C" int posenc_reinstalled() { return 2; }\n'
    monkeypatch.setattr(_native, "CSRC", _tiny_csrc(tmp_path / "site1" / "csrc", body))
    _native._build_and_load(cuda=False)
    assert len(calls) == 1
    lib = _native._state["library"]
    again = _tiny_csrc(tmp_path / "site2" / "csrc", body)
    os.utime(again / "bindings.cpp", None)
    monkeypatch.setattr(_native, "CSRC", again)
    _native._build_and_load(cuda=False)
    assert len(calls) == 1, "the compiler ran again for unchanged sources"
    assert _native._state["library"] == lib


def test_registered_ops_have_cpu_kernels():
    if not _native.available():
        if os.environ.get("CI"):
            pytest.fail(f"CI builds the extension: {_native.load_error()}")
        pytest.skip(_native.load_error())
    ops = _native.kernel_devices()
    assert ops and all(op.startswith("posenc::") for op in ops)
    for op, devices in ops.items():
        assert "cpu" in devices, op
        # served through the extension's chooser on BackendSelect (issue 17), Python's kernel on CPU below it
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "BackendSelect")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


def _expected_cpu_isa(capability: str) -> str:
    """The CPU kernels' variant for torch's capability: x86-64 GCC builds AVX2 and AVX512 variants
    (csrc/cpu_variant.h), other compilers and machines the baseline only."""
    built = platform.machine() in ("x86_64", "AMD64") and "clang" not in os.environ.get("CXX", "")
    return capability if built and capability in ("AVX2", "AVX512") else "baseline"


def test_status_command():
    """``python -m posenc_kernels`` (the first thing a user runs): versions, kernels per device, the CPU
    kernels' instruction set (the --json run with ATEN_CPU_CAPABILITY narrowed to avx2 where torch runs
    AVX512: the variant that runs is reported, not the widest built), cache."""
    env = dict(os.environ)
    cap = torch.backends.cpu.get_cpu_capability()
    narrow = dict(env, ATEN_CPU_CAPABILITY="avx2") if cap == "AVX512" else env
    out = subprocess.run([sys.executable, "-m", "posenc_kernels", "--json"], capture_output=True, text=True,
                         env=narrow, timeout=900)  # fmt: skip
    facts = json.loads(out.stdout)
    assert facts["torch"] == torch.__version__ and facts["posenc_kernels"]
    assert facts["cache"] and "triton" in facts
    if facts["source"] is None:
        assert out.returncode == 1 and facts["error"]
    else:
        assert out.returncode == 0
        assert set(facts["kernels"]) == set(_native.kernel_devices())
        assert all("cpu" in d for d in facts["kernels"].values())
        isa = _expected_cpu_isa("AVX2" if cap == "AVX512" else cap)
        assert facts["cpu_isa"] == {"rope": isa, "sinusoidal": isa}, (facts["cpu_isa"], cap)
    text = subprocess.run([sys.executable, "-m", "posenc_kernels"], capture_output=True, text=True, env=env,
                          timeout=900).stdout  # fmt: skip
    assert text.startswith("posenc_kernels ") and f"torch {torch.__version__}" in text and "JIT cache:" in text
    if facts["source"] is not None:
        assert f"CPU instruction set: {_expected_cpu_isa(cap)} " in text, text
        assert _native.cpu_isa() == {"rope": _expected_cpu_isa(cap), "sinusoidal": _expected_cpu_isa(cap)}
    off = subprocess.run([sys.executable, "-m", "posenc_kernels"], capture_output=True, text=True,
                         env=dict(env, POSENC_NATIVE="0"), timeout=300)  # fmt: skip
    assert off.returncode == 0 and "native: not loaded (disabled by POSENC_NATIVE=0)" in off.stdout
