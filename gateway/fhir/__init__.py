"""FHIR R4 codec: model introspection, transaction Bundles, validation (fhir.resources R4B)."""
