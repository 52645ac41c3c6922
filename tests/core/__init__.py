"""Cross-cutting tests: the op layer and registry, position resolution, int64 indexing, CUDA graphs, context parallel."""
