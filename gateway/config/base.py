"""The base every settings section shares: frozen, and unknown keys are errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

ENV_PREFIX = "ISTHMUS_"
CONFIG_ENV = "ISTHMUS_CONFIG"


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
