"""Apply turns on PostgreSQL (gateway.store.pg.turns): a row's turn gives its patient's
rows up to it still `translated`, oldest first; a second instance's turn for the same
patient waits until the first ends and then sees what it marked; other patients, and
rows without a patient, do not wait."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from gateway.store.inbox import APPLIED, TRANSLATED
from gateway.store.pg.connect import PgSpec, Pool
from gateway.store.pg.inbox import PgInbox
from gateway.store.pg.turns import PgApplyTurns
from support.backends import inbound


async def _rows(inbox: PgInbox, *patients: str) -> list[int]:
    """One translated row per patient key given, in order: their inbox ids."""
    return [(await inbox.accept(replace(inbound(f"T-{n}", patient_key=patient),
                                        status=TRANSLATED))).inbox_id
            for n, patient in enumerate(patients)]


async def test_a_turn_gives_the_patients_earlier_rows_still_to_apply(
        pg_spec: PgSpec, pg_pool: Pool) -> None:
    inbox = await PgInbox.open(pg_pool)
    turns = PgApplyTurns(pg_spec)
    try:
        p1, q1, p2, none, p3 = await _rows(inbox, "P", "Q", "P", "", "P")
        await inbox.set_statuses([(p1, APPLIED, "")])
        async with turns.turn(p3) as pending:
            assert pending == [p2, p3]
        async with turns.turn(q1) as pending:
            assert pending == [q1]
        async with turns.turn(none) as pending:
            assert pending == [none]
        async with turns.turn(p1) as pending:
            assert pending == []  # applied: nothing to do in its turn
    finally:
        await turns.close()
        await inbox.close()


async def test_another_instances_turn_for_the_patient_waits_and_sees_what_was_marked(
        pg_spec: PgSpec, pg_pool: Pool) -> None:
    inbox = await PgInbox.open(pg_pool)
    first, second, third = (PgApplyTurns(pg_spec) for _ in range(3))
    try:
        p1, p2, q1 = await _rows(inbox, "P", "P", "Q")
        order: list[str] = []

        async def later() -> list[int]:
            async with second.turn(p2) as pending:
                order.append("second")
                return pending

        async with first.turn(p1) as pending:
            assert pending == [p1]
            waiting = asyncio.create_task(later())
            async with third.turn(q1) as other:  # another patient: no wait
                assert other == [q1]
            await asyncio.sleep(0.3)
            assert not waiting.done()
            await inbox.set_statuses([(p1, APPLIED, "")])
            order.append("first")
        assert await asyncio.wait_for(waiting, 10) == [p2]
        assert order == ["first", "second"]
    finally:
        for turns in (first, second, third):
            await turns.close()
        await inbox.close()
