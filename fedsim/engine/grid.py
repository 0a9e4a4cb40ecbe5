"""fedsim's ``flwr.serverapp.Grid`` over a Ray actor pool.

Flower strategies and ServerApps run on it unchanged. Messages pushed in one phase are
delivered together on the next pull: the pool gets one call per actor carrying that
actor's batch, and the replies come back when the batch is done (no sleep-polling).
Node ids are ``client id + NODE_ID_OFFSET``, so the mapping needs no table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsim.engine.fold import Block
from fedsim.engine.messaging import ClientDirectory, PhasedGrid
from fedsim.engine.pool import Pending, WorkerPool
from fedsim.engine.schedule import balance, split_ranges

NODE_ID_OFFSET = 1 << 16


class _OffsetDirectory(ClientDirectory):
    def __init__(self) -> None:  # no tables: the mapping is arithmetic
        pass

    def node_of(self, cid: int) -> int:
        return cid + NODE_ID_OFFSET

    def client_of(self, node_id: int) -> int:
        return node_id - NODE_ID_OFFSET


class RayGrid(PhasedGrid):
    screens_updates = True  # ClientWorker screens every training reply

    def __init__(
        self,
        pool: WorkerPool,
        *,
        num_clients: int,
        run_id: int = 1,
        cost: Callable[[int], float] | None = None,
    ) -> None:
        self._pool = pool
        self._num_clients = num_clients
        self._run = Run.create_empty(run_id)
        self._cost = cost or (lambda cid: 1.0)
        self._outbox: dict[str, Message] = {}
        self._inbox: dict[str, Message] = {}
        self._counter = 0
        # Flower's Message constructor reads the identity of the task running it.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    # -- Grid API ------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(NODE_ID_OFFSET, NODE_ID_OFFSET + self._num_clients)

    def client_directory(self) -> ClientDirectory:
        return _OffsetDirectory()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            cid = msg.metadata.dst_node_id - NODE_ID_OFFSET
            if not 0 <= cid < self._num_clients:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this grid")
            self._counter += 1
            msg_id = f"{self._counter:016x}"
            msg.metadata.__dict__["_message_id"] = msg_id
            self._outbox[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._deliver()
        out = []
        for msg_id in message_ids:
            if (reply := self._inbox.pop(msg_id, None)) is not None:
                out.append(reply)
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        self._deliver(timeout=timeout)
        return self.pull_messages(ids)

    # -- fedsim extension ------------------------------------------------------------
    def client_states(self) -> dict[int, RecordDict]:
        return dict(self._pool.states)  # (each state is replaced, never changed in place)

    def restore_client_states(self, states: dict[int, RecordDict]) -> None:
        self._pool.states = dict(states)

    def submit_phase(self, messages: Iterable[Message], *, fold: bool = False) -> InFlight:
        """Send a phase's messages and return at once; ``collect_phase`` waits for the
        replies. A phase submitted while another is in flight is queued behind it on
        each worker (see ``WorkerPool.submit``).

        With ``fold`` the workers pre-fold the weighted sum of the replies' arrays
        (``fedsim.engine.fold``): replies carry metrics only, and the partial sums come
        back too. Cohort positions are then the messages sorted by client id, and each
        worker gets a contiguous range of them. Otherwise the workers share the phase
        where they can, each taking the next client, costliest first
        (``WorkerPool.submit_shared``), or each gets a batch balanced by cost.
        """
        return self._submit(messages, fold=fold)

    def _submit(self, messages: Iterable[Message], *, fold: bool) -> InFlight:
        ids = list(self.push_messages(messages))
        items = [(m.metadata.dst_node_id - NODE_ID_OFFSET, m) for m in self._outbox.values()]
        self._outbox.clear()
        run_id = self._run.run_id
        if fold:
            items.sort(key=lambda it: it[0])
            ranges = split_ranges([self._cost(cid) for cid, _ in items], self._pool.size)
            batches = [items[a:b] for a, b in ranges]
            fold_from = [a for a, _ in ranges]
            pending = self._pool.submit(run_id, self._num_clients, batches, fold_from=fold_from)
        elif self._pool.shares_work:
            pending = self._pool.submit_shared(run_id, self._num_clients, items, cost=self._cost)
        else:
            batches = balance(items, self._pool.size, self._cost)
            pending = self._pool.submit(run_id, self._num_clients, batches)
        return InFlight(ids, fold, pending)

    def collect_phase(
        self, phase: InFlight, *, timeout: float | None = None
    ) -> tuple[list[Message], list[Block] | None]:
        """The replies of a submitted phase (and its partial sums when folded)."""
        replies, blocks = self._pool.collect(phase.pending, timeout=timeout)
        self._store(replies)
        return list(self.pull_messages(phase.ids)), blocks if phase.fold else None

    # -- delivery --------------------------------------------------------------------
    def _deliver(self, timeout: float | None = None) -> None:
        if self._outbox:
            replies, _ = self._pool.collect(self._submit([], fold=False).pending, timeout=timeout)
            self._store(replies)

    def _store(self, replies: list[Message]) -> None:
        for reply in replies:
            self._inbox[reply.metadata.reply_to_message_id] = reply


@dataclass
class InFlight:
    """A phase sent by ``RayGrid.submit_phase``."""

    ids: list[str]
    fold: bool
    pending: Pending
