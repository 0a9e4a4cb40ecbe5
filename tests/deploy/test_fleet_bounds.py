"""The SuperLink fedsim starts (``fedsim.deploy.fleet``: Flower's ``flower-superlink``
with its Fleet API bounded) refuses node messages over its limit, on loopback.

Here with a raw gRPC client (a node that registers its key, signs its requests as
Flower's SuperNode does, and has no run): one gRPC message over the Fleet API's bound is
refused by gRPC before it is read, and a push outside an object-push session (which
nothing could count) is refused by fedsim's servicer. A reply pushed in many
objects past the limit is refused in a real run by tests/deploy/test_deployment.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.client.grpc_rere_client.node_auth_client_interceptor import NodeAuthClientInterceptor
from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
from flwr.proto.fleet_pb2_grpc import FleetStub
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node

from fedsim.deploy.fleet import CHUNK_BYTES, grpc_limit
from fedsim.deploy.processes import free_port
from fedsim.deploy.superlink import SuperLink
from fedsim.scenario import load_scenario

LIMIT = 1000


@contextlib.contextmanager
def _bounded(folder, limit: int):
    """fedsim's SuperLink (insecure, loopback) refusing replies over ``limit``, and a
    node: a Fleet stub signing its requests as Flower's SuperNode does, with its key
    registered. Yields (link, scenario, stub, public key PEM, node id)."""
    port = free_port()
    scn = load_scenario(
        None,
        [
            "simulation.engine=deployment",
            "deployment.insecure=true",
            f"deployment.fleet_address=127.0.0.1:{port}",
        ],
    )
    with (
        SuperLink(scn.deployment, folder, limit) as link,
        grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        ) as channel,
    ):
        key = ec.generate_private_key(ec.SECP384R1())
        stub = FleetStub(
            grpc.intercept_channel(channel, NodeAuthClientInterceptor(key, key.public_key()))
        )
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        node_id = stub.RegisterNode(RegisterNodeFleetRequest(public_key=pem)).node_id
        yield link, scn, stub, pem, node_id
    assert not link.process.alive()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with _bounded(tmp_path_factory.mktemp("fleet"), LIMIT) as (_, _, stub, _, node_id):
        yield stub, node_id


def _push(fleet, content: bytes, session_id: str = "") -> grpc.RpcError:
    stub, node_id = fleet
    request = PushObjectRequest(
        node=Node(node_id=node_id),
        run_id=1,
        session_id=session_id,
        object_id="0" * 64,
        object_content=content,
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.PushObject(request, timeout=30)
    return err.value


def test_a_grpc_message_over_the_bound_is_refused_before_it_is_read(fleet):
    err = _push(fleet, b"\0" * (grpc_limit(LIMIT) + 1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "larger than max" in err.details()


@pytest.mark.parametrize(
    ("session", "words"),
    [("", "without a session"), ("no-such-session", "outside a session this SuperLink opened")],
)
def test_a_push_outside_a_session_it_opened_is_refused_by_fedsims_servicer(fleet, session, words):
    err = _push(fleet, b"x" * 10, session_id=session)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and words in err.details()


def test_a_chunk_of_flowers_size_fits_the_bound():
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    assert grpc_limit(0) > CHUNK_BYTES >= FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE


@pytest.mark.parametrize("taken", ["after", "while pushed"])
def test_a_reply_pushed_past_the_limit_is_refused_and_answered_with_an_error(tmp_path, taken):
    """A real run on the bounded SuperLink: the coordinator's grid sends an instruction,
    a node (this test, with Flower's own protocol) pushes a 160 KB reply in 40 arrays
    against a 64 KiB limit, most of it in one push session and the rest in another (a
    new session must not start a new count). The object that passes the limit is
    refused, and so is pushing the reply again. The coordinator gets an error reply
    that names the limit, whether it takes the reply after the refusal (the SuperLink
    stored the error in its place) or "while pushed": Flower hands over a reply as soon
    as its message is pushed, so the grid is pulling the reply's objects when they are
    refused and dropped (the SuperLink's "not found" then names the refusal)."""

    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.fleet_pb2 import (
        ActivateNodeRequest,
        PullMessagesRequest,
        PushMessagesRequest,
    )
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        iterate_object_tree,
    )

    from fedsim.deploy.superlink import DeployedRun
    from fedsim.engine.screening import REJECTED

    limit = 64 * 1024
    with _bounded(tmp_path, limit) as (link, scn, stub, pem, _):
        activated = stub.ActivateNode(ActivateNodeRequest(public_key=pem, heartbeat_interval=30))
        node = Node(node_id=activated.node_id)
        with DeployedRun(
            link.http_address,
            scn.model_dump_json(),
            insecure=True,
            root_certificates=None,
            max_reply_bytes=limit,
        ) as run:
            grid = run.grid
            out = Message(
                RecordDict({"config": ConfigRecord({"server-round": 1})}),
                dst_node_id=node.node_id,
                message_type="train",
            )
            (sent,) = grid.push_messages([out])
            pulled = stub.PullMessages(PullMessagesRequest(node=node))
            instruction = message_from_proto(pulled.messages_list[0])
            # 160 KB in 40 arrays of 4 KB (distinct: Flower stores an object by its hash)
            arrays = {
                f"w{i}": Array(np.arange(i * 1000, (i + 1) * 1000, dtype=np.float32))
                for i in range(40)
            }
            reply = Message(RecordDict({"arrays": ArrayRecord(arrays)}), reply_to=instruction)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            tree = get_object_tree(reply)
            objects = {k: o.deflate() for k, o in get_all_nested_objects(reply).items()}

            def push_reply(most: int = 10**9, then: Any = None) -> int:
                """Push the reply's missing objects, stopping before ``most`` bytes (or
                calling ``then`` there and going on in the same session); the bytes
                pushed."""
                res = stub.PushMessages(
                    PushMessagesRequest(
                        node=node,
                        messages_list=[message_to_proto(reply)],
                        message_object_trees=[tree],
                    )
                )
                pushed = 0
                for t in iterate_object_tree(tree):
                    if t.object_id in res.objects_to_push:
                        if pushed + len(objects[t.object_id]) > most:
                            if then is None:
                                break
                            then, most = then(), 10**9
                        pushed += len(objects[t.object_id])
                        stub.PushObject(
                            PushObjectRequest(
                                node=node,
                                run_id=instruction.metadata.run_id,
                                session_id=res.session_id,
                                object_id=t.object_id,
                                object_content=objects[t.object_id],
                            )
                        )
                return pushed

            def take() -> list[Message]:
                for _ in range(50):
                    if replies := grid.pull_messages([sent]):
                        return replies
                    time.sleep(0.1)
                return []

            got: list[list[Message]] = []
            taker = threading.Thread(target=lambda: got.append(take()))

            def hand_over() -> None:
                """Let the grid take the reply; return once it pulls its objects."""
                asked, pull = threading.Event(), grid._runtime_client.PullObject

                def pull_object(request: Any) -> Any:
                    asked.set()
                    return pull(request)

                grid._runtime_client.PullObject = pull_object
                taker.start()
                assert asked.wait(30)

            with pytest.raises(grpc.RpcError) as err:
                if taken == "after":
                    # Most of the limit in one session, the rest in a new one: one count.
                    assert limit - 6000 < push_reply(limit - 1000) <= limit - 1000
                    push_reply(limit - 1000)
                else:
                    push_reply(limit - 1000, then=hand_over)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "exceeds the limit of 65536 bytes" in err.value.details()
            with pytest.raises(grpc.RpcError) as again:
                push_reply()
            assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            if taken == "while pushed":
                taker.join(60)
                (replies,) = got
            else:
                replies = take()
            (answer,) = replies
            assert answer.has_error() and answer.error.code == REJECTED
            assert answer.error.reason == (
                "rejected: reply exceeds the limit of 65536 bytes (refused at the SuperLink)"
            )
