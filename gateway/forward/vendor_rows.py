"""The rows of a vendor table, read and checked: what each rule names and the column
rules every kind of row must meet. A bad row stops the start with `file:line: reason`.

Columns: `resource,rule,path,from,to,source,note` (`source`, the public page a row is
taken from, and `note` may be left out of a site's table). The rules:

- answers (the backend's resources, rewritten before policy applies):
  identifier-system, coding-system, code, extension-to-telecom, drop-extension,
  telecom-use; and `drop-empty`, a repair applied only in the `repair` validation mode;
- requests: `search-param` (a vendor search parameter the backend accepts, forwarded
  as it came; `path` is its name, `from` its type), `operation` (an operation the backend
  offers; `path` is `type` or `instance`, `from` the `$name`, `to` the interaction whose
  scope it needs);
- refusals: `error-code` (a coding system of the vendor's own error codes, kept in our
  OperationOutcome's `issue.details`: codes only, never text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gateway.fhir.model import UnknownElement, element, is_resource_type
from gateway.mapping.tables import Where, records

COLUMNS = ("resource", "rule", "path", "from", "to", "source", "note")
OPTIONAL = ("source", "note")
ANY = "*"
EVERYWHERE = "*"  # drop-empty's path: anywhere in the resource

# The FHIR type of the elements each answer rule's path names.
RULE_TYPES = {
    "identifier-system": "Identifier",
    "coding-system": "Coding",
    "code": "Coding",
    "extension-to-telecom": "ContactPoint",
    "drop-extension": "Extension",
    "telecom-use": "ContactPoint",
    "error-code": "Coding",
}
REPAIRS = frozenset({"drop-empty"})
DECLARATIONS = frozenset({"search-param", "operation"})
KINDS = (*RULE_TYPES, *sorted(REPAIRS), *sorted(DECLARATIONS))
# FHIR R4 ContactPoint.system and ContactPoint.use (required bindings).
CONTACT_SYSTEMS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})
CONTACT_USES = frozenset({"home", "work", "temp", "old", "mobile"})
# FHIR R4 search.html §3.1.1.0.2: the parameter types.
PARAM_TYPES = frozenset({"number", "date", "string", "token", "reference", "composite",
                         "quantity", "uri", "special"})
OPERATION_LEVELS = frozenset({"type", "instance"})
OPERATION_SCOPES = frozenset({"read", "search", "create", "update", "delete"})

_STEP = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_URI = re.compile(r"\S+")
# A vendor parameter's name: FHIR's shape, or Cerner's leading '-' (e.g. -location).
_PARAM_NAME = re.compile(r"-?[a-z][a-z0-9-]{0,63}")
_OPERATION = re.compile(r"\$[a-z][A-Za-z0-9-]{0,63}")


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of a vendor table, checked."""

    where: Where
    resource: str
    rule: str
    steps: tuple[str, ...]
    source: str  # the `from` column
    target: str  # the `to` column
    cited: str = ""  # the `source` column: the public page the row is taken from

    @property
    def line(self) -> int:
        return self.where.line

    def applies_to(self, resource_type: str) -> bool:
        return self.resource in (ANY, resource_type)


def read_rules(path: Path) -> list[Rule]:
    """The checked rows of a table file; TableError names file, line and reason."""
    rules: list[Rule] = []
    seen: dict[tuple[str, str, tuple[str, ...], str], int] = {}
    for where, row in records(path, COLUMNS, optional=OPTIONAL):
        rule = _rule(where, row)
        key = (rule.resource, rule.rule, rule.steps, rule.source)
        if key in seen:
            raise where.error(f"repeats the rule of line {seen[key]}")
        seen[key] = where.line
        rules.append(rule)
    return rules


def _rule(where: Where, row: dict[str, str]) -> Rule:
    resource, kind, path = row["resource"], row["rule"], row["path"]
    source, target = row["from"], row["to"]
    if kind not in KINDS:
        raise where.error(f"rule '{kind}' is not one of {', '.join(KINDS)}")
    if resource != ANY and not is_resource_type(resource):
        raise where.error(f"resource '{resource}' is not a FHIR R4 resource type or *")
    cited = row.get("source", "")
    if cited and not _URI.fullmatch(cited):
        raise where.error("'source' must be a URL without spaces")
    if kind in DECLARATIONS:
        return _declaration(where, resource, kind, path, source, target, cited)
    if kind in REPAIRS:
        return _repair(where, resource, kind, path, source, target, cited)
    steps = tuple(path.split(".")) if path else ()
    if not steps or not all(_STEP.fullmatch(s) for s in steps):
        raise where.error("path must name elements, e.g. identifier or code.coding")
    if resource != ANY:
        _check_path(where, resource, path, RULE_TYPES[kind])
    elif kind == "drop-extension" and steps[-1] != "extension":
        raise where.error("a drop-extension path ends in 'extension'")
    _check_values(where, kind, source, target)
    return Rule(where, resource, kind, steps, source, target, cited)


def _check_values(where: Where, kind: str, source: str, target: str) -> None:
    if not source:
        raise where.error("'from' is empty")
    if kind in ("drop-extension", "error-code"):
        if target:
            raise where.error(f"{kind} takes no 'to'")
    elif not target:
        raise where.error("'to' is empty")
    if kind in ("identifier-system", "coding-system", "extension-to-telecom",
                "drop-extension", "error-code") and not _URI.fullmatch(source):
        raise where.error("'from' must be a URI without spaces")
    if kind in ("identifier-system", "coding-system") and not _URI.fullmatch(target):
        raise where.error("'to' must be a URI without spaces")
    if kind == "code":
        _check_coding(where, "from", source, 2)
        _check_coding(where, "to", target, 3)
    if kind == "extension-to-telecom" and target not in CONTACT_SYSTEMS:
        raise where.error("'to' must be a ContactPoint.system: "
                          + "|".join(sorted(CONTACT_SYSTEMS)))
    if kind == "telecom-use" and target not in CONTACT_USES:
        raise where.error("'to' must be a ContactPoint.use: " + "|".join(sorted(CONTACT_USES)))


def _declaration(where: Where, resource: str, kind: str, path: str, source: str,
                 target: str, cited: str) -> Rule:
    if resource == ANY:
        raise where.error(f"a {kind} row names its resource type")
    if kind == "search-param":
        if not _PARAM_NAME.fullmatch(path):
            raise where.error("a search-param's path is the parameter's name, e.g. -location")
        if source not in PARAM_TYPES:
            raise where.error("'from' must be a search parameter type: "
                              + "|".join(sorted(PARAM_TYPES)))
        if target:
            raise where.error("search-param takes no 'to'")
    else:
        if path not in OPERATION_LEVELS:
            raise where.error("an operation's path is its level: type or instance")
        if not _OPERATION.fullmatch(source):
            raise where.error("'from' must be the operation's name, e.g. $find")
        if target not in OPERATION_SCOPES:
            raise where.error("'to' must be the interaction whose scope the operation "
                              "needs: " + "|".join(sorted(OPERATION_SCOPES)))
    return Rule(where, resource, kind, (path,), source, target, cited)


def _repair(where: Where, resource: str, kind: str, path: str, source: str, target: str,
            cited: str) -> Rule:
    if source or target:
        raise where.error(f"{kind} takes no 'from' or 'to'")
    if path == EVERYWHERE:
        return Rule(where, resource, kind, (), source, target, cited)
    steps = tuple(path.split(".")) if path else ()
    if not steps or not all(_STEP.fullmatch(s) for s in steps):
        raise where.error("a drop-empty path names elements (e.g. extension.valueString) "
                          "or is * for anywhere")
    if resource != ANY:
        try:
            element(resource, path)
        except UnknownElement as exc:
            raise where.error(f"path '{path}' of {resource}: {exc}") from None
    return Rule(where, resource, kind, steps, source, target, cited)


def _check_path(where: Where, resource: str, path: str, wanted: str) -> None:
    try:
        found = element(resource, path).type
    except UnknownElement as exc:
        raise where.error(f"path '{path}' of {resource}: {exc}") from None
    if found != wanted:
        raise where.error(f"path '{path}' of {resource} is a {found}; this rule needs "
                          f"{wanted} elements")


def _check_coding(where: Where, column: str, text: str, max_parts: int) -> None:
    parts = text.split("|")
    if not 2 <= len(parts) <= max_parts or not parts[0] or not parts[1]:
        shape = "system|code" if max_parts == 2 else "system|code or system|code|display"
        raise where.error(f"'{column}' must be {shape}")
