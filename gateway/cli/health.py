"""`isthmus health`: ask the gateway the same config runs whether it is ready (/readyz).

Container health checks call this instead of a fixed URL, so the check follows
server.http_port and server.host wherever they are set (file or ISTHMUS_* environment)."""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from gateway.cli.shared import settings_from

if TYPE_CHECKING:
    from gateway.cli.shared import Subparsers

# Addresses that mean "every interface" are reached on loopback from inside the host.
_ANY_ADDRESS = {"0.0.0.0", "::", ""}


def add_parser(sub: Subparsers) -> None:
    health = sub.add_parser(
        "health", help="exit 0 if the configured gateway answers /readyz with 200")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    health.set_defaults(run=_health)


def _health(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    host = settings.server.host
    host = "127.0.0.1" if host in _ANY_ADDRESS else host
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{settings.server.http_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        print(f"isthmus health: {url}: {reason or type(exc).__name__}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"isthmus health: {url}: HTTP {status}", file=sys.stderr)
        return 1
    print(f"ready ({url})")
    return 0
