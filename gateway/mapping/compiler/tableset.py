"""A whole table set checked and compiled, every problem collected before any is raised."""

from __future__ import annotations

import re

from gateway.mapping.compiler.context import Context
from gateway.mapping.compiler.identities import compile_identities
from gateway.mapping.compiler.messages import MessageMaps
from gateway.mapping.compiler.segments import FieldMaps
from gateway.mapping.convert import Converters
from gateway.mapping.errors import TableErrors
from gateway.mapping.steps import MessageFn
from gateway.mapping.tables import MergeRow, TableSet, Where, merge_kind
from gateway.mapping.vocabulary import Vocab, check_vocabulary

_MESSAGE_TYPE = re.compile(r"[A-Z0-9]{3}\^[A-Z0-9]{3}")


class Compiled:
    """Everything the engine needs, compiled: message functions by message type."""

    def __init__(self, events: dict[str, MessageFn], messages: dict[str, MessageFn],
                 vocabularies: dict[str, Vocab], tables: TableSet,
                 merges: dict[str, MergeRow] | None = None) -> None:
        self.events = events
        self.messages = messages
        self.vocabularies = vocabularies
        self.tables = tables
        self.merges = merges or {}


def compile_tables(tables: TableSet, converters: Converters) -> Compiled:
    """Check and compile; raise TableErrors listing every problem found.

    Vocabularies first, then every data-type and segment table (also those no message map
    uses yet), then the message maps and the events that name them.
    """
    ctx = Context(tables, converters)
    for vocab in tables.vocabularies.values():
        ctx.errors.extend(check_vocabulary(vocab))
    field_maps = FieldMaps(ctx)
    for name in sorted(tables.datatypes):
        field_maps.datatype(name, Where(tables.datatypes[name].file, 0))
    for name in sorted(tables.segments):
        field_maps.segment(name, Where(tables.segments[name].file, 0))
    message_maps = MessageMaps(ctx, field_maps, compile_identities(ctx, tables.identities))
    messages = {name: message_maps.message(table) for name, table in
                sorted(tables.messages.items())}
    events: dict[str, MessageFn] = {}
    for row in tables.events:
        if not _MESSAGE_TYPE.fullmatch(row.message_type):
            ctx.errors.append(row.where.error(
                f"message type '{row.message_type}' must look like ADT^A01"))
        elif row.message_type in events:
            ctx.errors.append(row.where.error(f"{row.message_type} is mapped twice"))
        elif row.map not in messages:
            ctx.errors.append(row.where.error(f"unknown message map '{row.map}'"))
        else:
            events[row.message_type] = messages[row.map]
    merges = _merges(ctx, tables.merges, events)
    if ctx.errors:
        raise TableErrors(ctx.errors)
    return Compiled(events, messages, ctx.vocabs, tables, merges)


def _merges(ctx: Context, rows: list[MergeRow], events: dict[str, MessageFn]
            ) -> dict[str, MergeRow]:
    """merges.csv checked: message type -> its merge row."""
    merges: dict[str, MergeRow] = {}
    for row in rows:
        if row.message_type not in events:
            ctx.errors.append(row.where.error(
                f"{row.message_type} has no message map in events.csv"))
        elif row.message_type in merges:
            ctx.errors.append(row.where.error(f"{row.message_type} is listed twice"))
        elif merge_kind(row.resource) is None:
            ctx.errors.append(row.where.error(
                f"a {row.resource} cannot be merged: it has neither link and active "
                f"(Patient) nor a status with the code inactive (Account)"))
        elif row.identifiers not in ("old", "dropped"):
            ctx.errors.append(row.where.error("identifiers must be 'old' or 'dropped'"))
        else:
            merges[row.message_type] = row
    return merges
