"""Routing: which backends an HL7 message or a FHIR request goes to.

Routes are tried in order; the first whose match fits decides. With no route (or none
that fits) everything stays local: the gateway's own FHIR store, as with no routing at
all. Patterns are shell-style and case-sensitive (`ADT^*`, `ORU^R0?`, `EPIC*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

LOCAL = "local"

# A "write" route covers every interaction that changes data.
_WRITES = frozenset({"create", "update", "delete", "patch"})


@dataclass(frozen=True, slots=True)
class Route:
    """One [[routes]] entry. HL7 routes set message/sender/facility; FHIR routes set
    resource/interaction ("" matches anything)."""

    to: tuple[str, ...]
    message: str = ""
    sender: str = ""
    facility: str = ""
    resource: str = ""
    interaction: str = ""

    @property
    def for_hl7(self) -> bool:
        return bool(self.message or self.sender or self.facility)


@dataclass(frozen=True, slots=True)
class Targets:
    """Where one HL7 message goes: the local store, and remote backends (by name)."""

    local: bool
    remote: tuple[str, ...] = ()
    # Some remote target is a FHIR server: the translated Bundle must be kept for it.
    needs_bundle: bool = False


_LOCAL_ONLY = Targets(local=True)


class Router:
    """Decides targets from the routes and each backend's kind ("fhir" | "mllp")."""

    def __init__(self, routes: tuple[Route, ...], kinds: dict[str, str]) -> None:
        self._hl7 = tuple(r for r in routes if r.for_hl7)
        self._fhir = tuple(r for r in routes if not r.for_hl7)
        self._kinds = kinds
        self._targets: dict[tuple[str, ...], Targets] = {}

    def for_message(self, message_type: str, sending_application: str,
                    sending_facility: str) -> Targets:
        """`message_type` as `ADT^A01` (MSH-9.1^MSH-9.2)."""
        for route in self._hl7:
            if ((not route.message or fnmatchcase(message_type, route.message))
                    and (not route.sender or fnmatchcase(sending_application, route.sender))
                    and (not route.facility
                         or fnmatchcase(sending_facility, route.facility))):
                return self._targets_of(route.to)
        return _LOCAL_ONLY

    def for_request(self, resource_type: str, interaction: str) -> str:
        """The backend that answers a FHIR request: its route's first target, else local."""
        for route in self._fhir:
            if ((not route.resource or fnmatchcase(resource_type, route.resource))
                    and _interaction_fits(route.interaction, interaction)):
                return route.to[0]
        return LOCAL

    def untranslated(self, targets: Targets) -> Targets:
        """The targets of a message that was not translated: only MLLP backends take it
        as it came (a FHIR backend needs the translation)."""
        if not targets.needs_bundle:
            return targets
        return Targets(local=targets.local, remote=tuple(
            n for n in targets.remote if self._kinds.get(n) != "fhir"))

    @property
    def remote_types(self) -> bool:
        """Whether any FHIR request may leave the gateway (the facade is in use)."""
        return any(r.to[0] != LOCAL for r in self._fhir)

    def _targets_of(self, to: tuple[str, ...]) -> Targets:
        targets = self._targets.get(to)
        if targets is None:
            remote = tuple(name for name in to if name != LOCAL)
            targets = Targets(local=LOCAL in to, remote=remote,
                              needs_bundle=any(self._kinds.get(n) == "fhir" for n in remote))
            self._targets[to] = targets
        return targets


def _interaction_fits(pattern: str, interaction: str) -> bool:
    if pattern in ("", "*") or pattern == interaction:
        return True
    return pattern == "write" and interaction in _WRITES
