"""Scenario tables generated from registries: walking a scenario's model for the tables
whose keys a registry decides (``fedsim.registry.Variants``), to rebuild their schemas
after a registration, to default their selector keys, and to find the registry of a
table by its key path.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedsim.registry import Registry, Variants


def _registry(info: FieldInfo) -> Registry[Any] | None:
    """The registry whose entries a field's table validates into, if it is one."""
    return next((m.registry for m in info.metadata if isinstance(m, Variants)), None)


def _nested(ann: Any) -> Iterator[type[BaseModel]]:
    """The model classes an annotation can hold (through unions, lists, Annotated)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        yield ann
    elif get_origin(ann) is Annotated and any(isinstance(m, Variants) for m in ann.__metadata__):
        reg = next(m.registry for m in ann.__metadata__ if isinstance(m, Variants))
        yield from (reg.params(n) for n in reg.names())
    elif get_origin(ann) in (Annotated, Union, UnionType, list, dict, tuple):
        for a in get_args(ann):
            yield from _nested(a)


def _children(model: type[BaseModel]) -> Iterator[type[BaseModel]]:
    for info in model.model_fields.values():
        reg = _registry(info)
        if reg is not None:
            yield from (reg.params(n) for n in reg.names())
        else:
            yield from _nested(info.annotation)


def _post_order(model: type[BaseModel], seen: set[type], out: list[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    for child in _children(model):
        _post_order(child, seen, out)
    out.append(model)


def rebuild(root: type[BaseModel]) -> None:
    """Rebuild ``root`` and every model under it, children before the tables holding
    them (pydantic reuses a nested model's schema as it was built)."""
    models: list[type[BaseModel]] = []
    _post_order(root, set(), models)
    for m in models:
        m.model_rebuild(force=True)


def registries(root: type[BaseModel]) -> Iterator[Registry[Any]]:
    """Every registry that decides a table under ``root``."""
    models: list[type[BaseModel]] = []
    _post_order(root, set(), models)
    seen: set[int] = set()
    for m in models:
        for info in m.model_fields.values():
            regs = [_registry(info)] + [
                m.registry
                for a in _annotated(info.annotation)
                for m in a
                if isinstance(m, Variants)
            ]
            for reg in regs:
                if reg is not None and id(reg) not in seen:
                    seen.add(id(reg))
                    yield reg


def _annotated(ann: Any) -> Iterator[tuple[Any, ...]]:
    """The metadata of every Annotated inside an annotation."""
    if get_origin(ann) is Annotated:
        yield ann.__metadata__
    for a in get_args(ann):
        yield from _annotated(a)


def table_registry(
    root: type[BaseModel], path: tuple[str, ...], raw: dict[str, Any]
) -> Registry[Any] | None:
    """The registry a table at ``path`` validates into (None: not a variant table),
    following the variants ``raw`` selects on the way down."""
    model: type[BaseModel] | None = root
    cur: Any = raw
    for i, p in enumerate(path):
        info = model.model_fields.get(p) if model is not None else None
        if info is None:
            return None
        reg = _registry(info)
        if i == len(path) - 1:
            return reg
        cur = cur.get(p) if isinstance(cur, dict) else None
        if reg is not None:
            tag = cur.get(reg.key, reg.default) if isinstance(cur, dict) else reg.default
            model = reg.params(tag) if tag in reg else None
        else:
            nested = list(_nested(info.annotation))
            model = nested[0] if len(nested) == 1 else None
    return None


def variant_fields(
    root: type[BaseModel], table: tuple[str, ...], value: Any, raw: dict[str, Any]
) -> set[str] | None:
    """The keys the variant ``value`` of a discriminated table accepts (None: unknown)."""
    reg = table_registry(root, table, raw)
    if reg is None or not isinstance(value, str) or value not in reg:
        return None
    return set(reg.params(value).model_fields)


def fill_selectors(raw: dict[str, Any], model: type[BaseModel]) -> None:
    """Default the selector keys (``strategy.name`` etc.) so a table may omit them, in
    every variant table the scenario has (a table the chosen variant lacks, such as
    ``data.partition`` for ``synthetic``, is left for validation to refuse)."""
    for name, info in model.model_fields.items():
        sub = raw.get(name)
        if not isinstance(sub, dict):
            continue
        reg = _registry(info)
        if reg is not None:
            if reg.default is not None:
                sub.setdefault(reg.key, reg.default)
            tag = sub.get(reg.key)
            if isinstance(tag, str) and tag in reg:
                fill_selectors(sub, reg.params(tag))
        else:
            nested = list(_nested(info.annotation))
            if len(nested) == 1:
                fill_selectors(sub, nested[0])
