"""Shared parameters of the relative-bias tests.
"""

import torch

from conftest import DTYPES


ALL_DTYPES = DTYPES + [torch.float64]

# (bidirectional, num_buckets, max_distance): T5 encoder / decoder defaults, then other shapes of the table.
BUCKET_SETTINGS = [
    (True, 32, 128),
    (False, 32, 128),
    (True, 64, 256),
    (False, 16, 64),
    (True, 8, 20),
    (False, 6, 5),
    (True, 320, 800),
]

# (Lq, Lk, q_offset): square, odd, decode (one query after a cache), fewer keys than queries, chunked prefill.
SHAPES = [(13, 13, 0), (7, 45, 0), (1, 33, 32), (40, 9, 0), (5, 150, 145), (3, 17, 1000)]
