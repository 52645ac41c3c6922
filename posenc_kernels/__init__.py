"""posenc_kernels: fused kernels for the position encodings of transformers.

Every op is a ``torch.library`` custom op in the ``posenc`` namespace (``torch.ops.posenc.*``) with a fake
implementation and autograd, so ``torch.compile(fullgraph=True)`` traces through it. CUDA tensors run the
Triton kernels; CPU tensors run a pure-torch implementation, or the Triton kernels through the Triton
interpreter when ``TRITON_INTERPRET=1`` is set before import. :func:`set_backend` forces one.
"""

from .ops.checks import set_value_checks
from .ops.registry import get_backend, interpreter_enabled, set_backend, use_backend
from .ops.learned import LearnedPositionEmbedding, add_position_embedding, add_position_embedding_
from .positions import (
    fairseq_positions,
    opt_positions,
    position_ids_from_attention_mask,
    positions_from_cu_seqlens,
)
from .ops.relative import (
    T5RelativePositionBias,
    alibi_bias,
    alibi_score_mod,
    alibi_slopes,
    t5_bucket_thresholds,
    t5_relative_bias,
    t5_relative_bucket,
    t5_score_mod,
)
from .ops.rope import apply_rope, apply_rope_, apply_rope_qkv_, axial_positions, mrope_axis_map, rope_cos_sin
from .rotary import RotaryEmbedding
from .schedules import ROPE_TYPES, rope_frequencies
from .ops.sinusoidal import (
    SINUSOIDAL_CONVENTIONS,
    SinusoidalPositionalEncoding,
    add_sinusoidal,
    add_sinusoidal_,
    concat_sinusoidal,
    sinusoidal_table,
)

__version__ = "0.1.0"

from .ops import registry as _registry  # noqa: E402

_registry.finalize()  # every family has defined its ops: register their kernels

__all__ = [
    "apply_rope",
    "apply_rope_",
    "apply_rope_qkv_",
    "mrope_axis_map",
    "axial_positions",
    "rope_cos_sin",
    "rope_frequencies",
    "ROPE_TYPES",
    "RotaryEmbedding",
    "SINUSOIDAL_CONVENTIONS",
    "SinusoidalPositionalEncoding",
    "add_sinusoidal",
    "add_sinusoidal_",
    "concat_sinusoidal",
    "sinusoidal_table",
    "add_position_embedding_",
    "add_position_embedding",
    "LearnedPositionEmbedding",
    "alibi_slopes",
    "alibi_bias",
    "alibi_score_mod",
    "t5_bucket_thresholds",
    "t5_relative_bucket",
    "t5_relative_bias",
    "t5_score_mod",
    "T5RelativePositionBias",
    "position_ids_from_attention_mask",
    "opt_positions",
    "fairseq_positions",
    "positions_from_cu_seqlens",
    "get_backend",
    "set_backend",
    "use_backend",
    "set_value_checks",
    "interpreter_enabled",
]
