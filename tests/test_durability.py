"""Strict durability mode (shared/durability.py): the API's 202 means the request survives a Redis
crash; without the means to promise that, the API says so with a 503 instead."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from cli.embedded import RedisServer, free_port
from tests.support import linear, make_settings, operator_api, redis_binaries, redis_version


@asynccontextmanager
async def api_on(redis_url: str, db_url: str, **overrides: object) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process on a Redis of the test's own, as the operator."""
    async with operator_api(make_settings(redis_url, db_url, **overrides)) as client:
        yield client


STRICT: dict[str, object] = {"durability": "strict", "strict_wait_ms": 200}


async def execute(api: httpx.AsyncClient) -> httpx.Response:
    assert (await api.post("/clients", json={"slug": "acme", "name": "Acme"})).status_code == 201
    wf = (await api.post("/workflows", json={"name": "wf", "definition": linear("pass")})).json()["id"]
    return await api.post(f"/workflows/{wf}/execute", json={"client_slug": "acme"}, headers={"Idempotency-Key": "k"})


async def test_strict_mode_refuses_to_promise_what_redis_cannot_keep(
    redis_factory: Callable[..., RedisServer], db_url: str
) -> None:
    volatile = redis_factory(appendonly=True)  # appendfsync everysec: up to a second can be lost
    async with api_on(volatile.url, db_url, **STRICT) as api:
        response = await execute(api)
    assert response.status_code == 503
    assert "appendfsync always" in response.json()["error"]["message"]


async def test_strict_mode_accepts_with_fsync_always(redis_factory: Callable[..., RedisServer], db_url: str) -> None:
    durable = redis_factory(appendonly=True, appendfsync="always")
    async with api_on(durable.url, db_url, **STRICT) as api:
        response = await execute(api)
    assert response.status_code == 202, response.text


async def test_strict_mode_waits_for_a_replica(redis_factory: Callable[..., RedisServer], db_url: str) -> None:
    primary = redis_factory()
    replica = redis_factory(replicaof=primary)
    await _replica_online(primary)
    # A healthy replica confirms as soon as it has the write; the wait is only an upper bound, generous
    # here so a loaded machine cannot make the replica look absent.
    async with api_on(primary.url, db_url, durability="strict", strict_wait_ms=30_000) as api:
        response = await execute(api)
    assert response.status_code == 202, response.text
    # A replica that stops answering cannot confirm: 503, and the same key later gets the same task.
    assert replica.proc is not None
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        async with api_on(primary.url, db_url, **STRICT) as api:
            wf = (await api.post("/workflows", json={"name": "w2", "definition": linear("pass")})).json()["id"]
            stalled = await api.post(f"/workflows/{wf}/execute", json={"client_slug": "acme"})
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    assert stalled.status_code == 503 and "no replica confirmed" in stalled.json()["error"]["message"]


async def _replica_online(server: RedisServer) -> None:
    # A replica counts for WAIT once its initial sync is done (state=online).
    from redis.asyncio import Redis

    client = Redis.from_url(server.url, decode_responses=True)
    try:
        for _ in range(300):
            replica = (await client.info("replication")).get("slave0")
            if isinstance(replica, dict) and replica.get("state") == "online":
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("the replica did not come online")
    finally:
        await client.aclose()


def _refusal(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """How the admin makes Redis refuse every write, and how it takes that back."""
    if kind == "read-only":
        # A failover leaves the API's address on a replica for a while (here one of a master not there).
        return ("REPLICAOF", "127.0.0.1", str(free_port())), ("REPLICAOF", "NO", "ONE")
    # maxmemory under noeviction (the default).
    return ("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "SET", "maxmemory", "0")


@pytest.mark.parametrize("binary", redis_binaries(), ids=redis_version)
@pytest.mark.parametrize("kind", ["read-only", "out of memory"])
async def test_a_redis_refusing_writes_answers_503_and_the_request_goes_through_once_writes_are_back(
    redis_factory: Callable[..., RedisServer], db_url: str, binary: str, kind: str
) -> None:
    # The API answered a replica's refusal with a 500, and on Redis 6.2 (which reports a refusal of a
    # script's write as a script error) a full Redis's too.
    from redis.asyncio import Redis

    server = redis_factory(binary=binary)
    admin = Redis.from_url(server.admin_url, decode_responses=True)
    refuse, restore = _refusal(kind)
    async with api_on(server.url, db_url) as api:
        wf = (await api.post("/workflows", json={"name": "wf", "definition": linear("pass")})).json()["id"]
        assert (await api.post("/clients", json={"slug": "acme", "name": "Acme"})).status_code == 201
        await admin.execute_command(*refuse)
        try:
            refused = await api.post(f"/workflows/{wf}/execute", json={"client_slug": "acme"})
            metrics = (await api.get("/metrics")).text
        finally:
            await admin.execute_command(*restore)
        accepted = await api.post(f"/workflows/{wf}/execute", json={"client_slug": "acme"})
    await admin.aclose()
    assert refused.status_code == 503 and kind in refused.json()["error"]["message"]
    assert refused.headers["Retry-After"]
    assert accepted.status_code == 202
    if kind == "out of memory":
        assert 'nova_redis_memory_bytes{kind="max"} 1.0' in metrics
