"""The whole configuration: every section, and the checks that span sections."""

from __future__ import annotations

from pydantic import model_validator

from gateway.config.agent import AgentConfig
from gateway.config.auth import AuthConfig
from gateway.config.base import Section as _Section
from gateway.config.client import SendConfig
from gateway.config.console import ConsoleConfig
from gateway.config.edge import FhirConfig, MllpConfig, ServerConfig
from gateway.config.encryption import EncryptionConfig
from gateway.config.events import EventsConfig, WebhookConfig, check_webhooks
from gateway.config.forward import LOCAL_BACKEND, BackendConfig, ForwardConfig, RouteConfig
from gateway.config.processes import ProcessesConfig
from gateway.config.store import AuditConfig, MappingConfig, StoreConfig
from gateway.config.telemetry import LogConfig, TelemetryConfig


class Settings(_Section):
    server: ServerConfig = ServerConfig()
    mllp: MllpConfig = MllpConfig()
    store: StoreConfig = StoreConfig()
    mapping: MappingConfig = MappingConfig()
    audit: AuditConfig = AuditConfig()
    encryption: EncryptionConfig = EncryptionConfig()
    fhir: FhirConfig = FhirConfig()
    auth: AuthConfig = AuthConfig()
    # Minimum-necessary task profiles: profile -> resource type -> elements it may see
    # (["*"]: the whole resource). A type a profile does not list is refused.
    profiles: dict[str, dict[str, tuple[str, ...]]] = {}
    telemetry: TelemetryConfig = TelemetryConfig()
    log: LogConfig = LogConfig()
    backends: tuple[BackendConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    forward: ForwardConfig = ForwardConfig()
    send: SendConfig = SendConfig()
    console: ConsoleConfig = ConsoleConfig()
    agent: AgentConfig = AgentConfig()
    processes: ProcessesConfig = ProcessesConfig()
    events: EventsConfig = EventsConfig()
    webhooks: tuple[WebhookConfig, ...] = ()

    @model_validator(mode="after")
    def _webhooks_usable(self) -> Settings:
        check_webhooks(self.webhooks)
        return self

    @model_validator(mode="after")
    def _profiles_exist(self) -> Settings:
        named = [c.profile for c in self.auth.clients] + [
            i.profile for i in self.auth.issuers] + [k.profile for k in self.auth.api_keys]
        for profile in named:
            if profile is not None and profile not in self.profiles:
                raise ValueError(f"auth: profile '{profile}' is not defined under [profiles]")
        return self

    @model_validator(mode="after")
    def _routes_reach_backends(self) -> Settings:
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError("backends: names must be unique")
        known = set(names) | {LOCAL_BACKEND}
        kinds = {b.name: b.kind for b in self.backends}
        for index, route in enumerate(self.routes):
            for name in route.to:
                if name not in known:
                    raise ValueError(f"routes[{index}]: backend '{name}' is not defined "
                                     "under [[backends]]")
                if route.match.resource and kinds.get(name) == "mllp":
                    raise ValueError(f"routes[{index}]: FHIR requests cannot go to the "
                                     f"mllp backend '{name}'")
        return self


