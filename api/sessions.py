"""Dashboard sessions: sign in once with a key, then an HttpOnly cookie instead of the key.

A browser page must not hold an API key where script or history can read it (a URL, localStorage).
`POST /session` takes the admin key or a client key once and answers with a cookie holding an opaque
random id; Redis keeps what it stands for (`Keys.session`, named by the id's SHA-256, expiring with
`NOVA_SESSION_TTL`): who signed in, the digest of the key used, and a CSRF token.

Each use re-checks the key behind the session: a rotated client key, or a changed admin key, ends
every session opened with it at once. The cookie is SameSite=Strict, so other sites' pages cannot
send it; a state-changing request made with it must also carry the session's CSRF token in
`X-CSRF-Token` (the page reads it from `GET /session`), which a page of another origin cannot learn.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from shared.clients import ADMIN, ClientStore, Principal, hash_key
from shared.streams import Keys

COOKIE = "nova_session"
CSRF_HEADER = "X-CSRF-Token"
# Methods that change nothing: they need no CSRF token.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Session:
    principal: Principal
    key_digest: str
    csrf: str

    def csrf_matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, redis: Redis, keys: Keys, clients: ClientStore, ttl: int) -> None:
        self.redis = redis
        self.keys = keys
        self.clients = clients
        self.ttl = ttl

    async def open(self, principal: Principal, key: str) -> tuple[str, Session]:
        """A new session for a caller who presented `key` (already checked); returns the cookie value."""
        cookie = secrets.token_urlsafe(32)
        session = Session(principal, hash_key(key), secrets.token_urlsafe(32))
        record = {
            "admin": principal.admin,
            "client": principal.client,
            "key_digest": session.key_digest,
            "csrf": session.csrf,
        }
        await self.redis.set(self.keys.session(hash_key(cookie)), orjson.dumps(record), ex=self.ttl)
        return cookie, session

    async def get(self, cookie: str, admin_key: str | None) -> Session | None:
        """The live session behind a cookie, or None (unknown, expired, or its key no longer valid)."""
        name = self.keys.session(hash_key(cookie))
        raw = await self.redis.get(name)
        if raw is None:
            return None
        record = orjson.loads(raw)
        digest = str(record["key_digest"])
        if record["admin"]:
            valid = bool(admin_key) and hmac.compare_digest(digest, hash_key(admin_key or ""))
            principal = ADMIN
        else:
            client = str(record["client"])
            valid = await self.clients.resolve_digest(digest) == client
            principal = Principal(admin=False, client=client)
        if not valid:
            # The key it was opened with is gone (rotated, revoked, or a new admin key): so is the session.
            await self.redis.delete(name)
            return None
        return Session(principal, digest, str(record["csrf"]))

    async def remaining(self, cookie: str) -> int | None:
        """Seconds the session has left (None: gone)."""
        left = int(await self.redis.ttl(self.keys.session(hash_key(cookie))))
        return left if left >= 0 else None

    async def close(self, cookie: str) -> None:
        await self.redis.delete(self.keys.session(hash_key(cookie)))
