"""SMART resource scopes: v2 (`system/Observation.rs?category=...`) and v1 (`.read`, `.*`).

SMART App Launch 2.x §Scopes and Launch Context: `<context>/<Type|*>.<cruds subset>`, the
letters in that order, optionally with `?param=value&...` constraints. A v1 scope is read as
its v2 equivalent (`.read` = rs, `.write` = cud, `.*` = cruds) and always written as v2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast
from urllib.parse import quote, unquote

# ScopeDenied, ScopeError: defined in errors.py; imported here too for the old import path.
from gateway.policy.errors import ScopeDenied as ScopeDenied
from gateway.policy.errors import ScopeError as ScopeError

Context = Literal["patient", "user", "system"]
Constraint = tuple[str, str]

PERMISSIONS = "cruds"
CONTEXTS: tuple[Context, ...] = ("patient", "user", "system")
MAX_SCOPE_CHARS = 1024

# SMART v2 §Scopes for requesting FHIR resources: which letter each REST interaction needs.
# Bare 'history' may be either level, so it needs both (least privilege); say which when known.
INTERACTIONS: dict[str, frozenset[str]] = {
    "read": frozenset("r"),
    "vread": frozenset("r"),
    "history-instance": frozenset("r"),
    "search": frozenset("s"),
    "history-type": frozenset("s"),
    "history": frozenset("rs"),
    "create": frozenset("c"),
    "update": frozenset("u"),
    "patch": frozenset("u"),
    "delete": frozenset("d"),
}

_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"(patient|user|system)/([^./?]*)\.([^?]*)(?:\?(.*))?", re.DOTALL)
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
_PARAMETER = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_VALUE_SAFE = ":/|,.-_~*"


@dataclass(frozen=True, slots=True)
class Scope:
    """One resource scope: context, type (or '*'), permission letters, and constraints."""

    context: Context
    resource_type: str
    permissions: frozenset[str]
    constraints: tuple[Constraint, ...] = ()

    def covers(self, resource_type: str) -> bool:
        return self.resource_type in ("*", resource_type)

    @property
    def letters(self) -> str:
        return "".join(p for p in PERMISSIONS if p in self.permissions)

    def to_text(self) -> str:
        text = f"{self.context}/{self.resource_type}.{self.letters}"
        if self.constraints:
            text += "?" + "&".join(f"{quote(name, safe=_VALUE_SAFE)}="
                                   f"{quote(value, safe=_VALUE_SAFE)}"
                                   for name, value in self.constraints)
        return text


def parse_scope(text: str) -> Scope | None:
    """The resource scope `text` names; None for other scopes (openid, launch/patient, ...)."""
    head = text.partition("/")[0]
    if head not in CONTEXTS:
        return None
    if len(text) > MAX_SCOPE_CHARS or not _SCOPE_TOKEN.fullmatch(text):
        raise ScopeError("a scope is one token of printable characters, at most "
                         f"{MAX_SCOPE_CHARS} long")
    match = _SCOPE.fullmatch(text)
    if match is None:
        raise ScopeError(f"'{_shown(text)}': expected <context>/<Type|*>.<permissions>")
    context, resource_type, letters, query = match.groups()
    if resource_type != "*" and not _RESOURCE_TYPE.fullmatch(resource_type):
        raise ScopeError(f"'{_shown(text)}': the resource type must be a FHIR type name or *")
    if letters in _V1:
        if query is not None:
            raise ScopeError(f"'{_shown(text)}': v1 scopes take no ?constraints")
        permissions = frozenset(_V1[letters])
    else:
        permissions = _permissions(letters, text)
    constraints = _constraints(query, text) if query is not None else ()
    return Scope(cast(Context, context), resource_type, permissions, constraints)


def _permissions(letters: str, text: str) -> frozenset[str]:
    # SMART v2: a non-empty subset of c, r, u, d, s, each once and in that order.
    position = -1
    for letter in letters:
        index = PERMISSIONS.find(letter)
        if index <= position:
            raise ScopeError(f"'{_shown(text)}': permissions are a subset of 'cruds' in "
                             "that order, or v1 read, write, *")
        position = index
    if not letters:
        raise ScopeError(f"'{_shown(text)}': no permissions")
    return frozenset(letters)


def _constraints(query: str, text: str) -> tuple[Constraint, ...]:
    found: set[Constraint] = set()
    for pair in query.split("&"):
        name, equals, value = pair.partition("=")
        name, value = unquote(name), unquote(value)
        if not equals or not _PARAMETER.fullmatch(name) or not value:
            raise ScopeError(f"'{_shown(text)}': constraints are ?param=value&param=value")
        found.add((name, value))
    # A conjunction: order carries no meaning, so keep one canonical order.
    return tuple(sorted(found))


def _shown(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


_MEMO_SIZE = 4096


@dataclass(frozen=True, slots=True)
class ScopeSet:
    """The resource scopes a principal holds, and what they permit."""

    scopes: tuple[Scope, ...] = ()
    # What the scopes permit per (interaction, type), worked out once: a principal's set
    # lives as long as its API key or cached token, and every request asks again.
    _memo: dict[tuple[str, str], tuple[Scope, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False)
    # The scopes that reach a type at all, whatever the interaction.
    _reaching: dict[str, tuple[Scope, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def parse(cls, scopes: str | Iterable[str]) -> ScopeSet:
        """Resource scopes from space-separated text or a list; others are ignored."""
        items = scopes.split() if isinstance(scopes, str) else scopes
        return cls(tuple(s for s in map(parse_scope, items) if s is not None))

    def __iter__(self) -> Iterator[Scope]:
        return iter(self.scopes)

    def __len__(self) -> int:
        return len(self.scopes)

    def to_text(self) -> str:
        return " ".join(s.to_text() for s in self.scopes)

    def permits(self, interaction: str, resource_type: str) -> bool:
        """Whether some scope allows `interaction` (read, search, create, ...) on the type."""
        return bool(self._permitting(interaction, resource_type))

    def constraints_for(self, interaction: str,
                        resource_type: str) -> tuple[tuple[Constraint, ...], ...]:
        """The constraint sets of which the request must meet one; () when unconstrained.

        Raises ScopeDenied when nothing permits it, so () always means "no limit".
        """
        permitting = self._permitting(interaction, resource_type)
        if not permitting:
            raise ScopeDenied(interaction, resource_type)
        if any(not s.constraints for s in permitting):
            return ()
        return tuple(dict.fromkeys(s.constraints for s in permitting))

    def is_patient_context(self, resource_type: str) -> bool:
        """True when only patient/ scopes reach this type: access is limited to one patient."""
        reaching = self._reaching.get(resource_type)
        if reaching is None:
            reaching = tuple(s for s in self.scopes if s.covers(resource_type))
            if len(self._reaching) < _MEMO_SIZE:
                self._reaching[resource_type] = reaching
        return bool(reaching) and all(s.context == "patient" for s in reaching)

    def _permitting(self, interaction: str, resource_type: str) -> tuple[Scope, ...]:
        found = self._memo.get((interaction, resource_type))
        if found is not None:
            return found
        needed = INTERACTIONS.get(interaction)
        if needed is None:
            raise ValueError(f"unknown interaction '{interaction}' (known: "
                             + ", ".join(INTERACTIONS) + ")")
        return self._remember((interaction, resource_type), tuple(
            s for s in self.scopes if s.covers(resource_type) and needed <= s.permissions))

    def _remember(self, key: tuple[str, str],
                  scopes: tuple[Scope, ...]) -> tuple[Scope, ...]:
        # Bounded: a type comes from a URL, and a caller could name any number of them.
        if len(self._memo) < _MEMO_SIZE:
            self._memo[key] = scopes
        return scopes


def grant(requested: str, allowed: Sequence[str]) -> list[str]:
    """The scopes to grant: what was asked for, narrowed to what is allowed, as v2 text.

    Malformed or unknown requested scopes are dropped; other scopes (e.g. `openid`) pass
    only when allowed verbatim. A malformed allowed scope is a configuration error.
    """
    allowed_scopes = [s for s in map(parse_scope, allowed) if s is not None]
    allowed_other = {a for a in allowed if parse_scope(a) is None}
    granted: list[Scope] = []
    other: list[str] = []
    for text in requested.split():
        try:
            asked = parse_scope(text)
        except ScopeError:
            continue
        if asked is None:
            if text in allowed_other and text not in other:
                other.append(text)
            continue
        granted.extend(s for s in (_intersect(asked, a) for a in allowed_scopes)
                       if s is not None)
    return [s.to_text() for s in _normalise(granted)] + sorted(other)


def _intersect(a: Scope, b: Scope) -> Scope | None:
    if a.context != b.context:
        return None
    if a.resource_type == "*":
        resource_type = b.resource_type
    elif b.resource_type in ("*", a.resource_type):
        resource_type = a.resource_type
    else:
        return None
    permissions = a.permissions & b.permissions
    if not permissions:
        return None
    # Each side's constraints must hold, so the result carries both.
    constraints = tuple(sorted(set(a.constraints) | set(b.constraints)))
    return Scope(a.context, resource_type, permissions, constraints)


def _normalise(scopes: Iterable[Scope]) -> list[Scope]:
    """Merge scopes differing only in letters, drop ones another covers, sort."""
    merged: dict[tuple[str, str, tuple[Constraint, ...]], frozenset[str]] = {}
    for s in scopes:
        key = (s.context, s.resource_type, s.constraints)
        merged[key] = merged.get(key, frozenset()) | s.permissions
    candidates = [Scope(cast(Context, c), t, p, k) for (c, t, k), p in merged.items()]
    kept = [x for x in candidates if not any(y != x and _subsumes(y, x) for y in candidates)]
    return sorted(kept, key=lambda s: (CONTEXTS.index(s.context), s.resource_type,
                                       s.constraints, s.letters))


def _subsumes(wide: Scope, narrow: Scope) -> bool:
    return (wide.context == narrow.context and wide.covers(narrow.resource_type)
            and set(wide.constraints) <= set(narrow.constraints)
            and narrow.permissions <= wide.permissions)
