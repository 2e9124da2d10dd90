"""HL7 v2 data types and how many components each has (v2.8, the newest we read).

Table checks use this to refuse a row that reads a component a type does not have.
"""

from __future__ import annotations

COMPONENTS: dict[str, int] = {
    # primitives: one "component", the value itself
    "ST": 1, "TX": 1, "FT": 1, "ID": 1, "IS": 1, "NM": 1, "SI": 1, "DT": 1, "DTM": 1,
    "TM": 1, "GTS": 1, "SNM": 1, "NUL": 1, "varies": 1,
    # composites
    "AD": 8, "AUI": 3, "CCD": 2, "CD": 6, "CE": 6, "CF": 22, "CNE": 22, "CNN": 11, "CP": 6,
    "CQ": 2, "CWE": 22, "CX": 12, "DLD": 2, "DLN": 3, "DR": 2, "ED": 5, "EI": 4, "EIP": 2,
    "ERL": 6, "FC": 2, "FN": 5, "HD": 3, "JCC": 3, "MO": 2, "MSG": 3, "NDL": 11, "NR": 2,
    "OG": 4, "PL": 11, "PLN": 4, "PPN": 26, "PT": 2, "RI": 2, "RP": 4, "RPT": 11, "SAD": 3,
    "SN": 4, "SPS": 7, "TQ": 12, "TS": 2, "VID": 3, "XAD": 23, "XCN": 25, "XON": 10,
    "XPN": 15, "XTN": 18,
}
