"""The pydantic base of every configuration and watch record: frozen, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    """A pydantic model that is immutable (and so hashable) and rejects unknown keys.

    A typo in a YAML key or a Prefect UI form fails validation with the field's dotted name
    instead of being dropped; an instance cannot change after validation.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
