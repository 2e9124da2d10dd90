"""PHI redaction for everything that leaves the data path: log lines, span text, error text.

A safety net, not a licence: code should never put patient data into a log message in the
first place. These patterns catch what slips through by accident.

Caught (replaced by `[redacted]`, or `[redacted resource]` for a whole resource):
- HL7 v2 segments: a 3-character segment id at a word start followed by `|` (any
  separator after `MSH`): everything after the id up to the end of the line;
- FHIR/JSON objects with a `"resourceType"` (or Python-repr `'resourceType'`) key: the
  whole outermost object, or everything from the key to the end if the braces don't match;
- values of PHI keys (name, family, given, birthDate, dob, phone, telecom, email, address,
  mrn, identifier, ssn, patient and a few spellings like `birth_date`, `patient_name`) in
  `key=value`, `key: value`, `"key": "value"` and `'key': 'value'` forms (keys compared
  case-insensitively; an unquoted value runs to the next `,;&`, line end, or ` other=`);
- e-mail addresses; US-style SSNs (`123-45-6789`); phone numbers of 7+ digits written with
  separators (`(555)010-4477`, `555-010-4477`, `+1 555 010 4477`, `555-0104`);
- digit runs of 6 or more not glued to letters, dots or dashes (MRNs, SSNs, YYYYMMDD dates).

Not caught: names, addresses or dates in free prose outside a PHI key (`seen Zephyrina on
1985-02-14`), identifiers mixing letters and digits (`ZZ9001`) outside a segment or PHI
key, digit runs under 6 (short MRNs), segments with a custom field separator (not MSH),
PHI split across log records, and attributes passed to a logger with `extra=`. Kept on
purpose: IP:port, counts under a million, ISO timestamps and their fractions, durations,
short control ids, HTTP status codes, UUIDs. Over-redacted on purpose: the rest of a line
after a segment, and an unquoted PHI-key value up to the next delimiter.
"""

from __future__ import annotations

import logging
import re
import traceback
from types import TracebackType

REDACTED = "[redacted]"
REDACTED_RESOURCE = "[redacted resource]"

_PHI_KEYS = (
    "name", "family", "given", "birthDate", "birthdate", "birth_date", "date_of_birth", "dob",
    "phone", "phone_number", "telecom", "email", "address", "mrn", "identifier", "ssn",
    "patient", "patient_name", "first_name", "last_name", "full_name",
)
_KEY = "(?:" + "|".join(re.escape(k) for k in sorted(_PHI_KEYS, key=len, reverse=True)) + ")"

# HL7 v2 §2.5: a segment is a 3-character id then the field separator; MSH-1 defines it.
_SEGMENT = re.compile(r"(?<![A-Za-z0-9])(?:MSH[^\w\s]|[A-Z][A-Z0-9]{2}\|)[^\r\n]*")
_RESOURCE_KEY = re.compile(r"""\\?["']resourceType\\?["']\s*:""")
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}]', re.DOTALL)
# Python reprs quote strings with either quote character.
_REPR_TOKEN = re.compile(r""""[^"\\]*(?:\\.[^"\\]*)*"|'[^'\\]*(?:\\.[^'\\]*)*'|[{}]""",
                         re.DOTALL)
# Quoted key, then a JSON/Python string, a bracketed group or a bare scalar.
_QUOTED_PAIR = re.compile(
    r"""(?P<key>(?P<q>\\?["'])""" + _KEY + r"""(?P=q)\s*:\s*)"""
    r"""(?:"[^"\\]*(?:\\.[^"\\]*)*"|'[^'\\]*(?:\\.[^'\\]*)*'|\[[^\]]*\]?|\{[^}]*\}?"""
    r"""|[^\s,}\]]+)""",
    re.IGNORECASE,
)
# Bare key, '=' or ':', then a quoted value or text up to a delimiter or the next key=.
_BARE_PAIR = re.compile(
    r"""(?P<key>(?<![\w.\-"'])""" + _KEY + r"""[ \t]*[=:][ \t]*)"""
    r"""(?:"[^"\r\n]*"?|'[^'\r\n]*'?|\[[^\]\r\n]*\]?|\{[^}\r\n]*\}?"""
    r"""|(?:(?!\s+[\w.\-]+=)[^,;&\r\n])+)""",
    re.IGNORECASE,
)
_EMAIL = re.compile(r"(?<![\w.+\-])[\w.+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
_SSN = re.compile(r"(?<![\w.\-])\d{3}-\d{2}-\d{4}(?![\w\-])")
_PHONE = re.compile(
    r"(?<![\w.:/\-])(?:\+\d{1,3}[\s.\-]?)?"
    r"(?:\(\d{3}\)\s?\d{3}[\s.\-]?\d{4}|\d{3}[\s.\-]\d{3}[\s.\-]\d{4}|\d{3}[.\-]\d{4})"
    r"(?![\w.\-])"
)
_DIGITS = re.compile(r"(?<![\w.\-])\d{6,}(?![\w\-])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_QUERY_NAME = re.compile(r"[A-Za-z_][\w.:\-]{0,63}")


def redact_text(text: str) -> str:
    """The text with every PHI-looking part replaced (see the module docstring)."""
    if "resourceType" in text:
        text = _redact_resources(text)
    text = _SEGMENT.sub(_keep_segment_id, text)
    text = _QUOTED_PAIR.sub(_keep_key, text)
    text = _BARE_PAIR.sub(_keep_key, text)
    text = _EMAIL.sub(REDACTED, text)
    text = _SSN.sub(REDACTED, text)
    text = _PHONE.sub(REDACTED, text)
    return _DIGITS.sub(REDACTED, text)


def safe_text(text: str, max_len: int = 200) -> str:
    """Redacted, control characters blanked, bounded: for error texts and span values."""
    text = _CONTROL.sub(" ", redact_text(text))
    return text if len(text) <= max_len else text[: max(max_len - 1, 0)] + "…"


def redact_query(query_string: str) -> str:
    """A URL query with every value replaced by `*`; names kept if they look like names."""
    prefix = "?" if query_string.startswith("?") else ""
    parts = []
    for part in query_string[len(prefix):].split("&"):
        if not part:
            continue
        name, has_value, _ = part.partition("=")
        # A bare item or an odd name may itself be a value ('?Quixote').
        safe_name = name if _QUERY_NAME.fullmatch(name) else "*"
        parts.append(f"{safe_name}=*" if has_value else "*")
    return prefix + "&".join(parts)


def _keep_segment_id(match: re.Match[str]) -> str:
    return match.group(0)[:4] + REDACTED


def _keep_key(match: re.Match[str]) -> str:
    return match.group("key") + REDACTED


def _redact_resources(text: str) -> str:
    """Replace each outermost {...} holding a resourceType key; to the end if unbalanced."""
    found = list(_RESOURCE_KEY.finditer(text))
    if not found:
        return text
    keys = [m.start() for m in found]
    repr_style = all("'" in m.group(0) for m in found)
    spans: list[tuple[int, int]] = []
    depth = 0
    top = -1  # where the current outermost object starts
    marked = False  # the current outermost object holds a resourceType key
    k = 0
    for token in (_REPR_TOKEN if repr_style else _JSON_TOKEN).finditer(text):
        start = token.start()
        while k < len(keys) and keys[k] < start:
            if depth == 0:  # a key outside any object: a fragment, cut from there
                spans.append((keys[k], len(text)))
                return _cut(text, spans)
            marked = True
            k += 1
        char = token.group(0)
        if char == "{":
            if depth == 0:
                top, marked = start, False
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
            if depth == 0 and marked:
                spans.append((top, token.end()))
                marked = False
        elif char not in "{}" and k < len(keys) and keys[k] < token.end():
            # The key sits inside a string token (escaped JSON inside JSON).
            if depth == 0:
                spans.append((keys[k], len(text)))
                return _cut(text, spans)
            marked = True
            while k < len(keys) and keys[k] < token.end():
                k += 1
    if k < len(keys) and depth == 0:
        spans.append((keys[k], len(text)))
    elif (k < len(keys) or marked) and depth > 0:
        spans.append((top, len(text)))
    return _cut(text, spans)


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    out: list[str] = []
    last = 0
    for start, end in spans:
        out += [text[last:start], REDACTED_RESOURCE]
        last = end
    out.append(text[last:])
    return "".join(out)


def safe_traceback(exc_type: type[BaseException], exc: BaseException,
                   tb: TracebackType | None) -> str:
    """A traceback with exception type names and file:line of each frame, no messages."""
    lines: list[str] = []
    for chained, note in reversed(_chain(exc)):  # Python prints the oldest first
        if lines:
            lines += ["", note, ""]
        lines.append("Traceback (most recent call last):")
        frames = traceback.extract_tb(tb if chained is exc else chained.__traceback__)
        lines += [f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in frames]
        kind = exc_type if chained is exc else type(chained)
        name = kind.__qualname__ if kind.__module__ == "builtins" else (
            f"{kind.__module__}.{kind.__qualname__}")
        lines.append(f"{name}: [message redacted]")
    return "\n".join(lines)


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def _chain(exc: BaseException) -> list[tuple[BaseException, str]]:
    """The chain newest first, each with the note printed between it and its cause."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__cause__ is not None:
            older, note = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            older, note = current.__context__, _CONTEXT
        else:
            older, note = None, ""
        chain.append((current, note))
        current = older
    return chain


class PhiRedactingFilter(logging.Filter):
    """Rewrites each record's message, args and exception text without PHI; never drops."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_phi_redacted", False):
            return True  # already done by another handler's filter
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):
            # Arguments that don't fit the format: keep the template, never the arguments.
            message = str(record.msg) + " [unformattable arguments dropped]"
        record.msg = redact_text(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            kind, exc, tb = record.exc_info
            record.exc_text = safe_traceback(kind or type(exc), exc, tb)
            # Formatters render exc_info themselves unless it is gone; exc_text remains.
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        record._phi_redacted = True
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add the filter to the logger's handlers (default: root) and to the logger itself.

    Handler filters see every record the handler emits, including those propagated from
    child loggers; the logger-level filter also covers handlers added after this call,
    but only for records logged on that logger itself. So call this after logging is
    configured, and again if handlers are added later.
    """
    target = logger if logger is not None else logging.getLogger()
    for filterer in (target, *target.handlers):
        if not any(isinstance(f, PhiRedactingFilter) for f in filterer.filters):
            filterer.addFilter(PhiRedactingFilter())
