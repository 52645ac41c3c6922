"""Installs the package. By default pure Python/Triton and imports nothing but setuptools: torch is never
needed (or fetched) at build time; the runtime requirement below is satisfied by an already-installed torch.

The C++/CUDA extension (``csrc/``) is optional:

* ahead of time, against the torch already installed (hence no build isolation)::

      POSENC_BUILD_EXT=1 pip install --no-build-isolation .      # or -e . for a checkout

  builds ``posenc_kernels._C`` with the CPU kernels, plus the CUDA kernels when torch has CUDA and nvcc is
  found (``POSENC_BUILD_CUDA=0`` skips them; ``TORCH_CUDA_ARCH_LIST`` picks the architectures);
* just in time: the sources ship inside the package (``posenc_kernels/csrc``), and the first call that
  needs a native kernel builds them once into a cache (see ``posenc_kernels/_native.py``).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(
    line.split("=")[1].strip().strip('"')
    for line in (here / "posenc_kernels" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)


def native_extension():
    """``(ext_modules, cmdclass)`` for the AOT build; only called with POSENC_BUILD_EXT=1 (imports torch)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    csrc = Path("csrc")
    # Baseline translation units first on the link line, ISA variants last (see csrc/cpu_variant.h)
    # (the linker keeps the first copy of an inline function shared by two objects: the baseline one).
    cpp = [p for p in sorted(csrc.glob("*.cpp")) if not p.name.startswith("cuda_")]
    variant = [p.stem.endswith(("_avx2", "_avx512")) for p in cpp]
    cpu = [str(p) for p, v in zip(cpp, variant) if not v]
    isa_variants = [str(p) for p, v in zip(cpp, variant) if v]
    cuda = [str(p) for p in sorted(csrc.glob("*.cu")) + sorted(csrc.glob("cuda_*.cpp"))]
    cxx = ["-O3", "-g0", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]  # as posenc_kernels/_native.py _cxx_flags()
    with_cuda = (
        bool(cuda)
        and os.environ.get("POSENC_BUILD_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
    )
    if with_cuda:
        ext = CUDAExtension(
            "posenc_kernels._C",
            cpu + cuda + isa_variants,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "posenc_kernels._C", cpu + isa_variants, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": BuildExtension}


build_ext = os.environ.get("POSENC_BUILD_EXT", "0") == "1"
ext_modules, cmdclass = native_extension() if build_ext else ([], {})

setup(
    name="posenc_kernels",
    version=version,
    description="Fused Triton kernels for transformer position encodings (RoPE, sinusoidal)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # csrc/ travels inside the package (posenc_kernels/csrc) so an installed copy can build it on first use.
    packages=find_packages(include=["posenc_kernels", "posenc_kernels.*"]) + ["posenc_kernels.csrc"],
    package_dir={"posenc_kernels.csrc": "csrc"},
    package_data={"posenc_kernels.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "numpy",
        # Triton runs the kernels on CUDA and, through its interpreter, on CPU (tests).
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # transformers: parity tests against HF's rope functions and models (CPU, tiny random models).
        "test": ["pytest>=7", "pytest-benchmark>=4", "matplotlib", "transformers>=5.0,<6"],
        # Pictures: python -m posenc_kernels.plot ...
        "plot": ["matplotlib"],
    },
    license="Apache-2.0",
    classifiers=["Programming Language :: Python :: 3", "Operating System :: POSIX :: Linux"],
)
