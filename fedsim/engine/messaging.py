"""How the coordinator talks to a grid: sending and collecting messages, the view of a
grid a strategy gets, and the map between client ids and node ids."""

from __future__ import annotations

import random
import threading
import time
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid


class Stopped(RuntimeError):
    """The engine asked the coordinator to stop (the runtime failed or was interrupted)."""


POLL_S = 0.02


def exchange(
    grid: Grid,
    messages: list[Message],
    *,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    max_poll_s: float = POLL_S,
) -> list[Message]:
    """Send messages and collect replies.

    fedsim's grid delivers synchronously (no polling). Other grids (Flower's runtime,
    a real SuperLink) are pulled in short steps so a ``stop`` request ends the wait;
    with ``max_poll_s`` above ``POLL_S`` the step grows (x1.5) while nothing arrives,
    up to that (each pull of a real SuperLink is an HTTPS request it must serve).
    """
    if isinstance(grid, PhasedGrid) or stop is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    step = POLL_S
    while pending:
        if stop.is_set():
            raise Stopped("stopped while waiting for client replies")
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if deadline is not None and time.monotonic() > deadline:
            break
        if got:
            step = POLL_S
        elif pending:
            time.sleep(step)
            step = min(max_poll_s, step * 1.5)
    return replies


@contextmanager
def pinned_global_random(seed: int) -> Iterator[None]:
    """Pin the global ``random`` a third-party function reads, then restore it."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


class PhasedGrid(Grid):
    """A grid that runs a whole phase per call (fedsim's own): it knows its client
    directory, starts a phase at once and collects it later, so phases can queue."""

    @abstractmethod
    def client_directory(self) -> ClientDirectory: ...

    #: Whether its workers run the scenario's per-update transforms on training replies
    #: (else the coordinator does).
    screens_updates: bool = False

    def client_states(self) -> dict[int, RecordDict]:
        """Every client's persistent state, by client id (for a checkpoint)."""
        return {}

    def restore_client_states(self, states: dict[int, RecordDict]) -> None:
        """Start from a :meth:`client_states` (a resumed run)."""
        if states:
            raise NotImplementedError(f"{type(self).__name__} keeps no client states")

    @abstractmethod
    def submit_phase(self, messages: Iterable[Message], *, fold: bool = False) -> Any:
        """Send a phase's messages; return a handle for ``collect_phase`` at once."""

    @abstractmethod
    def collect_phase(
        self, phase: Any, *, timeout: float | None = None
    ) -> tuple[list[Message], Any]:
        """The phase's replies (and its partial sums, when submitted with ``fold``)."""


class SubsetGrid(Grid):
    """A view of a grid that shows a strategy only the nodes the coordinator sampled."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class ClientDirectory:
    """Maps fedsim client ids (data partitions) to the grid's node ids and back."""

    def __init__(self, node_of: dict[int, int]) -> None:
        self._node_of = node_of
        self._client_of = {n: c for c, n in node_of.items()}

    def node_of(self, cid: int) -> int:
        return self._node_of[cid]

    def client_of(self, node_id: int) -> int:
        return self._client_of[node_id]

    @classmethod
    def discover(
        cls,
        grid: Grid,
        num_clients: int,
        *,
        timeout_s: float = 120.0,
        stop: threading.Event | None = None,
        local_data: bool | None = None,
    ) -> ClientDirectory:
        """Ask every node for its ``partition-id`` (Flower runtime or real SuperNodes).
        With ``local_data`` given, every node must (True) or must not (False) train on a
        data folder of its own (``fedsim node --data``), as the scenario says.

        fedsim's own grid knows the mapping and is asked directly instead.
        """
        if isinstance(grid, PhasedGrid):
            return grid.client_directory()
        deadline = time.monotonic() + timeout_s
        while len(nodes := list(grid.get_node_ids())) < num_clients:
            if stop is not None and stop.is_set():
                raise Stopped("stopped while waiting for client nodes")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of {num_clients} client nodes connected "
                    f"within {timeout_s:.0f} s"
                )
            time.sleep(0.05)
        msgs = [
            Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
            for node in sorted(nodes)
        ]
        node_of: dict[int, int] = {}
        for reply in exchange(grid, msgs, timeout=timeout_s, stop=stop):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            info = reply.content.metric_records["info"]
            cid = int(info["partition-id"])
            if local_data is not None and bool(info.get("local-data", 0)) != local_data:
                node = reply.metadata.src_node_id
                raise RuntimeError(
                    f"the node of partition-id {cid} (node {node}) trains on "
                    + (
                        "the scenario's partition, but deployment.client_data = 'local' "
                        "(start it with fedsim node --data DIR)"
                        if local_data
                        else "a data folder of its own (fedsim node --data), but "
                        "deployment.client_data = 'partitions'"
                    )
                )
            if cid in node_of:
                raise RuntimeError(f"two nodes claim partition-id {cid}")
            node_of[cid] = reply.metadata.src_node_id
        missing = sorted(set(range(num_clients)) - set(node_of))
        if missing:
            raise RuntimeError(f"no node answered for client ids {missing[:10]}")
        return cls(node_of)
