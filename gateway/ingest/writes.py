"""The store writes of a translated message.

`translation_writes` makes them straight from the canonical resources: the same writes,
entry for entry, as the message's transaction Bundle (`to_bundle`) read back by the
Bundle parser (`bundle_writes`), without writing the Bundle out and reading it again
(identifiers quoted into URLs and parsed back, every entry checked for a shape it has by
construction). The apply worker makes them for every message it applies: the round trip
was ~10 % of its time (py-spy). `bundle_writes` stays for Bundles as such.
"""

from __future__ import annotations

import functools
from typing import Any

from gateway.canonical import Translation
from gateway.fhir.bundle import provenance_resource, to_bundle
from gateway.fhir.errors import SearchError
from gateway.fhir.escaping import escape_value, token
from gateway.fhir.search import SearchRegistry
from gateway.fhir.transaction import condition, parse_bundle, write_request
from gateway.ingest.merges import keep_merge_state
from gateway.store.fhir import SearchQuery, TokenMatch, WriteRequest

_URN = "urn:uuid:"


def translation_writes(registry: SearchRegistry, translation: Translation
                       ) -> list[WriteRequest]:
    """The store writes for a translated message, equal to
    `bundle_writes(registry, to_bundle(translation))`.

    As `to_bundle` says them: a resource with a business identifier is a conditional
    update on it (primary) or a create if absent (only referred to); one without is PUT at
    its deterministic id; a Provenance naming the message comes last, PUT at its id. A
    conditional update that creates takes the resource's deterministic id (`create_id`),
    so the same message gives the same ids on every gateway instance.
    """
    writes: list[WriteRequest] = []
    targets: list[dict[str, Any]] = []  # the Provenance's: every resource of the message
    # Positional arguments: WriteRequest's order is method, type, id, resource, condition,
    # if_match, full_url.
    for resource in translation.resources:
        resource_type = resource.resource_type
        resource_id = resource.id
        content = resource.content
        if "id" in content or "resourceType" in content:
            # Not made by the engine (content holds no id and no type): the parser's
            # checks and rules (a create drops the id, a mismatch is a 400) apply.
            return bundle_writes(registry, to_bundle(translation))
        full_url = _URN + resource_id
        key = resource.key
        if key is not None and (system := key.system):
            search = identifier_condition(registry, resource_type, system, key.value)
            body: dict[str, Any] = {"resourceType": resource_type, **content}
            if resource.primary:
                write = WriteRequest("PUT", resource_type, None, body, search, None,
                                     full_url, carry=keep_merge_state,
                                     create_id=resource_id)
            else:
                write = WriteRequest("POST", resource_type, None, body, search, None,
                                     full_url, carry=keep_merge_state)
        else:
            body = {"resourceType": resource_type, "id": resource_id, **content}
            write = WriteRequest("PUT", resource_type, resource_id, body, None, None,
                                 full_url, carry=keep_merge_state)
        writes.append(write)
        targets.append({"reference": full_url})
    provenance = provenance_resource(translation.provenance, targets)
    provenance_id = provenance["id"]
    writes.append(WriteRequest("PUT", "Provenance", provenance_id, provenance, None, None,
                               _URN + provenance_id, carry=keep_merge_state))
    if len({write.full_url for write in writes}) != len(writes):
        # Two resources with one id: the parser refuses the Bundle (a 400 naming
        # Bundle.entry.fullUrl), and so must this.
        return bundle_writes(registry, to_bundle(translation))
    return writes


def identifier_condition(registry: SearchRegistry, resource_type: str, system: str,
                         value: str) -> SearchQuery:
    """The condition the parser makes of `identifier=system|value` once unquoted (equal to
    `condition`'s). A value the parser reads as it is (no escapes, not empty) gives the
    query the parser would, made here: a patient's MRN is new in nearly every message, so
    `condition`'s cache missed and each was parsed (~10 % of the worker's main thread)."""
    if value and escape_value(value) == value and _reads_plainly(registry, resource_type,
                                                                  system):
        return SearchQuery(resource_type, ((TokenMatch("identifier", system, value),),),
                           count=None)
    return condition(registry, resource_type, (("identifier", token(system, value)),))


@functools.lru_cache(maxsize=256)
def _reads_plainly(registry: SearchRegistry, resource_type: str, system: str) -> bool:
    """Whether the parser makes `identifier=system|v` into one TokenMatch of `system` and
    `v` as given, for a `v` it reads as it is (a token parameter that does not normalise
    its values, as a ContactPoint's does): checked on a probe, once per type and system."""
    param = registry.params(resource_type).get("identifier")
    if param is None or param.type != "token" or param.contact:
        return False
    probe = "x"
    try:
        parsed = condition(registry, resource_type, (("identifier", token(system, probe)),))
    except SearchError:
        return False  # the caller's `condition` raises it
    return parsed == SearchQuery(resource_type, ((TokenMatch("identifier", system, probe),),),
                                 count=None)


def bundle_writes(registry: SearchRegistry, bundle: dict[str, Any]) -> list[WriteRequest]:
    """The store writes for a translated message's transaction Bundle.

    A conditional update that creates takes the entry's deterministic id (its urn:uuid),
    so the same message gives the same resource ids on every gateway instance.
    """
    _, entries = parse_bundle(bundle, max_entries=100_000)
    writes = []
    for entry in entries:
        write = write_request(registry, entry)
        create_id = None
        if (write.method == "PUT" and write.id is None and write.resource is not None
                and "id" not in write.resource and entry.full_url
                and entry.full_url.startswith(_URN)):
            create_id = entry.full_url[len(_URN):]
        writes.append(WriteRequest(write.method, write.resource_type, write.id,
                                   write.resource, write.condition, write.if_match,
                                   write.full_url, carry=keep_merge_state,
                                   create_id=create_id))
    return writes
