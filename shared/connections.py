"""Opening the Redis client and the PostgreSQL pool; callers own them (open in a lifespan, pass down)."""

from __future__ import annotations

import asyncio
import functools
import re
import weakref
from typing import Any, cast

import asyncpg
import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.db import create_pool
from shared.settings import Settings
from shared.streams import Keys, decode_fields, pairs

# Errors that mean "Redis is unreachable or restarting", as opposed to a bad command. On a cluster also
# a slot that is moving (TRYAGAIN past the client's own retries) or a shard with no master for a moment
# (a failover): the same step succeeds when tried again. And what the cluster client raises when it
# cannot learn a slot map: no node reachable, or a slot that no master serves (it then refuses every
# command, whatever its slot, until the map is whole again). And a replica's refusal of writes
# (READONLY): a failover under way, or an address that reaches a demoted master for a while. And a
# master at its memory limit under noeviction (OOM): it refuses writes until memory is freed, and a
# transaction (MULTI) whole, an acknowledgement in it included; nothing of the refused step is written.
REDIS_UNAVAILABLE = (
    ReadOnlyError,
    OutOfMemoryError,
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ConnectionError,
    OSError,
    ClusterError,
    ClusterDownError,
    RedisClusterException,
    TryAgainError,
)


class NotConfigured(RuntimeError):
    pass


# A command this small is written without asyncio.wait_for (see PromptWrites).
PROMPT_WRITE_BYTES = 16 * 1024


class ReconnectsWhenReadOnly:
    """For a connection class: a connection whose server refused a write as a replica (READONLY) is
    closed, and the next command on it connects anew.

    A failover of a managed Redis moves its address (DNS) to the new master, but a connection already
    open stays with the demoted one, which refuses every write for as long as the connection lives: a
    pooled client would answer 503 until restarted. redis-py does the same for Sentinel's connections
    only. Closing after the error costs nothing while Redis is writable."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ResponseError as exc:
            if isinstance(refusal_of(exc), ReadOnlyError):
                await self.disconnect()  # type: ignore[attr-defined]
            raise


class PromptWrites:
    """For a connection class: small commands are written without asyncio.wait_for.

    redis-py 8 gives every connection a socket timeout (5 s) and wraps each write in asyncio.wait_for.
    On Python 3.11 that runs the write in a task of its own: one more pass of the event loop and a task
    per command, about an eighth of the API's CPU per enqueue (measured in-process, two commands). The
    timeout guards nothing there: a write goes to the transport's buffer, and drain() returns at once
    below its high-water mark (64 KiB), which a connection holding one small command at a time does not
    reach. Reads keep their timeout, so a Redis that stops answering still fails the command after it;
    connecting, health checks and large commands keep redis-py's whole path.
    """

    socket_timeout: float | None
    is_connected: bool

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        send = super().send_packed_command  # type: ignore[misc]
        if (
            not self.socket_timeout
            or not self.is_connected
            or not isinstance(command, list)
            or sum(len(part) for part in command) > PROMPT_WRITE_BYTES
        ):
            await send(command, check_health)
            return
        if check_health:
            await self.check_health()  # type: ignore[attr-defined]
        # Only this write goes without: the connection is this task's alone until its reply is read.
        timeout, self.socket_timeout = self.socket_timeout, None
        try:
            await send(command, False)
        finally:
            self.socket_timeout = timeout


class CPacking:
    """For a connection class: commands are packed by hiredis, in C, as redis-py's synchronous client does
    when hiredis is installed; its asyncio client packs in Python. The bytes are the same; an enqueue's
    EVALSHA (27 arguments) took 33 us to pack in Python and takes 3 us, a tenth of the API's CPU per request.
    What hiredis does not take as redis-py would goes the Python way, with its errors: a first argument of
    several words ("CLIENT SETINFO"), another encoding than UTF-8, text that is not UTF-8 (surrogate-escaped
    bytes), bools, subclasses of str or int (enums), None.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args[0]
        if type(command) is str and " " not in command and self.encoder.encoding == "utf-8":  # type: ignore[attr-defined]
            try:
                return [hiredis.pack_command(args)]
            except (TypeError, UnicodeEncodeError):
                pass
        packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
        return packed


def takes_lean_commands(redis: Redis) -> bool:
    """Whether `lean_command` may serve this client: a plain one drawing on its pool (not a cluster's,
    not one bound to a single connection, whose writes a WAIT after them must count)."""
    return (
        isinstance(redis, Redis)
        and not isinstance(redis, RedisCluster)
        and redis.connection is None
        and not redis.single_connection_client
    )


async def lean_command(redis: Redis, *args: Any) -> Any:
    """One command on a plain client (see takes_lean_commands), its reply as the protocol parser gives it.

    redis-py's own path adds, per command, a retry wrapper, observability hooks and the reply's callback
    lookup: about 12 us of CPU on top of the 30 us of this one (a worker sends one script call per no-op
    run). No retry here: the caller goes the whole way (`redis.execute_command` or a script object) when
    this fails for want of a connection, which retries. A cancelled or failed read or write closes the
    connection (redis-py's connection does so itself), so the pool never hands out one with a reply
    half read.
    """
    pool = redis.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_command(*args)
        return await conn.read_response()
    finally:
        await pool.release(conn)


# The most a batch carries (its commands' arguments): a burst of large requests (an enqueue carries its
# context twice) is sent in several writes, each within the client's socket timeout.
MAX_BATCH_BYTES = 1 << 20


class CommandBatcher:
    """Lean commands (see lean_command) issued in one pass of the event loop, sent together: one
    connection, one write, their replies read in turn, each handed to its caller.

    A busy worker's runs each end with a script call, dozens of them in the same pass of the loop (a
    read hands a batch of entries to runs that all reach their call before the loop turns); a busy API's
    execute requests, each one enqueue script call, arrive together the same way (the loop reads every
    connection that is ready, then runs their requests). Each on a
    connection of its own cost a write (a system call that also carries the command through the
    loopback to Redis) and a read, each in the worker and in Redis; together they cost one of each.
    Only commands that Redis answers at once belong here (scripts; never a blocking read), as one
    reply waits for those before it.

    Nothing of a command's meaning changes: each is the command it was, atomic on its own, and commands
    in one batch never depended on each other's order (they would have gone on different connections).
    A failure of the connection fails every command of its batch not yet answered, with the error
    lean_command raises, and each caller goes the whole way as it does after that (its command may
    have run: what is sent this way must be safe to send twice, as every script is).
    """

    def __init__(self, redis: Redis, max_batch_bytes: int = MAX_BATCH_BYTES) -> None:
        # The client's pool, not the client: the registry below keys batchers by client, weakly.
        self.pool = redis.connection_pool
        self.max_batch_bytes = max_batch_bytes
        # The batch of this pass of the loop, until its send takes it (None: no batch open).
        self._queued: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] | None = None
        # The size of the open batch's arguments, in characters and bytes (about its bytes on the wire).
        self._queued_bytes = 0
        # The sends in progress (kept, so they are not collected mid-way).
        self._sending: set[asyncio.Task[None]] = set()

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """The command's reply, once its batch is answered."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        size = sum(len(arg) for arg in args if isinstance(arg, (str, bytes)))
        if self._queued is not None and self._queued_bytes + size > self.max_batch_bytes:
            # Full: one write, and one socket timeout, for no more than this; the rest go in batches of
            # their own, on connections of their own, in the same pass.
            self._queued = None
        if self._queued is None:
            # The task's first step runs in the loop's next pass: every command issued in this one is
            # queued by then.
            batch = self._queued = []
            self._queued_bytes = 0
            task = asyncio.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(functools.partial(self._sent, batch))
        self._queued.append((args, future))
        self._queued_bytes += size
        return future

    def _sent(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]], task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._queued is batch:
            # Cancelled before its first step (the loop closing): the next command must open a batch of
            # its own rather than join one that is never sent.
            self._queued = None
        # A batch cancelled before its first step (open, or closed full) wrote nothing; a send that ran
        # answered every caller itself.
        for _, future in batch:
            if not future.done():
                future.set_exception(RedisConnectionError("batched command not sent: its batch was cancelled"))

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        if self._queued is batch:
            self._queued = None  # closed: what is issued from here on goes in the next batch
        answered = 0
        try:
            conn = await self.pool.get_connection()
            try:
                await conn.send_packed_command(conn.pack_commands([args for args, _ in batch]))
                for _, future in batch:
                    try:
                        reply = await conn.read_response()
                    except ResponseError as exc:
                        # This command's own error (NOSCRIPT, a script's error): the connection is fine,
                        # and the next reply follows it.
                        answered += 1
                        if not future.done():
                            future.set_exception(exc)
                        continue
                    answered += 1
                    if not future.done():
                        future.set_result(reply)
            finally:
                if answered < len(batch):
                    # Replies may be left unread: an error redis-py raises without closing the connection
                    # (LOADING, NOAUTH are ConnectionErrors, not ResponseErrors) must not hand them to the
                    # connection's next user. A failed read or write has closed it already.
                    await conn.disconnect()
                await self.pool.release(conn)
        except BaseException as exc:
            # A lost connection, a read timeout, or this task cancelled (the loop closing): the callers
            # not yet answered see a lost connection, and go the whole way.
            error = exc if isinstance(exc, (RedisConnectionError, RedisTimeoutError)) else None
            for _, future in batch[answered:]:
                if not future.done():
                    future.set_exception(error or RedisConnectionError(f"batched command not answered: {exc!r}"))
            if not isinstance(exc, Exception):
                raise


# The batchers of the clients made with batch_commands (create_redis): kept with their client.
_BATCHERS: weakref.WeakKeyDictionary[Redis, CommandBatcher] = weakref.WeakKeyDictionary()


def batcher_of(redis: Redis) -> CommandBatcher | None:
    """The client's command batcher, if it was made with one (create_redis's `batch_commands`)."""
    return _BATCHERS.get(redis)


def create_redis(
    settings: Settings, *, prompt_writes: bool = False, batch_commands: bool = False, **kwargs: object
) -> Redis:
    """`prompt_writes`: the API's and the worker's clients, whose requests and runs each wait on a couple
    of small commands (see PromptWrites and CPacking); not on a cluster, whose client keeps a pool per node.
    `batch_commands`: the worker's and the API's, whose script calls go in batches (see CommandBatcher),
    when the client may take lean commands."""
    if not settings.redis_url:
        raise NotConfigured("REDIS_URL is not set (or run `nova dev`, which starts an embedded Redis)")
    options: dict[str, object] = {
        "decode_responses": True,
        # Anyone with access to Redis can write bytes that are not UTF-8 into a stream. Strict decoding
        # would raise inside XREADGROUP/XAUTOCLAIM and stall every entry of that batch (and
        # maintenance) for ever; surrogateescape decodes them to lone surrogates that the request
        # parser refuses (a dead letter with its reason) and encodes them back to the same bytes.
        "encoding_errors": "surrogateescape",
        # A dropped connection (Redis restarting, a proxy closing idle sockets) is retried a few
        # times before callers see it; longer outages are handled by each caller's own backoff.
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "socket_connect_timeout": 5,
        "health_check_interval": 15,
        "max_connections": 256,
    }
    options.update(kwargs)
    if settings.cluster:
        # The cluster client follows MOVED/ASK and refreshes its slot map itself; it offers the same
        # commands, so callers keep their `Redis` type. Its pool limit is per node.
        url = settings.redis_url.replace("+cluster://", "://", 1)
        options.pop("health_check_interval", None)
        return cast(Redis, RedisCluster.from_url(url, **options))  # type: ignore[arg-type]
    client = Redis.from_url(settings.redis_url, **options)  # type: ignore[arg-type]
    # The class the URL chose (plain, TLS or Unix socket), with a reconnect after a replica's refusal and,
    # for `prompt_writes`, small writes made promptly.
    pool = client.connection_pool
    base = pool.connection_class
    mixins = (ReconnectsWhenReadOnly, PromptWrites, CPacking) if prompt_writes else (ReconnectsWhenReadOnly,)
    pool.connection_class = type(f"Nova{base.__name__}", (*mixins, base), {})
    if batch_commands and takes_lean_commands(client):
        _BATCHERS[client] = CommandBatcher(client)
    return client


async def redis_ms(redis: Redis) -> int:
    """Milliseconds since the epoch by Redis's clock (TIME): what due times are counted on, so that
    processes on hosts with skewed clocks agree on what is due. On its own, never in a pipeline: a
    cluster client refuses a keyless command there."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def prepare(redis: Redis) -> None:
    """Learn a cluster's slot map now, once, before a process's loops start: the cluster client
    otherwise learns it on first use, from many concurrent commands at once (some of them bounded by
    timeouts that cancel them mid-way)."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()


def pubsub_client(redis: Redis) -> tuple[Redis, bool]:
    """A client for SUBSCRIBE and whether the caller must close it. On a cluster, a plain client to
    one master: channels (not sharded ones) reach every node over the cluster bus, and a subscribed
    connection of its own never shares the cluster client's node pools."""
    if isinstance(redis, RedisCluster):
        node = redis.get_random_primary_node()
        kwargs = {k: v for k, v in node.connection_kwargs.items() if k not in ("retry",)}
        return Redis(**kwargs), True
    return redis, False


def decodes_responses(redis: Redis | None) -> bool:
    """Whether the client answers text, never bytes (create_redis's clients do): its stream entries need no
    decode_fields, which only copies them then."""
    if isinstance(redis, RedisCluster):
        return bool(redis.get_encoder().decode_responses)
    return redis is not None and bool(redis.connection_pool.connection_kwargs.get("decode_responses"))


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


async def info_of(redis: Redis, section: str, key: str) -> dict[str, Any]:
    """INFO `section` of the server that holds `key`: on a cluster, the master of its slot (INFO
    elsewhere says nothing about that key's data)."""
    if isinstance(redis, RedisCluster):
        node = redis.get_node_from_key(key)
        return cast(dict[str, Any], await redis.info(section, target_nodes=node))
    return cast(dict[str, Any], await redis.info(section))


async def open_pool(settings: Settings, *, max_size: int = 10) -> asyncpg.Pool:
    if not settings.database_url:
        raise NotConfigured("DATABASE_URL is not set (or run `nova dev`, which starts an embedded PostgreSQL)")
    return await create_pool(settings.database_url, min_size=1, max_size=max_size)


async def ensure_groups(redis: Redis, keys: Keys) -> None:
    """Create the consumer groups (and their streams) of a shard if missing: the workers' on every
    lane's requests stream, the projector's on the results stream.

    Groups start at id 0, not $, so entries appended before the first worker ever ran are not skipped.
    """
    streams = [(lane.requests, keys.worker_group) for lane in keys.lanes]
    for stream, group in (*streams, (keys.results, keys.projector_group)):
        try:
            await redis.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def is_moved_away(exc: ResponseError) -> bool:
    """A blocked read whose stream was migrated to another node (a slot move): read again, and the
    cluster client follows the slot to its new master."""
    return str(exc).startswith("UNBLOCKED")


def is_missing_group(exc: ResponseError) -> bool:
    """Redis lost its data (a restart without persistence, a flush): the caller recreates the groups."""
    return "NOGROUP" in str(exc)


# Refusals of a write (not errors of the command): a replica's, and maxmemory's under noeviction.
_REFUSALS: dict[str, type[ResponseError]] = {"READONLY": ReadOnlyError, "OOM": OutOfMemoryError}
# Redis 6.2 reports a refusal of a script's write as a script error carrying it: "... 201: -OOM ...".
_WRAPPED_REFUSAL = re.compile(r": -(READONLY|OOM) ")


def refusal_of(exc: ResponseError) -> ResponseError | None:
    """The refusal `exc` is or carries, as its own class (ReadOnlyError, OutOfMemoryError), or None.
    Redis 7 raises a script's refused write as the refusal itself; 6.2 as a script error."""
    if isinstance(exc, tuple(_REFUSALS.values())):
        return exc
    wrapped = _WRAPPED_REFUSAL.search(str(exc))
    return _REFUSALS[wrapped.group(1)](str(exc)) if wrapped else None


async def read_group(
    redis: Redis, group: str, consumer: str, stream: str, cursor: str, *, count: int, block_ms: int | None = None
) -> list[tuple[str, list[str]]]:
    """XREADGROUP of one stream: its entries, each with its fields as Redis answers them (field, value,
    ...) in text; an entry deleted while pending comes with none (an empty list), for its reader to
    settle as it would an entry without the fields it needs.

    On a client lean commands serve (takes_lean_commands) whose replies are text, the reply is taken as
    the protocol parser gives it: redis-py's reply callbacks made a dict of every entry, which its
    reader then looked its fields up in (see Event.from_pairs), and cost a busy projector about 3% of a
    worker's CPU. A lean read of pending entries (not of new ones, ">": see below) that fails for want of a
    connection goes the whole way, with redis-py's retries, as any other client's read does (a cluster, a
    client answering bytes): each entry's fields laid flat again.
    """
    if takes_lean_commands(redis) and decodes_responses(redis):
        block = ("BLOCK", block_ms) if block_ms is not None else ()
        command = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, *block, "STREAMS", stream, cursor)
        try:
            reply = await lean_command(redis, *command)
        except (RedisConnectionError, RedisTimeoutError):
            if cursor == ">":
                # Redis may have delivered new entries whose reply was lost: they are pending for this
                # consumer now, which another read of new ones never sees. The caller reads its own
                # pending entries again (from "0").
                raise
        else:
            if not reply:
                return []
            # RESP3 answers a map of streams, RESP2 a list of (stream, entries) pairs.
            streams = reply.values() if isinstance(reply, dict) else [items for _, items in reply]
            return [(entry_id, fields or []) for items in streams for entry_id, fields in items]
    answer = await redis.xreadgroup(group, consumer, {stream: cursor}, count=count, block=block_ms)
    # redis-py answers a list of (stream, entries) pairs, or, asked for RESP3 by name, a map of streams
    # to a list holding their entries.
    if isinstance(answer, dict):
        streams = [value[0] if value else [] for value in answer.values()]
    else:
        streams = [items for _, items in answer or []]
    return [
        (entry_id if isinstance(entry_id, str) else entry_id.decode(), pairs(decode_fields(fields or {})))
        for items in streams
        for entry_id, fields in items
    ]


async def autoclaim(
    redis: Redis, stream: str, group: str, consumer: str, idle_ms: int, *, start: str = "0-0", count: int
) -> tuple[str, list[tuple[str, dict[str, str]]]]:
    """XAUTOCLAIM: the cursor to resume the scan from ("0-0" when it wrapped) and the claimed entries.

    Redis 6.2 answers nil for an entry deleted while it was pending; those are left out (maintenance
    acknowledges them).
    """
    reply = await redis.xautoclaim(stream, group, consumer, idle_ms, start_id=start, count=count)
    cursor = reply[0] if reply and reply[0] else "0-0"
    claimed = reply[1] if len(reply) > 1 else []
    return cursor, [(i, f) for i, f in claimed if i is not None and f is not None]
