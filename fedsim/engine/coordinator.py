"""The coordinator: fedsim's round loop wrapped around any Flower strategy.

It owns the policies a strategy should not have to know about: which clients take part
(sampled with fedsim's own seeded generator, not the global ``random`` that Flower's
``sample_nodes`` reads), the order replies are aggregated in (by client id, so worker
timing never changes a result), failed replies, and the per-round record.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.engine.fold import Block, fold_weighted_mean, num_examples
from fedsim.rng import int_seed, np_rng

log = logging.getLogger("fedsim")

RoundHook = Callable[[dict[str, Any]], None]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class AllClientsFailed(RuntimeError):
    """Every client of a phase failed: almost always a bug or a bad setting, not churn."""


class Stopped(RuntimeError):
    """The engine asked the coordinator to stop (the runtime failed or was interrupted)."""


POLL_S = 0.02


def exchange(
    grid: Grid,
    messages: list[Message],
    *,
    timeout: float | None = None,
    stop: threading.Event | None = None,
) -> list[Message]:
    """Send messages and collect replies.

    fedsim's grid delivers synchronously (no polling). Other grids (Flower's runtime,
    a real SuperLink) are pulled in short steps so a ``stop`` request ends the wait.
    """
    if hasattr(grid, "client_directory") or stop is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        if stop.is_set():
            raise Stopped("stopped while waiting for client replies")
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if deadline is not None and time.monotonic() > deadline:
            break
        if pending and not got:
            time.sleep(POLL_S)
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
    ) -> ClientDirectory:
        """Ask every node for its ``partition-id`` (Flower runtime or real SuperNodes).

        fedsim's own grid knows the mapping and is asked directly instead.
        """
        if hasattr(grid, "client_directory"):
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
            cid = int(reply.content.metric_records["info"]["partition-id"])
            if cid in node_of:
                raise RuntimeError(f"two nodes claim partition-id {cid}")
            node_of[cid] = reply.metadata.src_node_id
        missing = sorted(set(range(num_clients)) - set(node_of))
        if missing:
            raise RuntimeError(f"no node answered for client ids {missing[:10]}")
        return cls(node_of)


def sample_clients(seed: int, server_round: int, phase: str, k: int, num_clients: int) -> list[int]:
    """k distinct client ids, sorted, drawn from the run seed for this round and phase."""
    if k >= num_clients:
        return list(range(num_clients))
    rng = np_rng(seed, f"sample-{phase}", server_round)
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


@dataclass
class CoordinatorResult:
    arrays: ArrayRecord
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial_eval: dict[str, float] | None = None


def _get(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])  # type: ignore[arg-type]


class Coordinator:
    """Runs ``rounds`` rounds of ``strategy`` over a grid, with seeded sampling."""

    def __init__(
        self,
        *,
        strategy: Strategy,
        initial_arrays: ArrayRecord,
        num_clients: int,
        rounds: int,
        train_cohort: int,
        eval_cohort: int,
        seed: int,
        evaluate_fn: EvaluateFn | None = None,
        on_round: RoundHook | None = None,
        reply_timeout_s: float | None = None,
        stop: threading.Event | None = None,
        evaluate_trained: bool = False,
        fold_train: bool = False,
    ) -> None:
        self.strategy = strategy
        self.initial_arrays = initial_arrays
        self.num_clients = num_clients
        self.rounds = rounds
        self.train_cohort = train_cohort
        self.eval_cohort = eval_cohort
        self.seed = seed
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round
        self.reply_timeout_s = reply_timeout_s
        self.stop = stop
        self.evaluate_trained = evaluate_trained
        # Hand a weighted-mean strategy one folded reply instead of the whole cohort.
        self.fold_train = fold_train

    def sample(self, server_round: int, phase: str, k: int) -> list[int]:
        return sample_clients(self.seed, server_round, phase, k, self.num_clients)

    def _exchange(
        self,
        grid: Grid,
        directory: ClientDirectory,
        messages: Iterable[Message],
        phase: str,
        server_round: int,
        fold: bool = False,
    ) -> tuple[list[Message | None], int, int, list[Message], list[Block] | None]:
        """Send, then return the replies in cohort order (by client id; None if missing).

        With ``fold`` and a grid that can pre-fold (fedsim's), the replies carry metrics
        only and the partial sums of their arrays come back as blocks.
        """
        msgs = sorted(messages, key=lambda m: directory.client_of(m.metadata.dst_node_id))
        blocks = None
        if fold and hasattr(grid, "send_and_fold"):
            replies, blocks = grid.send_and_fold(msgs, timeout=self.reply_timeout_s)
        else:
            replies = exchange(grid, msgs, timeout=self.reply_timeout_s, stop=self.stop)
        by_id = {r.metadata.reply_to_message_id: r for r in replies}
        ordered = [by_id.get(m.metadata.message_id) for m in msgs]
        errors = [r for r in replies if r.has_error()]
        ok = len(replies) - len(errors)
        failed = len(msgs) - ok
        if msgs and ok == 0:
            reason = errors[0].error.reason if errors else "no replies before the timeout"
            raise AllClientsFailed(
                f"round {server_round}: all {len(msgs)} clients failed in {phase}: {reason}"
            )
        if errors:
            log.warning(
                "round %d %s: %d client(s) failed, e.g. %s",
                server_round,
                phase,
                len(errors),
                errors[0].error.reason.strip().splitlines()[-1:],
            )
        return ordered, ok, failed, msgs, blocks

    def _phase(
        self,
        grid: Grid,
        directory: ClientDirectory,
        server_round: int,
        phase: str,
        cids: list[int],
        arrays: ArrayRecord,
        fold: bool = False,
    ) -> tuple[list[Message | None], int, int, list[Message], list[Block] | None]:
        """Let the strategy configure ``phase`` for exactly ``cids``, then exchange."""
        if phase == "train":
            configure, key = self.strategy.configure_train, 0
        else:
            configure, key = self.strategy.configure_evaluate, 1
        view = SubsetGrid(grid, [directory.node_of(c) for c in cids])
        with pinned_global_random(int_seed(self.seed, "strategy-random", server_round, key)):
            msgs = configure(server_round, arrays, ConfigRecord(), view)
        return self._exchange(grid, directory, msgs, phase, server_round, fold)

    def run(self, grid: Grid) -> CoordinatorResult:
        directory = ClientDirectory.discover(grid, self.num_clients, stop=self.stop)
        arrays = self.initial_arrays
        result = CoordinatorResult(arrays=arrays)
        if self.evaluate_fn is not None:
            init = self.evaluate_fn(0, arrays)
            if init is not None:
                result.initial_eval = {k: float(v) for k, v in init.items()}  # type: ignore[arg-type]

        for rnd in range(1, self.rounds + 1):
            t0 = time.perf_counter()
            record: dict[str, Any] = {"round": rnd}

            cids = self.sample(rnd, "train", self.train_cohort)
            ordered, ok, failed, sent, blocks = self._phase(
                grid, directory, rnd, "train", cids, arrays, fold=self.fold_train
            )
            if self.fold_train and sent:
                folded = fold_weighted_mean(
                    ordered, with_arrays=True, reply_to=sent[0], blocks=blocks
                )
                replies = [folded] if folded is not None else []
            else:
                replies = [r for r in ordered if r is not None]
            new_arrays, train_metrics = self.strategy.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = new_arrays
            record["train_loss"] = _get(train_metrics, "train_loss")
            record["clients_selected"] = len(cids)
            record["clients_replied"] = ok
            record["clients_failed"] = failed

            client_eval: MetricRecord | None = None
            if self.eval_cohort > 0:
                if self.evaluate_trained:
                    ecids = cids
                else:
                    ecids = self.sample(rnd, "evaluate", self.eval_cohort)
                eordered, _, _, esent, _ = self._phase(
                    grid, directory, rnd, "evaluate", ecids, arrays
                )
                # A client with an empty held-out split has nothing to report.
                ereplies = [
                    r
                    for r in eordered
                    if r is not None and not r.has_error() and num_examples(r) > 0
                ]
                if ereplies:
                    # Every Flower strategy averages evaluation metrics by num-examples.
                    folded = fold_weighted_mean(ereplies, with_arrays=False, reply_to=esent[0])
                    client_eval = self.strategy.aggregate_evaluate(rnd, [folded])
            record["client_eval_loss"] = _get(client_eval, "eval_loss")
            record["client_eval_accuracy"] = _get(client_eval, "eval_accuracy")

            central = self.evaluate_fn(rnd, arrays) if self.evaluate_fn is not None else None
            record["eval_loss"] = _get(central, "eval_loss")
            record["eval_accuracy"] = _get(central, "eval_accuracy")
            record["round_wall_s"] = time.perf_counter() - t0
            result.rounds.append(record)
            if self.on_round is not None:
                self.on_round(record)

        result.arrays = arrays
        return result
