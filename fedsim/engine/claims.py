"""A claim counter that the actors of one machine share through a small file.

A shared phase (see ``fedsim.engine.pool``) gives every actor the whole phase; each
takes its next client from the counter, so a worker that finished early runs more
clients and none waits for another. A file lock works across the actor processes
without a Ray round trip (a few microseconds a claim, where an actor holding the count
would cost a call each), but only between processes of one machine.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


class ClaimCounter:
    """A counter in a small file that the actors of one machine share: ``take`` returns
    0, 1, 2, ... across all of them, each number once (an exclusive ``flock`` around a
    read and a write; a few microseconds)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR)

    def take(self) -> int:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            os.pwrite(self._fd, (n + 1).to_bytes(8, "little"), 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return n

    def close(self) -> None:
        os.close(self._fd)


def new_counter(path: str, start: int = 0) -> None:
    """Create a ``ClaimCounter`` file whose first ``take`` returns ``start``."""
    with open(path, "wb") as fh:
        fh.write(start.to_bytes(8, "little"))


def claimed(batch: Sequence[T], path: str) -> Iterator[tuple[int, T]]:
    """The (index, item) pairs of ``batch`` that this process takes from the counter."""
    counter = ClaimCounter(path)
    try:
        while (i := counter.take()) < len(batch):
            yield i, batch[i]
    finally:
        counter.close()


def shm_dir() -> str:
    """A private directory for a pool's counter files, in memory where there is one."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="fedsim-pool-", dir=base)
