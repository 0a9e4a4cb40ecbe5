"""Base class for every scenario section and registry-selected parameter block."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A scenario table: unknown keys are errors, values are validated on assignment.

    Types are strict (a string "0.05" where a number belongs is an error, as is 1.0 where
    an integer belongs; an integer is a number) and every float is finite (``inf`` and
    ``nan`` are refused with their key path).
    """

    # defer_build: a table whose keys come from a registry (``fedsim.registry.Variants``)
    # builds its schema on first use, once the built-in registrations have been imported.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        defer_build=True,
        strict=True,
        allow_inf_nan=False,
    )
