"""A gateway with console users, and a signed-in console session over HTTP."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp

from conftest import RunningGateway, start_gateway
from gateway.edge.console.passwords import hash_password

PASSWORD = "synthetic-console-password-1"
# Fast hashes for tests: the cost parameters travel in the hash, so checks stay exact.
_HASH = hash_password(PASSWORD, n=1 << 10)
USERS = [
    {"name": "ops", "password_hash": _HASH, "roles": ["operator"], "phi": True},
    {"name": "ops-nophi", "password_hash": _HASH, "roles": ["operator"], "phi": False},
    {"name": "reviewer", "password_hash": _HASH, "roles": ["reviewer"]},
    {"name": "admin", "password_hash": _HASH, "roles": ["admin"], "phi": True},
]
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def start_console_gateway(data_dir: Path, **overrides: Any) -> RunningGateway:
    return await start_gateway(data_dir, **{"console.users": USERS, **overrides})


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, html
    return found.group(1)


async def sign_in(gateway: RunningGateway, name: str,
                  password: str = PASSWORD) -> tuple[aiohttp.ClientSession, str]:
    """A session signed in as `name` (cookies kept) and its CSRF token."""
    http = aiohttp.ClientSession(base_url=gateway.http_url,
                                 cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with http.get("/console/login") as answer:
        token = csrf_of(await answer.text())
    async with http.post("/console/login", data={"name": name, "password": password,
                                                 "csrf": token}) as answer:
        html = await answer.text()
        assert answer.status == 200, html
    return http, csrf_of(html)
