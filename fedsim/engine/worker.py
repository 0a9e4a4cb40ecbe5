"""The body of a Ray actor that hosts many virtual clients of one scenario.

Each actor builds the scenario's Flower ClientApp once; the datasets, shards and model
it needs are built on first use and reused (see ``clients.app``). A phase of a round is
one call per actor carrying a batch of messages (``run_packed``), so a round costs one
Ray call per actor, not one task per client.
"""

from __future__ import annotations

import gc
import pickle
import time
from collections.abc import Sequence
from typing import NamedTuple

import ray
from flwr.app import ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from fedsim.engine.claims import claimed
from fedsim.engine.fold import WEIGHT_KEY, Block, Sums, TreeFold, array_record, leaf, records
from fedsim.engine.screening import checked, screen, screened
from fedsim.engine.transport import PackedRecord, Unpickled, hold
from fedsim.engine.validation import ReplyLimits
from fedsim.transforms import Chains


class ClientWorker:
    """Ray actor body: runs the scenario's Flower ClientApp on batches of messages."""

    def __init__(self, spec_json: str, torch_threads: int) -> None:
        import torch

        from clients.app import build_client_app

        torch.set_num_threads(torch_threads)
        self._spec_json = spec_json
        self._app = build_client_app(spec_json)
        self._screening: tuple[Chains, ReplyLimits] | None = None
        self._screens = True  # (see screening)

    @property
    def screening(self) -> tuple[Chains, ReplyLimits]:
        """The scenario's update transforms and what a reply may claim (built with the
        client app's environment)."""
        if self._screening is None:
            from clients.app import _env

            env = _env(self._spec_json)
            scn = env.scenario
            chains = scn.chains()
            self._screening = (
                chains,
                ReplyLimits.of(
                    env.federation, scn.coordinator.max_examples, scn.coordinator.max_reply_bytes
                ),
            )
            # Under an omniscient attack the coordinator crafts the attackers' replies
            # and then screens every training reply itself.
            self._screens = not (scn.attack.active and type(scn.attack).omniscient)
        return self._screening

    def warm(self) -> float:
        """Load data and model and run one client through train and evaluate (replies
        discarded), so the first round measures the round, not lazy start-up work."""
        from flwr.app import ConfigRecord
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
        states: dict[int, RecordDict] | None = None,
    ) -> PhaseOutput:
        """Run the batch's clients in order; return their replies, and the persistent
        state of each client that trained and has one (``states`` brings it in).

        Replies are validated, and training replies go through the scenario's
        per-update transforms (``fedsim.engine.screening``). With ``fold_from`` (the
        cohort position of the batch's first client; the batch is a contiguous range of
        positions) their weighted sum is folded here as clients finish (a few at a time,
        up to ``FOLD_AFTER_BYTES`` of replies), and the replies come back with metrics
        only, together with the partial sums (see ``fedsim.engine.fold``).

        With ``claims`` (a shared phase: ``batch`` is the whole phase) only the clients
        whose index this worker takes from the shared counter run here.
        """
        replies: list[Message | None] = []
        new_states: dict[int, RecordDict] = {}
        states = states or {}
        chains, limits = self.screening
        tree = TreeFold() if fold_from is not None else None
        # Trained replies wait to be screened and folded until they hold FOLD_AFTER_BYTES
        # of arrays (or the batch ends): the screening then runs over several replies in
        # a row instead of between two clients' training, when its code and data have
        # left the CPU's caches (tiny-100of1k: 60 µs less a client,
        # ``benchmarks.client_overhead``). A large model's reply is folded at once.
        waiting: list[Waiting] = []
        wait_for = 1 if tree is None else max(1, FOLD_AFTER_BYTES // max(1, _model_bytes(batch)))
        for pos, (cid, msg) in (
            claimed(batch, claims) if claims else enumerate(batch, start=fold_from or 0)
        ):
            state = states.get(cid)
            context = Context(
                run_id=run_id,
                node_id=msg.metadata.dst_node_id,
                node_config={"partition-id": cid, "num-partitions": num_clients},
                state=RecordDict() if state is None else state,
                run_config={},
            )
            try:
                reply = self._app(msg, context)
            except Exception as exc:  # a failing client is a failed reply, not a crash
                reason = f"{type(exc).__name__}: {exc}"
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
            training = msg.metadata.message_type == MessageType.TRAIN
            if training and not reply.has_error() and (state is not None or len(context.state)):
                new_states[cid] = context.state  # kept by the pool for the client's next task
            if tree is not None:
                waiting.append(Waiting(len(replies), pos, cid, reply, msg))
                replies.append(None)
                if len(waiting) >= wait_for:
                    self._fold_waiting(waiting, tree, replies, chains, limits)
                continue
            if not training:
                reply = checked(reply, msg, cid, limits)
            elif self._screens:  # (else the coordinator screens it: an omniscient attack)
                reply = screened(reply, msg, chains, cid, limits)
            replies.append(reply)
        if tree is None:
            return PhaseOutput(replies, new_states, None)  # type: ignore[arg-type]
        self._fold_waiting(waiting, tree, replies, chains, limits)
        return PhaseOutput(replies, new_states, tree.blocks)  # type: ignore[arg-type]

    def _fold_waiting(
        self,
        waiting: list[Waiting],
        tree: TreeFold,
        replies: list[Message | None],
        chains: Chains,
        limits: ReplyLimits,
    ) -> None:
        """Screen and fold the waiting replies in order (their positions follow the
        tree's), each in its place among ``replies``."""
        for i, pos, cid, reply, msg in waiting:
            replies[i], term = self.fold(reply, msg, chains, cid, limits)
            tree.add(pos, term)
        waiting.clear()

    def run_packed(
        self,
        run_id: int,
        num_clients: int,
        batch: bytes,
        fold_from: int | None = None,
        token: int | None = None,
        record: PackedRecord | None = None,
        claims: str | None = None,
        states: bytes | None = None,
    ) -> bytes | tuple[bytes, list[Block]]:
        """``run`` with the batch and the replies pickled by the caller and here (see
        ``fedsim.engine.transport`` for why).

        Partial sums (a few numpy arrays) are returned as they are: Ray moves them out of
        band through its object store and the driver reads them in place, where pickling
        them in the bytes would copy each model-sized array twice more on each side.

        The batch refers to the phase's shared ArrayRecord by ``token``; ``record`` (put
        in Ray's object store once for all actors when large) comes only when this
        worker does not hold that token yet. ``states`` are the pickled persistent
        states of the batch's clients that have one; the replies come back pickled with
        the states of the clients that trained (``PhaseOutput``).
        """
        if record is not None:
            hold(token, record)  # type: ignore[arg-type]
        items = pickle.loads(batch)
        if claims is not None:  # one pickle per item: unpickle only those taken here
            items = Unpickled(items)
        out = self.run(
            run_id, num_clients, items, fold_from, claims, pickle.loads(states) if states else None
        )
        packed = pickle.dumps((out.replies, out.states), protocol=pickle.HIGHEST_PROTOCOL)
        return packed if fold_from is None else (packed, out.blocks)  # type: ignore[return-value]

    @staticmethod
    def fold(
        reply: Message, msg: Message, chains: Chains, cid: int, limits: ReplyLimits
    ) -> tuple[Message, Sums | None]:
        """The reply's term of the weighted sum (its screened update times its weight),
        and the reply without its model arrays (or the error that left it out)."""
        reply, update = screen(reply, msg, chains, cid, limits)
        if update is None:
            return reply, None
        _, metrics = records(reply.content)
        # Only the model arrays are folded away; any other record stays with the reply.
        model = array_record(reply.content)
        reply.content = RecordDict({k: r for k, r in reply.content.items() if r is not model})
        return reply, leaf(update, chains.weight(float(metrics[WEIGHT_KEY])))  # type: ignore[arg-type]


#: How many bytes of trained replies a worker lets wait before it screens and folds them.
FOLD_AFTER_BYTES = 8 << 20


def _model_bytes(batch: Sequence[tuple[int, Message]]) -> int:
    """The bytes of the model the batch's first instruction carries (0 if none)."""
    first = next(iter(batch), None)
    model = None if first is None or not first[1].has_content() else array_record(first[1].content)
    return 0 if model is None else sum(len(a.data) for a in model.values())


class Waiting(NamedTuple):
    """A trained reply waiting to be folded: its index in the call's replies, its cohort
    position, its client and instruction."""

    index: int
    pos: int
    cid: int
    reply: Message
    msg: Message


class PhaseOutput(NamedTuple):
    """What a worker returns for one call: replies, the persistent states of the clients
    that trained and have one, and the partial sums when it pre-folded."""

    replies: list[Message]
    states: dict[int, RecordDict]
    blocks: list[Block] | None
