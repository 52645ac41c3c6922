"""The native C++/CUDA extension: its build and install, its CPU kernels and its CUDA kernels (test_cuda_*: need a GPU)."""
