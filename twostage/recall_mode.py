"""How recall finds candidates: the one set of modes the recall servers, the gateway, the CLI and the HTTP face
share. The values are the names settings, environment variables, flags and JSON bodies use; twostage/convert.py
maps them to and from the proto enum."""

from enum import StrEnum


class RecallMode(StrEnum):
    DENSE = "dense"  # nearest neighbours of the query's embedding
    LEXICAL = "lexical"  # BM25 over title and text
    HYBRID = "hybrid"  # both lists, fused into one order
