"""RoPE: apply_rope(_) and its modes (varlen, M-RoPE, on-the-fly angles, fused qkv), the frequency
schedules and the RotaryEmbedding module."""
