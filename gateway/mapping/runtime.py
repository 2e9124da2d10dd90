"""The state of one translation: the message being read, and the resources being built.

Compiled tables (the compiler package) are closures over these objects; nothing here
interprets table text.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import orjson

from gateway.hl7.delimiters import Delimiters
from gateway.hl7.escape import unescape
from gateway.hl7.message import Message, Segment

Json = dict[str, Any]
F = TypeVar("F", bound=Callable[..., Any])
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

NULL = '""'  # the HL7 explicit null: "no value", never the two-character text
_new_dict = dict.__new__
_dumps = orjson.dumps
_SORT_KEYS = orjson.OPT_SORT_KEYS


class Draft:
    """A resource being built: its type, content, identity and place in the bundle.

    Made by `Run.new_draft`, which sets every attribute: not a
    Draft.__init__, as calling a class runs __init__ through the type's slot (a C call and
    a fresh interpreter frame), dearer than the stores; without one, `Draft()` is all C
    (and cheaper than object.__new__(Draft), which checks its arguments as a method)."""

    __slots__ = ("resource_type", "content", "primary", "ordinal", "full_url", "identity",
                 "digest")

    resource_type: str
    content: Json
    primary: bool  # made from a segment of its own, not only referred to
    ordinal: int  # how many resources of its type the message made before it
    full_url: str  # "urn:uuid:" and its id, once the ids are known (`engine._finish`)
    identity: str  # a referred-to resource: what makes it the same one next time
    # What a reference to it holds until the ids are known (`Run.reference`): a resource
    # made from a segment, its identity as made (only `engine._finish` changes it, once
    # every reference is made); one only referred to, a digest of its identity.
    digest: str


class Run:
    """One message's translation: reading helpers and the resources produced so far."""

    __slots__ = ("message", "d", "charset", "drafts", "current", "unmapped", "z_segments",
                 "_referenced", "pending_refs", "offset", "latest", "ordinals")

    def __init__(self, message: Message, default_offset: str = "+00:00") -> None:
        self.message = message
        self.d: Delimiters = message.delimiters
        self.charset = message.charset
        self.drafts: list[Draft] = []
        self.current: dict[str, Draft] = {}
        # An empty Counter without Counter.__init__ (a Python-level update() of nothing).
        self.unmapped: Counter[str] = _new_dict(Counter)
        self.z_segments = 0
        self._referenced: dict[str, Draft] = {}
        # References whose target's fullUrl is known only once every id is (at the end).
        self.pending_refs: list[tuple[Json, Draft]] = []
        # Resource type -> how many the message made so far (`new_draft`).
        self.ordinals: dict[str, int] = {}
        # A local time without an offset is read in the sender's zone: MSH-7's offset when
        # the sender gave one, else the site's configured offset. Read from MSH-7 as kept
        # (`_OFFSETS`): working it out cost ~7k instructions a message, and a sender's
        # messages of one second share MSH-7.
        msh7 = message.header_value(7)
        offset = _OFFSETS.get(msh7)
        if offset is None:
            offset = remember(_OFFSETS, msh7, _offset_of(msh7), len(msh7))
        self.offset = offset or default_offset
        # The latest segment of each id read so far (fields of other segments come from it).
        self.latest: dict[str, Segment] = {}

    def text(self, raw: str) -> str:
        return unescape(raw, self.d, self.charset) if self.d.escape in raw else raw

    def new_draft(self, resource_type: str, content: Json | None = None,
                  primary: bool = True, identity: str = "") -> Draft:
        """A resource of this message: made from a segment (`steps.apply_step`), or only
        referred to (`reference_to`), with its place among the resources of its type."""
        # The ordinal: how many resources of this type came before (stable ids by position).
        ordinals = self.ordinals
        ordinal = ordinals.get(resource_type, 0)
        ordinals[resource_type] = ordinal + 1
        draft = Draft()
        draft.resource_type = resource_type
        draft.content = {} if content is None else content
        draft.primary = primary
        draft.ordinal = ordinal
        draft.full_url = ""
        draft.identity = identity
        draft.digest = identity
        self.drafts.append(draft)
        return draft

    def reference_to(self, resource_type: str, content: Json) -> Json:
        """Add a resource that another one points at (a Practitioner from an XCN, ...),
        once per identity within the message, and return the reference to it."""
        # The identity and `reference` written inline: a message refers to a
        # Practitioner, a Location, an Organization a dozen times.
        for identifier in content.get("identifier", ()):
            value = identifier.get("value")
            if value:
                identity = f"{resource_type}|{identifier.get('system', '')}|{value}"
                break
        else:
            # Without an identifier only an identical resource is the same one (two beds
            # of a ward, a facility and a point of care sharing a name, stay apart).
            text = _dumps(content, option=_SORT_KEYS, default=str).decode()
            identity = f"{resource_type}|~{text}"  # one string made, not two
        referenced = self._referenced
        draft = referenced.get(identity)
        if draft is None:
            draft = referenced[identity] = self.new_draft(resource_type, content, False,
                                                          identity)
            # The same doctor, ward, facility come again in the sender's next messages.
            digest = draft.digest = (_REFERRED_DIGESTS.get(identity) or remember(
                _REFERRED_DIGESTS, identity, _digest(identity), len(identity)))
        else:
            _merge(draft.content, content)
            digest = draft.digest  # set when it was made
        ref: Json = {"reference": digest}
        self.pending_refs.append((ref, draft))
        return ref

    def reference(self, target: Draft) -> Json:
        """A Reference to a resource of this message, resolved when the ids are known."""
        # Until the ids are known the reference holds its target's identity, so a resource
        # that points at another is only the same as one pointing at the same (room 408
        # of ward 4E is not room 408 of ward 5W). The target is one made from a segment
        # (`steps.apply_step`'s links), and so is the resource the reference goes into:
        # no content identity is made of it (`reference_to`'s are), so the identity itself
        # serves, unhashed (equal exactly when its digest would be), set by `new_draft`.
        ref: Json = {"reference": target.digest}
        self.pending_refs.append((ref, target))
        return ref


def _digest(identity: str) -> str:
    return hashlib.blake2b(identity.encode(), digest_size=12).hexdigest()


# identity -> digest of referred-to resources, across messages (`Run.reference_to`).
_REFERRED_DIGESTS: dict[str, str] = {}


def remember(kept: dict[K, V], key: K, value: V, length: int) -> V:
    """`value`, kept under `key` for the messages after this one: bounded, as the generated
    tables' converted values are (keys of up to 512 characters, `length` being the key's;
    cleared at 4,096)."""
    if length <= 512:
        if len(kept) >= 4096:
            kept.clear()
        kept[key] = value
    return value


def _merge(into: Json, other: Json) -> None:
    """Two views of one referred-to resource (MSH-4 `NORTHSIDE`, PID-3's
    `NORTHSIDE&1.2.3.4.5&ISO`): what either says, the first one's single values first."""
    for key, value in other.items():
        current = into.get(key)
        if current is None:
            into[key] = value
        elif isinstance(current, list) and isinstance(value, list):
            current.extend(item for item in value if item not in current)


# MSH-7 -> its offset (`_offset_of`, "" for none), across messages.
_OFFSETS: dict[str, str] = {}


def _offset_of(msh7: str) -> str:
    """The `+hh:mm` of an MSH-7 that ends in one: `convert.MSH7_OFFSET`'s match, by string
    methods (every translation runs this; the regex and its groups were most of its cost):
    digits, perhaps a fraction, a sign and four digits, nothing after but a last LF."""
    if msh7[-1:] == "\n":
        msh7 = msh7[:-1]  # `$` matches before a final newline
    sign = msh7[-5:-4]
    if sign != "+" and sign != "-":
        return ""
    hours_minutes = msh7[-4:]
    stamp, dot, fraction = msh7[:-5].partition(".")
    # `str.isdecimal` is the regex's `\d` (Unicode category Nd).
    if not (hours_minutes.isdecimal() and 4 <= len(stamp) <= 14 and stamp.isdecimal()):
        return ""
    if dot and not (len(fraction) <= 4 and fraction.isdecimal()):
        return ""
    return f"{sign}{hours_minutes[:2]}:{hours_minutes[2:]}"


def leaf(raw: str, separators: str) -> str:
    """The first part of a value at the deepest level (no further components)."""
    for sep in separators:
        if sep in raw:
            raw = raw.split(sep, 1)[0]
    return raw


class Scope:
    """What a row reads: the parts at its level, and the repetition being mapped."""

    __slots__ = ("parts", "seps", "run", "rep_field", "rep", "rep_tag", "src_tag", "memo")

    def __init__(self, parts: list[str], seps: str, run: Run) -> None:
        self.memo: dict[tuple[int, int, int], str] = {}
        self.parts = parts
        self.seps = seps
        self.run = run
        self.rep_field = 0
        self.rep = ""
        # Instance keys: rows of one source and repetition share unindexed instances
        # (src_tag); indexed ones (coding[1]) are shared by every row of the repetition.
        self.rep_tag = "#1"
        self.src_tag = "@#1"


# -- reading wire text at a row's place (component/subcomponent 0: not named) ------------


def first_repetition(field: str, run: Run) -> str:
    rep = run.d.repetition
    return field.split(rep, 1)[0] if rep in field else field


def descend(raw: str, run: Run, component: int, subcomponent: int) -> str:
    if component:
        parts = raw.split(run.d.component)
        raw = parts[component - 1] if component <= len(parts) else ""
        if subcomponent:
            pieces = raw.split(run.d.subcomponent)
            raw = pieces[subcomponent - 1] if subcomponent <= len(pieces) else ""
    return raw


def part_below(raw: str, seps: str, position: int) -> str:
    """The position-th part one level down; with no level left the value is its own first."""
    if not seps:
        return raw if position == 1 else ""
    pieces = raw.split(seps[0])
    return pieces[position - 1] if position <= len(pieces) else ""


def separators_below(run: Run, component: int, subcomponent: int) -> str:
    if subcomponent:
        return ""
    if component:
        return run.d.subcomponent
    return run.d.component + run.d.subcomponent


def described(fn: F, *spec: object) -> F:
    """`fn` with what it does written on it, for the code generator (`mapping.codegen`),
    which emits the same steps as Python source; a closure without one cannot be emitted."""
    fn.__dict__["spec"] = spec
    return fn


# -- reading a location as unescaped text, for conditions, templates and identities ------


def read_component(index: int, sub: int) -> Callable[[Scope], str]:
    """A component (CX.4, or CX.4.1) of the data type being mapped."""
    def component(scope: Scope) -> str:
        parts = scope.parts
        raw = parts[index] if index < len(parts) else ""
        if sub:
            raw = part_below(raw, scope.seps, sub)
        raw = "" if raw == NULL else raw
        return scope.run.text(raw)
    return described(component, "read_component", index, sub)


def read_other(segment_id: str, f: int, c: int, s: int) -> Callable[[Scope], str]:
    """Another segment's field, from its nearest occurrence so far (the OBR above an OBX)."""
    def other(scope: Scope) -> str:
        run = scope.run
        segment = run.latest.get(segment_id) or run.message.segment(segment_id)
        if segment is None:
            return ""
        # `own_value` reads a field as this does (first repetition, the place, unescaped).
        return own_value(segment.field(f), run, c, s)
    return described(other, "read_other", segment_id, f, c, s)


def read_repetition(f: int, c: int, s: int, nth: int) -> Callable[[Scope], str]:
    """A named repetition (`OBX-5(2) VALUED`: does the field repeat?), read as it is,
    whichever repetition of that field is being mapped."""
    def repetition(scope: Scope) -> str:
        parts = scope.parts
        field = parts[f] if f < len(parts) else ""
        reps = field.split(scope.run.d.repetition) if field else []
        raw = descend(reps[nth - 1], scope.run, c, s) if nth <= len(reps) else ""
        return "" if raw == NULL else scope.run.text(raw)
    return described(repetition, "read_repetition", f, c, s, nth)


def read_own(f: int, c: int, s: int) -> Callable[[Scope], str]:
    """A field of the segment being mapped: the repetition being mapped when it is that
    field, else the field's first repetition."""
    key = (f, c, s)

    def own(scope: Scope) -> str:
        if scope.rep_field == f:
            raw = descend(scope.rep, scope.run, c, s)
            return "" if raw == NULL else scope.run.text(raw)
        # Another field of this segment does not change while the segment is mapped,
        # and conditions read the same one over and over (OBX-2 for every value row).
        memo = scope.memo
        value = memo.get(key)
        if value is None:
            parts = scope.parts
            value = memo[key] = own_value(parts[f] if f < len(parts) else "", scope.run, c, s)
        return value
    return described(own, "read_own", f, c, s)


def own_value(field: str, run: Run, component: int, subcomponent: int) -> str:
    """What `read_own` reads of a field that is not the one being repeated over: its first
    repetition, at the component and subcomponent named (0: not named), unescaped.
    `first_repetition` and `descend` written inline: this runs for most values a message
    has, and the two calls were a measurable share of a translation."""
    rep = run.d.repetition
    raw = field.split(rep, 1)[0] if rep in field else field
    if component:
        parts = raw.split(run.d.component)
        raw = parts[component - 1] if component <= len(parts) else ""
        if subcomponent:
            pieces = raw.split(run.d.subcomponent)
            raw = pieces[subcomponent - 1] if subcomponent <= len(pieces) else ""
    # The explicit null "" is no value: not VALUED, and nothing for a template.
    if raw == NULL:
        return ""
    return unescape(raw, run.d, run.charset) if run.d.escape in raw else raw


def fill(into: Json, value: Json) -> None:
    """A value written where one is already: what it adds (its keys, its list items)."""
    for key, item in value.items():
        if key not in into:
            into[key] = item
        elif isinstance(into[key], list) and isinstance(item, list):
            into[key].extend(item)
