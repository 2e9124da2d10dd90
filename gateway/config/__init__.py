"""Configuration: one TOML file, environment overrides and CLI flags, validated once.

Precedence, lowest first: built-in defaults, the TOML file (`--config` or ISTHMUS_CONFIG),
environment variables `ISTHMUS_<SECTION>__<KEY>`, command-line flags. Every setting has a
default, so the gateway runs with no file at all.

One module per group of sections; this package re-exports the names callers use.
"""

from gateway.config.agent import AgentConfig
from gateway.config.auth import ApiKeyConfig, AuthConfig, ClientConfig, IssuerConfig
from gateway.config.base import CONFIG_ENV, ENV_PREFIX
from gateway.config.client import SendConfig
from gateway.config.console import ConsoleConfig, ConsoleUser
from gateway.config.edge import AllowedSender, FhirConfig, MllpConfig, ServerConfig, TlsConfig
from gateway.config.encryption import EncryptionConfig
from gateway.config.events import EventsConfig, WebhookConfig
from gateway.config.forward import (
    LOCAL_BACKEND,
    BackendAuthConfig,
    BackendConfig,
    ForwardConfig,
    RouteConfig,
    RouteMatch,
)
from gateway.config.loader import ConfigError, load_settings
from gateway.config.processes import ProcessesConfig
from gateway.config.settings import Settings
from gateway.config.store import AuditConfig, AuditReviewer, MappingConfig, StoreConfig
from gateway.config.telemetry import LogConfig, TelemetryConfig
from gateway.config.webhooks import InboundWebhookConfig

__all__ = [
    "CONFIG_ENV", "ENV_PREFIX", "LOCAL_BACKEND", "AgentConfig", "AllowedSender",
    "ApiKeyConfig", "AuditConfig", "AuditReviewer", "AuthConfig", "BackendAuthConfig",
    "BackendConfig", "ClientConfig", "ConfigError", "ConsoleConfig", "ConsoleUser",
    "EncryptionConfig", "EventsConfig", "FhirConfig", "ForwardConfig", "InboundWebhookConfig",
    "IssuerConfig",
    "LogConfig",
    "MappingConfig", "MllpConfig", "ProcessesConfig", "RouteConfig", "RouteMatch",
    "SendConfig", "ServerConfig", "Settings", "StoreConfig", "TelemetryConfig", "TlsConfig",
    "WebhookConfig", "load_settings",
]
