"""The authorization server and authenticator, from the `auth` settings, on the app."""

from __future__ import annotations

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.app.files import KEYS_DIR
from gateway.app.specs import client, issuer
from gateway.audit.record import Action, AuditRecord
from gateway.config import Settings
from gateway.edge import audit_http
from gateway.edge.auth import ApiKey, Authenticator, checked_scopes, install_auth
from gateway.edge.auth_server import SIGNING_KEY_FILE as TOKEN_SIGNING_KEY_FILE
from gateway.edge.auth_server import AuthorizationServer, TokenHook, load_signing_key


def setup_auth(app: web.Application, settings: Settings, *,
               on_token: TokenHook | None = None) -> None:
    """The authorization server and authenticator from the `auth` settings, on the app."""
    auth = settings.auth
    default_key = settings.store.data_dir / KEYS_DIR / TOKEN_SIGNING_KEY_FILE
    if auth.signing_key_file is None and not auth.clients and not default_key.exists():
        # No registered client, so no token is ever issued: no key file to create.
        signing_key = ec.generate_private_key(ec.SECP384R1())
    else:
        signing_key = load_signing_key(auth.signing_key_file, settings.store.data_dir)
    server = AuthorizationServer(
        [client(i, c) for i, c in enumerate(auth.clients)], signing_key, issuer=auth.issuer,
        fhir_base=settings.fhir.base_url, token_lifetime=auth.token_lifetime,
        on_token=on_token)
    api_keys = [ApiKey(k.name, bytes.fromhex(k.key_sha256),
                       checked_scopes(k.scopes, f"auth.api_keys[{i}]"), k.profile)
                for i, k in enumerate(auth.api_keys)]
    anonymous = (checked_scopes(auth.anonymous_scopes, "auth.anonymous_scopes")
                 if auth.anonymous else None)
    install_auth(app, server, Authenticator(
        server, issuers=[issuer(i, c) for i, c in enumerate(auth.issuers)],
        api_keys=api_keys, anonymous=anonymous))


def token_auditor(app: web.Application) -> TokenHook:
    """Every token issued or refused goes into the audit trail (the log opens later)."""
    async def record(client_id: str, outcome: str, peer: str) -> None:
        audit = app.get(audit_http.AUDIT)
        if audit is not None:
            await audit.record(AuditRecord(Action.TOKEN, outcome, client_id=client_id,
                                           peer=peer))
    return record
