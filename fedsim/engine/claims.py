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


SHM_PREFIX = "fedsim-pool-"
OWNER_FILE = ".owner"


def shm_dir() -> tuple[str, int]:
    """A private directory for a pool's counter files, in memory where there is one, and
    the descriptor of the lock that marks it in use (hold it open for the pool's life;
    the kernel releases it when the process dies, however it dies). Leftovers of dead
    runs (kill -9 skips every clean-up) are removed first."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    remove_stale(base or tempfile.gettempdir())
    path = tempfile.mkdtemp(prefix=SHM_PREFIX, dir=base)
    fd = os.open(os.path.join(path, OWNER_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path, fd


def remove_stale(base: str, *, unowned_after_s: float = 60.0) -> list[str]:
    """Remove the pool directories under ``base`` whose owner lock nobody holds (and any
    without one older than ``unowned_after_s``); returns them."""
    import shutil
    import time

    removed = []
    try:
        names = [n for n in os.listdir(base) if n.startswith(SHM_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(base, name)
        owner = os.path.join(path, OWNER_FILE)
        try:
            fd = os.open(owner, os.O_RDWR)
        except FileNotFoundError:
            try:
                stale = time.time() - os.stat(path).st_mtime > unowned_after_s
            except OSError:
                continue
        except OSError:
            continue
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                stale = True
            except BlockingIOError:
                stale = False  # a live pool's
            finally:
                os.close(fd)
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
