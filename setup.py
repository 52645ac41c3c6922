"""Installs the pure-Python/Triton package. Imports nothing but setuptools: torch is never needed (or
fetched) at build time; the runtime requirement below is satisfied by an already-installed torch."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(
    line.split("=")[1].strip().strip('"')
    for line in (here / "posenc_kernels" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

setup(
    name="posenc_kernels",
    version=version,
    description="Fused Triton kernels for transformer position encodings (RoPE, sinusoidal)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["posenc_kernels", "posenc_kernels.*"]),
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
