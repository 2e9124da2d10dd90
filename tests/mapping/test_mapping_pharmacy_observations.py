"""OBX in pharmacy orders and dispenses (RDE^O11, RDE^O25, RDS^O13): the observations the
order comes with (a weight, a lab value the dose depends on) become Observations, the
order's supporting information, with their NTE comments."""

from __future__ import annotations

import pytest

from support.mapping import one, ref, resources, translate, v2

_ORDER = [
    "PID|1||MRN-880001^^^SYNTHCLINIC^MR||Dosewell^Rae||19750412|F",
    "ORC|NW|RX-8801^SYNTHEHR|||||||20261201090000+0000",
    "RXE|^QD^^20261201^^R|197361^Amlodipine 5 MG Oral Tablet^RXNORM|5||mg^milligram^UCUM",
    "OBX|1|NM|29463-7^Body weight^LN||72|kg^kilogram^UCUM|||||F|||20261201085500+0000",
    "NTE|1||weighed at the pharmacy counter",
]


@pytest.mark.parametrize(("header", "extra"), [
    ("RDE^O11^RDE_O11", []),
    ("RDE^O25^RDE_O25", []),
    ("RDS^O13^RDS_O13", ["RXD|1|197361^Amlodipine 5 MG Oral Tablet^RXNORM|20261202100000+0000"
                         "|30|TAB^Tablet^HL70292"]),
])
def test_an_order_observation_is_the_orders_supporting_information(
        header: str, extra: list[str]) -> None:
    message = v2(f"MSH|^~\\&|SYNTHEHR|SYNTHCLINIC|ISTHMUS|GATEWAY|20261201091000+0000||{header}"
                 f"|CTRL-RXOBX-1|P|2.5.1", *_ORDER[:3], *extra, *_ORDER[3:])
    bundle = translate(message)
    observation = one(bundle, "Observation")
    assert observation["code"]["coding"][0] == {
        "system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}
    assert observation["valueQuantity"]["value"] == 72
    assert observation["valueQuantity"]["code"] == "kg"
    assert observation["status"] == "final"
    assert observation["note"] == [{"text": "weighed at the pharmacy counter"}]
    assert observation["subject"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    [order] = [r for r in resources(bundle, "MedicationRequest")
               if r.get("supportingInformation")]
    assert order["supportingInformation"] == [{"reference": ref(bundle, observation)}]
