"""The agent API's work, one method per call: verify a caller, then answer from the
session's cache or the records, book, cancel, reschedule, request refills.

Everything a method touches is confined to the session's patient (another patient's
appointment or medication is 404, as one that does not exist) and to its purpose's
minimum-necessary profile (`sessions.PURPOSES`). Each call must finish within the
deadline or answer 503 emr_unavailable; nothing is ever made up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import gateway.agent.flatten as flatten
from gateway.agent.errors import (
    EmrUnavailable,
    InvalidRequest,
    Locked,
    NotFound,
    NotPermitted,
    NotVerified,
    RefillRefused,
    SlotUnavailable,
)
from gateway.agent.matching import Claim, MatchingRules, normalised_mrn, patient_matches
from gateway.agent.outbound import Outbound
from gateway.agent.records import BackendDown, Conflict, Records
from gateway.agent.requests import Verification
from gateway.agent.sessions import PREFETCH, Attempts, Session, Sessions

Json = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Limits:
    deadline: float
    verify_floor: float
    horizon: timedelta
    # Who places the appointments booked here (SCH-1's assigning authority).
    placer: str = "ISTHMUS"


class AgentService:
    """Sessions, verification and the calls an agent makes, over `records`."""

    def __init__(self, records: Records, rules: MatchingRules, sessions: Sessions,
                 attempts: Attempts, limits: Limits, outbound: Outbound | None = None) -> None:
        self.records = records
        self.rules = rules
        self.sessions = sessions
        self.attempts = attempts
        self.limits = limits
        self.outbound = outbound
        self._slot_locks: dict[str, asyncio.Lock] = {}

    # -- verification -----------------------------------------------------------------

    async def verify(self, client_id: str, asked: Verification) -> tuple[str, Session]:
        """A session for the one patient matching every factor; NotVerified (the same
        answer, after the same floor, whatever was wrong) or Locked."""
        started = time.monotonic()
        keys = [f"call:{asked.call_id}"]
        if asked.caller_phone is not None:
            keys.append(f"phone:{asked.caller_phone}")
        wait = self.attempts.locked_for(keys)
        if wait > 0:
            raise Locked(wait)
        claim = self._claim(asked)
        try:
            found = await self._within(self._candidates(claim))
        finally:
            await _at_least(self.limits.verify_floor, started)
        if len(found) != 1:
            left = self.attempts.fail(keys)
            if left == 0:
                raise Locked(self.attempts.locked_for(keys))
            raise NotVerified(left)
        patient = found[0]
        token, session = self.sessions.open(
            client_id, asked.call_id, asked.purpose, str(patient["id"]),
            _first_name(patient), _last_initial(patient))
        for kind in PREFETCH[asked.purpose]:
            session.tasks[kind] = self._prefetch(session, kind)
        return token, session

    def _prefetch(self, session: Session, kind: str) -> asyncio.Task[Any]:
        """Fetch in the background; a failure is seen by the call that needs the data
        (which asks again), not logged as a task nobody awaited."""
        task = asyncio.create_task(self._fetch(session, kind))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    def _claim(self, asked: Verification) -> Claim:
        rules = self.rules
        birth_date = rules.date(asked.date_of_birth)
        factor, value = asked.second
        if factor == "phone":
            normalised = rules.phone(value)
        elif factor == "zip":
            normalised = rules.zip(value)
        elif factor == "ssn_last4":
            normalised = "".join(c for c in value if c.isdigit())[-4:]
        else:
            normalised = normalised_mrn(value)
        # A value that cannot be normalised still costs the same search: it matches none.
        return Claim(rules.name(asked.last_name),
                     rules.name(asked.first_name) if asked.first_name else None,
                     birth_date or "", (factor, normalised or "\x00"))

    async def _candidates(self, claim: Claim) -> list[Json]:
        # One search by birth date whatever else was said: the same work for every answer.
        patients = await self.records.search(
            "Patient", [("birthdate", claim.birth_date or "0001-01-01")])
        return [p for p in patients
                if patient_matches(self.rules, p, claim) and p.get("active") is not False]

    # -- reads ------------------------------------------------------------------------

    async def appointments(self, session: Session, since: str | None, until: str | None,
                           status: str | None) -> list[Json]:
        _allow(session, "appointments")
        flat: list[Json] = await self._within(self._cached(session, "appointments"))
        now = datetime.now(UTC)
        low = _bound(since, now)
        if session.purpose == "appointment_lookup":
            low = max(low, now)  # the profile: upcoming appointments only
        high = _instant(until)
        return [a for a in flat
                if (start := _instant(a.get("start"))) is not None and start >= low
                and (high is None or start <= high)
                and (status is None or a.get("status") == status)]

    async def slots(self, session: Session, since: str | None, until: str | None,
                    provider: str | None, kind: str | None, location: str | None
                    ) -> list[Json]:
        _allow(session, "slots")
        low = _bound(since, datetime.now(UTC))
        high = _bound(until, datetime.now(UTC) + self.limits.horizon)
        found = await self._within(self._free_slots(session, low, high))
        return [s for s in found
                if _fits(s.get("provider_name"), provider) and _fits(s.get("type"), kind)
                and _fits(s.get("location"), location)]

    async def medications(self, session: Session) -> list[Json]:
        _allow(session, "medications")
        flat: list[Json] = await self._within(self._cached(session, "medications"))
        return flat

    # -- writes -----------------------------------------------------------------------

    async def book(self, session: Session, slot_id: str, reason: str | None) -> Json:
        _allow(session, "book")
        async with self._slot_lock(slot_id):
            return await self._within(self._book(session, slot_id, reason))

    async def _book(self, session: Session, slot_id: str, reason: str | None) -> Json:
        slot, version = await self._free_slot(slot_id)
        appointment: Json = {
            "resourceType": "Appointment", "status": "booked",
            "identifier": [{"system": f"urn:isthmus:naming-system:{self.limits.placer}",
                            "value": uuid.uuid4().hex[:20].upper(),
                            "type": {"coding": [{
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "PLAC"}]}}],
            "start": slot.get("start"), "end": slot.get("end"),
            "slot": [{"reference": f"Slot/{slot_id}"}],
            "created": _now_iso()[:10],
            "participant": [{"actor": {"reference": session.patient}, "status": "accepted"},
                            *await self._schedule_participants(slot)],
            **({"description": reason} if reason else {}),
            **({"appointmentType": slot["appointmentType"]}
               if isinstance(slot.get("appointmentType"), dict) else {}),
        }
        writes: list[tuple[Json, int | None]] = []
        if not self.records.remote:
            writes.append(({**slot, "status": "busy"}, version))
        writes.append((appointment, None))
        try:
            written = await self.records.write(writes)
        except Conflict:
            raise SlotUnavailable() from None
        booked = written[-1]
        await self._tell(session, booked, "SIU^S12")
        return await self._flat_appointment(session, booked)

    async def cancel(self, session: Session, appointment_id: str, reason: str | None) -> Json:
        _allow(session, "cancel")
        return await self._within(self._cancel(session, appointment_id, reason))

    async def _cancel(self, session: Session, appointment_id: str, reason: str | None
                      ) -> Json:
        appointment, version = await self._own_appointment(session, appointment_id)
        if appointment.get("status") in ("cancelled", "fulfilled", "noshow",
                                         "entered-in-error"):
            raise InvalidRequest("this appointment can no longer be cancelled")
        changed = {**appointment, "status": "cancelled",
                   **({"cancelationReason": {"text": reason}} if reason else {})}
        writes = [(changed, version)]
        writes += await self._freed(appointment)
        written = await self._write(writes)
        await self._tell(session, written[0], "SIU^S15")
        return await self._flat_appointment(session, written[0])

    async def reschedule(self, session: Session, appointment_id: str, slot_id: str) -> Json:
        _allow(session, "reschedule")
        async with self._slot_lock(slot_id):
            return await self._within(self._reschedule(session, appointment_id, slot_id))

    async def _reschedule(self, session: Session, appointment_id: str, slot_id: str) -> Json:
        appointment, version = await self._own_appointment(session, appointment_id)
        if appointment.get("status") not in ("booked", "pending", "proposed"):
            raise InvalidRequest("only a booked appointment can be rescheduled")
        slot, slot_version = await self._free_slot(slot_id)
        moved = {**appointment, "status": "booked", "start": slot.get("start"),
                 "end": slot.get("end"), "slot": [{"reference": f"Slot/{slot_id}"}]}
        writes: list[tuple[Json, int | None]] = [(moved, version)]
        if not self.records.remote:
            writes.append(({**slot, "status": "busy"}, slot_version))
        writes += await self._freed(appointment)
        written = await self._write(writes)
        await self._tell(session, written[0], "SIU^S13")
        return await self._flat_appointment(session, written[0])

    async def refill(self, session: Session, medication_id: str, note: str | None) -> Json:
        _allow(session, "refill")
        return await self._within(self._refill(session, medication_id, note))

    async def _refill(self, session: Session, medication_id: str, note: str | None) -> Json:
        order = await self.records.read("MedicationRequest", medication_id, fresh=True)
        if order is None or not _about(order, session.patient, ("subject",)):
            raise NotFound("no such medication for this caller")
        if order.get("status") != "active":
            raise RefillRefused("not_active", "this prescription is not active")
        dispenses = await self.records.search("MedicationDispense",
                                              [("patient", session.patient)])
        done = flatten.dispensed_for(order, dispenses)
        remaining = flatten.refills_remaining(_repeats(order), len(done))
        if not remaining:
            raise RefillRefused("no_refills_remaining",
                                "no refills remain on this prescription; the prescriber "
                                "must renew it")
        request: Json = {
            "resourceType": "MedicationRequest", "status": "draft", "intent": "order",
            "subject": {"reference": session.patient},
            "priorPrescription": {"reference": f"MedicationRequest/{medication_id}"},
            "authoredOn": _now_iso(),
            **{k: order[k] for k in ("identifier", "medicationCodeableConcept",
                                     "medicationReference", "requester",
                                     "dosageInstruction", "dispenseRequest") if k in order},
            **({"note": [{"text": note}]} if note else {}),
        }
        written = (await self.records.write([(request, None)]))[-1]
        await self._tell(session, written, "OMP^O09")
        return {"id": written.get("id"), "status": "requested"}

    # -- session data -----------------------------------------------------------------

    def end(self, token: str) -> bool:
        return self.sessions.end(token)

    async def _cached(self, session: Session, kind: str) -> Any:
        if kind in session.cache:
            return session.cache[kind]
        task = session.tasks.get(kind)
        if task is None or task.cancelled() or (task.done() and task.exception()):
            task = session.tasks[kind] = self._prefetch(session, kind)
        return await asyncio.shield(task)

    async def _fetch(self, session: Session, kind: str) -> Any:
        if kind == "appointments":
            found = await self.records.search("Appointment", [("patient", session.patient)])
            value: Any = sorted([await self._flat_appointment(session, a) for a in found
                                 if _about(a, session.patient, ("participant",))],
                                key=lambda a: a.get("start") or "")
        else:
            value = await self._flat_medications(session)
        session.cache[kind] = value
        return value

    async def _flat_medications(self, session: Session) -> list[Json]:
        orders, dispenses = await asyncio.gather(
            self.records.search("MedicationRequest", [("patient", session.patient),
                                                      ("status", "active")]),
            self.records.search("MedicationDispense", [("patient", session.patient)]))
        flat = []
        for order in orders:
            if order.get("status") != "active" or not _about(order, session.patient,
                                                               ("subject",)):
                continue
            names = await self._names(session, flatten.references(order))
            flat.append(flatten.medication(order, flatten.dispensed_for(order, dispenses),
                                           names))
        return flat

    async def _free_slots(self, session: Session, low: datetime, high: datetime
                          ) -> list[Json]:
        found = await self.records.search("Slot", [("status", "free"),
                                                   ("start", f"ge{_iso(low)}"),
                                                   ("start", f"le{_iso(high)}")])
        free = [s for s in sorted(found, key=lambda s: s.get("start") or "")
                if s.get("status") == "free"
                and (start := _instant(s.get("start"))) is not None and low <= start <= high]
        schedules = await self._schedules(session, free)
        names = await self._names(session, [a for actors in schedules.values()
                                            for a in actors])
        return [flatten.slot(s, schedules.get(_schedule_of(s) or "", []), names)
                for s in free]

    async def _flat_appointment(self, session: Session, appointment: Json) -> Json:
        names = await self._names(session, flatten.references(appointment))
        return flatten.appointment(appointment, names)

    async def _names(self, session: Session, references: list[str]) -> dict[str, str]:
        """Display names of the people and places referred to, read concurrently once per
        session (a name says nothing about the patient)."""
        known: dict[str, str] = session.cache.setdefault("names", {})
        missing = sorted({r for r in references if r not in known and r.count("/") == 1})
        found = await asyncio.gather(*(self.records.read(*r.split("/")) for r in missing))
        for reference, resource in zip(missing, found, strict=True):
            name = flatten.display_name(resource) if resource is not None else None
            if name:
                known[reference] = name
        return {r: known[r] for r in references if r in known}

    async def _schedules(self, session: Session | None, slots: list[Json]
                         ) -> dict[str, list[str]]:
        """Schedule reference -> its actors, for these slots: each schedule read once, all
        concurrently (kept for the session: slots share a handful of schedules)."""
        known: dict[str, list[str]] = (session.cache.setdefault("schedules", {})
                                       if session is not None else {})
        wanted = sorted({r for s in slots if (r := _schedule_of(s)) is not None} - set(known))
        found = await asyncio.gather(*(self.records.read("Schedule",
                                                         r.removeprefix("Schedule/"))
                                       for r in wanted))
        for reference, schedule in zip(wanted, found, strict=True):
            known[reference] = flatten.references(schedule) if schedule is not None else []
        return known

    async def _schedule_actors(self, slot: Json) -> list[str]:
        reference = _schedule_of(slot)
        return (await self._schedules(None, [slot])).get(reference or "", [])

    async def _schedule_participants(self, slot: Json) -> list[Json]:
        return [{"actor": {"reference": r}, "status": "accepted"}
                for r in await self._schedule_actors(slot)]

    async def _free_slot(self, slot_id: str) -> tuple[Json, int | None]:
        slot = await self.records.read("Slot", slot_id, fresh=True)
        if slot is None:
            raise NotFound("no such slot")
        if slot.get("status") != "free":
            raise SlotUnavailable()
        if self.records.remote:
            # The EHR books the slot with the Appointment; one already booked on it here
            # means it is taken whatever the Slot says yet.
            taken = await self.records.search("Appointment", [("slot", f"Slot/{slot_id}")])
            if any(_slot_of(a) == f"Slot/{slot_id}" and a.get("status") not in
                   ("cancelled", "entered-in-error", "noshow") for a in taken):
                raise SlotUnavailable()
        return slot, _version(slot)

    async def _own_appointment(self, session: Session, appointment_id: str
                               ) -> tuple[Json, int | None]:
        found = await self.records.read("Appointment", appointment_id, fresh=True)
        if found is None or not _about(found, session.patient, ("participant",)):
            raise NotFound("no such appointment for this caller")
        return found, _version(found)

    async def _freed(self, appointment: Json) -> list[tuple[Json, int | None]]:
        """The slot an appointment held, free again (the local store keeps slots; a
        remote EHR frees its own)."""
        reference = _slot_of(appointment)
        if self.records.remote or reference is None:
            return []
        slot = await self.records.read("Slot", reference.removeprefix("Slot/"), fresh=True)
        if slot is None or slot.get("status") != "busy":
            return []
        return [({**slot, "status": "free"}, _version(slot))]

    async def _write(self, writes: list[tuple[Json, int | None]]) -> list[Json]:
        try:
            return await self.records.write(writes)
        except Conflict:
            raise SlotUnavailable() from None

    async def _tell(self, session: Session, resource: Json, message_type: str) -> None:
        """Send the change on (local shape: the routes decide where) and forget what the
        session had cached about it."""
        kind = "appointments" if resource.get("resourceType") == "Appointment" else (
            "medications")
        session.cache.pop(kind, None)
        stale = session.tasks.pop(kind, None)
        if stale is not None:
            stale.cancel()
        if self.outbound is None or self.records.remote:
            return
        patient = await self.records.read("Patient", session.patient_id)
        await self.outbound.send([resource, *([patient] if patient else [])], message_type)

    def _slot_lock(self, slot_id: str) -> asyncio.Lock:
        lock = self._slot_locks.get(slot_id)
        if lock is None:
            if len(self._slot_locks) > 10_000:
                self._slot_locks = {k: v for k, v in self._slot_locks.items() if v.locked()}
            lock = self._slot_locks[slot_id] = asyncio.Lock()
        return lock

    async def _within(self, work: Awaitable[T]) -> T:
        """The work's answer within the deadline, else EmrUnavailable (never a guess)."""
        try:
            async with asyncio.timeout(self.limits.deadline):
                return await work
        except TimeoutError:
            raise EmrUnavailable(self.limits.deadline) from None
        except BackendDown as exc:
            raise EmrUnavailable(exc.retry_after) from None


def _allow(session: Session, operation: str) -> None:
    if not session.may(operation):
        raise NotPermitted(f"a {session.purpose} session cannot do this")


def _about(resource: Json, patient: str, keys: tuple[str, ...]) -> bool:
    """The resource names this patient (its subject, or a participant)."""
    for key in keys:
        value = resource.get(key)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, dict):
                continue
            reference = (item.get("actor") or {}) if key == "participant" else item
            if isinstance(reference, dict) and reference.get("reference") == patient:
                return True
    return False


def _schedule_of(slot: Json) -> str | None:
    schedule = slot.get("schedule")
    reference = schedule.get("reference") if isinstance(schedule, dict) else None
    return reference if isinstance(reference, str) and reference.startswith(
        "Schedule/") else None


def _slot_of(appointment: Json) -> str | None:
    for slot in appointment.get("slot") or ():
        if isinstance(slot, dict) and isinstance(slot.get("reference"), str):
            return str(slot["reference"])
    return None


def _version(resource: Json) -> int | None:
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return int(version) if isinstance(version, str) and version.isdigit() else None


def _repeats(order: Json) -> int | None:
    dispense = order.get("dispenseRequest")
    value = dispense.get("numberOfRepeatsAllowed") if isinstance(dispense, dict) else None
    return value if isinstance(value, int) else None


def _first_name(patient: Json) -> str | None:
    for name in patient.get("name") or ():
        if isinstance(name, dict):
            given = [g for g in name.get("given") or () if isinstance(g, str)]
            if given:
                return given[0]
    return None


def _last_initial(patient: Json) -> str | None:
    for name in patient.get("name") or ():
        if isinstance(name, dict) and isinstance(name.get("family"), str) and name["family"]:
            return str(name["family"][0]).upper()
    return None


def _fits(value: Any, wanted: str | None) -> bool:
    if wanted is None:
        return True
    return isinstance(value, str) and wanted.casefold() in value.casefold()


def _instant(value: Any) -> datetime | None:
    """An ISO date or dateTime as a UTC instant (a date is its midnight UTC)."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _bound(value: str | None, default: datetime) -> datetime:
    found = _instant(value)
    return default if found is None else found


def _now_iso() -> str:
    return _iso(datetime.now(UTC))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


async def _at_least(seconds: float, since: float) -> None:
    remaining = seconds - (time.monotonic() - since)
    if remaining > 0:
        await asyncio.sleep(remaining)

