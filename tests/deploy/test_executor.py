"""``fedsim node``'s task executor against Flower's own SuperNode Runtime API (its
FastAPI app and node state, in this process, on loopback): a reply the SuperNode lets
go before its objects arrive ends that task, not the node's work.

That happens to a reply that comes after its instruction's time to live: the
SuperNode's push stage forwards the reply's message, the SuperLink no longer wants it,
and the SuperNode deletes the message and its objects, while the executor may still be
pushing them. In a real deployment that is a race (the SuperNode checks for replies
every few hundred milliseconds); here the SuperNode's push stage, Flower's own
``_push_messages``, runs at the moment the executor first pushes an object of the late
reply, so the race goes the bad way every time.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from .conftest import wait_for

RUN_ID = 7
NODE_ID = 11


def _instruction(node) -> str:
    """A train instruction from the SuperLink, stored as Flower's SuperNode stores one
    it pulled (``_insert_message`` with a ClientApp task for it)."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from flwr.app.message import make_message
    from flwr.app.metadata import Metadata
    from flwr.supercore.constant import TaskType
    from flwr.supernode.start_client_internal import _insert_message

    msg = make_message(
        metadata=Metadata(
            run_id=RUN_ID,
            message_id="",
            src_node_id=0,
            dst_node_id=NODE_ID,
            reply_to_message_id="",
            group_id="1",
            created_at=time.time(),
            ttl=60.0,
            message_type="train",
        ),
        content=RecordDict(
            {"arrays": ArrayRecord([np.zeros(4, np.float32)]), "config": ConfigRecord({})}
        ),
    )
    assert node.state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=node.fab)
    _insert_message(msg, node.state, node.state.object_store)
    return msg.metadata.message_id


@pytest.fixture
def supernode():
    """Flower's SuperNode Runtime API, on a free loopback port, with a node state
    holding one run. Instructions whose ids the test adds to ``late`` get replies the
    SuperLink no longer wants; ``let_go`` gathers those the push stage let go."""
    import dataclasses
    from types import SimpleNamespace

    import uvicorn
    from flwr.app import Context, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.main import create_app
    from flwr.supernode.nodestate import NodeStateFactory
    from flwr.supernode.start_client_internal import _push_messages

    from fedsim.deploy.processes import free_port

    factory = NodeStateFactory(ObjectStoreFactory())
    state = factory.state()
    store = state.object_store
    state.set_node_id(NODE_ID)
    fab = state.store_fab(Fab(hash_str="", content=b"fedsim test", verifications={}))
    run = dataclasses.replace(Run.create_empty(RUN_ID), fab_hash=fab, primary_task_type="")
    state.store_run(run)
    state.set_run_series_context(
        run.series_id,
        Context(run_id=RUN_ID, node_id=NODE_ID, node_config={}, state=RecordDict(), run_config={}),
    )
    late: set[str] = set()
    let_go: set[str] = set()

    def send(message, tree, runtime):
        """The SuperLink's answer to a late reply: it wants none of its objects."""
        let_go.add(message.metadata.reply_to_message_id)
        return set(), "session"

    app = create_app(state_factory=factory)

    @app.middleware("http")
    async def supernode_push_stage_first(request, call_next):
        # The executor pushes a reply's objects: the SuperNode's push stage runs first
        # (for a late reply it forwards the message and lets it go, objects and all).
        if request.url.path == "/v1/runtime/push-object" and late - let_go:
            _push_messages(state, store, send, lambda *a: None)
        return await call_next(request)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "Runtime API did not start"
        time.sleep(0.05)
    try:
        yield SimpleNamespace(
            address=f"127.0.0.1:{port}", state=state, fab=fab, late=late, let_go=let_go
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _finished(state) -> list:
    from flwr.common.constant import Status

    return [t for t in state.get_tasks() if t.status.status == Status.FINISHED]


def test_a_reply_the_supernode_let_go_ends_its_task_and_the_node_takes_the_next(supernode, caplog):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.constant import SubStatus

    from fedsim.deploy.executor import serve_tasks

    node = supernode
    app = ClientApp()
    trained: list[str] = []

    @app.train()
    def train(msg: Message, context) -> Message:
        trained.append(msg.metadata.message_id)
        arrays = ArrayRecord([np.ones(1000, np.float32) * k for k in range(3)])
        content = {"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}
        return Message(RecordDict(content), reply_to=msg)

    stop, wake = threading.Event(), threading.Event()
    worker = threading.Thread(target=serve_tasks, args=(node.address, app, stop, wake), daemon=True)
    first = _instruction(node)
    node.late.add(first)
    caplog.set_level(logging.WARNING, logger="fedsim.node")
    worker.start()
    try:
        wake.set()
        wait_for(lambda: _finished(node.state), 30, "the first task to end", every_s=0.05)
        done = _finished(node.state)
        assert node.let_go == {first}  # (the race went the bad way)
        assert len(done) == 1
        assert done[0].status.sub_status == SubStatus.FAILED, done[0].status
        assert "could not be handed over" in done[0].status.details
        assert any("could not be handed to the SuperNode" in r.message for r in caplog.records)
        # ... and the executor takes the next message (before the fix its thread had
        # died with the ObjectPushError: no task was ever claimed again).
        second = _instruction(node)
        wake.set()
        wait_for(
            lambda: len(_finished(node.state)) == 2,
            30,
            "the node to take and end a task after the late reply",
            every_s=0.05,
        )
        done = _finished(node.state)
        assert trained == [first, second]
        assert sorted(t.status.sub_status for t in done) == [
            SubStatus.COMPLETED,
            SubStatus.FAILED,
        ]
        assert worker.is_alive()
    finally:
        stop.set()
        wake.set()
        worker.join(timeout=10)
