"""The fault proxy against the suite's real Redis: lost replies, partitions and severed connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cli.embedded import RedisServer
from cli.faultproxy import FaultProxy


@pytest.fixture
async def proxy(redis_server: RedisServer, redis_url: str) -> AsyncIterator[FaultProxy]:
    del redis_url  # requested for its flush: each test starts from an empty Redis
    async with FaultProxy("127.0.0.1", redis_server.port, seed=1, credentials=redis_server.credentials) as p:
        yield p


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """Redis itself, not through the proxy: what really happened. (No PostgreSQL needed here.)"""
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def through(proxy: FaultProxy, **options: object) -> Redis:
    """A client of the proxy that never retries on its own, so each fault surfaces as it happened."""
    return Redis.from_url(proxy.url, decode_responses=True, retry=Retry(NoBackoff(), 0), **options)  # type: ignore[arg-type]


async def test_forwards_commands_unchanged(proxy: FaultProxy, redis: Redis) -> None:
    client = through(proxy)
    try:
        assert await client.set("k", "v")
        pipe = client.pipeline(transaction=True)
        pipe.incr("n").incr("n").get("k")
        assert await pipe.execute() == [1, 2, "v"]
    finally:
        await client.aclose()
    assert await redis.get("n") == "2"
    assert proxy.replies_dropped == 0


async def test_lost_reply_the_command_ran_but_the_client_sees_a_connection_error(
    proxy: FaultProxy, redis: Redis
) -> None:
    client = through(proxy)
    try:
        # Connect first: the handshake's own replies must not be the ones that get lost.
        assert await client.ping()
        proxy.drop_replies(1)
        with pytest.raises(RedisConnectionError):
            await client.set("lost", "but-written")
        assert await redis.get("lost") == "but-written"
        assert proxy.replies_dropped == 1
        # One reply only: the client reconnects and carries on.
        assert await client.incr("after") == 1
    finally:
        await client.aclose()


async def test_lost_reply_of_a_pipeline_loses_every_reply_in_it(proxy: FaultProxy, redis: Redis) -> None:
    client = through(proxy)
    try:
        assert await client.ping()
        proxy.drop_replies(1)
        pipe = client.pipeline(transaction=False)
        pipe.incr("a").incr("b")
        with pytest.raises(RedisConnectionError):
            await pipe.execute()
    finally:
        await client.aclose()
    assert await redis.mget("a", "b") == ["1", "1"]


async def test_probability_one_loses_every_reply_and_zero_none(proxy: FaultProxy, redis: Redis) -> None:
    # One connected client per command: a reconnect's handshake would lose its replies too.
    clients = [through(proxy) for _ in range(3)]
    try:
        for client in clients:
            assert await client.ping()
        proxy.drop_replies(probability=1.0)
        for i, client in enumerate(clients):
            with pytest.raises(RedisConnectionError):
                await client.rpush("log", str(i))
        proxy.stop_dropping()
        assert await clients[0].llen("log") == 3
    finally:
        for client in clients:
            await client.aclose()
    assert await redis.lrange("log", 0, -1) == ["0", "1", "2"]
    assert proxy.replies_dropped == 3


async def test_pause_hangs_commands_without_reaching_redis_and_resume_heals(proxy: FaultProxy, redis: Redis) -> None:
    # A short client timeout: during a pause nothing is ever forwarded, so it fires however loaded
    # the machine is; it only bounds how long the test waits to see that.
    client = through(proxy, socket_timeout=0.5)
    try:
        assert await client.ping()
        proxy.pause()
        assert proxy.paused
        with pytest.raises(RedisTimeoutError):
            await client.set("during", "partition")
        # No byte reached Redis: the SET was held by the proxy, not executed.
        assert await redis.exists("during") == 0
        proxy.resume()
    finally:
        await client.aclose()
    healed = through(proxy)
    try:
        assert await healed.set("after", "resume")
    finally:
        await healed.aclose()
    assert await redis.get("after") == "resume"


async def test_new_connections_wait_out_a_pause(proxy: FaultProxy, redis: Redis) -> None:
    proxy.pause()
    client = through(proxy)
    try:
        pending = asyncio.create_task(client.set("late", "1"))
        # The client is connected to the proxy and has sent its command, yet Redis has nothing:
        # wait (bounded) until the proxy holds the connection, then check Redis directly.
        for _ in range(500):
            if proxy.connections:
                break
            await asyncio.sleep(0.01)
        assert proxy.connections == 1
        assert not pending.done()
        assert await redis.exists("late") == 0
        proxy.resume()
        assert await asyncio.wait_for(pending, 30)
    finally:
        await client.aclose()
    assert await redis.get("late") == "1"


async def test_sever_closes_every_connection(proxy: FaultProxy) -> None:
    streams = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
    # A PING answered on each proves every connection reached Redis before it is cut.
    for reader, writer in streams:
        # Redis takes nothing before a login (the suite's servers are locked as in production).
        writer.write(f"AUTH {proxy.credentials.replace(':', ' ', 1)}\r\n".encode())
        writer.write(b"PING\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n"), 30) == b"+OK\r\n"
        await writer.drain()
        assert await asyncio.wait_for(reader.readuntil(b"\r\n"), 30) == b"+PONG\r\n"
    assert proxy.connections == 3
    assert proxy.sever() == 3
    for reader, writer in streams:
        # EOF or a reset, never a hang: the proxy closed its end.
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await asyncio.wait_for(reader.readexactly(1), 30)
        writer.close()
    assert proxy.severed == 3


async def test_severed_client_reconnects_through_the_proxy(proxy: FaultProxy, redis: Redis) -> None:
    # One retry, as the product's clients have: whether redis-py notices the cut when it takes the
    # connection from its pool or only when it uses it, the command lands once on a new connection.
    client = Redis.from_url(proxy.url, decode_responses=True, retry=Retry(NoBackoff(), 1))
    try:
        assert await client.set("k", "1")
        assert proxy.sever() == 1
        assert await client.incr("k") == 2
    finally:
        await client.aclose()
    assert proxy.accepted == 2
    assert await redis.get("k") == "2"


async def test_upstream_down_closes_the_client(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory()
    async with FaultProxy("127.0.0.1", server.port, credentials=server.credentials) as proxy:
        client = through(proxy)
        try:
            assert await client.ping()
            server.kill()
            with pytest.raises(RedisConnectionError):
                await client.ping()
        finally:
            await client.aclose()


async def test_a_throttle_that_is_not_a_positive_rate_is_refused(proxy: FaultProxy, redis: Redis) -> None:
    # 0 read as "no throttle" and a negative rate as one too: a test meaning a stalled link got a fast one.
    for rate in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive number of bytes a second"):
            proxy.throttle(rate)
    proxy.throttle(1 << 20)
    proxy.throttle(None)
    assert await redis.ping()
