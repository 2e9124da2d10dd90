"""PostgreSQL for the store tests: a schema of its own per test on the server at
ISTHMUS_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test), migrated,
dropped after. With CI=true a missing server fails the tests; elsewhere they skip, and
the session's header says so in one line (tests/conftest.py)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator
from functools import cache
from urllib.parse import urlsplit

import asyncpg
import pytest

from gateway.store.pg.connect import PgSpec, open_pool
from gateway.store.pg.migrate import migrate

URL = os.environ.get("ISTHMUS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
HOW_TO_ENABLE = ("start PostgreSQL on 127.0.0.1:5432 (trust auth, database 'test') or set "
                 "ISTHMUS_TEST_POSTGRES_URL=postgresql://user@host:port/db")


@cache
def reachable() -> bool:
    """Whether something listens where URL points (asked once per session)."""
    parts = urlsplit(URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432),
                                      timeout=2):
            return True
    except OSError:
        return False


def header_line() -> str:
    if reachable():
        return f"PostgreSQL store tests: on {URL}"
    if os.environ.get("CI") == "true":
        return f"PostgreSQL store tests: FAIL (CI=true) - no server at {URL}"
    return (f"PostgreSQL store tests: SKIPPED - no server at {URL}; to run them, "
            f"{HOW_TO_ENABLE}")


def require() -> None:
    """Skip (or, in CI, fail) the calling test when no server answers."""
    if reachable():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and no PostgreSQL at {URL}")
    pytest.skip(f"no PostgreSQL at {URL}: {HOW_TO_ENABLE}")


async def new_schema() -> PgSpec:
    """A fresh, migrated schema on the test server."""
    require()
    spec = PgSpec(URL, schema=f"t_{secrets.token_hex(6)}", pool_min_size=1,
                  pool_max_size=8, connect_timeout=5, statement_timeout=30)
    try:
        await migrate(spec)
    except BaseException:
        await drop_schema(spec)  # made before the migration that failed
        raise
    return spec


async def drop_schema(spec: PgSpec) -> None:
    connection = await asyncpg.connect(URL)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{spec.schema}" CASCADE')
    finally:
        await connection.close()


@pytest.fixture
async def pg_spec() -> AsyncIterator[PgSpec]:
    spec = await new_schema()
    try:
        yield spec
    finally:
        await drop_schema(spec)


@pytest.fixture
async def pg_pool(pg_spec: PgSpec) -> AsyncIterator[object]:
    pool = await open_pool(pg_spec)
    try:
        yield pool
    finally:
        await pool.close()
