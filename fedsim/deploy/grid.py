"""Flower's ``HttpGrid`` with a bound on what one reply may bring into the coordinator.

Flower pulls a reply's objects (its records, its arrays in chunks of at most 5 MB) one by
one from the SuperLink and inflates them, whatever their total size. Here the bytes a
reply has brought are counted as its objects arrive, and the pull stops as soon as they
pass ``max_reply_bytes``: the reply becomes an error ``exceeds the limit`` (a
``rejected:`` status in ``participation.csv``), so the coordinator never holds more than
the limit plus the objects in flight (two chunks) for a reply.

fedsim's SuperLink (``fedsim.deploy.fleet``) refuses a reply over its own limit as its
node pushes it; when this grid had already taken the reply, the objects it is pulling
are gone, and the SuperLink's "not found" names the refusal: the reply becomes the same
``rejected:`` error that the SuperLink stores when the refusal comes first.
"""

from __future__ import annotations

import threading
from typing import Any, cast

from flwr.app import Message, Metadata
from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
from flwr.proto.runtime_pb2 import PullAppMessagesRequest
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    inflate_object_from_contents,
    pull_objects,
)
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid

from fedsim.deploy.fleet import REFUSED_MARK
from fedsim.engine.screening import REJECTED, REJECTED_PREFIX

__all__ = ["BoundedHttpGrid"]


class _TooLarge(ObjectPullError):
    pass


class _RefusedAtSuperLink(ObjectPullError):
    def __init__(self, object_id: str, reason: str) -> None:
        super().__init__(object_id, reason)
        self.reason = reason


class BoundedHttpGrid(HttpGrid):
    """``HttpGrid`` whose replies are refused once they pass ``max_reply_bytes``."""

    def __init__(
        self, *args: Any, max_reply_bytes: int, max_pull_s: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_reply_bytes = max_reply_bytes
        # A reply whose node died while pushing it lists objects that never come (the
        # SuperLink forgets them when its push session lapses, 3 minutes later): waiting
        # for them longer than a round may last would hold up the replies behind it.
        self.max_pull_s = max_pull_s

    def _error(self, run_id: int, reply_to: str, code: int, reason: str) -> Message:
        return make_message(
            metadata=Metadata(
                run_id=run_id,
                message_id="",
                src_node_id=self.node.node_id,
                dst_node_id=self.node.node_id,
                message_type=SYSTEM_MESSAGE_TYPE,
                group_id="",
                ttl=0,
                reply_to_message_id=reply_to,
                created_at=now().timestamp(),
            ),
            error=Error(code=code, reason=reason),
        )

    def pull_messages(self, message_ids: Any) -> list[Message]:
        run_id = cast(Run, self._run).run_id
        client = self._runtime_client
        res = client.PullMessages(PullAppMessagesRequest(message_ids=message_ids))

        def pull_object(request: Any) -> Any:
            got = client.PullObject(request)
            if not got.object_found and got.object_content.startswith(REFUSED_MARK):
                said = got.object_content[len(REFUSED_MARK) :][:500].decode(errors="replace")
                reason = said if said.startswith(REJECTED_PREFIX) else REJECTED_PREFIX + said
                raise _RefusedAtSuperLink(request.object_id, reason)
            return got

        fetch = make_pull_object_fn_protobuf(
            pull_object_protobuf=pull_object, node=self.node, run_id=run_id
        )
        out: list[Message] = []
        for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
            msg_id = proto.metadata.message_id
            reply_to = proto.metadata.reply_to_message_id
            held = [0]
            lock = threading.Lock()

            def counted(object_id: str, held: list[int] = held, lock: threading.Lock = lock):
                content = fetch(object_id)
                with lock:
                    held[0] += len(content)
                    if held[0] > self.max_reply_bytes:
                        raise _TooLarge(object_id, "the reply exceeds the limit")
                return content

            try:
                contents = pull_objects(
                    object_ids=[t.object_id for t in iterate_object_tree(tree)],
                    pull_object_fn=counted,
                    **({} if self.max_pull_s is None else {"max_time": self.max_pull_s}),
                )
            except _TooLarge:
                # (its objects stay at the SuperLink, never confirmed, until their TTL)
                reason = (
                    f"{REJECTED_PREFIX}reply exceeds the limit of {self.max_reply_bytes} "
                    "bytes (refused while it arrived)"
                )
                out.append(self._error(run_id, reply_to, REJECTED, reason))
                continue
            except _RefusedAtSuperLink as e:
                out.append(self._error(run_id, reply_to, REJECTED, e.reason))
                continue
            except ObjectPullError as e:
                reason = f"the reply's objects are unavailable: {e}"
                out.append(self._error(run_id, reply_to, ErrorCode.MESSAGE_UNAVAILABLE, reason))
                continue
            client.ConfirmMessageReceived(
                ConfirmMessageReceivedRequest(
                    node=self.node, run_id=run_id, message_object_id=msg_id
                )
            )
            message = cast(Message, inflate_object_from_contents(msg_id, contents))
            message.metadata.__dict__["_message_id"] = msg_id
            out.append(message)
        return out
