"""participation.csv: what became of every client in every round.

One row ``round,client_id,status`` per client and round, where status is one of
:data:`STATUSES`:

* ``offline``: not online at the round's start;
* ``online``: online at the round's start but not selected;
* ``selected``: selected, and nothing more is known (e.g. the round ended first);
* ``replied``: its reply arrived in time but was not aggregated;
* ``dropped``: it vanished mid-round or its training failed;
* ``late``: its reply arrived after the deadline or after the round closed;
* ``aggregated``: its reply went into the round's aggregate;
* ``rejected:<reason>``: an update transform left its reply out (``fedsim.transforms``);
  the reason has no commas or line breaks.

For populations larger than ``max_full_clients`` only the selected clients get rows
(a client with no row in a round was offline or online but not selected).
The log is streamed: rows are written (and flushed) round by round, never kept in memory.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from types import TracebackType

import numpy as np

STATUSES = (
    "offline",
    "online",
    "selected",
    "replied",
    "dropped",
    "late",
    "aggregated",
    "rejected",
)
REJECTED = "rejected"
HEADER = "round,client_id,status"
OFFLINE, ONLINE = 0, 1
#: The statuses a selected client can end a round with.
OUTCOMES = STATUSES[2:]
_CODE = {s: i for i, s in enumerate(STATUSES)}
_STATUS_NL = np.array([s + "\n" for s in STATUSES], dtype=object)


class ParticipationLog:
    """Streams participation.csv, one :meth:`add_round` per round.

    For ``num_clients <= max_full_clients`` every client gets one row per round, in
    client-id order: ``offline`` or ``online`` if it was not selected, else its outcome.
    For larger populations only the selected clients get rows (in client-id order), so
    the file grows with the cohort size rather than the population; ``full`` says which.
    """

    def __init__(
        self,
        path: Path,
        num_clients: int,
        *,
        max_full_clients: int = 10_000,
        keep_rounds: int | None = None,
    ) -> None:
        """A new log at ``path``; with ``keep_rounds`` (a resumed run), the existing
        file's rows of rounds 1..keep_rounds are kept (a torn last line dropped) and
        later rounds are appended."""
        if num_clients < 0:
            raise ValueError(f"num_clients must be >= 0, got {num_clients}")
        self.path = Path(path)
        self.num_clients = int(num_clients)
        self.full = self.num_clients <= max_full_clients
        # "cid," per client, built once: a round's rows are then a few numpy object-array ops.
        self._cid_cols = (
            np.array([f"{i}," for i in range(self.num_clients)], dtype=object)
            if self.full
            else None
        )
        if keep_rounds is not None and self.path.exists():
            _truncate_rounds(self.path, keep_rounds)
            self._fh: io.TextIOBase | None = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
            return
        self._fh = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self._fh.write(HEADER + "\n")
        self._fh.flush()

    # ------------------------------------------------------------------ writing
    def add_round(
        self, server_round: int, online: np.ndarray | None, outcome: dict[int, str]
    ) -> None:
        """Write round ``server_round``'s rows.

        ``online``: bool mask over the population at the round's start (None: all online).
        ``outcome``: client id -> one of :data:`OUTCOMES` for every selected client.
        Raises ValueError for an unknown status, a client id outside the population, a
        mask of the wrong shape, or a selected client that the mask says was offline.
        """
        if self._fh is None:
            raise ValueError(f"participation log {self.path} is closed")
        n = self.num_clients
        ids = np.fromiter(outcome.keys(), dtype=np.int64, count=len(outcome))
        codes = np.fromiter(
            (_code(s) for s in outcome.values()),
            dtype=np.int8,
            count=len(outcome),
        )
        # A rejection carries its reason: its row is written as given.
        reasons = {c: _clean(s) for c, s in outcome.items() if _code(s) == _CODE[REJECTED]}
        if (codes < 0).any():
            bad = sorted({str(s) for s in outcome.values() if _code(s) < 0})
            raise ValueError(
                f"round {server_round}: unknown status {bad}; a selected client's status "
                f"must be one of {list(OUTCOMES)}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            bad_ids = sorted(int(i) for i in ids if not 0 <= i < n)
            raise ValueError(
                f"round {server_round}: client ids {bad_ids[:10]} outside the population 0..{n - 1}"
            )
        if online is not None:
            online = np.asarray(online)
            if online.shape != (n,):
                raise ValueError(
                    f"round {server_round}: online mask has shape {online.shape}, expected ({n},)"
                )
            online = online.astype(bool, copy=False)
            if ids.size and not online[ids].all():
                off = sorted(int(i) for i in ids[~online[ids]])
                raise ValueError(
                    f"round {server_round}: clients {off[:10]} were selected but offline at "
                    "the round's start (a simulator bug)"
                )

        head = f"{int(server_round)},"
        if self.full:
            row_codes = (
                np.full(n, ONLINE, dtype=np.int8)
                if online is None
                else np.where(online, ONLINE, OFFLINE).astype(np.int8)
            )
            row_codes[ids] = codes
            # object arrays: elementwise str concatenation in numpy's loop
            tails = _STATUS_NL[row_codes]
            for c, text in reasons.items():
                tails[c] = text + "\n"
            lines = (head + self._cid_cols + tails).tolist()
        else:
            order = np.argsort(ids)
            lines = [
                f"{head}{cid},{reasons.get(cid, STATUSES[c])}\n"
                for cid, c in zip(ids[order].tolist(), codes[order].tolist(), strict=True)
            ]
        self._fh.write("".join(lines))
        self._fh.flush()

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    @property
    def closed(self) -> bool:
        return self._fh is None

    def __enter__(self) -> ParticipationLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _truncate_rounds(path: Path, keep: int) -> None:
    """Keep the header and the complete rows of rounds 1..keep (rows are in round order)."""
    tmp = path.with_name(path.name + ".tmp")
    with (
        open(path, encoding="utf-8", newline="") as src,
        open(tmp, "w", encoding="utf-8", newline="") as dst,
    ):
        header = src.readline()
        if header.strip() != HEADER:
            raise ValueError(f"{path}: not a participation.csv (header {header!r})")
        dst.write(HEADER + "\n")
        for line in src:
            head, sep, _ = line.partition(",")
            if not line.endswith("\n") or not sep or not head.isdigit() or int(head) > keep:
                break
            dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


def _code(status: str) -> int:
    if status in OUTCOMES:
        return _CODE[status]
    rejected = isinstance(status, str) and status.startswith(REJECTED + ":")
    return _CODE[REJECTED] if rejected else -1


def _clean(status: str) -> str:
    """A rejection with its reason made safe for one CSV field."""
    kind, sep, reason = status.partition(":")
    reason = " ".join(reason.replace(",", ";").split())
    return f"{kind}{sep}{reason}"


def read_participation(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rounds, client_ids, status_codes) of a participation.csv, one entry per row;
    status_codes index into :data:`STATUSES`."""
    text = Path(path).read_text(encoding="utf-8")
    header, _, body = text.partition("\n")
    if header.strip() != HEADER:
        raise ValueError(f"{path}: not a participation.csv (header {header!r})")
    if not body.strip():
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.int8)
    # Status names -> codes, then numpy's C parser does the rest.
    body = body.replace("\r\n", "\n")
    if not body.endswith("\n"):
        body += "\n"
    body = re.sub(r",rejected:[^\n]*\n", f",{_CODE[REJECTED]}\n", body)
    for code, name in enumerate(STATUSES):
        body = body.replace(f",{name}\n", f",{code}\n")
    try:
        data = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{path}: unreadable participation row ({e})") from None
    if data.shape[1] != 3:
        raise ValueError(f"{path}: expected 3 columns, got {data.shape[1]}")
    codes = data[:, 2]
    if codes.size and (codes.min() < 0 or codes.max() >= len(STATUSES)):
        raise ValueError(f"{path}: status code outside 0..{len(STATUSES) - 1}")
    return data[:, 0].copy(), data[:, 1].copy(), codes.astype(np.int8)
