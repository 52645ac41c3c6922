"""posenc_kernels.plot: the pictures and the command line."""
