"""Liger-Kernel's vision RoPE test, ported to CPU and run against our HF drop-in
:func:`posenc_kernels.integrations.hf.apply_rotary_pos_emb` (issue 21: the drop-in accepts Liger's rank-2
cos/sin).

Upstream: github.com/linkedin/Liger-Kernel, ``test/transformers/test_rope.py::test_vision_2d_cos_sin`` at
commit ead96b618e5c67bddc6a6e9bcb99bfe6b5ab661c. Its form: q/k ``[1, H, S, D]`` (``[S, H, D]`` unsqueezed and
transposed, as ``liger_rotary_pos_emb_vision`` does), cos/sin ``[S, D]`` (HF Llama rotary module output with
the batch dim dropped); checked against HF's ``apply_rotary_pos_emb`` fed the ``[1, S, D]`` table, values
and q/k gradients. The code here is ours; kept from upstream: the head counts and head dims of its three
shapes ``(S, H, D)`` = ``(128, 32, 64)``, ``(256, 16, 128)``, ``(423, 73, 92)``, the three dtypes with their
tolerances (fp32 atol 1e-5, bf16 atol 1e-1, fp16 atol 1e-2; rtol 1e-5), the rotary module
(``LlamaConfig(head_dim=D)``), the random upstream gradients and ``torch.allclose``. Nine cases, the default
backend (Triton under the interpreter in CI). Changed for the interpreter on a 2-core CPU: the sequence
lengths 128, 256, 423 -> 5, 4, 3 (the 423-token case alone took over 3 minutes there; each token is its own
program, so length adds no coverage).
"""

import pytest
import torch

from posenc_kernels.integrations import hf as hf_int

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402


@pytest.mark.parametrize("seq_len, num_heads, head_dim", [(5, 32, 64), (4, 16, 128), (3, 73, 92)])
@pytest.mark.parametrize(
    "dtype, atol, rtol",
    [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-1, 1e-5), (torch.float16, 1e-2, 1e-5)],
)
def test_vision_2d_cos_sin(seq_len, num_heads, head_dim, dtype, atol, rtol, monkeypatch):
    calls = []
    real = hf_int._rope_out
    monkeypatch.setattr(hf_int, "_rope_out", lambda *a, **k: calls.append(1) or real(*a, **k))
    rotary_emb = LlamaRotaryEmbedding(config=LlamaConfig(num_key_value_heads=num_heads, head_dim=head_dim))
    _q = torch.randn((seq_len, num_heads, head_dim)).to(dtype)
    _k = torch.randn((seq_len, num_heads, head_dim)).to(dtype)

    def to_4d(x):
        return x.unsqueeze(0).transpose(1, 2).contiguous()

    q_hf, k_hf = to_4d(_q).requires_grad_(True), to_4d(_k).requires_grad_(True)
    q_tt, k_tt = to_4d(_q).requires_grad_(True), to_4d(_k).requires_grad_(True)
    pos_ids = torch.arange(seq_len, dtype=torch.long).unsqueeze(0)
    cos_3d, sin_3d = rotary_emb(k_hf, pos_ids)  # (1, seq_len, head_dim)
    cos_2d, sin_2d = cos_3d[0], sin_3d[0]  # (seq_len, head_dim): the vision table

    hf_q, hf_k = apply_rotary_pos_emb(q_hf, k_hf, cos_3d, sin_3d)
    tt_q, tt_k = hf_int.apply_rotary_pos_emb(q_tt, k_tt, cos_2d, sin_2d)
    assert calls, "the rank-2 form must take the kernel path"
    assert torch.allclose(hf_q, tt_q, atol=atol, rtol=rtol)
    assert torch.allclose(hf_k, tt_k, atol=atol, rtol=rtol)

    dq, dk = torch.randn_like(hf_q), torch.randn_like(hf_k)
    q_hf_grad, k_hf_grad = torch.autograd.grad((hf_q, hf_k), (q_hf, k_hf), (dq, dk), allow_unused=True)
    q_tt_grad, k_tt_grad = torch.autograd.grad((tt_q, tt_k), (q_tt, k_tt), (dq.clone(), dk.clone()), allow_unused=True)
    assert torch.allclose(q_hf_grad, q_tt_grad, atol=atol, rtol=rtol)
    assert torch.allclose(k_hf_grad, k_tt_grad, atol=atol, rtol=rtol)
