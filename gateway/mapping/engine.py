"""The translator: HL7 v2 message in, canonical Translation out, through compiled tables."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.canonical import BusinessKey, Provenance, Resource, Translation, trusted_resource
from gateway.canonical.ids import name_uuid
from gateway.canonical.models import key_of_pair
from gateway.fhir.model_cache import FACTS
from gateway.hl7.message import Message
from gateway.mapping.errors import UnsupportedMessage
from gateway.mapping.runtime import Draft, Json, Run, remember
from gateway.mapping.steps import MessageFn
from gateway.mapping.tables import SHIPPED, MergeRow

if TYPE_CHECKING:
    from gateway.mapping.compiler import Compiled


class Translator:
    """Compiled tables, ready to translate any number of messages (thread-safe: no state
    but bounded maps of referred-to resources' ids and digests, which any thread may fill)."""

    def __init__(self, events: dict[str, MessageFn], merges: dict[str, MergeRow],
                 default_offset: str = "+00:00", *, generated: bool = False) -> None:
        self._events = events
        self._merges = merges
        self._default_offset = default_offset
        self.generated = generated  # the tables run as generated source, not closures

    @classmethod
    def load(cls, directory: Path = SHIPPED, site: Path | None = None,
             default_offset: str = "+00:00", *, facts: Path | None = None,
             cache: Path | None = None, generate: bool | None = None) -> Translator:
        """Read, check and compile the tables; raises TableErrors naming file:line.

        `facts`: a file where the FHIR model's answers the checks need are kept between
        runs (`gateway.fhir.model_cache`): with it, a start imports no FHIR model.
        With `cache` (a directory) the tables run as generated Python source
        (`mapping.codegen`) kept there by the tables' hash, so a later start only loads
        it; without one, or when it cannot be written, as the compiler's closures (the
        interpreter: they translate alike, slower, and start without compiling source).
        `generate` forces either way (True: generated even without a cache)."""
        def compiled() -> Compiled:
            from gateway.mapping.compiler import compile_tables
            from gateway.mapping.convert import Converters
            from gateway.mapping.tables import read_tables

            with FACTS.kept_in(facts):
                return compile_tables(read_tables(directory, site), Converters(default_offset))

        if generate is False or (generate is None and cache is None):
            tables = compiled()
            return cls(tables.events, tables.merges, default_offset)
        from gateway.mapping.codegen import load

        loaded = load(directory, site, default_offset, cache, compiled,
                      in_memory=bool(generate))
        return cls(loaded.events, loaded.merges, default_offset, generated=loaded.generated)

    @property
    def message_types(self) -> list[str]:
        return sorted(self._events)

    def supports(self, message_type: str) -> bool:
        return message_type in self._events

    def merge_rule(self, message_type: str) -> MergeRow | None:
        """How the store applies this message type as a merge (merges.csv), if it does."""
        return self._merges.get(message_type)

    def translate(self, message: Message, received_at: datetime | None = None) -> Translation:
        """The canonical form of one message; raises TranslationError naming the location."""
        header = message.header
        message_type = header.message_type  # a property: made once
        translate = self._events.get(message_type)
        if translate is None:
            raise UnsupportedMessage(message_type)
        run = Run(message, self._default_offset)
        translate(run)
        now = datetime.now(UTC)
        # `run.text` written inline: these are seldom escaped.
        escape = run.d.escape
        application = header.sending_application
        facility = header.sending_facility
        control_id = header.control_id
        provenance = Provenance(
            run.text(application) if escape in application else application,
            run.text(facility) if escape in facility else facility,
            run.text(control_id) if escape in control_id else control_id,
            message_type, received_at or now, now)
        resources = _finish(run, provenance)
        return Translation(provenance, resources, dict(run.unmapped), run.z_segments)


# What the name of a referred-to resource (the doctor, the ward: not made from a segment of
# its own) is made of -> its id, fullUrl and BusinessKey, across messages (`_referred`).
_REFERRED_IDS: dict[tuple[str, ...], tuple[str, str, BusinessKey | None]] = {}


def _finish(run: Run, provenance: Provenance) -> list[Resource]:
    """Give every resource its identity and id, resolve the references between them, and
    make the canonical Resources.

    Stable ids: by business identifier when there is one, else by source position.
    Without a system an identifier is only unique at its sender, so the sender is part of
    the name. A resource only referred to (a ward from PV1-3) without an identifier is named
    by its content at that sender, so every message naming that ward names the same
    Location instead of adding one; one an identity rule names (identities.csv: an
    Observation by filler order number, OBX-3 and OBX-4) by that rule at that sender.
    Otherwise the same message (sender + control id) resent gives the same ids, so a
    resend updates instead of duplicating.
    """
    application, facility, control_id = provenance[:3]
    sender = f"{application}|{facility}"
    position = f"{sender}|{control_id}|"
    keys: set[tuple[str, str, str]] = set()
    identities: dict[str, int] = {}
    made: set[str] = set()  # the types of the resources made from a segment of their own
    stubs: set[str] = set()  # the types of the resources only referred to
    resources: list[Resource] = []
    # One pass, written inline: it runs for every resource of every message. A Resource
    # holds its draft's content dict itself, so the references resolved below are in it.
    for draft in run.drafts:
        resource_type = draft.resource_type
        content = draft.content
        key: tuple[str, str] | None = None
        if identifiers := content.get("identifier"):
            # The usual case inline: the first identifier has a value and a system.
            if type(identifiers) is list and (value := (first := identifiers[0]).get("value")):
                if system := first.get("system"):
                    key = (system, value)
                elif len(identifiers) == 1:  # a doctor's XCN-1 without an authority
                    key = ("", value)
                else:
                    key = _business_key(identifiers)
            else:
                key = _business_key(identifiers)
        identity = draft.identity
        primary = draft.primary
        if primary:
            made.add(resource_type)
            if identity:
                # Two results of one message with one identity (text lines of a report
                # sent as OBX segments with one OBX-3 and no OBX-4) stay apart by their
                # order, which a resend keeps.
                seen = identities[identity] = identities.get(identity, 0) + 1
                if seen > 1:
                    identity = draft.identity = f"{identity}#{seen}"
            if key is not None:
                # Two resources of one message claiming one business identifier (a sender
                # reusing a filler id) cannot both be that record: the later ones are kept
                # under their own ids rather than sent as clashing conditional updates.
                claim = (resource_type, *key)
                if claim in keys:
                    key = None
                    run.unmapped[f"{resource_type}.identifier (repeated)"] += 1
                keys.add(claim)
            if key is not None:
                resource_id = name_uuid(f"{resource_type}|{key[0] or sender}|{key[1]}")
                business_key = key_of_pair(key)
            else:
                resource_id = name_uuid(f"{sender}|{identity}" if identity else
                                        f"{resource_type}|{position}{draft.ordinal}")
                business_key = None
            draft.full_url = "urn:uuid:" + resource_id
        else:
            stubs.add(resource_type)
            # A referred-to resource (the attending doctor, the ward, the facility) comes
            # again in the sender's next messages: its id and key are kept rather than made
            # again, by what its name is made of (no name built to look it up).
            if key is not None:
                system, value = key
                referred: tuple[str, ...] = (resource_type, system, value,
                                             "" if system else sender)
            else:
                referred = (sender, identity) if identity else (
                    resource_type, position, str(draft.ordinal))
            kept = _REFERRED_IDS.get(referred)
            if kept is None:
                kept = _referred(referred, resource_type, key, sender, identity,
                                 f"{resource_type}|{position}{draft.ordinal}")
            resource_id, draft.full_url, business_key = kept
        resources.append(trusted_resource(
            resource_type, resource_id, primary, business_key, content, provenance))
    # Only a type both made and referred to can have a stub to drop (an ADT's doctors and
    # wards are never made from a segment of their own).
    same = _made_in_full(run) if not stubs.isdisjoint(made) else None
    if same:
        for ref, target in run.pending_refs:
            ref["reference"] = same.get(id(target), target).full_url
        return [resource for draft, resource in zip(run.drafts, resources, strict=True)
                if id(draft) not in same]
    for ref, target in run.pending_refs:
        ref["reference"] = target.full_url
    return resources


def _referred(referred: tuple[str, ...], resource_type: str, key: tuple[str, str] | None,
              sender: str, identity: str, by_position: str
              ) -> tuple[str, str, BusinessKey | None]:
    """A referred-to resource's id, fullUrl and BusinessKey, kept under `referred` for the
    next messages (`runtime.remember`: bounded; a long content identity's is not kept)."""
    if key is not None:
        name = f"{resource_type}|{key[0] or sender}|{key[1]}"
    else:
        name = f"{sender}|{identity}" if identity else by_position
    resource_id = name_uuid(name)
    return remember(_REFERRED_IDS, referred, (
        resource_id, "urn:uuid:" + resource_id,
        None if key is None else key_of_pair(key)), len(name))


def _made_in_full(run: Run) -> dict[int, Draft]:
    """Resources only referred to (a parent specimen named by SPM-3) that the message also
    makes from a segment of their own (that specimen's SPM): the reference goes to the full
    one, and the stub is dropped, so one Bundle never holds one fullUrl twice."""
    made = {(d.resource_type, d.full_url): d for d in run.drafts if d.primary}
    return {id(d): full for d in run.drafts
            if not d.primary and (full := made.get((d.resource_type, d.full_url))) is not None}


def _business_key(identifiers: list[Json] | Json) -> tuple[str, str] | None:
    """(system, value) of the first identifier with a system, else ("", value) of the first
    with a value; None without one. `identifiers`: a resource's `identifier`, not empty."""
    if isinstance(identifiers, dict):  # a single-valued identifier (e.g. Appointment? no)
        identifiers = [identifiers]
    best: tuple[str, str] | None = None
    for identifier in identifiers:
        value = identifier.get("value")
        if not value:
            continue
        system = identifier.get("system", "")
        if system:
            return system, value
        best = best or ("", value)
    return best
