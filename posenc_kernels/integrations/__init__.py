"""Drop-in entry points for other libraries' RoPE calls, built on the posenc kernels.

* :mod:`.hf`: Hugging Face transformers - ``apply_rotary_pos_emb`` (and GPT-J's), ``patch``/``unpatch``
  for Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 3, OLMo 2, Phi-3, GPT-NeoX and GPT-J models (Qwen3, Gemma 3
  and OLMo 2 with QK-norm and RoPE fused).
* :mod:`.vllm`: vLLM's in-place ``rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)``
  and ``fused_qk_norm_rope(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight, k_weight,
  cos_sin_cache, is_neox, position_ids)``.
* :mod:`.flash_attn`: flash-attn's ``apply_rotary_emb(x, cos, sin, interleaved, inplace, seqlen_offsets,
  cu_seqlens, max_seqlen)``.

None of them imports the library it mirrors: transformers is imported only by ``hf.patch``.
"""

from . import flash_attn, hf, vllm
from .flash_attn import apply_rotary_emb
from .hf import apply_rotary_pos_emb, apply_rotary_pos_emb_gptj, patch, unpatch
from .vllm import rotary_embedding

__all__ = ["hf", "vllm", "flash_attn", "apply_rotary_pos_emb", "apply_rotary_pos_emb_gptj", "patch", "unpatch",
           "rotary_embedding", "apply_rotary_emb"]  # fmt: skip
