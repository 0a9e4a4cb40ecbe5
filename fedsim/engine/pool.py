"""A pool of Ray actors, each hosting many virtual clients of one scenario.

The pool submits a round's phases to its actors (``fedsim.engine.worker``) and collects
the replies, replacing actors that fail. A phase is one Ray call per actor, carrying
that actor's whole batch of messages (cut by ``fedsim.engine.schedule``, pickled by
``fedsim.engine.transport``): no per-client task, no polling. The global model goes to
an actor only when it does not hold it yet (tokens, see ``_token``), and several
phases may be queued on the actors at once (``submit``, then ``collect``).

A phase whose replies are not pre-folded (evaluation; training for strategies that need
every reply) can instead be *shared*: every actor gets the whole phase and takes its
next client from a counter in a file the actors share (``fedsim.engine.claims``), so a
worker that finished its training early evaluates more clients, and none waits for the
other. Which worker runs a client never changes its reply. Sharing needs the actors on
the driver's machine (a one-node Ray cluster); otherwise each actor gets a fixed batch.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from flwr.app import ArrayRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedsim.engine.claims import new_counter, shm_dir
from fedsim.engine.fold import Block, TreeFold
from fedsim.engine.malloc import WORKER_ENV
from fedsim.engine.transport import Batch, pack_batch, record_arg, shared_record
from fedsim.engine.worker import ClientWorker


@dataclass
class Pending:
    """A phase submitted to the pool and not yet collected."""

    batches: list[Batch]  # one per actor; a shared phase: one, the whole phase
    fold_from: Sequence[int] | None
    record: ArrayRecord | None  # the shared record (global model), sent by token
    token: int | None
    claims: str | None = None  # a shared phase's counter file
    states: dict[int, bytes] = field(default_factory=dict)  # slot -> its clients' states
    record_arg: Any = None  # the packed record (or its object ref), made on first need
    # slot -> (object ref of the call, its leading arguments)
    calls: dict[int, tuple[ray.ObjectRef, list]] = field(default_factory=dict)


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
        # Each client's persistent state (Flower's Context.state), by client id: sent with
        # its next task, whichever actor runs it. Clients without one cost nothing.
        self.states: dict[int, RecordDict] = {}

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
            self._shm, self._shm_lock = shm_dir()

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
        record = shared_record(batches)
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
                calls.append((i, [run_id, num_clients, pack_batch(b, record, token), start]))
                self._attach_states(pending, i, b)
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
        ``shares_work``; elsewhere ``submit`` fixed batches
        (``fedsim.engine.schedule.balance``)."""
        if self._shm is None:
            raise RuntimeError("the actors cannot share a phase: submit fixed batches")
        items = sorted(items, key=lambda it: (-cost(it[0]), it[0]))
        self._phases += 1
        path = os.path.join(self._shm, str(self._phases))
        new_counter(path)
        pending = self._pending([items], claims=path)
        packed = pack_batch(items, pending.record, pending.token, each=True)
        if items:
            self._attach_states(pending, 0, items)
            for i in range(1, self.size):  # every actor may take any client: the same states
                if 0 in pending.states:
                    pending.states[i] = pending.states[0]
            for i in range(self.size):
                self._call(pending, i, [run_id, num_clients, packed, None])
        return pending

    def _attach_states(self, pending: Pending, i: int, batch: Batch) -> None:
        """Send slot ``i`` the persistent states of its batch's clients that have one."""
        if self.states:
            mine = {cid: self.states[cid] for cid, _ in batch if cid in self.states}
            if mine:
                pending.states[i] = pickle.dumps(mine, protocol=pickle.HIGHEST_PROTOCOL)

    def _call(self, pending: Pending, i: int, args: list) -> None:
        """Submit ``pending``'s call for slot ``i`` to the actor now in that slot,
        with the shared record when that actor does not hold it yet."""
        send = None
        if pending.token is not None and self._held[i] != pending.token:
            if pending.record_arg is None:  # once per phase, for every actor that needs it
                pending.record_arg = record_arg(pending.record)  # type: ignore[arg-type]
            send = pending.record_arg
        ref = self.actors[i].run_packed.remote(
            *args, pending.token, send, pending.claims, pending.states.get(i)
        )
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
                packed, got_blocks = (got, None) if fold_from is None else got
                got_replies, got_states = pickle.loads(packed)
            except ray.exceptions.RayError as exc:
                # The actor died (e.g. out of memory), or its call raised: its clients
                # fail this phase, and a live actor is killed so its CPUs come back for
                # the replacement.
                failure = f"worker failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                with contextlib.suppress(Exception):
                    ray.kill(self.actors[i])
                if pending.claims is None:
                    replies.extend(
                        Message(Error(ErrorCode.CLIENT_APP_CRASHED, failure), reply_to=m)
                        for _, m in batches[i]
                    )
                lost.append(i)
                self._replace(i)
                continue
            replies.extend(got_replies)
            self.states.update(got_states)
            if got_blocks is not None:
                blocks.extend(got_blocks)
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
            os.close(self._shm_lock)
            self._shm = None
