"""The SuperLink fedsim starts (``fedsim.deploy.fleet``: Flower's ``flower-superlink``
with its Fleet API bounded) refuses node messages over its limit, on loopback.

Here with a raw gRPC client (a node that registers its key, signs its requests as
Flower's SuperNode does, and has no run): one gRPC message over the Fleet API's bound is
refused by gRPC before it is read, and a push outside an object-push session (which
nothing could count) is refused by fedsim's servicer. A reply pushed in many
objects past the limit is refused in a real run by tests/deploy/test_deployment.py.
"""

from __future__ import annotations

import grpc
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


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    port = free_port()
    scn = load_scenario(
        None,
        [
            "simulation.engine=deployment",
            "deployment.insecure=true",
            f"deployment.fleet_address=127.0.0.1:{port}",
        ],
    )
    with SuperLink(scn.deployment, tmp_path_factory.mktemp("fleet"), LIMIT) as link:
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
        )
        key = ec.generate_private_key(ec.SECP384R1())
        signed = grpc.intercept_channel(channel, NodeAuthClientInterceptor(key, key.public_key()))
        try:
            stub = FleetStub(signed)
            pem = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            node_id = stub.RegisterNode(RegisterNodeFleetRequest(public_key=pem)).node_id
            yield stub, node_id
        finally:
            channel.close()
    assert not link.process.alive()


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


def test_a_push_outside_a_session_is_refused_by_fedsims_servicer(fleet):
    err = _push(fleet, b"x" * 10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "without a session" in err.details()


def test_a_push_in_a_session_the_superlink_never_opened_is_flowers_to_answer(fleet):
    # (an unknown session: Flower's own checks answer, here that run 1 does not exist)
    err = _push(fleet, b"x" * 10, session_id="no-such-session")
    assert err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "without a session" not in err.details()


def test_a_chunk_of_flowers_size_fits_the_bound():
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    assert grpc_limit(0) > CHUNK_BYTES >= FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
