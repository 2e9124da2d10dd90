"""FHIR R4 -> HL7 v2, from the same tables as the forward translation, read backwards.

    messages.py         Reverser: a resource or Bundle in, one v2 message per top resource
    outbound_tables.py  outbound.csv and outbound/<LAYOUT>.csv: which message, which segments
    inverter.py         segment and data-type tables compiled backwards (FHIR -> v2 positions)
    inverse.py          one table read backwards, run on a FHIR value
    fhir_paths.py       the FHIR side: Bundle references, target paths as steps
    tree.py             v2 segments as trees while written, and their serialisation
"""

from gateway.mapping.to_v2.messages import Reverser

__all__ = ["Reverser"]
