"""Flower's own SuperLink (``flower-superlink``), refusing node messages over a limit.

``python -m fedsim.deploy.fleet --max-message-bytes N [flower-superlink arguments]``

Flower 1.39's SuperLink takes whatever a SuperNode pushes: a reply arrives as a message
and then its objects (records, arrays in chunks of at most 5 MB) one ``PushObject`` call
at a time, and the Fleet API accepts gRPC messages of up to 2 GB. A node could fill the
SuperLink's memory long before the coordinator, which bounds what it pulls
(``fedsim.deploy.grid``), sees the reply. This runs the same SuperLink (same program,
same protocol, same TLS and node authentication) with two bounds on the Fleet API:

- one gRPC message may hold at most ``N`` bytes plus a chunk's worth (5 MB) plus 64
  KiB: a larger one is refused by gRPC from its length prefix, before it is read
  (``RESOURCE_EXHAUSTED``);
- a reply's pushed objects may add up to at most ``N`` bytes, counted over every push
  session its node opens for it (pushing it again starts no new count): the object
  that passes the limit is refused (``RESOURCE_EXHAUSTED``, which the SuperNode logs as
  "Failed to send message"), and so is every later push of that reply; what the reply
  had stored is dropped, and an error reply takes its place, so the coordinator records
  the client ``rejected:reply exceeds the limit of N bytes (refused at the SuperLink)``
  at once instead of waiting out the round. An object pushed outside a session the
  SuperLink opened (which nothing could count) is refused (``FAILED_PRECONDITION``).

Flower hands a reply to the coordinator as soon as its message is pushed, before its
objects: a coordinator may have taken the reply, and be pulling its objects, when they
are refused and dropped. The SuperLink's answer to a pull of one of them ("not found")
then carries the refusal's reason after ``REFUSED_MARK`` in its otherwise empty
``object_content``, and fedsim's grid records the same ``rejected:`` status from it (a
grid that does not look there sees the object not found, as from any SuperLink).

Flower's other Fleet API (``--fleet-api-type grpc-adapter``) is refused here: its
servicer is not the one bounded.

The bounds are put in place by replacing two names in
``flwr.superlink.cli.flower_superlink``: its ``GRPC_MAX_MESSAGE_LENGTH`` (used only for
the Fleet API's servers) and its ``FleetServicer`` (by a subclass that counts), and the
runtime API's ``pull_object`` handler by one that names refused objects. A Flower
without them is refused here rather than run unbounded.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CHUNK_BYTES", "REFUSED_MARK", "main", "patch"]

CHUNK_BYTES = 5 * 1024 * 1024  # Flower's largest array chunk (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
FRAMING_BYTES = 64 * 1024  # a request's own fields around the bytes it carries
REFUSED_AT_SUPERLINK = "refused at the SuperLink"
# (no object's content starts with a NUL: Flower's begin with their class's name)
REFUSED_MARK = b"\0fedsim:refused\0"


@dataclass
class _Reply:
    """A reply being pushed, over every push session its node opened for it: its
    message (to answer with an error in its place) and the bytes its objects brought."""

    message: Any
    objects: frozenset[str] = frozenset()  # its object tree's ids
    held: int = 0
    refused: bool = False
    seen: float = field(default_factory=time.monotonic)


class _Pushes:
    """The replies being pushed, by the instruction they answer (so a node that pushes
    one again, in a new session, goes on from the bytes so far), and the push sessions
    open for them with the objects still to come. The Fleet servicer counts them; the
    runtime API's ``pull_object`` names the objects of a refused one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.replies: dict[tuple[int, str], _Reply] = {}
        self.sessions: dict[str, tuple[_Reply, set[str]]] = {}

    def refused(self, object_id: str) -> bool:
        """Whether ``object_id`` belongs to a reply refused at the limit."""
        with self.lock:
            return any(r.refused and object_id in r.objects for r in self.replies.values())


def refusal(max_message_bytes: int) -> str:
    """The error reason of a reply refused at the SuperLink."""
    from fedsim.engine.screening import REJECTED_PREFIX

    return (
        f"{REJECTED_PREFIX}reply exceeds the limit of {max_message_bytes} bytes "
        f"({REFUSED_AT_SUPERLINK})"
    )


def grpc_limit(max_message_bytes: int) -> int:
    """The largest gRPC message the Fleet API reads."""
    return max_message_bytes + CHUNK_BYTES + FRAMING_BYTES


def bounded_servicer(base: type, max_message_bytes: int, pushes: _Pushes) -> type:
    """``base`` (Flower's ``FleetServicer``) refusing replies over ``max_message_bytes``,
    counted in ``pushes``."""
    import grpc
    from flwr.app import Error, Metadata
    from flwr.app.message import make_message
    from flwr.common.serde import message_from_proto
    from flwr.supercore.constant import OBJECT_PUSH_SESSION_TTL_SECONDS
    from flwr.supercore.date import now
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree

    from fedsim.engine.screening import REJECTED

    reason = refusal(max_message_bytes)
    replies, sessions = pushes.replies, pushes.sessions

    class BoundedFleetServicer(base):  # type: ignore[misc, valid-type]
        def PushMessages(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's name)
            if not request.messages_list:
                return super().PushMessages(request, context)
            msg = message_from_proto(request.messages_list[0])
            key = (msg.metadata.run_id, msg.metadata.reply_to_message_id)
            with pushes.lock:
                # (a reply its node stopped pushing is forgotten with Flower's session)
                old = time.monotonic() - 2 * OBJECT_PUSH_SESSION_TTL_SECONDS
                for k in [k for k, r in replies.items() if r.seen < old]:
                    del replies[k]
                for sid in [s for s, (r, _) in sessions.items() if r.seen < old]:
                    del sessions[sid]
                reply = replies.setdefault(key, _Reply(msg))
                reply.message, reply.seen = msg, time.monotonic()
                trees = request.message_object_trees
                reply.objects = frozenset(
                    t.object_id for tree in trees[:1] for t in iterate_object_tree(tree)
                )
            if reply.refused:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
            res = super().PushMessages(request, context)
            if res.session_id and res.objects_to_push:
                with pushes.lock:
                    sessions[res.session_id] = (reply, set(res.objects_to_push))
            return res

        def PushObject(self, request: Any, context: Any) -> Any:  # noqa: N802
            refuse = False
            with pushes.lock:
                entry = sessions.get(request.session_id)
                if entry is not None:
                    reply, pending = entry
                    if not reply.refused:
                        # (every byte a push brings counts, whatever Flower makes of it)
                        reply.held += len(request.object_content)
                        reply.seen = time.monotonic()
                        refuse = reply.refused = reply.held > max_message_bytes
                        pending.discard(request.object_id)
                        if not pending and not reply.refused:
                            del sessions[request.session_id]
            if entry is None:
                # (Flower 1.39 nodes push in the sessions the SuperLink opened for them;
                # objects pushed outside one would be counted by nothing)
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "an object push without a session"
                    if not request.session_id
                    else "an object push outside a session this SuperLink opened",
                )
            if refuse:  # (the push that passed the limit: once per reply)
                self._refuse(request.session_id, reply.message)
            if reply.refused:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
            return super().PushObject(request, context)

        def _refuse(self, session_id: str, msg: Any) -> None:
            """Drop what the reply stored and store an error reply in its place."""
            state = self.state_factory.state()
            state._cleanup_push_session(session_id, cleanup_messages=True)
            meta = msg.metadata
            created = now().timestamp()
            error = make_message(
                metadata=Metadata(
                    run_id=meta.run_id,
                    message_id="",
                    src_node_id=meta.src_node_id,
                    dst_node_id=meta.dst_node_id,
                    reply_to_message_id=meta.reply_to_message_id,
                    group_id=meta.group_id,
                    message_type=meta.message_type,
                    created_at=created,
                    ttl=max(meta.ttl - (created - meta.created_at), 1.0),
                    src_task_id=meta.src_task_id,
                    dst_task_id=meta.dst_task_id,
                ),
                error=Error(code=REJECTED, reason=reason),
            )
            error.metadata.__dict__["_message_id"] = error.object_id
            # (None: the coordinator took the reply already, and its pull of the dropped
            # objects names the refusal; or the instruction expired, and it lapses)
            if state.store_message_res(error) is not None:
                state._store_generated_message(error)

    BoundedFleetServicer.__qualname__ = BoundedFleetServicer.__name__ = "BoundedFleetServicer"
    return BoundedFleetServicer


def patch(max_message_bytes: int) -> bool:
    """Bound the Fleet API of ``flower_superlink`` to ``max_message_bytes`` a reply;
    False if this Flower's SuperLink is not built the way this expects (then nothing is
    changed)."""
    from flwr.server.superlink.fleet.grpc_rere.fleet_servicer import FleetServicer

    # (the package's attribute of that name is the program's function, not the module)
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    if getattr(fs, "FleetServicer", None) is not FleetServicer or not hasattr(
        fs, "GRPC_MAX_MESSAGE_LENGTH"
    ):
        return False
    from flwr.server.superlink.linkstate import InMemoryLinkState, SqlLinkState
    from flwr.superlink import main as superlink_main
    from flwr.superlink.servicer.runtime import runtime_handlers

    needed = ("_cleanup_push_session", "_store_generated_message", "store_message_res")
    if not all(hasattr(c, m) for c in (InMemoryLinkState, SqlLinkState) for m in needed):
        return False
    # (the runtime API calls the handler by its name on this module, for every request)
    if getattr(superlink_main, "_RUNTIME_HANDLERS", None) is not runtime_handlers:
        return False
    pushes = _Pushes()
    fs.GRPC_MAX_MESSAGE_LENGTH = grpc_limit(max_message_bytes)
    fs.FleetServicer = bounded_servicer(FleetServicer, max_message_bytes, pushes)
    runtime_handlers.pull_object = _naming_refused(
        runtime_handlers.pull_object, pushes, refusal(max_message_bytes)
    )
    return True


def _naming_refused(pull_object: Any, pushes: _Pushes, reason: str) -> Any:
    """The runtime API's ``pull_object`` handler, whose "not found" for an object of a
    refused reply carries ``reason`` (see the module's doc)."""
    said = REFUSED_MARK + reason.encode()

    def pull_object_naming_refused(request: Any, state: Any, task: Any) -> Any:
        res = pull_object(request, state, task)
        if not res.object_found and pushes.refused(request.object_id):
            res.object_content = said
        return res

    return pull_object_naming_refused


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--max-message-bytes" or not argv[1].isdigit():
        print("usage: python -m fedsim.deploy.fleet --max-message-bytes N [flower-superlink args]")
        return 2
    if any(a == "grpc-adapter" or a.endswith("=grpc-adapter") for a in argv[2:]):
        print(
            "fedsim: --fleet-api-type grpc-adapter is not bounded here (its servicer is "
            "not Flower's FleetServicer); use the default grpc-rere",
            file=sys.stderr,
        )
        return 2
    if not patch(int(argv[1])):
        print(
            "fedsim: this Flower's SuperLink is not built as 1.39's is; its Fleet API "
            "cannot be bounded here (see fedsim.deploy.fleet)",
            file=sys.stderr,
        )
        return 1
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *argv[2:]]
    return flower_superlink() or 0


if __name__ == "__main__":
    sys.exit(main())
