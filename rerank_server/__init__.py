"""Stage 2: the cross-encoder rerank service."""
