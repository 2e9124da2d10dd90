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
    from gateway.fhir.bundle import Json
    from gateway.mapping.engine import Translator


def add_parser(sub: Subparsers) -> None:
    translate = sub.add_parser(
        "translate", help="HL7 v2 to FHIR R4 Bundles, or FHIR R4 to HL7 v2, on stdout")
    translate.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                           help="input file; '-' or nothing reads stdin")
    translate.add_argument("--to", choices=("fhir", "hl7"),
                           help="output format (default: the other one than the input)")
    translate.add_argument("--pretty", action="store_true", help="indented JSON")
    translate.add_argument("--event", help="v2 event for FHIR input, e.g. A28 or S14")
    translate.set_defaults(run=_translate)


def _translate(args: argparse.Namespace) -> int:
    from gateway.app import load_translator

    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        print(f"isthmus translate: {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    looks_like_json = data.lstrip()[:1] in (b"{", b"[")
    target = args.to or ("hl7" if looks_like_json else "fhir")
    settings = settings_from(args)
    if target == "hl7":
        return _fhir_to_hl7(data, args.event)
    translator = tables_or_exit(lambda: load_translator(settings))
    if translator is None:
        return 2
    return _hl7_to_fhir(translator, data, args.pretty)


def _hl7_to_fhir(translator: Translator, data: bytes, pretty: bool) -> int:
    from gateway.fhir.bundle import to_bundle
    from gateway.fhir.jsonio import dumps
    from gateway.hl7.batch import split_messages
    from gateway.hl7.errors import Hl7Error
    from gateway.hl7.message import check_header, parse_message
    from gateway.mapping.errors import TranslationError

    bundles = []
    try:
        messages = split_messages(data)
    except Hl7Error as exc:
        print(f"isthmus translate: {exc.location or 'input'}: {exc.reason}", file=sys.stderr)
        return 2
    if not messages:
        print("isthmus translate: the input holds no HL7 v2 message", file=sys.stderr)
        return 2
    for number, raw in enumerate(messages, 1):
        prefix = f"message {number}: " if len(messages) > 1 else ""
        try:
            message = parse_message(raw)
            check_header(message.header)
            bundles.append(to_bundle(translator.translate(message)))
        except Hl7Error as exc:
            where = f"{exc.location}: " if exc.location else ""
            print(f"isthmus translate: {prefix}{where}{exc.reason}", file=sys.stderr)
            return 2
        except TranslationError as exc:
            print(f"isthmus translate: {prefix}{exc}", file=sys.stderr)
            return 2
    # One Bundle alone, several as a JSON array (which bundle.dumps, typed for one
    # document, does not take; it is the same serialiser).
    document: Json | list[Json] = bundles[0] if len(bundles) == 1 else bundles
    sys.stdout.buffer.write(dumps(document, pretty=pretty) + b"\n")
    return 0


def _fhir_to_hl7(data: bytes, event: str | None) -> int:
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
    for message in messages:
        sys.stdout.write(message.replace("\r", "\n") if sys.stdout.isatty() else message)
        sys.stdout.write("\n")
    return 0
