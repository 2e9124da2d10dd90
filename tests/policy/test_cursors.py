"""Paging cursors: what the facade hands out instead of a backend's continuation opens
only unchanged, for the client it was issued to, before it expires, and says nothing of
what it holds."""

from __future__ import annotations

import pytest

from gateway.policy.cursors import MAX_CURSOR_CHARS, PageCursors
from gateway.policy.errors import CursorRefused

CONTENT = {"u": "Slot?-pageContext=CANARY-CONTEXT-77&-pageDirection=NEXT", "p": []}


def test_a_cursor_opens_for_its_client_with_its_content() -> None:
    cursors = PageCursors()
    cursor = cursors.seal("agent-1", CONTENT)
    assert cursors.open("agent-1", cursor) == CONTENT
    assert "CANARY" not in cursor and "pageContext" not in cursor


def test_another_clients_cursor_is_refused() -> None:
    cursors = PageCursors()
    with pytest.raises(CursorRefused, match="not issued to this client"):
        cursors.open("agent-2", cursors.seal("agent-1", CONTENT))


@pytest.mark.parametrize("mangle", [
    lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),
    lambda c: c[:20],
    lambda c: "!" + c,
    lambda c: "x" * (MAX_CURSOR_CHARS + 1),
])
def test_a_changed_cursor_is_refused(mangle: object) -> None:
    cursors = PageCursors()
    cursor = cursors.seal("agent-1", CONTENT)
    with pytest.raises(CursorRefused):
        cursors.open("agent-1", mangle(cursor))  # type: ignore[operator]


def test_another_gateways_cursor_is_refused() -> None:
    with pytest.raises(CursorRefused):
        PageCursors().open("agent-1", PageCursors().seal("agent-1", CONTENT))


def test_a_cursor_expires() -> None:
    now = [1000.0]
    cursors = PageCursors(lifetime=60, clock=lambda: now[0])
    cursor = cursors.seal("agent-1", CONTENT)
    now[0] += 59
    assert cursors.open("agent-1", cursor) == CONTENT
    now[0] += 2
    with pytest.raises(CursorRefused, match="expired"):
        cursors.open("agent-1", cursor)


def test_the_same_key_opens_across_instances() -> None:
    key = bytes(range(32))
    assert PageCursors(key).open("a", PageCursors(key).seal("a", CONTENT)) == CONTENT


def test_cursors_derived_from_one_secret_open_across_instances() -> None:
    secret = b"the audit signing key's mac key, shared by instances"
    cursor = PageCursors.derived(secret).seal("a", CONTENT)
    assert PageCursors.derived(secret).open("a", cursor) == CONTENT
    with pytest.raises(CursorRefused):
        PageCursors.derived(b"another gateway's").open("a", cursor)
