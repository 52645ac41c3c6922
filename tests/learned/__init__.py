"""Learned absolute position embeddings: add_position_embedding(_) and LearnedPositionEmbedding."""
