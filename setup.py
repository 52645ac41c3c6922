"""Installs the package. By default pure Python/Triton and imports nothing but setuptools: torch is never
needed (or fetched) at build time; the runtime requirement below is satisfied by an already-installed torch.

The C++/CUDA extension (``csrc/``) is optional:

* ahead of time, against the torch already installed (hence no build isolation)::

      POSENC_BUILD_EXT=1 pip install --no-build-isolation .      # or -e . for a checkout

  builds ``posenc_kernels._C`` with the CPU kernels, plus the CUDA kernels when torch has CUDA and a CUDA
  toolkit (nvcc and headers) of its major version is found (``POSENC_BUILD_CUDA=0`` skips them;
  ``TORCH_CUDA_ARCH_LIST`` picks the architectures, else the visible GPUs, else ``8.0;9.0+PTX``: see
  ``posenc_kernels/_build.py``). Needs setuptools >= 70.1 and ninja in the environment;
* just in time: the sources ship inside the package (``posenc_kernels/csrc``), and the first import of
  the package builds them once into a cache (see ``posenc_kernels/_native.py``).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(
    line.split("=")[1].strip().strip('"')
    for line in (here / "posenc_kernels" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)
# The build facts the JIT build uses too (sources, CUDA toolkit, architectures), loaded by path: importing
# the package would need torch and triton.
_spec = importlib.util.spec_from_file_location("_posenc_build", here / "posenc_kernels" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

# The torch releases CI builds and tests the extension against (.ci/run): the oldest and the newest of the
# range. Widen it only together with CI.
TORCH_REQUIREMENT = "torch>=2.12,<2.15"


def native_extension():
    """``(ext_modules, cmdclass)`` for the AOT build; only called with POSENC_BUILD_EXT=1 (imports torch)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise SystemExit(
            f"POSENC_BUILD_EXT=1 builds against the installed torch, and this build environment has none ({e}): "
            "install torch first, then build without isolation (pip install --no-build-isolation ., "
            "python -m build --no-isolation)"
        ) from e

    csrc = Path("csrc")
    # One explicit list of sources, in link order (posenc_kernels/_build.py CPU_SOURCES ...).
    cpu = [str(csrc / n) for n in _build.CPU_SOURCES]
    isa_variants = [str(csrc / n) for n in _build.CPU_ISA_VARIANTS]
    cuda = [str(csrc / n) for n in _build.CUDA_KERNELS + _build.CUDA_GLUE]
    cxx = ["-O3", "-g0", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]  # as posenc_kernels/_native.py _cxx_flags()

    cuda_home, why, archs = None, "no CUDA sources", None
    if cuda:
        if os.environ.get("POSENC_BUILD_CUDA", "1") == "0":
            why = "POSENC_BUILD_CUDA=0"
        else:
            # A toolkit with headers, of torch's CUDA major version (not just CUDA_HOME/bin/nvcc: an nvcc wrapper
            # in /usr/local/bin makes torch guess CUDA_HOME=/usr/local, which has no cuda_runtime.h).
            cuda_home, why = _build.cuda_toolkit(torch.version.cuda)
    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home  # what CUDAExtension and BuildExtension compile with
        os.environ["CUDA_HOME"] = cuda_home
        visible = (
            [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else []
        )
        # Without a GPU to query and without TORCH_CUDA_ARCH_LIST, torch's own detection fails (IndexError in
        # _get_cuda_arch_flags): build the documented default list instead (posenc_kernels/_build.py).
        archs, origin = _build.cuda_arch_list(visible)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        print(f"posenc_kernels: building the CPU and CUDA kernels: CUDA archs {archs} ({origin}), toolkit {why}")
    else:
        print(f"posenc_kernels: building the CPU kernels only (CUDA: {why})")

    # What the module is built from, embedded in it: posenc_kernels/_native.py compares it with the sources
    # of a checkout and with the running torch (content, not timestamps: a reinstall changes only the latter).
    info = {"source": _build.source_hash(csrc), "torch": torch.__version__, "cuda": None, "archs": None}
    if cuda_home is not None:
        info.update(cuda=torch.version.cuda, archs=archs)
    # One string and no inline function, so its place on the link line (after the ISA variants) is immaterial.
    gen = Path("build") / "posenc_generated" / "build_info.cpp"
    gen.parent.mkdir(parents=True, exist_ok=True)
    text = _build.build_info_source(info)
    if not gen.is_file() or gen.read_text() != text:  # unchanged: ninja keeps its object
        gen.write_text(text)

    if cuda_home is not None:
        ext = cpp_extension.CUDAExtension(
            "posenc_kernels._C",
            cpu + cuda + isa_variants + [str(gen)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "posenc_kernels._C",
            cpu + isa_variants + [str(gen)],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


build_ext = os.environ.get("POSENC_BUILD_EXT", "0") == "1"
ext_modules, cmdclass = native_extension() if build_ext else ([], {})

setup(
    name="posenc_kernels",
    version=version,
    description="Fused Triton kernels for transformer position encodings (RoPE, sinusoidal)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # csrc/ travels inside the package (posenc_kernels/csrc) so an installed copy can build it on first use.
    # posenc_dev: the SASS reader and the static harness that scripts/ and tests/ import (development tools)
    packages=find_packages(include=["posenc_kernels", "posenc_kernels.*", "posenc_dev"]) + ["posenc_kernels.csrc"],
    package_dir={"posenc_kernels.csrc": "csrc"},
    package_data={"posenc_kernels.csrc": list(_build.SOURCE_PATTERNS)},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=[
        TORCH_REQUIREMENT,
        "numpy",
        # Triton runs the kernels on CUDA and, through its interpreter, on CPU (tests).
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # transformers: parity tests against HF's rope functions and models (CPU, tiny random models);
        # kernels: the hub layer kernelized as a user would (tests/integrations/test_hub.py), the release
        # transformers 5.25 requires, pinned because its layer rules and metadata format change between releases;
        # hypothesis: the property-based differential suite (tests/properties/).
        "test": ["pytest>=7", "pytest-benchmark>=4", "matplotlib", "transformers>=5.0,<6", "kernels==0.19.1",
                 "hypothesis>=6.100"],
        # Pictures: python -m posenc_kernels.plot ...
        "plot": ["matplotlib"],
    },
    license="Apache-2.0",
    classifiers=["Programming Language :: Python :: 3", "Operating System :: POSIX :: Linux"],
)
