"""``fedsim node`` reads its SuperNode's output (Flower 1.39's own lines) for refusals
and for the two ways it was seen stuck after losing its SuperLink; its executor stops
at once when asked, SuperNode or not."""

from __future__ import annotations

import inspect

from fedsim.deploy.executor import RECEIVED
from fedsim.deploy.node import GAVE_UP, GAVE_UP_GRACE_S, LINK_CLOSED, SILENT_S, STALE_ID, _Watch

CANCELLED = (
    "ERROR :     [RUN 0] gRPC error occurred: <_MultiThreadedRendezvous of RPC that "
    "terminated with: status = StatusCode.CANCELLED ..."
)
GIVING_UP = "ERROR :     Giving up reconnection after 15.00 seconds and 4 tries."
RETRY = "WARNING :   Connection attempt failed, retrying in 2.31 seconds"
NOT_REGISTERED = (
    "ERROR :     Failed to activate SuperNode: No SuperNode found with the given public key"
)


def test_a_supernode_that_gave_up_and_stays_is_stuck_after_the_grace():
    w = _Watch()
    w.see(GIVING_UP, 100.0)
    assert w.stuck(100.0 + GAVE_UP_GRACE_S - 0.1) == ""
    assert "gave up" in w.stuck(100.0 + GAVE_UP_GRACE_S + 0.1)


def test_a_supernode_silent_after_a_cancelled_stream_is_stuck():
    w = _Watch()
    w.see(CANCELLED, 10.0)
    assert w.stuck(10.0 + SILENT_S - 1) == ""
    assert "silent" in w.stuck(10.0 + SILENT_S + 1)


def test_one_that_retries_after_the_cancelled_stream_is_not():
    w = _Watch()
    w.see(CANCELLED, 10.0)
    w.see(RETRY, 12.0)
    assert w.stuck(10.0 + SILENT_S + 60) == ""


def test_a_refusal_is_named_once_per_line():
    w = _Watch()
    w.see(NOT_REGISTERED, 0.0)
    w.see("INFO :      Starting Flower SuperNode", 1.0)
    assert len(w.refused) == 1 and "public key is not registered" in w.refused[0]
    assert w.stuck(1000.0) == ""


def test_a_supernode_asked_to_stop_that_stays_is_stuck():
    w = _Watch()
    assert w.see_stale(50.0) and not w.see_stale(51.0)  # (asked once)
    assert w.renew and w.stuck(50.0 + GAVE_UP_GRACE_S - 0.1) == ""
    assert "did not stop" in w.stuck(50.0 + GAVE_UP_GRACE_S + 0.1)


def test_the_lines_watched_for_are_flowers_own():
    # (if Flower stops printing one, the watch, or the executor's wake-up, goes blind)
    import flwr.server.superlink.fleet.grpc_rere.node_auth_server_interceptor as auth
    import flwr.supercore.retry.grpc_retry as retry
    import flwr.supernode.start_client_internal as sci

    assert RECEIVED in inspect.getsource(sci)
    assert GAVE_UP in inspect.getsource(retry)
    assert STALE_ID in inspect.getsource(auth)
    assert LINK_CLOSED == "StatusCode.CANCELLED"


def test_the_executor_stops_at_once_while_its_supernode_is_gone():
    """Its idle loop retries the SuperNode's runtime API itself and sees ``stop``
    between tries (Flower's retrying client held it in a backoff of up to 10 s: a
    stopped ``fedsim node`` whose SuperNode had gone took 4-6 s more to exit)."""
    import threading
    import time

    from flwr.clientapp import ClientApp

    from fedsim.deploy.executor import serve_tasks
    from fedsim.deploy.processes import free_port

    stop = threading.Event()
    t = threading.Thread(
        target=serve_tasks, args=(f"127.0.0.1:{free_port()}", ClientApp(), stop), daemon=True
    )
    t.start()
    time.sleep(3.0)  # (nothing listens there: Flower's backoff would be 2-4 s by now)
    stop.set()
    t.join(timeout=2.0)
    assert not t.is_alive()
