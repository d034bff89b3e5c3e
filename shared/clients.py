"""Clients, their API keys and their stored credentials.

PostgreSQL holds the record; Redis holds what the hot paths need without a database round trip: the
key hashes (`nova:apikeys`, hash -> client slug) checked on every request, and each client's
credentials still encrypted (`nova:credentials:{slug}`, name -> token) for the workers, which decrypt
them only to hand them to that client's node code.

A credential is a JSON value (a port stays an int) and is either a secret (masked wherever a run
shows it) or a setting (shown as is). Its token is `secret:<Fernet token>` or `setting:<Fernet
token>`, the Fernet token holding `{"value", "secret"}` as JSON: the kind in clear lets the API list
kinds without decrypting, the encrypted copy cannot be flipped to unmask a secret. A bare Fernet token
is a credential stored before values were typed, a string whose kind follows its name
(secret_by_default).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from cryptography.fernet import Fernet, InvalidToken
from redis.asyncio import Redis

from shared.masking import Masker
from shared.settings import Settings
from shared.streams import Keys

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_PREFIX = "nova_"
# Credential names are environment variable names: node code also reads them from os.environ.
CREDENTIAL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")
# Injected beside the credentials (the tenant's name); a credential of that name would shadow it.
RESERVED_NAMES = frozenset({"client_slug"})
MAX_CREDENTIAL_BYTES = 64 * 1024

CredentialValue = str | int | float | bool | list[Any] | dict[str, Any] | None

# The names NOVA's worker injects (its get_email_credentials and get_database_credentials) that hold
# configuration rather than secrets: hosts, ports, users, the sender whitelist, the database name and
# its table schemas. Masking them would garble ordinary output (every "993", every table name) and
# hide nothing an attacker needs. Every other name (passwords, tokens, keys, anything unknown) is a
# secret unless stored with "secret": false.
NOVA_SETTINGS = frozenset(
    {
        "email_user",
        "imap_host",
        "imap_port",
        "smtp_host",
        "smtp_port",
        "sender_whitelist",
        "db_host",
        "db_port",
        "db_name",
        "db_user",
        "database_schemas",
    }
)


def secret_by_default(name: str) -> bool:
    """Whether a credential stored without "secret" is one: all but NOVA's setting names (any case)."""
    return name.lower() not in NOVA_SETTINGS


class ClientError(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    """Who is calling: the operator (admin) or one client."""

    admin: bool
    client: str | None

    def may_see(self, client: str | None) -> bool:
        return self.admin or (client is not None and client == self.client)


ADMIN = Principal(admin=True, client=None)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_admin_key(presented: str, admin_key: str | None) -> bool:
    return bool(admin_key) and hmac.compare_digest(presented.encode(), (admin_key or "").encode())


class Vault:
    """Encrypts credentials at rest; without a key configured, storing credentials is refused."""

    def __init__(self, secret: str | None) -> None:
        self._fernet = Fernet(secret.encode()) if secret else None

    @property
    def has_key(self) -> bool:
        return self._fernet is not None

    @classmethod
    def from_settings(cls, settings: Settings) -> Vault:
        return cls(settings.secrets_key.get_secret_value() if settings.secrets_key else None)

    @staticmethod
    def new_key() -> str:
        return Fernet.generate_key().decode()

    def encrypt(self, value: str) -> str:
        if self._fernet is None:
            raise ClientError("NOVA_SECRETS_KEY is not set: credentials cannot be stored")
        return self._fernet.encrypt(value.encode()).decode()

    def decrypt(self, token: str) -> str:
        if self._fernet is None:
            raise ClientError("NOVA_SECRETS_KEY is not set: credentials cannot be read")
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ClientError("a stored credential does not decrypt with NOVA_SECRETS_KEY") from None


@dataclass(frozen=True)
class Credential:
    value: CredentialValue
    secret: bool


@dataclass(frozen=True)
class ClientCredentials:
    """One client's decrypted credentials, as its node code receives them."""

    slug: str
    items: dict[str, Credential] = field(default_factory=dict)

    @property
    def has_secrets(self) -> bool:
        return any(c.secret for c in self.items.values())

    def context(self) -> dict[str, Any]:
        """NOVA's way: each credential in the context under its own name, typed as stored.

        Containers are copied: a sandbox running in the worker's own process must not be able to
        change what the next node receives.
        """
        return {name: copy.deepcopy(c.value) for name, c in self.items.items()}

    def environment(self) -> dict[str, str]:
        """Each credential as an environment variable: strings as they are, other values as JSON."""
        return {
            name: c.value if isinstance(c.value, str) else orjson.dumps(c.value).decode()
            for name, c in self.items.items()
            if c.value is not None
        }

    def masker(self) -> Masker:
        """Hides these credentials' keys and secret values; the client's slug is public, never masked."""
        return Masker(
            (c.value for c in self.items.values() if c.secret),
            hidden_keys=self.items.keys(),
            keep=(self.slug,),
        )


def check_credential(name: str, value: CredentialValue) -> None:
    """Raises ClientError for a name or value that cannot be stored."""
    if not CREDENTIAL_NAME.fullmatch(name):
        raise ClientError(
            "credential names are environment variable names (ASCII letters, digits, '_'; a letter first)"
        )
    if name in RESERVED_NAMES:
        raise ClientError(f"'{name}' is set by NOVA for every run and cannot be a credential")
    if value == "":
        raise ClientError("a credential value cannot be empty")
    if isinstance(value, str) and "\x00" in value:
        # Node code gets it as an environment variable too, which cannot hold one: every run of the
        # client would fail to start its sandbox.
        raise ClientError("a credential value cannot contain U+0000 (NUL)")
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:
        raise ClientError(f"a credential value must be JSON: {exc}") from None
    if size > MAX_CREDENTIAL_BYTES:
        raise ClientError(f"a credential value is limited to {MAX_CREDENTIAL_BYTES} bytes as JSON ({size})")


_SECRET, _SETTING = "secret", "setting"


class ClientStore:
    def __init__(self, redis: Redis, pool: asyncpg.Pool | None, keys: Keys, vault: Vault) -> None:
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self.vault = vault

    @property
    def _api_keys(self) -> str:
        return f"{self.keys.prefix}:apikeys"

    def _credentials(self, slug: str) -> str:
        return f"{self.keys.prefix}:credentials:{slug}"

    def _db(self) -> asyncpg.Pool:
        if self.pool is None:
            raise ClientError("managing clients needs PostgreSQL")
        return self.pool

    async def create(self, slug: str, name: str) -> str:
        """Create a client and its first API key; returns the key (shown once, stored hashed)."""
        if not SLUG.fullmatch(slug):
            raise ClientError(f"'{slug}' is not a valid client slug (a-z, 0-9, '-', '_', up to 63 characters)")
        pool = self._db()
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO clients (slug, name) VALUES ($1, $2)
                   ON CONFLICT (slug) DO UPDATE SET name = EXCLUDED.name
                   RETURNING (xmax = 0) AS created""",
                slug,
                name,
            )
            existing = await conn.fetchval(
                "SELECT count(*) FROM api_keys WHERE client_slug = $1 AND revoked_at IS NULL", slug
            )
            if not row["created"] and existing:
                raise ClientError(f"client '{slug}' already exists (use rotate-key for a new key)")
            return await self._issue(conn, slug)

    async def rotate(self, slug: str) -> str:
        """Revoke the client's keys and issue a new one."""
        pool = self._db()
        async with pool.acquire() as conn, conn.transaction():
            # The client's row locked: rotations at once take turns, and each revokes the key the one
            # before it issued (unlocked, each saw only the keys committed when it began: several lived).
            if not await conn.fetchval("SELECT 1 FROM clients WHERE slug = $1 FOR UPDATE", slug):
                raise ClientError(f"client '{slug}' does not exist")
            revoked = await conn.fetch(
                """UPDATE api_keys SET revoked_at = now()
                   WHERE client_slug = $1 AND revoked_at IS NULL RETURNING key_hash""",
                slug,
            )
            if revoked:
                await self.redis.hdel(self._api_keys, *[r["key_hash"] for r in revoked])
            return await self._issue(conn, slug)

    async def _issue(self, conn: asyncpg.Connection, slug: str) -> str:
        key = f"{KEY_PREFIX}{secrets.token_urlsafe(32)}"
        digest = hash_key(key)
        await conn.execute(
            "INSERT INTO api_keys (client_slug, key_hash, prefix) VALUES ($1, $2, $3)", slug, digest, key[:9]
        )
        await self.redis.hset(self._api_keys, digest, slug)
        return key

    async def resolve(self, key: str) -> str | None:
        """The client a key belongs to, or None (unknown or revoked)."""
        return await self.resolve_digest(hash_key(key))

    async def resolve_digest(self, digest: str) -> str | None:
        """The client whose live key has this SHA-256 digest (a session holds the digest, never the key)."""
        slug = await self.redis.hget(self._api_keys, digest)
        if slug is not None or self.pool is None:
            return slug
        # Redis lost its copy (flush, new instance): PostgreSQL is the record.
        try:
            slug = await self.pool.fetchval(
                "SELECT client_slug FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", digest
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return None
        if slug is not None:
            await self.redis.hset(self._api_keys, digest, slug)
        return slug

    async def list(self) -> list[dict[str, object]]:
        rows = await self._db().fetch(
            """SELECT c.slug, c.name, c.created_at,
                      count(k.id) FILTER (WHERE k.revoked_at IS NULL) AS active_keys
               FROM clients c LEFT JOIN api_keys k ON k.client_slug = c.slug
               GROUP BY c.slug ORDER BY c.slug"""
        )
        return [
            {
                "slug": r["slug"],
                "name": r["name"],
                "created_at": r["created_at"].isoformat(),
                "active_keys": r["active_keys"],
            }
            for r in rows
        ]

    async def exists(self, slug: str) -> bool:
        return bool(await self._db().fetchval("SELECT 1 FROM clients WHERE slug = $1", slug))

    async def set_credential(self, slug: str, name: str, value: CredentialValue, secret: bool | None = None) -> None:
        """Store a credential; `secret` None takes the name's default (secret_by_default)."""
        check_credential(name, value)
        is_secret = secret_by_default(name) if secret is None else secret
        sealed = self.vault.encrypt(orjson.dumps({"value": value, "secret": is_secret}).decode())
        token = f"{_SECRET if is_secret else _SETTING}:{sealed}"
        await self._db().execute(
            """INSERT INTO client_credentials (client_slug, name, ciphertext) VALUES ($1, $2, $3)
               ON CONFLICT (client_slug, name) DO UPDATE SET ciphertext = EXCLUDED.ciphertext, updated_at = now()""",
            slug,
            name,
            token,
        )
        await self.redis.hset(self._credentials(slug), name, token)

    async def credential_names(self, slug: str) -> list[str]:
        return sorted(await self.redis.hkeys(self._credentials(slug)))

    async def credential_kinds(self, slug: str) -> dict[str, bool]:
        """Name -> whether it is a secret; read from the tokens without decrypting any value."""
        tokens = await self.redis.hgetall(self._credentials(slug))
        return {name: self._parse(name, token)[1] for name, token in sorted(tokens.items())}

    async def delete_credential(self, slug: str, name: str) -> bool:
        await self._db().execute("DELETE FROM client_credentials WHERE client_slug = $1 AND name = $2", slug, name)
        return bool(await self.redis.hdel(self._credentials(slug), name))

    async def credentials_for(self, slug: str) -> ClientCredentials:
        """Decrypted credentials for one client's node code; never log or return these."""
        tokens = await self.redis.hgetall(self._credentials(slug))
        items = {}
        for name, token in tokens.items():
            sealed, listed_secret = self._parse(name, token)
            plain = self.vault.decrypt(sealed)
            if sealed == token:
                # Stored before values were typed: the bare string.
                items[name] = Credential(plain, listed_secret)
                continue
            stored = orjson.loads(plain)
            # Either copy of the kind saying secret makes it one: an edited token unmasks nothing.
            items[name] = Credential(stored["value"], bool(stored["secret"]) or listed_secret)
        return ClientCredentials(slug, items)

    async def secrets_for(self, slug: str) -> dict[str, str]:
        """One client's credentials as its sandbox's environment; never log or return these."""
        return (await self.credentials_for(slug)).environment()

    @staticmethod
    def _parse(name: str, token: str) -> tuple[str, bool]:
        """(the Fernet token, whether the credential is a secret)."""
        kind, sep, sealed = token.partition(":")
        # Fernet tokens are URL-safe base64 and never contain ':'.
        if not sep:
            return token, secret_by_default(name)
        return sealed, kind != _SETTING
