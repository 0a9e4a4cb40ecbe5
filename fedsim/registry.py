"""Registries: name -> object, and the scenario tables they generate.

One registry per extensible kind (strategy, model, dataset, partitioner, availability
model, client behaviour, ...). Registering a class is all it takes for its name to work
everywhere: a scenario field annotated ``Annotated[Base, Variants(REGISTRY)]`` validates
into the registered parameter class its selector key names (``name``, ``kind``,
``dataset``, ``behaviour``), and ``fedsim schema`` and the README reference list it.

The union is built from the registry's contents when pydantic builds the schema, so a
registration made later (a user plug-in, ``run.plugins``) needs the models that use it
rebuilt: ``fedsim.scenario`` does that whenever ``Registry.generation`` has moved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from pydantic import GetCoreSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; refuses duplicates; unknown names list the known ones.

    ``key`` is the scenario key that selects an entry and ``default`` the entry used when
    a table omits it; ``params`` maps an entry to its parameter class (a pydantic model
    whose ``key`` field defaults to the entry's name). By default the entry *is* that class.
    """

    #: Moves on every registration in any registry: the generated schemas are then stale.
    generation = 0

    def __init__(
        self,
        kind: str,
        *,
        key: str | None = None,
        default: str | None = None,
        params: Callable[[T], Any] | None = None,
    ) -> None:
        self.kind = kind
        self.key = key
        self.default = default
        self._params = params
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("fedavg")`` registers the decorated object."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        if self.key is not None:
            cls = self._params(obj) if self._params else obj
            field = getattr(cls, "model_fields", {}).get(self.key)
            if field is None or field.default != name:
                raise ValueError(
                    f"{self.kind} '{name}': its parameter class needs a field "
                    f"{self.key}: Literal['{name}'] = '{name}'"
                )
        self._items[name] = obj
        Registry.generation += 1

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ValueError(f"unknown {self.kind} '{name}'; known: {known}") from None

    def params(self, name: str) -> Any:
        """The parameter class of entry ``name`` (the scenario table it validates)."""
        obj = self.get(name)
        return self._params(obj) if self._params else obj

    def default_params(self) -> Any:
        """The default entry's parameters with every default filled in."""
        if self.default is None or self.key is None:
            raise ValueError(f"{self.kind}: no default entry")
        return self.params(self.default)(**{self.key: self.default})

    def names(self) -> list[str]:
        return sorted(self._items)

    def values(self) -> list[T]:
        return [self._items[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


class Variants:
    """``Annotated[Base, Variants(REG)]``: a table that validates into the parameter
    class of the ``REG`` entry its ``REG.key`` names (a tagged union built from ``REG``)."""

    def __init__(self, registry: Registry[Any]) -> None:
        if registry.key is None:
            raise ValueError(f"{registry.kind} registry has no selector key")
        self.registry = registry

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        reg = self.registry
        if not len(reg):  # nothing registered yet: every value is refused, by name
            return core_schema.no_info_plain_validator_function(_nothing_registered(reg.kind))
        choices = {name: handler.generate_schema(reg.params(name)) for name in reg.names()}
        return core_schema.tagged_union_schema(choices, discriminator=reg.key)

    def __repr__(self) -> str:
        return f"Variants({self.registry.kind})"


def _nothing_registered(kind: str) -> Callable[[Any], Any]:
    def refuse(value: Any) -> Any:
        raise PydanticCustomError("nothing_registered", f"no {kind} is registered")

    return refuse
