"""Write versions: the order of every write to one document id.

Contract (what replication rests on):

- A version is (clock, writer). ``clock`` is a hybrid logical clock reading,
  milliseconds since the epoch shifted left 16 bits plus a counter, taken
  where the write enters the system (the gateway, or a recall server written
  to directly). ``writer`` names that process and breaks ties, so two writes
  of one id through two gateways in the same millisecond still have one order
  that every replica agrees on.
- A replica applies a write (an upsert or a tombstone) only when its version is
  newer than the version it holds for that id. Applying a set of writes in any
  order, any number of times, therefore ends in the same state.
- Documents of a built snapshot carry ``BASE``, below every write: a write
  made while a snapshot was being built wins over the snapshot's copy.
- A clock never runs backwards within a process, and it moves past every
  version it observes, so a write made after another one was seen is ordered
  after it even when wall clocks disagree.
"""

import threading
import time
from dataclasses import dataclass

COUNTER_BITS = 16


@dataclass(frozen=True, order=True)
class Version:
    clock: int
    writer: str

    def __str__(self) -> str:
        return f"{self.clock}/{self.writer}" if self.writer else str(self.clock)


BASE = Version(0, "")


def clock_at(unix_s: float) -> int:
    """The clock reading for a wall-clock time (counter 0): for comparing versions with ages."""
    return int(unix_s * 1000) << COUNTER_BITS


def age_s(version: Version, now_s: float | None = None) -> float:
    """Seconds since the version's clock was read (by wall clock)."""
    return (time.time() if now_s is None else now_s) - (version.clock >> COUNTER_BITS) / 1000


class HybridClock:
    """Thread-safe: writes are stamped from the event loop and observed from store threads."""

    def __init__(self, writer: str, wall=time.time):
        self.writer = writer
        self._wall = wall
        self._last = 0
        self._lock = threading.Lock()

    def now(self) -> Version:
        with self._lock:
            self._last = max(clock_at(self._wall()), self._last + 1)
            return Version(self._last, self.writer)

    def observe(self, clock: int) -> None:
        """Move past a version seen elsewhere, so later writes here are ordered after it."""
        with self._lock:
            self._last = max(self._last, clock)
