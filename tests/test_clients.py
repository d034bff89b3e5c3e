"""Clients, API keys (shown once, stored hashed, rotated) and credentials encrypted at rest."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from redis.asyncio import Redis

from shared.clients import ClientError, ClientStore, Vault, hash_key, is_admin_key
from shared.settings import Settings
from shared.streams import Keys


def store(redis: Redis, pool: asyncpg.Pool | None, settings: Settings, secret: str | None = None) -> ClientStore:
    return ClientStore(redis, pool, Keys.from_settings(settings), Vault(secret or Vault.new_key()))


async def test_keys_are_stored_hashed_and_resolve_to_their_client(
    redis: Redis, pool: asyncpg.Pool, settings: Settings
) -> None:
    clients = store(redis, pool, settings)
    key = await clients.create("acme", "Acme Corp")
    assert key.startswith("nova_") and len(key) > 40
    assert await clients.resolve(key) == "acme"
    assert await clients.resolve(key + "x") is None
    rows = await pool.fetch("SELECT key_hash, prefix FROM api_keys")
    assert [r["key_hash"] for r in rows] == [hash_key(key)] and key not in str([dict(r) for r in rows])
    with pytest.raises(ClientError, match="already exists"):
        await clients.create("acme", "Again")
    for bad in ("Bad Slug", "acme2\n"):
        with pytest.raises(ClientError, match="not a valid client slug"):
            await clients.create(bad, "x")


async def test_rotation_revokes_the_old_key_everywhere(redis: Redis, pool: asyncpg.Pool, settings: Settings) -> None:
    clients = store(redis, pool, settings)
    old = await clients.create("acme", "Acme")
    new = await clients.rotate("acme")
    assert await clients.resolve(old) is None and await clients.resolve(new) == "acme"
    # Redis lost its copy: PostgreSQL answers, and revoked keys stay revoked.
    await redis.delete(f"{settings.key_prefix}:apikeys")
    assert await clients.resolve(new) == "acme" and await clients.resolve(old) is None
    [listed] = await clients.list()
    assert listed["slug"] == "acme" and listed["active_keys"] == 1
    with pytest.raises(ClientError, match="does not exist"):
        await clients.rotate("nobody")


async def test_rotations_at_once_leave_one_live_key(redis: Redis, pool: asyncpg.Pool, settings: Settings) -> None:
    """Each rotation revokes the keys it finds: rotations at once must each find the others' keys."""
    clients = store(redis, pool, settings)
    await clients.create("acme", "Acme")
    rotated = await asyncio.gather(*(clients.rotate("acme") for _ in range(5)))
    live = [key for key in rotated if await clients.resolve(key) == "acme"]
    assert len(live) == 1, f"{len(live)} of 5 rotated keys still work"
    [listed] = await clients.list()
    assert listed["active_keys"] == 1


async def test_credentials_are_encrypted_at_rest(redis: Redis, pool: asyncpg.Pool, settings: Settings) -> None:
    secret = Vault.new_key()
    clients = store(redis, pool, settings, secret)
    await clients.create("acme", "Acme")
    await clients.set_credential("acme", "IMAP_PASSWORD", "hunter2-very-secret")
    stored = await pool.fetchval("SELECT ciphertext FROM client_credentials")
    cached = await redis.hget(f"{settings.key_prefix}:credentials:acme", "IMAP_PASSWORD")
    assert "hunter2" not in stored and "hunter2" not in cached
    assert await clients.secrets_for("acme") == {"IMAP_PASSWORD": "hunter2-very-secret"}
    assert await clients.credential_names("acme") == ["IMAP_PASSWORD"]
    with pytest.raises(ClientError, match="does not decrypt"):
        await store(redis, pool, settings, Vault.new_key()).secrets_for("acme")
    with pytest.raises(ClientError, match="NOVA_SECRETS_KEY is not set"):
        ClientStore(redis, pool, Keys.from_settings(settings), Vault(None)).vault.encrypt("x")
    assert await clients.delete_credential("acme", "IMAP_PASSWORD")
    assert await clients.secrets_for("acme") == {}


def test_admin_key_comparison() -> None:
    assert is_admin_key("s3cret", "s3cret")
    assert not is_admin_key("s3cret", "other") and not is_admin_key("", None) and not is_admin_key("x", None)
