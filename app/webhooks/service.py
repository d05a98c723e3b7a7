"""Webhook use cases for the API: the URL check at submit, the tenant's signing secret, signatures."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy.orm import Session

from app.auth import ensure_tenant
from app.errors import InvalidSpec
from app.secrets import seal, unseal
from app.settings import Settings
from app.webhooks import repository
from app.webhooks.addresses import Resolver, WebhookRefused, check_url, system_resolver

SIGNATURE_HEADER = "X-Squeeze-Signature"


def check_for_submit(settings: Settings, url: str, resolver: Resolver = system_resolver) -> None:
    try:
        check_url(url, settings.webhook_allow_private, resolver)
    except WebhookRefused as exc:
        raise InvalidSpec("webhook_url", str(exc)) from None


def signing_secret(session: Session, settings: Settings, tenant_id: str) -> str:
    """The tenant's secret, made (and sealed) on first use."""
    sealed = repository.sealed_secret(session, tenant_id)
    if sealed is None:
        ensure_tenant(session, tenant_id)
        secret = f"whsec_{secrets.token_urlsafe(32)}"
        if repository.store_secret(session, tenant_id, seal(settings, secret, "webhook_secret"), only_if_missing=True):
            return secret
        sealed = repository.sealed_secret(session, tenant_id)  # a concurrent first use won
    return unseal(settings, sealed)


def rotate_secret(session: Session, settings: Settings, tenant_id: str) -> str:
    """A new secret; deliveries from now on (retries included) are signed with it."""
    ensure_tenant(session, tenant_id)
    secret = f"whsec_{secrets.token_urlsafe(32)}"
    repository.store_secret(session, tenant_id, seal(settings, secret, "webhook_secret"), only_if_missing=False)
    return secret


def signature(secret: str, body: bytes) -> str:
    """The X-Squeeze-Signature value: HMAC-SHA256 of the raw body, keyed by the secret's UTF-8 bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
