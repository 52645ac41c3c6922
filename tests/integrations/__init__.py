"""The drop-in integrations (HF transformers, vLLM, flash-attn), each also tested with the mirrored library's own test file ported to CPU."""
