"""Which recall shard owns a document id: the one rule shared by index
builds, recall servers (which refuse ids they do not own) and the gateway
(which routes writes)."""

import zlib


def shard_of(doc_id: str, shards: int) -> int:
    """Stable: the same id lands on the same shard on every build and every write."""
    return zlib.crc32(doc_id.encode()) % shards


def part_of(doc_id: str, shards: int, parts: int) -> int:
    """Which of a shard's ``parts`` builds embeds the id (for building one shard on several machines);
    consistent with ``shard_of``: ids of one shard spread evenly over its parts."""
    return zlib.crc32(doc_id.encode()) % (shards * parts) // shards
