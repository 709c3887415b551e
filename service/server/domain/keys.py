"""Bearer API keys: ``gmk_<id>_<secret>``; only an HMAC-SHA256 of the secret is stored."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import sessionmaker

from service.server.adapters.db import ApiKey, Tenant, utcnow
from service.server.domain.errors import Unauthorized

_KEY_RE = re.compile(r"^gmk_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str


@dataclass(frozen=True)
class CreatedKey:
    key: str
    key_id: str
    tenant: str


class KeyService:
    def __init__(self, sessions: sessionmaker[Any], pepper: bytes) -> None:
        self._sessions = sessions
        self._pepper = pepper

    def _hash(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    def create(
        self,
        tenant: str,
        name: str = "",
        max_active_jobs: int | None = None,
        max_gpus: float | None = None,
    ) -> CreatedKey:
        """Create a key (and the tenant if new; limits update an existing tenant's)."""
        if not TENANT_RE.match(tenant):
            raise ValueError(
                f"tenant {tenant!r} must be 1-63 lowercase letters, digits or '-', starting alphanumeric"
            )
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self._sessions.begin() as s:
            t = s.get(Tenant, tenant)
            if t is None:
                t = Tenant(name=tenant, created_at=utcnow())
                s.add(t)
            if max_active_jobs is not None:
                t.max_active_jobs = max_active_jobs
            if max_gpus is not None:
                t.max_gpus = max_gpus
            s.flush()
            s.add(
                ApiKey(
                    id=key_id,
                    tenant=tenant,
                    name=name,
                    secret_hash=self._hash(secret),
                    created_at=utcnow(),
                )
            )
        return CreatedKey(key=f"gmk_{key_id}_{secret}", key_id=key_id, tenant=tenant)

    def revoke(self, key_id: str) -> bool:
        with self._sessions.begin() as s:
            k = s.get(ApiKey, key_id)
            if k is None or k.revoked_at is not None:
                return False
            k.revoked_at = utcnow()
            return True

    def authenticate(self, token: str | None) -> Caller:
        if not token:
            raise Unauthorized(
                "send 'Authorization: Bearer <api key>'; create a key with "
                "`greenmim keys create --tenant NAME`"
            )
        m = _KEY_RE.match(token)
        if m is None:
            raise Unauthorized("the API key is malformed; keys look like gmk_<id>_<secret>")
        key_id, secret = m.groups()
        with self._sessions() as s:
            k = s.get(ApiKey, key_id)
        if (
            k is None
            or k.revoked_at is not None
            or not hmac.compare_digest(k.secret_hash, self._hash(secret))
        ):
            raise Unauthorized("the API key is unknown or revoked")
        return Caller(tenant=k.tenant, key_id=key_id)
