"""The `isthmus` command line: serve, send, inbox, fhir, translate, mappings, audit, outbox,
webhooks, auth, store, health, console.

One module per command group, each adding its subparsers with `add_parser(sub)`; this
module only assembles them and runs the chosen command. Every group imports its heavy
modules inside the command functions, so that `isthmus translate` starts fast."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.cli import (
    audit,
    auth,
    console,
    fhir,
    health,
    inbox,
    mappings,
    outbox,
    send,
    serve,
    store,
    translate,
    webhooks,
)
from gateway.config import ConfigError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    # Files a command creates (stores and their WAL files, keys, exports) may hold PHI or
    # secrets: owner-only, whatever umask the caller had.
    os.umask(0o077)
    try:
        result: int = args.run(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isthmus", description="HL7 v2 <-> FHIR R4 integration gateway")
    parser.add_argument("--config", type=Path, help="TOML config file (or ISTHMUS_CONFIG)")
    sub = parser.add_subparsers(metavar="COMMAND")
    # `isthmus --help` lists the commands in this order.
    serve.add_parser(sub)
    send.add_parser(sub)
    inbox.add_parser(sub)
    fhir.add_parser(sub)
    translate.add_parser(sub)
    mappings.add_parser(sub)
    audit.add_parser(sub)
    outbox.add_parser(sub)
    webhooks.add_parser(sub)
    store.add_parser(sub)
    auth.add_parser(sub)
    health.add_parser(sub)
    console.add_parser(sub)
    _options_anywhere(parser)
    return parser


# Options users type after the command as often as before it: `isthmus serve --config F`,
# `isthmus inbox list --data-dir D`. Each is accepted on every command below the parser
# that declares it; SUPPRESS keeps an option given earlier from being reset to None.
_INHERITED = ("--config", "--data-dir")


def _options_anywhere(parser: argparse.ArgumentParser) -> None:
    for child in _children(parser):
        for flag in _INHERITED:
            action = parser._option_string_actions.get(flag)
            if action is None or flag in child._option_string_actions:
                continue
            child.add_argument(flag, type=action.type, help=action.help,  # type: ignore[arg-type]
                               default=argparse.SUPPRESS)
        _options_anywhere(child)


def _children(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of the subcommands directly below `parser`."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        # argparse keeps its subcommands in a private action class; nothing public lists them.
        if isinstance(action, argparse._SubParsersAction):
            found.extend(dict.fromkeys(action.choices.values()))
    return found
