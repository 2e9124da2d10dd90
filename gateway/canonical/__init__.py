"""The canonical model: what crosses the gateway, with where it came from."""

from gateway.canonical.models import (
    BusinessKey,
    Provenance,
    Resource,
    Translation,
    trusted_resource,
)

__all__ = ["BusinessKey", "Provenance", "Resource", "Translation", "trusted_resource"]
