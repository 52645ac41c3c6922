"""Static GPU checks without a GPU: every hot Triton kernel compiled for sm_90 and its SASS read."""
