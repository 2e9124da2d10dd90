"""Validate FHIR R4 JSON with the fhir.resources R4B models (strict mode, tests, checks).

Not on the hot path: validating a Bundle costs milliseconds; compiled tables and the value
converters are what keep ordinary output valid.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError


class InvalidResource(ValueError):
    """A resource the R4 model refuses; names the element path, never its value."""

    def __init__(self, resource_type: str, path: str, reason: str) -> None:
        super().__init__(f"{resource_type}.{path}: {reason}" if path else
                         f"{resource_type}: {reason}")
        self.resource_type = resource_type
        self.path = path
        self.reason = reason


def validate_resource(resource: dict[str, Any]) -> None:
    """Raise InvalidResource if the model refuses it (a Bundle validates its entries)."""
    resource_type = str(resource.get("resourceType", ""))
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError):
        raise InvalidResource(resource_type or "(none)", "resourceType",
                              "unknown resource type") from None
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        path = ".".join(str(p) for p in first["loc"] if p != "__root__")
        raise InvalidResource(resource_type, path, first["msg"]) from None
