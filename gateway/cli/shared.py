"""What several command groups share: the settings with their flag overrides, logging,
the inbox file, the mapping tables, and the type of the subparsers each group joins."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from gateway.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    # argparse names the type of `add_subparsers()` privately; typeshed makes it generic.
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

T = TypeVar("T")

# A flag's value as argparse gives it, keyed by the dotted config key it overrides.
FlagValue: TypeAlias = str | int | Path | None


def settings_from(args: argparse.Namespace, **flags: FlagValue) -> Settings:
    """The settings from --config (or the environment), with the given flags on top."""
    return load_settings(args.config, overrides=flags)


def audit_settings(args: argparse.Namespace) -> Settings:
    """The settings for a command that may have a --data-dir (the audit trail lives there)."""
    return settings_from(args, **{"store.data_dir": getattr(args, "data_dir", None)})


def configure_logging(level: str) -> None:
    """Log lines to stderr at `level`, each through the PHI filter."""
    from gateway.policy.redact import install

    logging.basicConfig(
        stream=sys.stderr, level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every line that leaves the process goes through the PHI filter, whatever logs it.
    install()


def inbox_path(args: argparse.Namespace) -> Path:
    """The inbox database under --data-dir or store.data_dir; ConfigError when absent."""
    from gateway.app.files import INBOX_FILE

    settings = settings_from(args, **{"store.data_dir": args.data_dir})
    path = settings.store.data_dir / INBOX_FILE
    if not path.exists():
        raise ConfigError(f"no inbox at {path} (set --data-dir or store.data_dir)")
    return path


def tables_or_exit(load: Callable[[], T]) -> T | None:
    """Whatever `load` builds from the tables, or None after saying which are unusable."""
    from gateway.mapping.errors import TableError, TableErrors

    try:
        return load()
    except (TableErrors, TableError) as exc:
        print(f"isthmus: the mapping tables are not usable:\n{exc}", file=sys.stderr)
        return None


@asynccontextmanager
async def database_pool(settings: Settings) -> AsyncIterator[object | None]:
    """A small pool on the PostgreSQL database the settings name (store.backend =
    "postgresql"), closed after; None for the embedded store."""
    if settings.store.backend != "postgresql":
        yield None
        return
    from dataclasses import replace

    from gateway.app.specs import pg_spec
    from gateway.store.pg.connect import open_pool

    pool = await open_pool(replace(pg_spec(settings), pool_min_size=1, pool_max_size=2))
    try:
        yield pool
    finally:
        await pool.close()
