"""`isthmus translate`: HL7 v2 to FHIR R4 Bundles, or FHIR R4 to HL7 v2, on stdout.

Its start-up time matters: the codecs and the mapping engine are imported inside the
functions, once the direction is known."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.shared import settings_from, tables_or_exit

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers
    from gateway.config import Settings
    from gateway.fhir.bundle import Json
    from gateway.mapping.engine import Translator


def add_parser(sub: Subparsers) -> None:
    translate = sub.add_parser(
        "translate", help="HL7 v2 to FHIR R4 Bundles, or FHIR R4 to HL7 v2, on stdout")
    translate.add_argument("files", nargs="*", default=["-"], metavar="FILE|-",
                           help="input files; '-' or nothing reads stdin")
    translate.add_argument("--to", choices=("fhir", "hl7"),
                           help="output format (default: the other one than the input)")
    translate.add_argument("--pretty", action="store_true", help="indented JSON")
    translate.add_argument("--event", help="v2 event for FHIR input, e.g. A28 or S14")
    translate.add_argument(
        "--allow-incomplete", action="store_true",
        help="FHIR to v2: print a message even when a field HL7 requires is empty (e.g. "
             "PID-3 of a Patient without an identifier); warned about either way")
    translate.set_defaults(run=_translate)


def _translate(args: argparse.Namespace) -> int:

    inputs: list[tuple[str, bytes]] = []
    for name in args.files:
        try:
            inputs.append((name, sys.stdin.buffer.read() if name == "-"
                           else Path(name).read_bytes()))
        except OSError as exc:
            print(f"isthmus translate: {name}: {exc.strerror}", file=sys.stderr)
            return 2
    looks_like_json = inputs[0][1].lstrip()[:1] in (b"{", b"[")
    target = args.to or ("hl7" if looks_like_json else "fhir")
    settings = settings_from(args)
    if target == "hl7":
        return max(_fhir_to_hl7(data, args.event, args.allow_incomplete) for _, data in inputs)
    translator = tables_or_exit(lambda: _load(settings))
    if translator is None:
        return 2
    return _hl7_to_fhir(translator, inputs, args.pretty)


def _load(settings: Settings) -> Translator:
    """The tables, without the rest of the gateway (this command's start-up is its cost),
    the FHIR model's answers read from the cache file when it has them."""
    from gateway.config.cache import compiled_tables_dir, facts_file
    from gateway.mapping.engine import Translator
    from gateway.mapping.tables import SHIPPED

    mapping = settings.mapping
    return Translator.load(mapping.tables_dir or SHIPPED, mapping.site_dir,
                           mapping.default_offset, facts=facts_file(),
                           cache=compiled_tables_dir())


def _hl7_to_fhir(translator: Translator, inputs: list[tuple[str, bytes]],
                 pretty: bool) -> int:
    """Every message of every input translated on its own: the Bundles of those that
    translate on stdout, one line on stderr per refusal, exit 2 if anything was refused."""
    from gateway.fhir.jsonio import dumps

    bundles: list[Json] = []
    refused = False
    for name, data in inputs:
        label = f"{name}: " if len(inputs) > 1 else ""
        refused |= not _translate_input(translator, data, label, bundles)
    if bundles:
        # One Bundle alone, several as a JSON array (which bundle.dumps, typed for one
        # document, does not take; it is the same serialiser).
        document: Json | list[Json] = bundles[0] if len(bundles) == 1 else bundles
        sys.stdout.buffer.write(dumps(document, pretty=pretty) + b"\n")
    return 2 if refused else 0


def _translate_input(translator: Translator, data: bytes, label: str,
                     bundles: list[Json]) -> bool:
    """The messages of one input, each translated or refused alone (a refusal does not
    cost the others); True if none was refused."""
    from gateway.fhir.bundle import to_bundle
    from gateway.hl7.batch import split_messages
    from gateway.hl7.errors import Hl7Error
    from gateway.hl7.message import check_header, parse_message
    from gateway.hl7.structure import missing_segments
    from gateway.mapping.errors import TranslationError

    try:
        messages = split_messages(data)
    except Hl7Error as exc:
        print(f"isthmus translate: {label}{exc.location or 'input'}: {exc.reason}",
              file=sys.stderr)
        return False
    if not messages:
        print(f"isthmus translate: {label}the input holds no HL7 v2 message", file=sys.stderr)
        return False
    clean = True
    for number, raw in enumerate(messages, 1):
        prefix = label + (f"message {number}: " if len(messages) > 1 else "")
        try:
            message = parse_message(raw)
            check_header(message.header)
            missing = missing_segments(message)
            if missing:
                raise missing[0]
            bundles.append(to_bundle(translator.translate(message)))
        except Hl7Error as exc:
            where = f"{exc.location}: " if exc.location else ""
            print(f"isthmus translate: {prefix}{where}{exc.reason}", file=sys.stderr)
            clean = False
        except TranslationError as exc:
            print(f"isthmus translate: {prefix}{exc}", file=sys.stderr)
            clean = False
    return clean


def _fhir_to_hl7(data: bytes, event: str | None, allow_incomplete: bool) -> int:
    import orjson

    try:
        from gateway.mapping.to_v2 import Reverser
    except ImportError:
        print("isthmus translate: FHIR to HL7 v2 is not available in this build",
              file=sys.stderr)
        return 2
    from gateway.mapping.errors import TranslationError

    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        print(f"isthmus translate: the input is not JSON (line {exc.lineno}, column "
              f"{exc.colno})", file=sys.stderr)
        return 2
    if not isinstance(document, dict):
        print("isthmus translate: expected a FHIR resource or Bundle (a JSON object)",
              file=sys.stderr)
        return 2
    reverser = tables_or_exit(Reverser.load)
    if reverser is None:
        return 2
    try:
        messages = reverser.to_v2(document, event=event)
    except (TranslationError, ValueError) as exc:
        print(f"isthmus translate: {exc}", file=sys.stderr)
        return 2
    gaps = [_required_but_empty(message) for message in messages]
    for number, missing in enumerate(gaps, 1):
        prefix = f"message {number}: " if len(messages) > 1 else ""
        for location, reason in missing:
            print(f"isthmus translate: {'warning: ' if allow_incomplete else ''}{prefix}"
                  f"{location}: {reason}", file=sys.stderr)
    if any(gaps) and not allow_incomplete:
        print("isthmus translate: the resource lacks what HL7 v2 requires there; nothing "
              "printed (--allow-incomplete prints it anyway)", file=sys.stderr)
        return 2
    for message in messages:
        sys.stdout.write(message.replace("\r", "\n") if sys.stdout.isatty() else message)
        sys.stdout.write("\n")
    return 0


def _required_but_empty(text: str) -> list[tuple[str, str]]:
    """(location, reason) of every field the message's HL7 version requires and ours left
    empty, by the standard's segment definitions (the checks MLLP's strict level runs)."""
    from gateway.hl7.errors import ErrorCode
    from gateway.hl7.message import parse_message
    from gateway.hl7.validate import validate

    found = validate(parse_message(text.encode("utf-8")), "strict")
    return [(str(error.location or "message"), error.reason) for error in found
            if error.code == ErrorCode.REQUIRED_FIELD_MISSING]
