"""Base class for every scenario section and registry-selected parameter block."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A scenario table: unknown keys are errors, values are validated on assignment."""

    # defer_build: a table whose keys come from a registry (``fedsim.registry.Variants``)
    # builds its schema on first use, once the built-in registrations have been imported.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, defer_build=True)
