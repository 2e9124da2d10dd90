"""`isthmus auth api-key`: a new API key for the FHIR API, shown once, with the config
lines that grant it (only its SHA-256 goes into the config)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers


def add_parser(sub: Subparsers) -> None:
    auth = sub.add_parser("auth", help="credentials for the FHIR API")
    auth_sub = auth.add_subparsers(metavar="ACTION")
    api_key = auth_sub.add_parser(
        "api-key", help="make a new API key; prints it once, and the config lines to add")
    api_key.add_argument("name", help="a name for the key (letters, digits, . _ @ -)")
    api_key.add_argument("--scope", action="append", default=[], metavar="SCOPE",
                         help="a SMART scope to grant, e.g. 'system/Patient.rs' (repeat)")
    api_key.add_argument("--profile", help="a minimum-necessary profile from [profiles]")
    api_key.set_defaults(run=_auth_api_key)


def _auth_api_key(args: argparse.Namespace) -> int:
    import hashlib
    import json
    import re
    import secrets

    from gateway.policy.scopes import ScopeError, ScopeSet

    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", args.name):
        print("isthmus auth api-key: the name may hold letters, digits and . _ @ - only",
              file=sys.stderr)
        return 2
    scopes = args.scope or ["system/*.rs"]
    try:
        ScopeSet.parse(scopes)
    except ScopeError as exc:
        print(f"isthmus auth api-key: {exc}", file=sys.stderr)
        return 2
    key = secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    print(f"# API key '{args.name}' (shown once; send it as the X-API-Key header):")
    print(key)
    print("# add to the config file:")
    print("[[auth.api_keys]]")
    print(f"name = {json.dumps(args.name)}")
    print(f'key_sha256 = "{digest}"')
    print(f"scopes = {json.dumps(scopes)}")
    if args.profile:
        print(f"profile = {json.dumps(args.profile)}")
    return 0
