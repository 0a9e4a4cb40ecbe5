"""Flower's own SuperNode (``flower-supernode``), asking for work more often when idle.

``python -m fedsim.deploy.supernode --idle-poll S [flower-supernode arguments]``

Flower 1.39's SuperNode sleeps 3 s after a pull that brought no message, and checks
for its ClientApp's reply every 0.5 s: each phase of a round then waits 1.5 s on
average, and a round (train, then evaluate) with many nodes waits for the slowest of
them, about 5 s in all, for a few milliseconds of work. This runs the same SuperNode
(same program, same protocol, same TLS and authentication) with those two waits
shortened: the idle pull every ``S`` seconds, the reply check every ``S / 10``. Each
idle node then asks the SuperLink ``1 / S`` times a second (Flower: 1/3).

The two waits are ``time.sleep(3)`` and ``time.sleep(0.5)`` calls in
``flwr.supernode.start_client_internal``; that module's ``time`` is replaced by one
whose ``sleep`` maps those two values and passes every other through. A Flower whose
SuperNode no longer has them runs unchanged (a warning says so).

``kill -USR1 PID`` makes the SuperNode print every thread's stack on its output (the
node's log), without stopping it: what a node that stopped taking work is waiting on.
"""

from __future__ import annotations

import faulthandler
import inspect
import signal
import sys
import time
import types

__all__ = ["IDLE_S", "REPLY_CHECK_S", "main"]

IDLE_S = 3  # Flower 1.39: after a pull that brought nothing
REPLY_CHECK_S = 0.5  # Flower 1.39: while its ClientApp's reply is not there yet


def patch(idle_poll_s: float) -> bool:
    """Shorten the SuperNode's idle wait to ``idle_poll_s``; False if this Flower's
    SuperNode does not wait the way this expects (then nothing is changed)."""
    import flwr.supernode.start_client_internal as sci

    source = inspect.getsource(sci)
    if f"time.sleep({IDLE_S})" not in source or f"time.sleep({REPLY_CHECK_S})" not in source:
        return False
    waits = {IDLE_S: idle_poll_s, REPLY_CHECK_S: min(REPLY_CHECK_S, idle_poll_s / 10)}

    class _Time(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            time.sleep(waits.get(seconds, seconds))

    sci.time = _Time("time")  # type: ignore[attr-defined]
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--idle-poll":
        print("usage: python -m fedsim.deploy.supernode --idle-poll S [flower-supernode args]")
        return 2
    idle = float(argv[1])
    if hasattr(signal, "SIGUSR1"):  # (POSIX)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if not patch(idle):
        print(
            "fedsim: this Flower's SuperNode does not wait as 1.39's does; its own idle "
            "poll (3 s) is kept",
            file=sys.stderr,
        )
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[2:]]
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main())
