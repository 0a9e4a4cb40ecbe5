"""State trees <-> JSON + named arrays, for checkpoints (no pickle).

A state tree is what a strategy, the world or a client keeps between rounds: numpy
arrays and scalars, Flower records (``ArrayRecord``, ``MetricRecord``, ``ConfigRecord``,
``RecordDict``), and dicts (string keys), lists and tuples of those. :func:`encode` turns
it into a JSON value in which every array is replaced by a reference into a flat
``{name: ndarray}`` table (written as safetensors); :func:`decode` inverts it exactly:
dtypes, shapes, numpy scalar types, ``nan`` and infinities included.

Every encoded value that is not a JSON scalar is a one-key object whose key names its
type (``{"nd": "a3"}``, ``{"f32": 0.5}``, ``{"dict": {...}}``), so decoding is
unambiguous and never executes anything: an unknown tag is an error.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict


class StateError(ValueError):
    """A value that cannot be encoded, or an encoded tree that is malformed."""


_NP_SCALARS = {
    "f16": np.float16,
    "f32": np.float32,
    "f64": np.float64,
    "i8": np.int8,
    "i16": np.int16,
    "i32": np.int32,
    "i64": np.int64,
    "u8": np.uint8,
    "u16": np.uint16,
    "u32": np.uint32,
    "u64": np.uint64,
    "b": np.bool_,
}
_NP_TAG = {v: k for k, v in _NP_SCALARS.items()}


def _float(x: float) -> Any:
    return x if math.isfinite(x) else {"float": repr(x)}


class Encoder:
    """Encodes trees, collecting their arrays in :attr:`arrays` under names ``a0, a1, ...``."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def _array(self, a: np.ndarray) -> str:
        if a.dtype.hasobject or a.dtype.kind not in "biufc" or a.dtype.kind == "c":
            raise StateError(f"arrays of dtype {a.dtype} cannot be saved")
        name = f"a{len(self.arrays)}"
        self.arrays[name] = np.ascontiguousarray(a).copy()
        return name

    def encode(self, value: Any, where: str = "") -> Any:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return _float(value)
        if isinstance(value, np.generic):
            tag = _NP_TAG.get(type(value))
            if tag is None:
                raise StateError(f"{where}: numpy scalar {type(value).__name__} cannot be saved")
            v = value.item()
            return {tag: _float(v) if isinstance(v, float) else v}
        if isinstance(value, np.ndarray):
            return {"nd": self._array(value)}
        if isinstance(value, bytes):
            return {"bytes": base64.b64encode(value).decode("ascii")}
        if isinstance(value, Array):
            return {"Array": self._array(value.numpy())}
        if isinstance(value, ArrayRecord):
            return {"ArrayRecord": self._items(value, where)}
        if isinstance(value, MetricRecord):
            return {"MetricRecord": self._items(value, where)}
        if isinstance(value, ConfigRecord):
            return {"ConfigRecord": self._items(value, where)}
        if isinstance(value, RecordDict):
            return {"RecordDict": self._items(value, where)}
        if isinstance(value, dict):
            return {"dict": self._items(value, where)}
        if isinstance(value, list):
            return {"list": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, tuple):
            return {"tuple": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        raise StateError(f"{where}: a {type(value).__name__} cannot be saved in a checkpoint")

    def _items(self, mapping: Any, where: str) -> dict[str, Any]:
        out = {}
        for k, v in mapping.items():
            if not isinstance(k, str):
                raise StateError(f"{where}: key {k!r} is not a string")
            out[k] = self.encode(v, f"{where}.{k}" if where else k)
        return out


def decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The tree :meth:`Encoder.encode` encoded, its arrays taken from ``arrays``."""
    if value is None or isinstance(value, bool | str | int | float):
        return value
    if isinstance(value, list):
        raise StateError("untagged list")
    if not isinstance(value, dict) or len(value) != 1:
        raise StateError(f"malformed value {str(value)[:60]!r}")
    ((tag, v),) = value.items()

    def array(name: Any) -> np.ndarray:
        if not isinstance(name, str) or name not in arrays:
            raise StateError(f"missing array {name!r}")
        return arrays[name]

    def items(obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise StateError(f"{tag}: expected an object")
        return {k: decode(x, arrays) for k, x in obj.items()}

    if tag == "float":
        if v not in ("nan", "inf", "-inf"):
            raise StateError(f"bad float {v!r}")
        return float(v)
    if tag in _NP_SCALARS:
        raw = decode(v, arrays)
        if not isinstance(raw, int | float):
            raise StateError(f"{tag}: expected a number")
        return _NP_SCALARS[tag](raw)
    if tag == "nd":
        return array(v).copy()
    if tag == "bytes":
        return base64.b64decode(v, validate=True)
    if tag == "Array":
        return Array(array(v).copy())
    if tag == "ArrayRecord":
        return ArrayRecord(items(v))
    if tag == "MetricRecord":
        return MetricRecord(items(v))
    if tag == "ConfigRecord":
        return ConfigRecord(items(v))
    if tag == "RecordDict":
        return RecordDict(items(v))
    if tag == "dict":
        return items(v)
    if tag in ("list", "tuple"):
        if not isinstance(v, list):
            raise StateError(f"{tag}: expected an array")
        seq = [decode(x, arrays) for x in v]
        return seq if tag == "list" else tuple(seq)
    raise StateError(f"unknown tag {tag!r}")
