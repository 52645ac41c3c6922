"""Helpers of the RotaryEmbedding tests: float64 truth by angles, HF's module applied, model configs.
"""

import pytest
import torch

from posenc_kernels import reference as ref

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402


EPS32 = torch.finfo(torch.float32).eps

# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def truth_rotate(x, angle, af, *, interleaved=False):
    """float64 rotation of x [B, S, H, D] by angle [B, S, R/2] (float64), cos/sin scaled by af."""
    return ref.rotate_by_angles_reference(x, angle, af, interleaved=interleaved)


def truth_angles(positions, inv64, axis_map=None):
    """positions [B, S] (or [A, B, S] with axis_map) -> float64 angles [B, S, R/2]."""
    if axis_map is None:
        return positions.double()[..., None] * inv64
    p = positions.double()[axis_map.long()]  # [half, B, S]
    return p.permute(1, 2, 0) * inv64


def hf_apply(rot, apply_fn, q, k, position_ids):
    """HF: cos/sin from its rotary module, then its apply function on [B, H, S, D] views."""
    cos, sin = rot(q, position_ids)
    qh, kh = apply_fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qh.transpose(1, 2), kh.transpose(1, 2)


def check_vs_truth(ours, hf, want, x, af, what=""):
    """ours may be off the float64 truth by at most 2x HF's error + 4 fp32 roundings of |x|*af."""
    atol = 4 * EPS32 * x.abs().max().item() * max(af, 1.0)
    err_ours = (ours.double() - want).abs().max().item()
    err_hf = (hf.double() - want).abs().max().item()
    assert err_hf <= 1e-3 * x.abs().max().item() * max(af, 1.0), f"{what}: HF is {err_hf:.3g} off the truth: wrong reference"
    assert err_ours <= 2 * err_hf + atol, f"{what}: ours {err_ours:.3g} vs HF {err_hf:.3g} off the truth"
    return err_ours, err_hf


def llama_config(head_dim=64, max_pos=64, **rope):
    rope.setdefault("rope_theta", 10000.0)
    rope.setdefault("rope_type", "default")
    return LlamaConfig(head_dim=head_dim, hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max_pos, rope_parameters=rope)  # fmt: skip


# HF rope_parameters of each type, with a short original length (64) so that small tests cross it.
LLAMA_TYPES = {
    "default": dict(rope_type="default", rope_theta=500000.0),
    "linear": dict(rope_type="linear", factor=4.0),
    "yarn": dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=64),
    "yarn-deepseek": dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.8),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),  # fmt: skip
    "dynamic": dict(rope_type="dynamic", factor=4.0),
}


def qk(B=2, S=13, Hq=4, Hk=2, D=64, dtype=torch.float32):
    return torch.randn(B, S, Hq, D, dtype=dtype), torch.randn(B, S, Hk, D, dtype=dtype)
