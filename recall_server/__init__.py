"""Stage 1: the bi-encoder recall service over an HNSW index."""
