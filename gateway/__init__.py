"""Isthmus: an HL7 v2 <-> FHIR R4 integration gateway."""

__version__ = "0.1.0"
