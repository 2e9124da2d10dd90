"""Settings of change events going out: `[[webhooks]]` and `[events]` (FHIR Subscriptions)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field, field_validator

from gateway.config.base import Section as _Section
from gateway.events.endpoints import url_problem

_NAME = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
# `<resource type in lower case>.<created|updated|deleted>`: the event catalogue
# (docs/events.md); the type is checked against the search table at start.
EVENT_NAME = re.compile(r"[a-z][a-z]{0,63}\.(created|updated|deleted)")


class EventsSecretError(ValueError):
    """A secret named by the config is not in the environment (a one-line start-up error)."""


class DeliverySettings(_Section):
    """How hard the outbox tries one event target."""

    max_attempts: int = Field(default=12, ge=1, le=1000)
    retry_base: float = Field(default=1.0, gt=0)
    retry_max_delay: float = Field(default=300.0, gt=0)
    timeout: float = Field(default=10.0, gt=0)
    concurrency: int = Field(default=4, ge=1, le=256)


class WebhookConfig(DeliverySettings):
    """One `[[webhooks]]` entry: simple events for a platform, signed with its secret."""

    name: str = Field(pattern=_NAME)
    url: str
    events: tuple[str, ...] = Field(min_length=1)
    secret_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    payload: Literal["ids", "flat"] = "ids"
    allow_insecure_http: bool = False

    @field_validator("events")
    @classmethod
    def _known_shape(cls, events: tuple[str, ...]) -> tuple[str, ...]:
        for event in events:
            if not EVENT_NAME.fullmatch(event):
                raise ValueError(f"event '{event}' is not <resource type>.<created|updated|"
                                 "deleted> in lower case (e.g. appointment.created)")
        return events

    @field_validator("url")
    @classmethod
    def _usable_url(cls, url: str) -> str:
        if url_problem(url, True) is not None:
            raise ValueError(f"url {url_problem(url, True)}")
        return url


class EventsConfig(DeliverySettings):
    """Change events and FHIR Subscriptions (`[events]`)."""

    enabled: bool = True
    # How often the change events are read when nothing woke the reader.
    poll_interval: float = Field(default=0.2, gt=0, le=60)
    batch: int = Field(default=500, ge=1, le=10_000)
    # The signing secret of a Subscription: its owning client's variable, else the default.
    subscription_secret_env: str = ""
    client_secret_env: dict[str, str] = {}
    handshake_attempts: int = Field(default=3, ge=1, le=20)
    # Failed delivery attempts in a row (none delivered between) after which an active
    # Subscription goes to `error` with the reason; its rows stay in the outbox.
    error_after: int = Field(default=50, ge=1)
    # How often each target's outbox worker re-reads the outbox for rows an operator
    # retried or dropped (`isthmus outbox retry`); new rows wake it at once.
    outbox_poll_interval: float = Field(default=10.0, gt=0, le=3600)
    allow_insecure_http: bool = False
    # PostgreSQL: how often an instance that does not pump tries to take the lead.
    leader_retry: float = Field(default=2.0, gt=0, le=600)
    # Change events older than this, once handled, are purged by the housekeeping.
    keep_days: float = Field(default=7.0, gt=0)


def check_webhooks(webhooks: Sequence[WebhookConfig]) -> None:
    names = [w.name for w in webhooks]
    if len(set(names)) != len(names):
        raise ValueError("webhooks: names must be unique")
    for index, hook in enumerate(webhooks):
        problem = url_problem(hook.url, hook.allow_insecure_http)
        if problem is not None:
            raise ValueError(f"webhooks[{index}] '{hook.name}': url {problem}")


def read_secret(variable: str, where: str, environ: Mapping[str, str] | None = None) -> bytes:
    """The secret in an environment variable; EventsSecretError naming `where` if unset."""
    value = (os.environ if environ is None else environ).get(variable, "")
    if not value:
        raise EventsSecretError(f"{where}: the secret variable {variable} is not set")
    return value.encode()


def webhook_secrets(webhooks: Sequence[WebhookConfig],
                    environ: Mapping[str, str] | None = None) -> dict[str, bytes]:
    """Each webhook's signing secret, read once at start."""
    return {hook.name: read_secret(hook.secret_env, f"webhooks[{i}] '{hook.name}'", environ)
            for i, hook in enumerate(webhooks)}


def subscription_secrets(config: EventsConfig, environ: Mapping[str, str] | None = None
                         ) -> tuple[bytes | None, dict[str, bytes]]:
    """The default Subscription secret (None if not configured) and each client's own."""
    default = (read_secret(config.subscription_secret_env, "events.subscription_secret_env",
                           environ) if config.subscription_secret_env else None)
    clients = {client: read_secret(variable, f"events.client_secret_env.{client}", environ)
               for client, variable in config.client_secret_env.items()}
    return default, clients
