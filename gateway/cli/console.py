"""`isthmus console user NAME --role R`: a console user's config lines, with a salted
scrypt hash of a password read from the terminal (or stdin with --password-stdin)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers

_MIN_LENGTH = 12


def add_parser(sub: Subparsers) -> None:
    console = sub.add_parser("console", help="the operator console at /console")
    actions = console.add_subparsers(metavar="ACTION")
    user = actions.add_parser("user", help="print the config lines of a console user")
    user.add_argument("name", help="a name (letters, digits, . _ @ -)")
    user.add_argument("--role", action="append", required=True,
                      choices=("operator", "reviewer", "admin"), help="repeat for several")
    user.add_argument("--phi", action="store_true", help="may open a message's content")
    user.add_argument("--password-stdin", action="store_true",
                      help="read the password from stdin (one line) instead of the terminal")
    user.set_defaults(run=_user)


def _user(args: argparse.Namespace) -> int:
    from gateway.config import ConsoleUser
    from gateway.edge.console.passwords import hash_password

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("isthmus console user: the passwords differ", file=sys.stderr)
            return 2
    if len(password) < _MIN_LENGTH:
        print(f"isthmus console user: a password needs {_MIN_LENGTH} characters at least",
              file=sys.stderr)
        return 2
    try:
        user = ConsoleUser(name=args.name, password_hash=hash_password(password),
                           roles=tuple(dict.fromkeys(args.role)), phi=args.phi)
    except ValueError:
        print("isthmus console user: a name is 1 to 64 letters, digits, . _ @ -",
              file=sys.stderr)
        return 2
    roles = ", ".join(f'"{r}"' for r in user.roles)
    print("[[console.users]]")
    print(f'name = "{user.name}"')
    print(f'password_hash = "{user.password_hash}"')
    print(f"roles = [{roles}]")
    print(f"phi = {'true' if user.phi else 'false'}")
    return 0
