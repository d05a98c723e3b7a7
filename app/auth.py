"""Tenants and API keys. A key is `sqz_<id>_<secret>`: the id is public (shown by `squeeze keys list`),
the secret is 32 random bytes; only sha256 of the whole key is stored, compared in constant time.

Requests send `Authorization: Bearer <key>`. A missing, unknown or revoked key is 401. Each caller acts
for its key's tenant; an admin key sees every tenant's jobs and uploads. With auth off every request
acts for the one implicit tenant, "default".

Each API process remembers the keys it found valid for settings.auth_cache_seconds (KeyCache), so a
dashboard polling every second costs one key lookup per few seconds instead of a transaction per request.
The price: `squeeze keys revoke` (another process) takes effect on a running server within that time,
not at once. Unknown, wrong and revoked keys are never remembered: each is looked up every time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.base import utcnow
from app.db.models import DEFAULT_TENANT, ApiKey, Tenant
from app.db.session import unit_of_work
from app.errors import InvalidSpec, Unauthorized

KEY_PATTERN = re.compile(r"^sqz_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    admin: bool = False

    def sees(self, tenant_id: str) -> bool:
        return self.admin or tenant_id == self.tenant_id


ANONYMOUS = Caller(DEFAULT_TENANT)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_tenant(session: Session, tenant_id: str) -> None:
    if session.get(Tenant, tenant_id) is None:
        session.add(Tenant(id=tenant_id, created_at=utcnow()))
        session.flush()


def create_key(session: Session, tenant_id: str, admin: bool = False) -> str:
    """Makes the tenant when new; returns the key, which is never stored or shown again."""
    if not TENANT_NAME.match(tenant_id):
        raise InvalidSpec("tenant", "a tenant name is 1-64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit")
    ensure_tenant(session, tenant_id)
    key_id = secrets.token_hex(6)
    key = f"sqz_{key_id}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(id=key_id, tenant_id=tenant_id, key_hash=hash_key(key), admin=admin, created_at=utcnow()))
    session.flush()
    return key


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.tenant_id, ApiKey.created_at)))


def revoke_key(session: Session, key_id: str) -> datetime | None:
    """Returns when the key was revoked (now, or earlier), None when there is no such key."""
    now = utcnow()
    session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now))
    key = session.get(ApiKey, key_id)
    return key.revoked_at if key is not None else None


def caller_for_key(session: Session, key: str) -> Caller | None:
    match = KEY_PATTERN.match(key)
    if match is None:
        return None
    row = session.get(ApiKey, match[1])
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, hash_key(key)):
        return None
    return Caller(row.tenant_id, row.admin)


class KeyCache:
    """Callers of keys found valid, by sha256 of the key, each for `seconds` from its lookup. Holds at most
    `size` keys: when full, the expired ones go, or else all (a burst of new keys costs lookups, not memory)."""

    def __init__(self, seconds: float, size: int = 4096, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.size, self.clock = seconds, size, clock
        self._callers: dict[str, tuple[Caller, float]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Caller | None:
        entry = self._callers.get(digest)
        return entry[0] if entry is not None and self.clock() < entry[1] else None

    def put(self, digest: str, caller: Caller) -> None:
        if self.seconds <= 0:
            return
        now = self.clock()
        with self._lock:
            if len(self._callers) >= self.size:
                self._callers = {d: e for d, e in self._callers.items() if now < e[1]}
                if len(self._callers) >= self.size:
                    self._callers = {}
            self._callers[digest] = (caller, now + self.seconds)


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticate(request: Request) -> Caller:
    """FastAPI dependency: who is calling. Async, so that a remembered key costs no hop through the thread
    pool; a lookup runs there."""
    state = request.app.state
    if not state.settings.auth_enabled:
        return ANONYMOUS
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    digest = hash_key(token)
    caller = state.key_cache.get(digest)
    if caller is not None:
        return caller
    caller = await run_in_threadpool(_look_up, state.sessions, token)
    if caller is None:
        raise Unauthorized("the API key is not valid (unknown or revoked)")
    state.key_cache.put(digest, caller)
    return caller


def _look_up(sessions: sessionmaker[Session], key: str) -> Caller | None:
    with unit_of_work(sessions) as session:
        return caller_for_key(session, key)
