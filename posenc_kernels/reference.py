"""Pure-torch references for every op, written for clarity; tests and benchmarks import these. Each family
keeps its references beside its kernels (``posenc_kernels/ops/<family>/reference.py``); this module is the
one place that gathers them.

Two kinds:

* ``*_reference``: the mathematical definition, computed in float64 (or a dtype you pass) - the truth a
  kernel is measured against.
* ``*_eager`` and the ``published_*`` functions: the computation as the field writes it, in the input dtype
  (HF transformers' ``rotate_half`` RoPE; the formulas of the Transformer paper, tensor2tensor, fairseq and
  diffusers). They are the "same computation done by torch" of the tolerance rule and the eager
  providers of the benchmarks.
"""

from __future__ import annotations

from .ops.rope.reference import (  # noqa: F401
    hf_apply_rotary_pos_emb, hf_gptj_apply_rotary_pos_emb, rope_cos_sin_reference, rope_frequencies_reference,
    rope_hf_eager, rope_reference, rotate_by_angles_reference, rotate_every_two, rotate_half, rotate_reference,
    vllm_rope_native,
)
from .ops.cache.reference import (  # noqa: F401
    quantise_reference, rope_and_cache_reference, write_cache_reference, written_rows,
)
from .ops.qknorm.reference import (  # noqa: F401
    hf_rms_norm, qk_norm_rope_hf_eager, qk_norm_rope_reference, rms_norm_reference,
)
from .ops.learned.reference import (  # noqa: F401
    add_position_embedding_reference, position_embedding_eager, position_embedding_grad_reference,
)
from .ops.relative.reference import (  # noqa: F401
    alibi_bias_eager, alibi_bias_reference, alibi_slopes_bloom, alibi_slopes_paper, alibi_slopes_reference,
    attention_reference, bloom_alibi_row_bias, t5_relative_bias_hf_eager, t5_relative_bias_reference,
    t5_relative_bucket_hf,
)
from .ops.sinusoidal.reference import (  # noqa: F401
    add_sinusoidal_reference, concat_sinusoidal_reference, published_diffusers, published_fairseq,
    published_tensor2tensor, published_transformer, sinusoidal_table_reference,
)
