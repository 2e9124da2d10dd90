"""The mapping engine: declarative tables (top-level `mappings/`) read, checked against HL7 v2
and the FHIR R4 model, compiled once, and run to translate HL7 v2 ⇄ canonical ⇄ FHIR R4."""
