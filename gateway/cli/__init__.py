"""The `isthmus` command line: serve, send, inbox, fhir, translate, mappings, audit, outbox,
webhooks, auth, store, health, console.

One module per command group, each adding its subparsers with `add_parser(sub)`; this
module only assembles them and runs the chosen command. Every group imports its heavy
modules inside the command functions, so that `isthmus translate` starts fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config import ConfigError

__all__ = ["main"]


# `isthmus --help` lists the commands in this order; each is the module of its name.
COMMANDS = ("serve", "send", "inbox", "fhir", "translate", "mappings", "audit", "outbox",
            "webhooks", "store", "auth", "health", "console")


def main(argv: Sequence[str] | None = None) -> int:
    # Only the command given is imported (what `isthmus translate` imports is its start-up
    # time); without one, or with an unknown one, every command, for the help and errors.
    command = _command_word(sys.argv[1:] if argv is None else list(argv))
    parser = _parser((command,) if command in COMMANDS else COMMANDS)
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


def _parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isthmus", description="HL7 v2 <-> FHIR R4 integration gateway")
    parser.add_argument("--config", type=Path, help="TOML config file (or ISTHMUS_CONFIG)")
    sub = parser.add_subparsers(metavar="COMMAND")
    for name in commands:
        importlib.import_module(f"gateway.cli.{name}").add_parser(sub)
    _options_anywhere(parser)
    return parser


def _command_word(argv: list[str]) -> str:
    """The command named on the line: the first word that is not an option before it
    (nor `--config`'s value)."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return ""


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
