"""Required bindings on `code` elements that the fhir.resources models do not list whole.

The models carry each code element's codes as `enum_values`, taken from the element's
short text in the spec; where that text ends in '+' ("registered | preliminary | final |
amended +") the list is cut short, and where the binding is on a shared data type
(Quantity.comparator) there is none. fhir.resources validates none of them: `model.py`
reads these lists and `validate.py` checks every code against them. This table completes
the lists for the types the gateway stores and the data types they use, from the FHIR R4
value sets named beside each row (https://hl7.org/fhir/R4/valueset-<name>.html).
"""

from __future__ import annotations

_QUANTITY_COMPARATOR = ("<", "<=", ">=", ">")  # quantity-comparator

# (type, element) -> every code of the required value set.
REQUIRED_CODES: dict[tuple[str, str], tuple[str, ...]] = {
    # observation-status
    ("Observation", "status"): ("registered", "preliminary", "final", "amended",
                                "corrected", "cancelled", "entered-in-error", "unknown"),
    # diagnostic-report-status
    ("DiagnosticReport", "status"): ("registered", "partial", "preliminary", "final",
                                     "amended", "corrected", "appended", "cancelled",
                                     "entered-in-error", "unknown"),
    # encounter-status
    ("Encounter", "status"): ("planned", "arrived", "triaged", "in-progress", "onleave",
                              "finished", "cancelled", "entered-in-error", "unknown"),
    ("EncounterStatusHistory", "status"): ("planned", "arrived", "triaged", "in-progress",
                                           "onleave", "finished", "cancelled",
                                           "entered-in-error", "unknown"),
    # udi-entry-type
    ("DeviceUdiCarrier", "entryType"): ("barcode", "rfid", "manual", "card",
                                        "self-reported", "unknown"),
    # quantity-comparator, on Quantity and the types constrained from it
    ("Quantity", "comparator"): _QUANTITY_COMPARATOR,
    ("Age", "comparator"): _QUANTITY_COMPARATOR,
    ("Count", "comparator"): _QUANTITY_COMPARATOR,
    ("Distance", "comparator"): _QUANTITY_COMPARATOR,
    ("Duration", "comparator"): _QUANTITY_COMPARATOR,
    # event-timing
    ("TimingRepeat", "when"): ("MORN", "MORN.early", "MORN.late", "NOON", "AFT",
                               "AFT.early", "AFT.late", "EVE", "EVE.early", "EVE.late",
                               "NIGHT", "PHS", "HS", "WAKE", "C", "CM", "CD", "CV", "AC",
                               "ACM", "ACD", "ACV", "PC", "PCM", "PCD", "PCV"),
}
