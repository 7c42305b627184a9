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
    # Read-only suffices on Linux, and a copied file may keep its source's read-only mode.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old content or the new, never a part; after a crash, one of the two."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)
