"""Flower's own programs (``flower-superlink``, ``flower-supernode``) as child processes
that fedsim starts, watches and always stops.

Each runs in its own process group (so its helpers, Flower's SuperExec and ClientApp
processes, are stopped with it), logs to a file, and is taken from the virtual
environment fedsim runs in: Flower's SuperNode starts ``flower-superexec`` by name, so
that folder goes first on the child's PATH (another Flower on PATH would answer).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["FlowerProcess", "free_port", "flower_program"]


def flower_program(name: str) -> str:
    """The path of a Flower program: beside this Python first, then on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"'{name}' not found (is flwr installed in this environment?)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for tests and local set-ups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The coordinator drives the run itself: never install an app's dependencies.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class FlowerProcess:
    """One Flower program started in its own process group, logging to ``log``."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
    ):
        """``on_line`` sees each line of output as it is logged (in a thread)."""
        self.argv = argv
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out if on_line is None else subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env or child_env(),
                start_new_session=True,
            )
        self._relay: threading.Thread | None = None
        if on_line is not None:
            self._relay = threading.Thread(target=self._copy, args=(on_line,), daemon=True)
            self._relay.start()

    def _copy(self, on_line: Callable[[str], None]) -> None:
        assert self.proc.stdout is not None
        with self.log.open("ab") as out:
            for raw in self.proc.stdout:
                out.write(raw)
                out.flush()
                on_line(raw.decode(errors="replace"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def wait_until(self, ready: Callable[[], bool], *, timeout_s: float, what: str) -> None:
        """Poll ``ready`` until true; RuntimeError (with the log's last line) if the
        process exits first or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if not self.alive():
                tail = [ln for ln in self.log_tail() if ln.strip()]
                last = tail[-1].strip() if tail else "(no output)"
                raise RuntimeError(
                    f"{what} exited with code {self.proc.returncode}: {last} (log: {self.log})"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{what} not ready within {timeout_s:.0f} s (log: {self.log})")
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, *, grace_s: float = 10.0) -> int | None:
        """SIGTERM to the whole group (Flower nodes then leave the SuperLink cleanly),
        SIGKILL after ``grace_s``; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout=grace_s)
        # Helpers of the group that outlive their parent get the same end.
        self.signal(signal.SIGKILL)
        if self._relay is not None:
            self._relay.join(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the program alone (a crash, for fault tests); its helpers notice."""
        if self.alive():
            self.proc.kill()
            self.proc.wait()
