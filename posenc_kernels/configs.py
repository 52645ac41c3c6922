"""Model-config registry shared by tests and benchmarks: the attention shapes of real models.

>>> from posenc_kernels.configs import MODEL_CONFIGS
>>> MODEL_CONFIGS["llama3-8b"].num_heads_kv
8
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionConfig:
    name: str
    num_heads_q: int
    num_heads_kv: int
    head_dim: int
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    interleaved: bool = False
    hidden_size: int = 0  # d_model, for the absolute (sinusoidal) encodings

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


MODEL_CONFIGS = {
    c.name: c
    for c in (
        AttentionConfig("llama3-8b", 32, 8, 128, rope_theta=500000.0, hidden_size=4096),
        AttentionConfig("llama2-7b", 32, 32, 128, hidden_size=4096),
        AttentionConfig("qwen2.5-7b", 28, 4, 128, rope_theta=1000000.0, hidden_size=3584),
        # head_dim 64 with partial rotary 0.25 (Pythia / GPT-NeoX style: 16 of 64 channels rotate).
        AttentionConfig("pythia-1b", 8, 8, 256, partial_rotary_factor=0.25, hidden_size=2048),
        AttentionConfig("gpt-j-6b", 16, 16, 256, partial_rotary_factor=0.25, interleaved=True, hidden_size=4096),
        AttentionConfig("phi-2", 32, 32, 80, partial_rotary_factor=0.4, hidden_size=2560),
        AttentionConfig("gemma-2b", 8, 1, 256, hidden_size=2048),
        AttentionConfig("tinyllama-1.1b", 32, 4, 64, hidden_size=2048),
    )
}
