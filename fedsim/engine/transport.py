"""How a phase's messages travel from the driver to a worker: pickled by fedsim itself,
with the global model sent once and then referred to by a token.

Ray serialises call arguments with cloudpickle, whose pure-Python reducer hook visits
every object of every Flower Message; the C pickler does the same job several times
faster (measured: about 0.8 ms less per call per actor). Only fedsim's own driver and
workers exchange these bytes.

Every instruction of a phase carries the same ArrayRecord (the global model). The driver
pickles a reference to it instead (``pack_batch``: the record by its token), and sends
the record itself (``pack_record``) only to a worker that does not hold that token yet
(``hold``). So a model sent for training is not sent again for that round's evaluation,
and the client app finds the very object whose weights its model still holds.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
from flwr.app import Array, ArrayRecord, Message

from fedsim.arrays import record_of
from fedsim.engine.fold import array_record

Batch = list[tuple[int, Message]]  # (client id, instruction)
PackedRecord = list[tuple[str, str, tuple[int, ...], str, np.ndarray]]

# A record larger than this goes into Ray's object store once for all actors; a smaller
# one rides inline in each call (cheaper than a put and a fetch).
INLINE_RECORD_BYTES = 2**20

# The global model this worker process was last sent, by token. A module global, not an
# attribute of the worker, because a pickled batch refers to it as a call of
# ``_held_record``, which unpickling finds by its module path (this module's), with no
# way to hand it an object; each actor process hosts a single ClientWorker, so one
# holder per process is all there is.
_HELD: dict[int, ArrayRecord] = {}


def _held_record(token: int) -> ArrayRecord:
    try:
        return _HELD[token]
    except KeyError:
        raise RuntimeError(f"worker does not hold record {token}") from None


def hold(token: int, packed: PackedRecord) -> None:
    """Make ``packed`` the record this process holds, as ``token`` (the last one only:
    the driver sends a new record whenever the token changes)."""
    _HELD.clear()
    _HELD[token] = _unpack_record(packed)


def pack_record(record: ArrayRecord) -> PackedRecord:
    """The record with each Array's bytes as a numpy view: Ray moves those out of band,
    so the driver copies them once into the object store and a worker once out of it
    (pickling the bytes would add a copy on each side)."""
    return [
        (k, a.dtype, a.shape, a.stype, np.frombuffer(a.data, np.uint8)) for k, a in record.items()
    ]


def _unpack_record(packed: PackedRecord) -> ArrayRecord:
    return record_of(
        {
            k: Array(dtype=dtype, shape=shape, stype=stype, data=data.tobytes())
            for k, dtype, shape, stype, data in packed
        }
    )


def record_arg(record: ArrayRecord) -> Any:
    """The call argument that carries ``record``: packed, and put in the object store
    when large (see ``INLINE_RECORD_BYTES``)."""
    data = pack_record(record)
    size = sum(a.nbytes for *_, a in data)
    return ray.put(data) if size > INLINE_RECORD_BYTES else data


def shared_record(batches: Sequence[Batch]) -> ArrayRecord | None:
    """The ArrayRecord the phase's instructions share (the global model), if any: the
    first message's. Others are pickled whole."""
    first = next((msg for batch in batches for _, msg in batch), None)
    return array_record(first.content) if first is not None and first.has_content() else None


def pack_batch(
    batch: Batch, record: ArrayRecord | None, token: int | None, each: bool = False
) -> bytes:
    """Pickle a batch with the shared record replaced by a reference to ``token``.

    With ``each``, every item is pickled on its own (a pickled list of pickles), so a
    worker of a shared phase unpickles only the items it takes (``Unpickled``).
    """
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    if record is not None:
        # Consulted for ArrayRecords only (a C-level type lookup), once per distinct
        # record: the pickle memo covers repeats.
        p.dispatch_table = {
            ArrayRecord: lambda r: (_held_record, (token,)) if r is record else r.__reduce_ex__(5)
        }
    if not each:
        p.dump(batch)
        return buf.getvalue()
    parts = []
    for item in batch:
        p.dump(item)
        parts.append(buf.getvalue())
        buf.seek(0)
        buf.truncate()
        p.clear_memo()
    return pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL)


class Unpickled(Sequence):
    """A shared phase's items (``pack_batch`` with ``each``), each unpickled when it is
    taken."""

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts

    def __len__(self) -> int:
        return len(self._parts)

    def __getitem__(self, i):  # type: ignore[override]
        return pickle.loads(self._parts[i])
