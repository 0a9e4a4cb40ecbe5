"""Fixtures for strategy tests: Flower reply messages, a fake grid, one training round."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True, scope="module")
def server_task_identity() -> Iterator[None]:
    """Flower 1.39 stamps every new instruction Message with the process's task identity
    and raises if none is set; Flower's runtimes set it (run_simulation: task 1, node
    SUPERLINK_NODE_ID) before a ServerApp runs. Set it as they do, then restore."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class FakeGrid:
    """The only part of a Grid the strategies read: the node ids they are shown."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


def make_reply(
    w: Sequence[float], *, num_examples: int, train_loss: float = 1.0, node_id: int = 1
) -> Message:
    """A client's train reply carrying model ``{"w": w}``, as fedsim's clients send it."""
    instruction = Message(
        RecordDict({"config": ConfigRecord()}),
        dst_node_id=node_id,
        message_type=MessageType.TRAIN,
    )
    # Flower's grids give every pushed instruction an id (its object id); a reply
    # records that id in reply_to_message_id.
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.asarray(w, dtype=np.float64))}),
            "metrics": MetricRecord({"num-examples": num_examples, "train_loss": train_loss}),
        }
    )
    return Message(content, reply_to=instruction)


def train_round(
    strategy: Strategy,
    *,
    current: Sequence[float],
    replies: list[tuple[Sequence[float], int, float]],
    server_round: int = 1,
) -> tuple[np.ndarray | None, MetricRecord | None]:
    """configure_train with the current model, then aggregate_train the given replies.

    ``replies`` are ``(w, num_examples, train_loss)`` per client, in client-id order.
    """
    node_ids = list(range(1, len(replies) + 1))
    arrays = ArrayRecord({"w": Array(np.asarray(current, dtype=np.float64))})
    messages = list(
        strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(node_ids))
    )
    assert sorted(m.metadata.dst_node_id for m in messages) == node_ids
    reply_messages = [
        make_reply(w, num_examples=n, train_loss=loss, node_id=node)
        for node, (w, n, loss) in zip(node_ids, replies, strict=True)
    ]
    new_arrays, metrics = strategy.aggregate_train(server_round, reply_messages)
    if new_arrays is None:
        return None, metrics
    return new_arrays["w"].numpy(), metrics


@pytest.fixture(scope="session")
def fake_grid() -> type[FakeGrid]:
    return FakeGrid


@pytest.fixture(scope="session")
def reply() -> Callable[..., Message]:
    return make_reply


@pytest.fixture(scope="session")
def one_round() -> Callable[..., Any]:
    return train_round
