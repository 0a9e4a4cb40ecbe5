"""A pool of Ray actors, each hosting many virtual clients of one scenario.

Each actor builds the ClientApp once; the datasets, shards and model it needs are built
on first use and reused (see ``clients.app``). A phase of a round is one Ray call per
actor, carrying that actor's whole batch of messages: no per-client task, no polling.

A phase whose replies are not pre-folded (evaluation; training for strategies that need
every reply) can instead be *shared*: every actor gets the whole phase and takes its
next client from a counter in a file the actors share (``ClaimCounter``), so a worker
that finished its training early evaluates more clients, and none waits for the other.
Which worker runs a client never changes its reply. Sharing needs the actors on the
driver's machine (a one-node Ray cluster); otherwise each actor gets a fixed batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import heapq
import io
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedsim.engine.fold import WEIGHT_KEY, Block, Sums, TreeFold, array_record, leaf, records

Batch = list[tuple[int, Message]]  # (client id, instruction)

# glibc serves allocations above a dynamic threshold with mmap and unmaps them on free,
# so every round of a large model pays page faults until the threshold has crept up
# (measured: the CNN workload's worker phase fell from 1.22 s to 0.76 s over 5 rounds).
# Fixed thresholds keep freed model-sized buffers for reuse from the first round on.
MMAP_THRESHOLD, TRIM_THRESHOLD = 64 * 2**20, 256 * 2**20
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}


INLINE_RECORD_BYTES = 2**20


def keep_freed_buffers() -> bool:
    """WORKER_ENV's settings for the running process (the driver), through glibc's
    ``mallopt``; False where that is not available.

    The driver builds model-sized buffers every round too (the mean, the strategy's
    copies of it): measured on the cnn workload, the strategy's aggregate took a
    median 6.8 ms per round without this and 3.4 ms with it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
            libc.mallopt(m_trim_threshold, TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False


# The global model a worker was last sent, by token (see ``WorkerPool._pack``). A module
# global because unpickling resolves references to it through ``_held_record``; each
# actor process hosts one ClientWorker.
_HELD: dict[int, ArrayRecord] = {}


def _held_record(token: int) -> ArrayRecord:
    try:
        return _HELD[token]
    except KeyError:
        raise RuntimeError(f"worker does not hold record {token}") from None


PackedRecord = list[tuple[str, str, tuple[int, ...], str, np.ndarray]]


def _pack_record(record: ArrayRecord) -> PackedRecord:
    """The record with each Array's bytes as a numpy view: Ray moves those out of band,
    so the driver copies them once into the object store and a worker once out of it
    (pickling the bytes would add a copy on each side)."""
    return [
        (k, a.dtype, a.shape, a.stype, np.frombuffer(a.data, np.uint8)) for k, a in record.items()
    ]


def _unpack_record(packed: PackedRecord) -> ArrayRecord:
    return ArrayRecord(
        {
            k: Array(dtype=dtype, shape=shape, stype=stype, data=data.tobytes())
            for k, dtype, shape, stype, data in packed
        }
    )


def _shared_record(batches: Sequence[Batch]) -> ArrayRecord | None:
    """The ArrayRecord the phase's instructions share (the global model), if any: the
    first message's. Others are pickled whole."""
    first = next((msg for batch in batches for _, msg in batch), None)
    return array_record(first.content) if first is not None and first.has_content() else None


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


@dataclass
class Pending:
    """A phase submitted to the pool and not yet collected."""

    batches: list[Batch]  # one per actor; a shared phase: one, the whole phase
    fold_from: Sequence[int] | None
    record: ArrayRecord | None  # the shared record (global model), sent by token
    token: int | None
    claims: str | None = None  # a shared phase's counter file
    record_arg: Any = None  # the packed record (or its object ref), made on first need
    # slot -> (object ref of the call, its leading arguments)
    calls: dict[int, tuple[ray.ObjectRef, list]] = field(default_factory=dict)


class ClientWorker:
    """Ray actor body: runs the scenario's Flower ClientApp on batches of messages."""

    def __init__(self, spec_json: str, torch_threads: int) -> None:
        import torch

        from clients.app import build_client_app

        torch.set_num_threads(torch_threads)
        self._spec_json = spec_json
        self._app = build_client_app(spec_json)

    def warm(self) -> float:
        """Load data and model and run one client through train and evaluate (replies
        discarded), so the first round measures the round, not lazy start-up work."""
        from flwr.app import ConfigRecord, MessageType
        from flwr.supercore.task_identity import TaskIdentity

        from clients.app import _env

        t0 = time.perf_counter()
        env = _env(self._spec_json)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
        content = RecordDict(
            {
                "arrays": ArrayRecord(env.model.state_dict()),
                "config": ConfigRecord({"server-round": 0}),
            }
        )
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            msg = Message(content, dst_node_id=0, message_type=kind)
            msg.metadata.__dict__["_message_id"] = "warm-up"
            fold = 0 if kind == MessageType.TRAIN else None  # warm the pre-fold too
            self.run(0, env.federation.num_clients, [(0, msg)], fold)
        env.last_record = env.last_state = env.holds = None
        # Exempt what start-up built from the cyclic GC's full scans (see
        # fedsim.engine.run.frozen_heap); the actor lives for one run.
        gc.collect()
        gc.freeze()
        return time.perf_counter() - t0

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run(
        self,
        run_id: int,
        num_clients: int,
        batch: Sequence[tuple[int, Message]],
        fold_from: int | None = None,
        claims: str | None = None,
    ) -> list[Message] | tuple[list[Message], list[Block]]:
        """Run the batch's clients in order; return their replies.

        With ``fold_from`` (the cohort position of the batch's first client; the batch is
        a contiguous range of positions) the weighted sum of the replies' arrays is
        folded here as each client finishes, and the replies come back with metrics
        only, together with the partial sums (see ``fedsim.engine.fold``).

        With ``claims`` (a shared phase: ``batch`` is the whole phase) only the clients
        whose index this worker takes from the shared counter run here.
        """
        replies = []
        tree = TreeFold() if fold_from is not None else None
        for pos, (cid, msg) in (
            _claimed(batch, claims) if claims else enumerate(batch, start=fold_from or 0)
        ):
            context = Context(
                run_id=run_id,
                node_id=msg.metadata.dst_node_id,
                node_config={"partition-id": cid, "num-partitions": num_clients},
                state=RecordDict(),
                run_config={},
            )
            try:
                reply = self._app(msg, context)
            except Exception as exc:  # a failing client is a failed reply, not a crash
                reason = f"{type(exc).__name__}: {exc}"
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
            if tree is not None:
                reply, term = self._fold(reply, msg)
                tree.add(pos, term)
            replies.append(reply)
        return replies if tree is None else (replies, tree.blocks)

    def run_packed(
        self,
        run_id: int,
        num_clients: int,
        batch: bytes,
        fold_from: int | None = None,
        token: int | None = None,
        record: PackedRecord | None = None,
        claims: str | None = None,
    ) -> bytes | tuple[bytes, list[Block]]:
        """``run`` with the batch and the replies pickled by the caller and here.

        Ray serialises call arguments with cloudpickle, whose pure-Python reducer hook
        visits every object of every Flower Message; the C pickler does the same job
        several times faster (measured: about 0.8 ms less per call per actor). Only
        fedsim's own driver and workers exchange these bytes. Partial sums (a few numpy
        arrays) are returned as they are: Ray moves them out of band through its object
        store and the driver reads them in place, where pickling them in the bytes
        would copy each model-sized array twice more on each side.

        The batch refers to the phase's shared ArrayRecord by ``token``; ``record`` (see
        ``_pack_record``; put in Ray's object store once for all actors when large)
        comes only when this worker does not hold that token yet. So a model already
        sent for training is not sent again for that round's evaluation, and the
        client app finds the very object whose weights its model still holds.
        """
        if record is not None:
            _HELD.clear()
            _HELD[token] = _unpack_record(record)  # type: ignore[index]
        items = pickle.loads(batch)
        if claims is not None:  # one pickle per item: unpickle only those taken here
            items = _Unpickled(items)
        result = self.run(run_id, num_clients, items, fold_from, claims)
        if fold_from is None:
            return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        replies, blocks = result
        return pickle.dumps(replies, protocol=pickle.HIGHEST_PROTOCOL), blocks

    @staticmethod
    def _fold(reply: Message, msg: Message) -> tuple[Message, Sums | None]:
        """The reply's term of the weighted sum, and the reply without its arrays."""
        if reply.has_error():
            return reply, None
        try:
            arrays, metrics = records(reply.content)
        except ValueError:
            arrays = None
        if arrays is None:
            reason = f"a training reply needs arrays and a MetricRecord with '{WEIGHT_KEY}'"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg), None
        term = leaf(arrays, float(metrics[WEIGHT_KEY]))  # type: ignore[arg-type]
        reply.content = RecordDict({"metrics": metrics})
        return reply, term


class _Unpickled(Sequence):
    """A shared phase's items, each unpickled when it is taken."""

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts

    def __len__(self) -> int:
        return len(self._parts)

    def __getitem__(self, i):  # type: ignore[override]
        return pickle.loads(self._parts[i])


def _claimed(
    batch: Sequence[tuple[int, Message]], path: str
) -> Iterator[tuple[int, tuple[int, Message]]]:
    """The (index, item) pairs of ``batch`` that this worker takes from the counter."""
    counter = ClaimCounter(path)
    try:
        while (i := counter.take()) < len(batch):
            yield i, batch[i]
    finally:
        counter.close()


def _shm_dir() -> str:
    """A private directory for the pool's counter files, in memory where there is one."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="fedsim-pool-", dir=base)


class WorkerPool:
    def __init__(
        self,
        spec_json: str,
        *,
        num_workers: int,
        cpus: float,
        gpus: float,
        torch_threads: int,
    ) -> None:
        self._make = lambda: (
            ray.remote(ClientWorker)
            .options(num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": WORKER_ENV})
            .remote(spec_json, torch_threads)
        )
        self.actors = [self._make() for _ in range(num_workers)]
        self._held: list[int | None] = [None] * num_workers  # token each actor holds
        # the last shared record, a snapshot of its contents, its token
        self._shared: tuple[ArrayRecord, list, int] | None = None
        self._in_flight: list[Pending] = []  # submitted, not yet collected, in order
        self._shm: str | None = None  # the counters' directory once sharing is on
        self._phases = 0

    def _replace(self, i: int) -> None:
        """A fresh actor in slot ``i``; it holds no model yet. Calls of phases still in
        flight that were queued on the old actor are submitted to the new one."""
        self.actors[i] = self._make()
        self._held[i] = None
        for pending in self._in_flight:
            if i in pending.calls:
                self._call(pending, i, pending.calls[i][1])

    def _token(self, record: ArrayRecord) -> int:
        """The token of ``record``: the last one's if it is the same object holding the
        same Array objects and bytes (a strategy may replace entries of a record in
        place), else a new one. The snapshot keeps those objects alive, so an ``is``
        check cannot be fooled by a reused id."""
        snapshot = [(k, a, a.data) for k, a in record.items()]
        if self._shared is not None:
            last, last_snapshot, token = self._shared
            if (
                last is record
                and len(last_snapshot) == len(snapshot)
                and all(
                    k1 == k2 and a1 is a2 and d1 is d2
                    for (k1, a1, d1), (k2, a2, d2) in zip(last_snapshot, snapshot, strict=True)
                )
            ):
                return token
        token = 0 if self._shared is None else self._shared[2] + 1
        self._shared = (record, snapshot, token)
        return token

    def _pack(
        self, batch: Batch, record: ArrayRecord | None, token: int | None, each: bool = False
    ) -> bytes:
        """Pickle a batch with the shared record replaced by a reference to ``token``.

        With ``each``, every item is pickled on its own (a pickled list of pickles), so a
        worker of a shared phase unpickles only the items it takes (``_Unpickled``).
        """
        buf = io.BytesIO()
        p = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        if record is not None:
            # Consulted for ArrayRecords only (a C-level type lookup), once per distinct
            # record: the pickle memo covers repeats.
            p.dispatch_table = {
                ArrayRecord: lambda r: (
                    (_held_record, (token,)) if r is record else r.__reduce_ex__(5)
                )
            }
        if not each:
            p.dump(batch)
            return buf.getvalue()
        parts = []
        for item in batch:
            p.dump(item)
            parts.append(buf.getvalue())
            buf.seek(0)
            buf.truncate()
            p.clear_memo()
        return pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL)

    @property
    def size(self) -> int:
        return len(self.actors)

    def warm(self, timeout_s: float = 300.0) -> None:
        refs = [a.warm.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            raise RuntimeError(
                f"{len(refs) - len(ready)} of {len(refs)} client workers did not start within "
                f"{timeout_s:.0f} s (too few free Ray resources for simulation.num_workers?)"
            )
        ray.get(ready)  # re-raises a worker's start-up error
        # Share phases only where every actor, now and any replacement, runs on this
        # machine: a Ray cluster of one node, the driver's.
        here = ray.get_runtime_context().get_node_id()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        one_node = len(alive) == 1 and alive[0]["NodeID"] == here
        if one_node and set(ray.get([a.node.remote() for a in self.actors])) == {here}:
            self._shm = _shm_dir()

    @property
    def shares_work(self) -> bool:
        """Whether the actors can share a phase (``submit_shared``)."""
        return self._shm is not None

    def _pending(
        self,
        batches: list[Batch],
        fold_from: Sequence[int] | None = None,
        claims: str | None = None,
    ) -> Pending:
        """A phase about to be submitted, with its shared record's token; in flight."""
        record = _shared_record(batches)
        token = None if record is None else self._token(record)
        pending = Pending(batches, fold_from, record, token, claims=claims)
        self._in_flight.append(pending)
        return pending

    def submit(
        self,
        run_id: int,
        num_clients: int,
        batches: Sequence[Batch],
        *,
        fold_from: Sequence[int] | None = None,
    ) -> Pending:
        """Start ``batches[i]`` on actor i and return at once; ``collect`` the results.

        Several phases may be in flight: each actor runs its calls in the order they were
        submitted (Ray keeps a caller's calls to one actor in order), so a phase can be
        queued behind the one before it and start the moment that one ends.
        """
        pending = self._pending(list(batches), fold_from)
        record, token = pending.record, pending.token
        calls = []
        for i, b in enumerate(batches):
            if b:
                start = None if fold_from is None else fold_from[i]
                calls.append((i, [run_id, num_clients, self._pack(b, record, token), start]))
        # Pack every batch first, then submit back to back: the workers start together.
        for i, args in calls:
            self._call(pending, i, args)
        return pending

    def submit_shared(
        self,
        run_id: int,
        num_clients: int,
        items: Batch,
        *,
        cost: Callable[[int], float] = lambda cid: 1.0,
    ) -> Pending:
        """Start a phase that every actor shares (see the module docstring): each takes
        its next client from a shared counter, the costliest first. Only where
        ``shares_work``; elsewhere ``submit`` fixed batches (``balance``)."""
        if self._shm is None:
            raise RuntimeError("the actors cannot share a phase: submit fixed batches")
        items = sorted(items, key=lambda it: (-cost(it[0]), it[0]))
        self._phases += 1
        path = os.path.join(self._shm, str(self._phases))
        new_counter(path)
        pending = self._pending([items], claims=path)
        packed = self._pack(items, pending.record, pending.token, each=True)
        if items:
            for i in range(self.size):
                self._call(pending, i, [run_id, num_clients, packed, None])
        return pending

    def _call(self, pending: Pending, i: int, args: list) -> None:
        """Submit ``pending``'s call for slot ``i`` to the actor now in that slot,
        with the shared record when that actor does not hold it yet."""
        send = None
        if pending.token is not None and self._held[i] != pending.token:
            if pending.record_arg is None:  # once per phase, for every actor that needs it
                data = _pack_record(pending.record)  # type: ignore[arg-type]
                # A large record goes into the object store once for all actors; a
                # small one rides inline in each call (cheaper than a put and a fetch).
                size = sum(a.nbytes for *_, a in data)
                pending.record_arg = ray.put(data) if size > INLINE_RECORD_BYTES else data
            send = pending.record_arg
        ref = self.actors[i].run_packed.remote(*args, pending.token, send, pending.claims)
        pending.calls[i] = (ref, args)
        self._held[i] = pending.token

    def collect(
        self, pending: Pending, *, timeout: float | None = None
    ) -> tuple[list[Message], list[Block]]:
        """The replies of a submitted phase; failed actors yield error replies and are
        replaced (and the calls of later phases queued on them go to the replacement).

        With ``fold_from`` (each batch's first cohort position; batches are contiguous
        ranges) the actors pre-fold the weighted sum and the partial sums come back too;
        a failed or late batch contributes empty sums over its range.
        """
        self._in_flight.remove(pending)
        batches, fold_from = pending.batches, pending.fold_from
        refs = {ref: i for i, (ref, _) in pending.calls.items()}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        replies: list[Message] = []
        blocks: list[Block] = []
        lost: list[int] = []
        failure = None
        for ref in ready:
            i = refs[ref]
            try:
                got = ray.get(ref)
                got = pickle.loads(got) if fold_from is None else (pickle.loads(got[0]), got[1])
            except ray.exceptions.RayError as exc:
                # The actor died (e.g. out of memory): its clients fail this phase.
                failure = f"worker failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                if pending.claims is None:
                    replies.extend(
                        Message(Error(ErrorCode.CLIENT_APP_CRASHED, failure), reply_to=m)
                        for _, m in batches[i]
                    )
                lost.append(i)
                self._replace(i)
                continue
            if fold_from is None:
                replies.extend(got)
            else:
                replies.extend(got[0])
                blocks.extend(got[1])
        for ref in late:  # late batches: no replies this phase; replace the worker
            i = refs[ref]
            lost.append(i)
            ray.kill(self.actors[i])
            self._replace(i)
        if pending.claims is not None:
            with contextlib.suppress(OSError):
                os.remove(pending.claims)
            if failure is not None:  # which clients the lost actor had taken is unknown:
                done = {r.metadata.reply_to_message_id for r in replies}  # all without a reply
                replies.extend(
                    Message(Error(ErrorCode.CLIENT_APP_CRASHED, failure), reply_to=m)
                    for _, m in batches[0]
                    if m.metadata.message_id not in done
                )
        if fold_from is not None:
            for i in lost:
                empty = TreeFold()
                for pos in range(fold_from[i], fold_from[i] + len(batches[i])):
                    empty.add(pos, None)
                blocks.extend(empty.blocks)
        return replies, blocks

    def run(
        self,
        run_id: int,
        num_clients: int,
        batches: Sequence[Batch],
        *,
        timeout: float | None = None,
        fold_from: Sequence[int] | None = None,
    ) -> tuple[list[Message], list[Block]]:
        """``submit`` then ``collect``."""
        pending = self.submit(run_id, num_clients, batches, fold_from=fold_from)
        return self.collect(pending, timeout=timeout)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._shm is not None:
            shutil.rmtree(self._shm, ignore_errors=True)
            self._shm = None


def balance(
    items: Sequence[tuple[int, Message]], n_bins: int, cost: Callable[[int], float]
) -> list[Batch]:
    """Longest-processing-time-first assignment of clients to workers (by cost)."""
    bins: list[Batch] = [[] for _ in range(n_bins)]
    heap = [(0.0, i) for i in range(n_bins)]
    for cid, msg in sorted(items, key=lambda it: (-cost(it[0]), it[0])):
        load, i = heapq.heappop(heap)
        bins[i].append((cid, msg))
        heapq.heappush(heap, (load + cost(cid), i))
    for b in bins:
        b.sort(key=lambda it: it[0])
    return bins


def split_ranges(costs: Sequence[float], n_bins: int) -> list[tuple[int, int]]:
    """Cut positions ``0..len(costs)`` into ``n_bins`` contiguous ranges of near-equal cost.

    Each cut goes where the running cost is closest to an equal share, so a range is
    off its share by at most one client's cost (LPT balancing does not need ranges, but
    pre-folding by subtree does).
    """
    total = float(sum(costs))
    bounds = [0]
    acc = 0.0
    pos = 0
    for b in range(1, n_bins):
        target = total * b / n_bins
        while pos < len(costs) and abs(acc + costs[pos] - target) <= abs(acc - target):
            acc += costs[pos]
            pos += 1
        bounds.append(pos)
    bounds.append(len(costs))
    return [(bounds[i], bounds[i + 1]) for i in range(n_bins)]
