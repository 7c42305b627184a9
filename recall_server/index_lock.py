"""An OS file lock that gives an index directory one writer.

Two processes writing one index would each save a graph reflecting only their
own writes over the other's: silent corruption. The writer holds an exclusive
lock for as long as the index is open; read-only openers (replicas sharing a
snapshot) hold a shared one, so they exclude a writer but not each other. The
kernel drops the lock when the process dies, so a crash never leaves it stale.
"""

import fcntl
import os
from pathlib import Path

from twostage.errors import IndexLocked

LOCK_FILE = ".lock"


class IndexLock:
    def __init__(self, directory: Path, exclusive: bool):
        self.path = Path(directory) / LOCK_FILE
        try:
            self._fd = os.open(self.path, (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CREAT, 0o644)
        except OSError:
            if exclusive:
                raise
            # A read-only file system holds no writer to exclude.
            self._fd = -1
            return
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            mode = "for writing" if exclusive else "read-only"
            raise IndexLocked(
                f"cannot open {directory} {mode}: another process{holder} has it open"
                + (" (a writer, or read-only replicas)" if exclusive else " for writing")
                + "; stop it, or give this one its own index directory"
            ) from None
        if exclusive:
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()}\n".encode())

    def _holder(self) -> str:
        try:
            pid = os.pread(self._fd, 32, 0).decode().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = -1
