"""A training reply through the scenario's per-update transforms, before it is folded or
handed to the strategy: its update ``w - w_t`` is computed against the instruction's
model, transformed (clipped), or the reply is turned into an error that says why it was
left out (malformed, or rejected by a transform).

fedsim's workers screen the replies of the clients they run; under Flower's runtime and
on real SuperNodes the coordinator does it, with the same functions on the same numbers,
so both give the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message
from flwr.common.constant import ErrorCode

from fedsim.arrays import record_of, to_array
from fedsim.client_params import instruction_config, round_of
from fedsim.engine.fold import Sums, apply_update, array_record, records, update_of, with_model
from fedsim.engine.validation import ReplyLimits, check_metrics, check_update
from fedsim.transforms import Chains, Rejected

if TYPE_CHECKING:
    from fedsim.engine.coordinator import Replies

#: Error code of a reply that a per-update transform rejected (its reason says why).
REJECTED = 4000
REJECTED_PREFIX = "rejected: "


def rejection(reply: Message | None) -> str | None:
    """The reason a reply was rejected by a transform, if it was."""
    if reply is None or not reply.has_error() or reply.error.code != REJECTED:
        return None
    return reply.error.reason.removeprefix(REJECTED_PREFIX)


def _failed(msg: Message, reason: str, code: int) -> Message:
    return Message(Error(code, reason), reply_to=msg)


def rejected(msg: Message, reason: str) -> Message:
    """The error reply that leaves a client out, saying why."""
    return _failed(msg, f"{REJECTED_PREFIX}{reason}", REJECTED)


def screen(
    reply: Message, msg: Message, chains: Chains, cid: int, limits: ReplyLimits
) -> tuple[Message, Sums | None]:
    """(reply, its update after the per-update transforms); for a reply that failed, is
    invalid (``fedsim.engine.validation``) or is rejected by a transform: an error reply
    and None."""
    if reply.has_error():
        return reply, None
    base = array_record(msg.content)
    if base is None:
        raise ValueError("a training instruction carries no ArrayRecord")
    try:
        limits.check_size(reply.content, base)
        arrays, metrics = records(reply.content)
        weight = check_metrics(metrics, limits.cap(cid, training=True), training=True)
        update = check_update(arrays, base)
    except ValueError as exc:  # Invalid, or records() finding no num-examples
        return rejected(msg, str(exc)), None
    if not chains.update:
        return reply, update
    # Transforms see the floating arrays only: an integer buffer (BatchNorm's batch count)
    # is no part of an update's norm.
    floats = {k: d for k, d in update.items() if _floating(base[k])}
    notes: dict[str, float] = {}
    config = instruction_config(msg)
    try:
        floats = chains.screen(
            floats,
            server_round=round_of(config),
            cid=cid,
            weight=weight,
            notes=notes,
            config=config,
        )
    except Rejected as exc:
        return rejected(msg, str(exc)), None
    except Exception as exc:  # a broken transform fails its client, not the run
        reason = f"update transform failed: {type(exc).__name__}: {exc}"
        return _failed(msg, reason, ErrorCode.CLIENT_APP_RAISED_EXCEPTION), None
    for k, v in notes.items():  # (the metrics were validated; notes are finite)
        metrics[k] = float(v)
    seen: set[int] = set()
    for k, d in floats.items():
        # The fold adds into these in place: never into a read-only or shared array.
        if not d.flags.writeable or id(d) in seen:
            d = np.array(d, dtype=update[k].dtype)
        seen.add(id(d))
        update[k] = d
    return reply, update


def checked(reply: Message, msg: Message, cid: int, limits: ReplyLimits) -> Message:
    """An evaluation reply, or the rejection of one that is invalid."""
    if reply.has_error():
        return reply
    try:
        limits.check_size(reply.content, array_record(msg.content))
        _, metrics = records(reply.content)
        check_metrics(metrics, limits.cap(cid, training=False), training=False)
    except ValueError as exc:
        return rejected(msg, str(exc))
    return reply


def _floating(arr: Array) -> bool:
    return np.issubdtype(np.dtype(arr.dtype), np.floating)


def screened(
    reply: Message, msg: Message, chains: Chains, cid: int, limits: ReplyLimits
) -> Message:
    """A reply handed to the strategy whole, validated and through the per-update
    transforms: it then carries ``w_t`` plus its transformed update (its own arrays,
    untouched, when there are no transforms)."""
    if reply.has_error():
        return reply
    reply, update = screen(reply, msg, chains, cid, limits)
    if update is None or not chains.update:
        return reply
    base = array_record(msg.content)
    arrays = record_of({k: to_array(apply_update(base[k], d)) for k, d in update.items()})  # type: ignore[index]
    reply.content = with_model(reply.content, arrays)
    return reply


def screen_replies(
    replies: Replies, chains: Chains, limits: ReplyLimits, *, fold: bool
) -> list[Sums | None] | None:
    """Validate training replies and run the per-update transforms at the coordinator,
    as fedsim's workers would: an invalid or rejected reply becomes an error in
    ``replies.ordered``. For a folded phase, returns each reply's update (None where it
    is left out)."""
    updates: list[Sums | None] = []
    for i, (cid, msg, r) in enumerate(
        zip(replies.cids, replies.msgs, replies.ordered, strict=True)
    ):
        update = None
        if r is not None and fold:
            r, update = screen(r, msg, chains, cid, limits)
        elif r is not None:
            r = screened(r, msg, chains, cid, limits)
        replies.ordered[i] = r
        updates.append(update)
    return updates if fold else None


def check_replies(replies: Replies, limits: ReplyLimits) -> None:
    """Validate evaluation replies at the coordinator, as fedsim's workers would."""
    for i, (cid, msg, r) in enumerate(
        zip(replies.cids, replies.msgs, replies.ordered, strict=True)
    ):
        if r is not None:
            replies.ordered[i] = checked(r, msg, cid, limits)


def finish_mean(
    chains: Chains, server_round: int, config: Mapping[str, Any] | None = None
) -> Callable[[Sums, float], Sums] | None:
    """The aggregate transforms, for the fold to apply to the mean update (``config``:
    what the round's instructions carried for them, e.g. an adaptive clip norm)."""
    if not chains.aggregate:
        return None
    return lambda mean, weight: chains.finish(
        mean, server_round=server_round, weight=weight, config=config
    )


def finish_model(
    chains: Chains,
    server_round: int,
    before: ArrayRecord,
    after: ArrayRecord,
    weight: float,
    config: Mapping[str, Any] | None = None,
) -> ArrayRecord:
    """A strategy's new model through the aggregate transforms (for strategies shown
    every reply; a folded mean went through them in the fold). ``weight``: the total
    weight of the replies it aggregated, as the fold passes."""
    if not chains.aggregate:
        return after
    update = chains.finish(
        update_of(after, before), server_round=server_round, weight=weight, config=config
    )
    return record_of({k: to_array(apply_update(before[k], d)) for k, d in update.items()})
