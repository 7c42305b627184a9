"""Writes that survive a power cut: a file or a rename is durable only once fsynced, and its directory too."""

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """A rename (or a new file) is durable only once its directory is."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old content or the new, never a part; after a crash, one of the two."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)
