"""HL7 v2 -> FHIR R4: every table checked against HL7 v2 and the FHIR R4 model, and
compiled into closures, once, at start-up.

Each row becomes a small function that reads its v2 source, converts it and writes it at
its FHIR path; a table becomes a list of those; a message map becomes one function that
walks the segments. No table text is looked at while a message is translated. Every
problem found is collected (file:line: reason), so one `isthmus mappings check` shows
them all.

    tableset.py   the whole set, in order; Compiled
    context.py    what the parts share; v2 locations checked and read
    segments.py   segment and data-type tables: rows grouped by source
    rows.py       one row: condition, value, target
    datatypes.py  what a row makes of its value (primitive, data-type table, template)
    setters.py    FHIR path setters
    messages.py   message maps: segments to resources, and their links
"""

from gateway.mapping.compiler.tableset import Compiled, compile_tables

__all__ = ["Compiled", "compile_tables"]
