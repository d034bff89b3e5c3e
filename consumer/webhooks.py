"""Webhook delivery: at-least-once, signed, retried with backoff, then dead-lettered per endpoint.

Two loops per process (inside every worker by default):

- Fan-out reads the results stream as the webhook group. For each event some endpoint wants it writes
  one delivery (body fixed now, so every attempt sends the same bytes) into the retry set, and
  acknowledges the entry in the same transaction. The group's backlog is therefore never pending
  entries: a dead endpoint does not hold back the trimming of the results stream (maintenance trims
  only below every group's floor). While no endpoint is registered (and the process reports nothing to
  Sentry) it reads nothing: the group is moved to the stream's end (_pass_unwatched).
- Dispatch takes due deliveries from the retry set under a short lease (so replicas do not send the
  same one at once, and a crash mid-send only delays it until the lease runs out) and sends each in
  its own task, at most `webhook_endpoint_concurrency` at a time per endpoint: a slow endpoint fills
  only its own slots, never execution's or another endpoint's.

A 2xx answer completes a delivery; anything else (an error status, a timeout, a refused connection, an
address the egress policy refuses, a URL httpx cannot send to) is retried with exponential backoff until
`webhook_retry_for` has passed since the first attempt, then the delivery is moved to the endpoint's
dead-letter list.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import defaultdict
from typing import Any

import httpx
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ResponseError

from shared.backoff import Backoff, linger, sleep_or_stop
from shared.connections import (
    REDIS_UNAVAILABLE,
    autoclaim,
    decodes_responses,
    is_cluster,
    is_missing_group,
    redis_ms,
)
from shared.events import Event
from shared.reporting import REPORTED_TYPES, active_sentry, report_failed_execution
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import EventField, Keys, Layout, decode_fields, format_version, now_iso
from shared.webhooks import (
    ANNOUNCED_TYPES,
    DEAD_LETTERS_KEPT,
    Delivery,
    EgressPolicy,
    EgressRefused,
    Endpoint,
    WebhookKeys,
    WebhookRegistry,
    delivery_id,
    endpoint_of,
    payload,
    sign,
    webhook_event,
)

log = logging.getLogger(__name__)

# An entry of the results stream: its id and its fields, decoded.
Entry = tuple[str, dict[str, str]]
# The event types an endpoint or the error reporting may want (see _deliveries).
SUBSCRIBED_TYPES = ANNOUNCED_TYPES | REPORTED_TYPES
# Entries a crashed process read but never acknowledged are taken over after this long idle.
STALE_PENDING_MS = 30_000
# Stale entries taken over per look.
CLAIM_BATCH = 100
# Sends one dispatch pass starts at most (each takes a lease first); a pass that starts any is followed at once.
DISPATCH_BATCH = 64
# How many of the oldest due deliveries one dispatch pass looks at. Those of endpoints whose slots are full
# are moved to the back of what is due (dispatch_once), so a backlog larger than this is gone through a
# window per pass: a delivery for another endpoint behind it waits passes in proportion to the backlog,
# but it is reached, and a pass costs at most this many members read and re-scored, whatever the backlog.
DISPATCH_WINDOW = 512
DISPATCH_IDLE_S = 0.2
# How long an idle fan-out read waits for new events. A stop waits for the read in flight (cancelling it
# would leave what Redis delivered to it pending until a reclaim), so this bounds how long a stopping
# worker waits on it: a quarter second, at four cheap reads a second per idle shard.
IDLE_BLOCK_MS = 250
# Events one fan-out read asks for, at first and once it keeps up with its stream.
FAN_OUT_BATCH = 200
# How many times FAN_OUT_BATCH a fan-out behind its stream reads at once: a full read doubles the next,
# a short one halves it (as the projector's reads: consumer/projector.py). Under a backlog each read came
# back full, and the next, asked at once, short: a round trip, a transaction and the endpoints' read for
# every ~100 events.
BATCH_GROWTH = 8
CLEANUP_INTERVAL_S = 60.0
# A live consumer reads several times a second (its XREADGROUP blocks for IDLE_BLOCK_MS): far past that,
# it is gone.
GONE_AFTER_MS = 300_000
# After a look found endpoints registered, how long the fan-out reads without looking again (reading is
# always right; the look is a round trip per pass saved only while there is none).
WATCHED_RECHECK_S = 5.0


class WebhookDelivery:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        *,
        consumer: str,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys.from_settings(settings)
        # Every shard's results stream is fanned out, each by a loop of its own.
        self.layout = Layout.from_settings(settings)
        self.names = WebhookKeys(self.keys)
        self.registry = WebhookRegistry(redis, self.keys, settings)
        self.policy = EgressPolicy.from_settings(settings)
        self.consumer = consumer
        self.group = settings.webhook_group
        self._transport = transport
        self._inflight: dict[str, int] = defaultdict(int)
        self._tasks: set[asyncio.Task[None]] = set()
        self._claim_cursors: dict[str, str] = {}
        # When each results stream's stale entries are looked for next (monotonic seconds).
        self._next_claim: dict[str, float] = {}
        # Whether the client decodes replies (each of ours does): every field read is text already.
        self._decoded = decodes_responses(redis)
        # On a cluster the deliveries (home slot) and a shard's results stream cannot share a transaction.
        self._split_ack = is_cluster(redis)
        self.stale_pending_ms = STALE_PENDING_MS
        self._client: httpx.AsyncClient | None = None
        self._scripts = Scripts(redis, self.keys)
        self._next_cleanup = 0.0
        # Set when a send ends: an endpoint's slot is free, so the dispatcher looks again at once.
        self._slot_freed = asyncio.Event()
        self._sending: set[str] = set()
        # Events the next read of each results stream asks for (see BATCH_GROWTH), and whether its last
        # read came back full (then the next follows at once, without lingering).
        self._count: dict[str, int] = {}
        self._full: dict[str, bool] = {}
        # Until when the fan-out reads without asking whether anything is watched (_pass_unwatched).
        self._read_until = 0.0

    # ---- loops ------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, fan_out: bool = True) -> None:
        # No redirects: a 3xx to an internal address would step around the egress check.
        self._client = httpx.AsyncClient(transport=self._transport, follow_redirects=False, trust_env=False)
        try:
            loops = [self._loop(self.dispatch_once, stop)]
            if fan_out:
                for keys in self.layout.shards:
                    loops.append(self._loop(functools.partial(self._fan_out_pass, keys, stop), stop))
            await asyncio.gather(*loops)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._client.aclose()
            await self._hand_back()

    async def _hand_back(self) -> None:
        """On shutdown, make the sends cut short due again at once rather than when their leases end."""
        if not self._sending:
            return
        with contextlib.suppress(Exception):
            now_ms = await redis_ms(self.redis)
            async with self.redis.pipeline(transaction=True) as pipe:
                for delivery in self._sending:
                    pipe.zadd(self.names.due, {delivery: now_ms}, xx=True)
                    pipe.delete(self.names.lease(delivery))
                await pipe.execute()
            self._sending.clear()

    async def _loop(self, step: object, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                busy = await step()  # type: ignore[operator]
                backoff.reset()
            except REDIS_UNAVAILABLE as exc:
                delay = backoff.next_delay()
                log.warning("webhooks: Redis unavailable (%s); retrying in %.1fs", exc, delay)
                await sleep_or_stop(delay, stop)
                continue
            except ResponseError as exc:
                if is_missing_group(exc):
                    # Redis lost its data (a flush, a restart without persistence): start again.
                    # Redis may be gone again (a failover), or the cluster client may fail under us:
                    # the next pass tries once more (an error raised here would escape the loop).
                    try:
                        await self.registry.ensure_group()
                    except Exception as exc:
                        log.warning("webhooks: consumer group not created yet (%r)", exc)
                    continue
                log.exception("webhooks: unexpected Redis error")
                await sleep_or_stop(backoff.next_delay(), stop)
                continue
            except Exception:
                # Webhooks run beside execution in the worker: a bug here must not stop the worker.
                log.exception("webhooks: unexpected error; going on")
                await sleep_or_stop(backoff.next_delay(), stop)
                continue
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), DISPATCH_IDLE_S)

    # ---- fan-out ----------------------------------------------------------------------------------

    async def _fan_out_pass(self, keys: Keys, stop: asyncio.Event) -> int:
        handled = await self.fan_out_once(keys=keys)
        if not self._full.get(keys.results, False):
            await linger(self.settings.results_linger_ms, stop)
        return handled

    async def fan_out_once(self, block_ms: int = IDLE_BLOCK_MS, *, keys: Keys | None = None) -> int:
        """Turn one batch of events of one shard (the home shard by default) into deliveries; returns
        how many entries were handled."""
        keys = keys or self.keys
        if time.monotonic() >= self._next_cleanup:
            self._next_cleanup = time.monotonic() + CLEANUP_INTERVAL_S
            await self.remove_gone_consumers()
        entries: list[tuple[str, dict[Any, Any]]] = []
        if time.monotonic() >= self._next_claim.get(keys.results, 0.0):
            cursor, entries = await autoclaim(
                self.redis,
                keys.results,
                self.group,
                self.consumer,
                self.stale_pending_ms,
                start=self._claim_cursors.get(keys.results, "0-0"),
                count=CLAIM_BATCH,
            )
            self._claim_cursors[keys.results] = cursor
            if entries:
                # Taken over, not read: the pass lingers after it, as after any short read.
                self._full[keys.results] = False
            # A scan that stopped part way goes on at the next pass; one that went round looks again after a
            # quarter of the idle time that makes an entry stale: a crashed process's entries wait at most
            # that much longer, and a busy fan-out pays a round trip per pass less.
            if cursor == "0-0":
                self._next_claim[keys.results] = time.monotonic() + self.stale_pending_ms / 4000
        if not entries and await self._pass_unwatched(keys):
            # Nothing read: the pass waits as the loop's idle passes do (an endpoint registered
            # meanwhile gets every event from the next pass on).
            return 0
        if not entries:
            count = self._count.get(keys.results, FAN_OUT_BATCH)
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {keys.results: ">"}, count=count, block=block_ms
            )
            entries = [e for _, batch in reply or [] for e in batch]
            full = self._full[keys.results] = len(entries) >= count
            self._count[keys.results] = (
                min(2 * count, FAN_OUT_BATCH * BATCH_GROWTH) if full else max(FAN_OUT_BATCH, count // 2)
            )
        if not entries:
            # Blocking already waited; the pass then lingers as after any short read (a linger is short
            # beside the block, and an event arriving meanwhile waits at most that).
            return 1
        handled = len(entries)
        acked, wanted = self._sort_out(entries)
        if not acked:
            return handled
        # Only events some subscriber may want need the endpoints (and Redis's clock, which dates their
        # deliveries): a batch of other events is only acknowledged.
        endpoints = await self.registry.list() if wanted else []
        now_ms = await redis_ms(self.redis) if endpoints else 0
        deliveries: list[Delivery] = []
        for entry_id, fields in wanted:
            # Entry ids repeat across shards' streams: a delivery is named by both.
            occurrence = entry_id if keys.shard_count == 1 else f"s{keys.shard_index}-{entry_id}"
            deliveries.extend(self._deliveries(occurrence, fields, endpoints, now_ms, entry_id=entry_id))
        if not deliveries:
            # Nothing to write with the ack (most batches: no endpoint wants their events): one command,
            # atomic on its own, instead of a transaction around it.
            await self.redis.xack(keys.results, self.group, *acked)
            return handled
        async with self.redis.pipeline(transaction=True) as pipe:
            for delivery in deliveries:
                # HSETNX/ZADD NX: an entry read twice (a crash before the ack) makes no second delivery.
                pipe.hsetnx(self.names.deliveries, delivery.id, delivery.encode())
                pipe.zadd(self.names.due, {delivery.id: now_ms}, nx=True)
            if not self._split_ack:
                pipe.xack(keys.results, self.group, *acked)
            await pipe.execute()
        if self._split_ack:
            # Deliveries first, then the ack: a crash between them re-reads the entries, and HSETNX /
            # ZADD NX make no second delivery.
            await self.redis.xack(keys.results, self.group, *acked)
        return handled

    async def _pass_unwatched(self, keys: Keys) -> bool:
        """With no endpoint registered and no failure reporting in this process, no event of a shard can
        become a delivery or a report: its new entries are passed over (pass_unwatched.lua), never read.
        Reading and acknowledging them was an eighth of a worker's CPU per execution. Not on a cluster,
        where the endpoints and a shard's stream are in different slots (no one script holds both).
        Failure reports then come only from processes with SENTRY_DSN; as with a shared group's reads,
        they are complete only when every worker has it (README, Operations)."""
        if self._split_ack or time.monotonic() < self._read_until or active_sentry() is not None:
            return False
        try:
            if await self._scripts.pass_unwatched(self.names.endpoints, keys.results, self.group):
                return True
        except OutOfMemoryError:
            # Redis at its memory limit refuses the script's write where a read still goes.
            pass
        self._read_until = time.monotonic() + WATCHED_RECHECK_S
        return False

    def _sort_out(self, entries: list[tuple[str, dict[Any, Any]]]) -> tuple[list[str], list[Entry]]:
        """The ids of the entries to acknowledge, and those of them whose type some subscriber (an
        endpoint or the error reporting) may want, with their fields decoded. Most events are of neither
        kind: their data is never parsed, and nothing but their type and format is looked at."""
        # Events of a format newer than this process reads (a newer release's, during a rolling deploy)
        # are not announced from what this one understands of them: left pending, unacknowledged, a newer
        # process claims them once they are stale (an old one that claims them leaves them again).
        readable = self.settings.readable_format
        acked: list[str] = []
        wanted: list[Entry] = []
        decoded = self._decoded
        for entry_id, raw in entries:
            fields = raw if decoded else decode_fields(raw)
            version = format_version(fields)
            if version is not None and version > readable:
                continue
            acked.append(entry_id)
            if fields.get(EventField.TYPE) in SUBSCRIBED_TYPES:
                wanted.append((entry_id, fields))
        return acked, wanted

    def _deliveries(
        self, occurrence: str, fields: dict[str, str], endpoints: list[Endpoint], now_ms: int, *, entry_id: str
    ) -> list[Delivery]:
        """`fields` decoded (decode_fields)."""
        # Most events can become neither a webhook nor a Sentry report: they are passed over by their
        # type alone, their data never parsed (with no endpoint, only failures are reported).
        if fields.get(EventField.TYPE) not in (ANNOUNCED_TYPES if endpoints else REPORTED_TYPES):
            return []
        try:
            if format_version(fields) is None:
                raise ValueError("the format version is not a positive integer")
            event = Event.from_entry(entry_id, fields)
        except (ValueError, KeyError):
            return []  # not an event: the projector dead-letters it; nothing to announce
        # Sentry is one more subscriber of the same events (a no-op without SENTRY_DSN).
        report_failed_execution(event)
        if not endpoints:
            return []
        kind = webhook_event(event)
        if kind is None:
            return []
        body = payload(kind, event)
        return [
            Delivery(delivery_id(e.id, occurrence), e.id, kind.value, body, first_at_ms=now_ms)
            for e in endpoints
            if e.wants(kind, event)
        ]

    async def remove_gone_consumers(self) -> list[str]:
        """Consumers of processes that are gone (silent a while, owning nothing): as maintenance does
        for the other groups, so the group's consumer list does not grow with every restart."""
        removed = []
        for keys in self.layout.shards:
            try:
                consumers = await self.redis.xinfo_consumers(keys.results, self.group)
            except ResponseError:
                continue  # no stream or group in this shard yet
            for consumer in consumers:
                name = consumer["name"]
                if name == self.consumer or consumer["pending"] or consumer["idle"] < GONE_AFTER_MS:
                    continue
                if await Scripts(self.redis, keys).remove_consumer_if_idle(keys.results, self.group, name):
                    removed.append(name)
        return removed

    # ---- dispatch ---------------------------------------------------------------------------------

    @property
    def _lease_ms(self) -> int:
        # Longer than one attempt can take (resolving, then the request, each bounded by the timeout),
        # so a live sender never loses its lease; a dead one's delivery is due again soon after.
        return int((self.settings.webhook_timeout * 3 + 1) * 1000)

    async def dispatch_once(self) -> int:
        """Start sending the deliveries that are due; returns how many were started."""
        self._slot_freed.clear()
        now_ms = await redis_ms(self.redis)
        due = await self.redis.zrangebyscore(self.names.due, "-inf", now_ms, start=0, num=DISPATCH_WINDOW)
        started = 0
        # Due deliveries of endpoints whose slots here are full: they wait, and others go on.
        waiting: list[str] = []
        for delivery in due:
            if started >= DISPATCH_BATCH:
                break  # the rest of the window is looked at again by the next pass, which follows at once
            endpoint_id = endpoint_of(delivery)
            if self._inflight[endpoint_id] >= self.settings.webhook_endpoint_concurrency:
                waiting.append(delivery)
                continue
            if not await self.redis.set(self.names.lease(delivery), self.consumer, nx=True, px=self._lease_ms):
                continue
            # Out of everyone's due range while leased; due again by itself if this process dies.
            await self.redis.zadd(self.names.due, {delivery: now_ms + self._lease_ms}, xx=True)
            self._inflight[endpoint_id] += 1
            task = asyncio.create_task(self._attempt(delivery, endpoint_id), name=f"webhook {delivery}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        if waiting and len(due) >= DISPATCH_WINDOW:
            await self._to_the_back(waiting, now_ms)
        return started

    async def _to_the_back(self, waiting: list[str], now_ms: int) -> None:
        """Move due deliveries this process cannot start (their endpoints' slots are full) behind every
        other delivery due now, still due: with a window full of them, the next pass's window (the oldest
        due first) would be the same one, and a hanging endpoint's backlog would hide every other
        endpoint's deliveries for as long as it lasted. Only when the window was full: otherwise this pass
        saw everything due, and moving would reach nothing more.

        One ZADD, XX GT to now_ms, safe against the other processes sending meanwhile: XX adds nothing,
        so a delivery another process just completed or dead-lettered (ZREM) is not brought back; GT only
        raises a score, so one another process leased (scored to its lease's end) or failed and scheduled
        for a later retry keeps that later score (if its write lands after this one, it wins anyway). A
        score this moves was at most now_ms: the delivery stays due, only behind the others, and takes
        any free slot as soon as the passes come round to it (the retry budget counts from first_at_ms,
        not from the score). The key layout is unchanged: older processes sharing the set read it the
        same way."""
        await self.redis.zadd(self.names.due, dict.fromkeys(waiting, now_ms), xx=True, gt=True)

    async def _attempt(self, delivery: str, endpoint_id: str) -> None:
        self._sending.add(delivery)
        try:
            await self.attempt(delivery)
            self._sending.discard(delivery)
        except REDIS_UNAVAILABLE as exc:
            self._sending.discard(delivery)
            log.warning("webhook %s: Redis unavailable (%s); due again when its lease ends", delivery, exc)
        except Exception:
            self._sending.discard(delivery)
            log.exception("webhook %s: unexpected error; due again when its lease ends", delivery)
        finally:
            self._inflight[endpoint_id] -= 1
            self._slot_freed.set()

    async def attempt(self, delivery_key: str) -> str:
        """Send one delivery once; returns 'delivered', 'retrying', 'dead' or 'dropped'."""
        raw = await self.redis.hget(self.names.deliveries, delivery_key)
        endpoint = await self.registry.get(endpoint_of(delivery_key))
        if raw is None or endpoint is None:
            # Delivered meanwhile by someone whose lease we outlived, or the endpoint was deleted.
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.names.due, delivery_key)
                pipe.hdel(self.names.deliveries, delivery_key)
                await pipe.execute()
            return "dropped"
        delivery = Delivery.decode(raw)
        error, status = await self._send(endpoint, delivery)
        if error is None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.names.due, delivery.id)
                pipe.hdel(self.names.deliveries, delivery.id)
                pipe.delete(self.names.lease(delivery.id))
                await pipe.execute()
            return "delivered"
        delivery.attempts += 1
        delivery.last_error = error
        delivery.last_status = status
        now_ms = await redis_ms(self.redis)
        if now_ms - delivery.first_at_ms >= self.settings.webhook_retry_for * 1000:
            delivery.dead_at = now_iso()
            log.warning(
                "webhook %s to %s dead after %d attempts: %s", delivery.id, endpoint.url, delivery.attempts, error
            )
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hexists(self.names.endpoints, endpoint.id)
                pipe.lpush(self.names.dead(endpoint.id), delivery.encode())
                pipe.ltrim(self.names.dead(endpoint.id), 0, DEAD_LETTERS_KEPT - 1)
                pipe.zrem(self.names.due, delivery.id)
                pipe.hdel(self.names.deliveries, delivery.id)
                pipe.delete(self.names.lease(delivery.id))
                endpoint_kept, *_ = await pipe.execute()
            if not endpoint_kept:
                # Deleted while this attempt was out: the push made its dead list again, which nothing
                # would list or remove. Deleted after the push instead, the delete removes the list.
                await self.redis.delete(self.names.dead(endpoint.id))
            return "dead"
        delay = min(self.settings.webhook_backoff * 2 ** (delivery.attempts - 1), self.settings.webhook_backoff_max)
        # Jitter, so that deliveries that failed together (an endpoint's outage) do not return together.
        next_ms = now_ms + int(delay * random.uniform(0.5, 1.0) * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.names.deliveries, delivery.id, delivery.encode())
            pipe.zadd(self.names.due, {delivery.id: next_ms}, xx=True)
            pipe.delete(self.names.lease(delivery.id))
            await pipe.execute()
        return "retrying"

    async def _send(self, endpoint: Endpoint, delivery: Delivery) -> tuple[str | None, int | None]:
        """(None, status) when the endpoint took it; else (why not, status if any)."""
        assert self._client is not None
        if not endpoint.secret:
            return "the endpoint's secret does not decrypt with this process's NOVA_SECRETS_KEY", None
        try:
            host, address = await self.policy.resolve(endpoint.url, timeout=self.settings.webhook_timeout)
        except EgressRefused as exc:
            return str(exc), None
        url = httpx.URL(endpoint.url)  # resolve() refused any URL httpx cannot parse
        now_ms = await redis_ms(self.redis)
        timestamp = now_ms // 1000
        # Both secrets during a rotation's grace, so a receiver verifies with either.
        signing = await self.registry.signing_secrets(endpoint, now_ms)
        headers = {
            "content-type": "application/json",
            "user-agent": "nova-webhooks",
            # The original name, although the connection goes to the address checked above.
            "host": url.netloc.decode(),
            **sign(signing, delivery.id, timestamp, delivery.body),
        }
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        try:
            # httpx's timeout bounds each phase; wait_for bounds the whole (an endpoint answering a byte
            # at a time would otherwise outlast the lease).
            response = await asyncio.wait_for(
                self._client.post(
                    url.copy_with(host=address),
                    content=delivery.body.encode(),
                    headers=headers,
                    timeout=self.settings.webhook_timeout,
                    extensions=extensions,
                ),
                self.settings.webhook_timeout,
            )
        except (httpx.TimeoutException, TimeoutError):
            return f"no answer within {self.settings.webhook_timeout:g}s", None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # InvalidURL too (building the request; not an HTTPError): uncaught, the attempt would escape
            # as an unexpected error, never counted, and be due again at every lease's end, for ever.
            return f"{type(exc).__name__}: {exc}", None
        with contextlib.suppress(Exception):
            await response.aclose()
        if 200 <= response.status_code < 300:
            return None, response.status_code
        return f"HTTP {response.status_code}", response.status_code
