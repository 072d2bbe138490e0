"""Vectors and ids: id helpers and top-k, :class:`EmbeddingIndex`, knn, approximate indexes, sharded search,
the index file format. Knows nothing of trees; imports only the top-level helpers."""
