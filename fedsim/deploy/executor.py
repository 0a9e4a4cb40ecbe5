"""``fedsim node``'s task executor: the node's ClientApp tasks run inside the ``fedsim
node`` process, one after another, with the scenario's data and model built once.

Flower's SuperNode (``--isolation process``) queues each message it receives as a task
on its local Runtime API; Flower's own executor starts a fresh ``flwr-clientapp``
process per task, which imports torch, loads the data and builds the model every time
(measured here: seconds per message, most of a small round). This executor claims the
tasks itself, the way Flower's SuperExec does (``AcquireTask``, then the task's token
for ``PullTaskInput`` / ``PushMessages`` / ``PushTaskOutput``, heartbeats while it
runs), and calls fedsim's ClientApp in this process, where its caches live.

It talks only to the SuperNode's Runtime API on 127.0.0.1 (plain HTTP on the node's own
loopback; the link to the SuperLink is the SuperNode's TLS gRPC).

It asks for a task when woken: ``fedsim node`` sets ``wake`` when the SuperNode logs
that it received a message (``RECEIVED``, logged once the task is queued), and without
a wake-up it asks every ``IDLE_POLL_S`` all the same (so a Flower that logs otherwise
still works, a little slower). Polling every 50 ms instead cost each idle node 20 HTTP
requests a second to its SuperNode, which with tens of nodes on one machine was load of
its own.
"""

from __future__ import annotations

import logging
import threading

from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp

__all__ = ["serve_tasks"]

log = logging.getLogger("fedsim.node")

POLL_S = 0.05  # without a wake-up signal: how often to ask for a task
IDLE_POLL_S = 0.5  # with one: how often to ask all the same
RECEIVED = "Received successfully"  # what Flower 1.39's SuperNode logs per message


def _client(
    address: str, *, token: str | None = None, component: str, retry: bool = True
) -> object:
    """A client of the SuperNode's runtime API; with ``retry``, its calls ride out the
    SuperNode's absence with Flower's backoff (up to 10 s between tries), for ever."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker() if retry else None,
    )


def run_task(address: str, token: str, app: ClientApp) -> bool:
    """Run one claimed ClientApp task; True if the app returned a reply."""
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client = _client(address, token=token, component="flwr-clientapp")
    beat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    beat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _run, _fab = pull_task_input(client)  # (fedsim's app, not the FAB's)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # the client's failure is its reply; the node goes on
        reason = f"{type(ex)}:<'{ex}'>"
        log.error("ClientApp raised: %s", reason)
        details = reason
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=message,
            )
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:  # (not the client's fault: the task ends, the node goes on)
            # Seen: a reply that comes after its instruction's time to live (a client
            # slower than the round timeout, or cut off the network for a while): the
            # SuperLink no longer wants it, the SuperNode has let the message go, and
            # the reply's objects have nowhere to go.
            status, details = SubStatus.FAILED, f"the reply could not be handed over: {ex}"
            log.warning(
                "fedsim node: the reply to a %s message could not be handed to the SuperNode "
                "(%s: %s); a reply that comes after its instruction's time to live (the "
                "round timeout) is not wanted any more",
                reply.metadata.message_type,
                type(ex).__name__,
                ex,
            )
        finally:
            beat.stop()
            try:
                push_task_output(client, context, status, details)
            except Exception as ex:
                log.warning("fedsim node: the task's end could not be reported: %s", ex)
            client.close()
    return status == SubStatus.COMPLETED


def serve_tasks(
    address: str, app: ClientApp, stop: threading.Event, wake: threading.Event | None = None
) -> None:
    """Claim and run the SuperNode's ClientApp tasks until ``stop`` is set (set ``wake``
    too, then, if given: it ends the wait for the next task)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    # (no retry of its own: this loop retries, and sees ``stop`` between tries, where
    # Flower's backoff held a stopping node for up to 5 s more once its SuperNode was gone)
    client = _client(address, component="SuperExec", retry=False)
    try:
        while not stop.is_set():
            if wake is not None:
                wake.clear()  # (a message received from here on wakes the next wait)
            try:
                res = client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
                )
            except Exception as ex:  # the SuperNode not up yet, or going down
                log.debug("AcquireTask: %s", ex)
                stop.wait(0.5)
                continue
            if res.HasField("task") and res.token:
                try:
                    run_task(address, res.token, app)
                except Exception as ex:  # one task's failure must not stop the node's work
                    log.warning(
                        "fedsim node: a ClientApp task failed: %s: %s", type(ex).__name__, ex
                    )
            elif wake is not None:
                wake.wait(IDLE_POLL_S)
            else:
                stop.wait(POLL_S)
    finally:
        client.close()
