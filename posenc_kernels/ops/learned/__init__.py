"""Learned absolute position embeddings: ``kernel`` (Triton), ``torch_impl``, ``reference``, ``op`` (schemas,
checks, registration, autograd) and ``api`` (the public functions and the module)."""

from .api import LearnedPositionEmbedding, add_position_embedding, add_position_embedding_

__all__ = ["LearnedPositionEmbedding", "add_position_embedding", "add_position_embedding_"]
