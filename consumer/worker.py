"""The stream consumer: reads execution requests as a member of the workers' group and runs them.

Backpressure: XREADGROUP asks for only as many entries as there are free slots, so a busy worker
leaves the rest of the stream to its peers. Before reading new entries, the reader takes over entries
whose worker went silent (XAUTOCLAIM, resuming its scan where the last one stopped), so a crashed
worker's runs do not wait behind the whole backlog. Alongside the reader run small loops: a heartbeat
that keeps this worker's in-flight entries fresh, a watchdog that gives runs up when the heartbeat
cannot reach Redis (another worker will take them over: running on would run their nodes twice),
promotion of due retries, and housekeeping (trimming, removing dead consumers).

Shards (NOVA_SHARDS) and priority lanes: a worker process reads every requests stream (each shard's,
in each lane), one `Worker` per stream, all sharing the process's slots (consumer/slots.py, which says
how lanes share them). With one stream the reader blocks in XREADGROUP; with several, a reader takes
slots only for a read that does not block, and waits for new entries with a plain XREAD (which
consumes nothing), so an idle stream never holds slots another stream's backlog could use. The
shard-wide loops (promotion of due retries, trimming the results stream, the worker's report) run in
the normal lane's reader of each shard only.

Run control (shared/control.py): a listener on the control channel learns of a cancel by a push and
stops the run at once (its sandbox is killed with it), and of a drain, after which the reader takes
nothing new until it ends. The heartbeat re-reads both, so a push missed while disconnected is made
good within a quarter of the visibility timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from consumer.maintenance import Maintenance
from consumer.runs import AlreadyFinished, Delivery, RunContext, TakenOver, release_slot, run_delivery
from consumer.sandbox.base import (
    AliasProvider,
    Sandbox,
    SandboxInfraError,
    SandboxProvider,
    SandboxSpec,
    UnavailableProvider,
)
from consumer.scheduler import Scheduler
from consumer.slots import SlotBudget
from shared.backoff import Backoff, sleep_or_stop
from shared.catalog import WorkflowCatalog
from shared.clients import ClientCredentials, ClientStore, Vault
from shared.connections import (
    REDIS_UNAVAILABLE,
    autoclaim,
    create_redis,
    ensure_groups,
    info_of,
    is_missing_group,
    is_moved_away,
    open_pool,
    prepare,
    pubsub_client,
)
from shared.control import drained_field
from shared.db import LazyPool
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import Keys, Lane, Layout, RequestField, decode_fields, dumps, entry_id_parts, now_iso
from shared.tasks import cancel_until_done

log = logging.getLogger(__name__)

# How long a reader of one of several streams waits for news of a new entry before it looks anyway.
WAKE_TIMEOUT_S = 2.0
# Container objects allocated (net) before the cycle collector's youngest generation is collected: at
# Python's default (700) a busy worker collected it a couple of times per 10 runs, each collection
# promoting the objects of the runs in flight, and every few thousand runs a full collection scanned the
# whole heap; together about a sixth of a worker's CPU per no-op execution.
GC_YOUNG_THRESHOLD = 10_000


class Worker:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        catalog: WorkflowCatalog,
        providers: dict[str, SandboxProvider],
        client_credentials: Callable[[str], Awaitable[ClientCredentials]] | None = None,
        *,
        keys: Keys | None = None,
        budget: SlotBudget | None = None,
        consumer: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        # The requests stream this reader serves (one shard's) and the process's shared slots.
        self.keys = keys or Keys.from_settings(settings)
        self.budget = budget or SlotBudget(settings.concurrency)
        self.budget.register(self.keys.lane, self.keys.requests)
        self.scripts = Scripts(redis, self.keys)
        self.consumer = consumer or settings.new_consumer_name()
        self.providers = providers
        self.ctx = RunContext(
            settings=settings,
            redis=redis,
            keys=self.keys,
            scripts=self.scripts,
            catalog=catalog,
            open_sandbox=self._open_sandbox,
            consumer=self.consumer,
            definitions={},
            client_credentials=client_credentials,
        )
        self.inflight: dict[str, asyncio.Task[None]] = {}
        # Runs started by the current read (what it used of the slots it reserved).
        self._started = 0
        # Set by the watcher of this stream when an entry was appended (several streams only).
        self._appended = asyncio.Event()
        # The newest entry a read of this reader was given. Every entry up to it has been delivered to
        # the group (a stream's ids only grow), so the watch need not wake this reader for any of them.
        self._read_up_to = "0-0"
        # The readers whose streams this one's watcher watches: None for its own only; [] when another
        # reader's watcher watches this stream (serve() gives a shard's normal lane reader its lanes').
        self.watches: list[Worker] | None = None
        self.maintenance = Maintenance(settings, redis, self.keys, self.scripts, self.consumer)
        # When this worker last knew its runs' entries were fresh in Redis (monotonic seconds).
        self._fresh_at = time.monotonic()
        # Reclaim is held back until then: after an outage, idle times include the downtime, and
        # live runs must get their heartbeat in before anyone takes them for dead.
        self._reclaim_not_before = 0.0
        self._next_reclaim = 0.0
        self._reclaim_cursor = "0-0"
        # Cancellations in progress of runs that were taken over (kept so they are not collected).
        self._stopping: set[asyncio.Task[None]] = set()
        # The task id of each in-flight entry: a cancel names the task.
        self._task_of: dict[str, str] = {}
        # Set while the operators drain the workers: finish what is held, take nothing new.
        self.draining = False
        self._undrained = asyncio.Event()
        # Whether the reader has stopped for the drain (what the drain's progress reports).
        self._reader_parked = False

    async def _open_sandbox(self, spec: SandboxSpec) -> Sandbox:
        provider = self.providers.get(spec.executor)
        if provider is None:
            raise SandboxInfraError(f"no sandbox provider for executor '{spec.executor}'")
        return await provider.open(spec)

    @property
    def free_slots(self) -> int:
        return self.budget.free

    def _start(self, entry_id: str, fields: dict[Any, Any], deliveries: int) -> None:
        if entry_id in self.inflight:
            return
        task = asyncio.create_task(self._run(entry_id, fields, deliveries), name=f"run {entry_id}")
        self.inflight[entry_id] = task
        self.budget.take()
        self._started += 1
        task_id = fields.get(RequestField.TASK_ID)
        # Text already from a client that decodes replies (ours does): no copy of the fields to read it.
        self._task_of[entry_id] = (
            task_id if type(task_id) is str else decode_fields(fields).get(RequestField.TASK_ID, "")
        )

    async def _run(self, entry_id: str, fields: dict[Any, Any], deliveries: int) -> None:
        try:
            await run_delivery(self.ctx, Delivery(entry_id, fields, deliveries))
        except AlreadyFinished as exc:
            log.info("entry %s: task %s already finished elsewhere", entry_id, exc.args[0])
        except TakenOver as exc:
            log.warning("entry %s: task %s was taken over by another worker; stopped", entry_id, exc.args[0])
        except asyncio.CancelledError:
            # Shutdown or lost ownership: the entry stays pending and resumes from its checkpoint.
            raise
        except REDIS_UNAVAILABLE as exc:
            log.warning("entry %s left pending, Redis unavailable: %s", entry_id, exc)
        except Exception:
            log.exception("entry %s: unexpected error; left pending for redelivery", entry_id)
        finally:
            if self.inflight.pop(entry_id, None) is not None:
                self.budget.give()
            self._task_of.pop(entry_id, None)
            self.ctx.held.pop(entry_id, None)
            self.ctx.settled.discard(entry_id)
            if self.draining:
                self._report(self._report_drained())

    # ---- loops ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self._until_redis(lambda: ensure_groups(self.redis, self.keys), stop)
        log.info(
            "worker %s reading %s as group %s (concurrency %d)",
            self.consumer,
            self.keys.requests,
            self.keys.worker_group,
            self.settings.concurrency,
        )
        # The side loops outlive `stop`: the heartbeat must keep draining runs fresh.
        closed = asyncio.Event()
        vt = self.settings.visibility_timeout
        self._fresh_at = time.monotonic()
        # The shard's keys outside its requests streams are looked after by its normal lane's reader.
        shard_wide = self.keys.lane == Lane.NORMAL
        loops = [
            asyncio.create_task(self._every(vt / 4, self._heartbeat, closed)),
            asyncio.create_task(self._every(vt / 8, self._watchdog, closed)),
            asyncio.create_task(self._every(max(vt, 5.0), self._maintain, stop)),
            asyncio.create_task(self._listen_control(closed), name="control"),
        ]
        if shard_wide:
            loops.append(asyncio.create_task(self._every(self._promote_interval(), self._promote, stop)))
        # One report per process, whatever the shards: the home shard's reader writes it for all.
        reports = self.keys.shard_index == 0 and shard_wide
        if reports:
            loops.append(asyncio.create_task(self._every(vt / 4, self.report_self, closed)))
        if self.budget.readers > 1 and self.watches != []:
            loops.append(asyncio.create_task(self._watch(stop), name="watch"))
        try:
            await self._read_loop(stop)
            await self._drain()
        finally:
            closed.set()
            await cancel_until_done(loops)
            if reports:
                # Gone at once rather than at its expiry: health and metrics stop counting this worker.
                with contextlib.suppress(*REDIS_UNAVAILABLE, TimeoutError):
                    await asyncio.wait_for(self.scripts.worker_report(self.consumer, None), 1.0)
            # Reached only on an unexpected error in the read loop: runs must not outlive it.
            await cancel_until_done(self.inflight.values())

    async def _maintain(self) -> None:
        if self.keys.lane == Lane.NORMAL:
            await self.maintenance.run()
        else:
            await self.maintenance.run_stream()

    def _promote_interval(self) -> float:
        return min(1.0, max(0.02, self.settings.retry_backoff / 2))

    async def _read_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        stop_wait = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if self.draining:
                    # Take nothing new (reclaims included) until the drain ends or the worker stops.
                    self._undrained.clear()
                    self._reader_parked = True
                    self._report(self._report_drained())
                    undrained = asyncio.create_task(self._undrained.wait())
                    await asyncio.wait({undrained, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    undrained.cancel()
                    self._reader_parked = False
                    continue
                # This lane's share of the free slots is this read's until its entries are started:
                # another stream's reader of this process cannot take them meanwhile.
                slots = self.budget.reserve(self.keys.lane, self.keys.requests)
                if slots <= 0:
                    self.budget.freed.clear()
                    freed = asyncio.create_task(self.budget.freed.wait())
                    await asyncio.wait({freed, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    freed.cancel()
                    continue
                self._started = 0
                reclaiming = time.monotonic() >= self._next_reclaim
                try:
                    if reclaiming:
                        self._next_reclaim = time.monotonic() + self.settings.visibility_timeout / 2
                        read: asyncio.Task[Any] = asyncio.create_task(self._reclaim(slots))
                    else:
                        read = asyncio.create_task(self._read(slots))
                    # A drain that begins during this read takes effect when it returns (within its 2 s
                    # block): cancelling it could strand what Redis delivered to it until a reclaim.
                    done, _ = await asyncio.wait({read, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    if read not in done:
                        # Stopping: an entry delivered to a cancelled read stays pending and is reclaimed.
                        read.cancel()
                        with contextlib.suppress(BaseException):
                            await read
                        break
                    error = read.exception()
                    entries = read.result() if error is None else []
                    for entry_id, fields in entries:
                        self._start(entry_id, fields, 1)
                finally:
                    self.budget.unreserve(slots, self.keys.lane, unused=slots - self._started)
                if error is not None:
                    await self._read_failed(error, backoff, stop)
                    continue
                backoff.reset()
                if reclaiming or self.budget.readers == 1 or len(entries) >= slots:
                    continue
                # The stream is empty now: its lane takes no slots until this stream's watcher sees an
                # entry appended (or a while has passed, and it looks again).
                self.budget.idle(self.keys.lane, self.keys.requests)
                # A stop ends the wait too: the drain's grace starts at once, not after it.
                appended = asyncio.create_task(self._appended.wait())
                await asyncio.wait({appended, stop_wait}, timeout=WAKE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
                appended.cancel()
        finally:
            stop_wait.cancel()

    async def _read_failed(self, exc: BaseException, backoff: Backoff, stop: asyncio.Event) -> None:
        if isinstance(exc, REDIS_UNAVAILABLE):
            self._outage()
            delay = backoff.next_delay()
            log.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
            await sleep_or_stop(delay, stop)
            return
        if isinstance(exc, ResponseError) and is_moved_away(exc):
            return
        if isinstance(exc, ResponseError) and is_missing_group(exc):
            # Redis lost its data (restart without AOF, FLUSHALL): recreate and go on.
            log.warning("consumer group missing; recreating it")
            # Redis may be gone again (a failover), or the cluster client may fail under us: the next
            # read tries once more.
            try:
                await ensure_groups(self.redis, self.keys)
            except Exception as exc:
                log.warning("consumer groups not created yet (%r)", exc)
            return
        # Nothing a read meets may end the worker (seen on a cluster: a connection the client library
        # closed under a concurrent command); wait, and read again.
        delay = backoff.next_delay()
        log.error("read of %s failed (%r); reading again in %.1fs", self.keys.requests, exc, delay)
        await sleep_or_stop(delay, stop)

    async def _watch(self, stop: asyncio.Event) -> None:
        """With several streams: tell the readers of this shard's lanes (or this one's alone) when an
        entry is appended to their stream. A plain XREAD consumes nothing, so it may wait as long as it
        likes without holding slots or entries; one XREAD watches every lane of a shard (one slot)."""
        readers = {w.keys.requests: w for w in (self.watches if self.watches is not None else [self])}
        # Concrete ids, never "$": Redis takes "$" anew at each read, so an entry appended to a quiet lane
        # between two reads (a busy lane answering each at once) would never be seen.
        last: dict[str, str] = {}
        backoff = Backoff()
        while not stop.is_set():
            try:
                for stream in readers.keys() - last.keys():
                    latest = await self.redis.xrevrange(stream, count=1)
                    last[stream] = latest[0][0] if latest else "0-0"
                for stream, reader in readers.items():
                    # Entries the reader has read already: a watch behind a backlog would otherwise
                    # wake for each of them, one round trip per entry.
                    if entry_id_parts(reader._read_up_to) > entry_id_parts(last[stream]):
                        last[stream] = reader._read_up_to
                reply = await self.redis.xread(last, count=1, block=1000)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Whatever it meets (on a cluster, a connection the client library closed under a
                # concurrent command), the watch goes on: the readers look anyway every few seconds.
                await sleep_or_stop(backoff.next_delay(), stop)
                log.debug("watch of %s: %r", ", ".join(readers), exc)
                continue
            for stream, items in reply or []:
                if items:
                    last[stream] = items[-1][0]
                    readers[stream]._appended.set()

    async def _read(self, count: int) -> list[tuple[str, dict[str, str]]]:
        if count <= 0:
            return []
        if self.budget.readers > 1:
            # Cleared before the read: an entry appended after it sets the event again.
            self._appended.clear()
        reply = await self.redis.xreadgroup(
            self.keys.worker_group,
            self.consumer,
            {self.keys.requests: ">"},
            count=count,
            # One stream: block here, as always. Several: never hold slots while waiting (see _watch).
            block=2000 if self.budget.readers == 1 else None,
        )
        entries: list[tuple[str, dict[str, str]]] = []
        for _stream, items in reply or []:
            entries.extend(items)
        if entries:
            self._read_up_to = entries[-1][0]
        return entries

    def _outage(self) -> None:
        """Redis was unreachable: hold reclaims back until live runs have had their heartbeat."""
        self._reclaim_not_before = time.monotonic() + self.settings.visibility_timeout

    async def _heartbeat(self) -> None:
        sent_at = time.monotonic()
        ids = [entry_id for entry_id in self.inflight if entry_id not in self.ctx.settled]
        if not ids:
            self._fresh_at = sent_at
            await self._recheck_control_bounded(ids)
            return
        try:
            # Bounded: a partitioned connection would otherwise hang this loop and the watchdog's view.
            kept = await asyncio.wait_for(
                self.scripts.heartbeat(self.consumer, ids), timeout=self.settings.visibility_timeout / 4
            )
        except (*REDIS_UNAVAILABLE, TimeoutError):
            self._outage()
            raise
        self._fresh_at = sent_at
        await self._refresh_slots(kept)
        await self._recheck_control_bounded(ids)
        for entry_id in ids:
            if entry_id not in kept and entry_id in self.inflight:
                # Another worker reclaimed it (we were silent too long): stop our copy so the
                # node in flight does not run twice at once.
                log.warning("entry %s was taken over by another worker; cancelling our run", entry_id)
                stopping = asyncio.create_task(cancel_until_done([self.inflight[entry_id]]))
                self._stopping.add(stopping)
                stopping.add_done_callback(self._stopping.discard)

    async def _refresh_slots(self, kept: set[str]) -> None:
        """Keep the concurrency-key slots of the runs whose entries are still ours: a holder expires a
        visibility timeout after its last refresh, as its entry would be reclaimed."""
        by_key: dict[str, list[str]] = {}
        for entry_id, slot in list(self.ctx.held.items()):
            if entry_id in kept:
                by_key.setdefault(slot.key, []).append(slot.task_id)
        ttl_ms = int(self.settings.visibility_timeout * 1000)
        for key, holders in by_key.items():
            holders_key = self.keys.concurrency_holders(key)
            # A missed refresh is not fatal (three more come before the slot expires), and must not keep
            # the heartbeat from its own checks; a Redis lost for longer stops the runs (the watchdog).
            with contextlib.suppress(*REDIS_UNAVAILABLE, TimeoutError):
                await asyncio.wait_for(
                    self.scripts.semaphore(
                        "refresh", key, holders, ttl_ms=ttl_ms, keys=[holders_key, f"{holders_key}:rate"]
                    ),
                    timeout=self.settings.visibility_timeout / 4,
                )

    async def report_self(self) -> None:
        """Write what operators see of this worker (shared/inspection.py worker_reports): its executors
        and their lasting faults (a refused E2B key, an unknown template), its load. Rewritten every
        quarter visibility timeout; stale one visibility timeout later, so a dead worker's report goes."""
        report = {
            "at": now_iso(),
            "concurrency": self.settings.concurrency,
            # The process's runs, every shard's reader's (they share the slots).
            "inflight": self.budget.used,
            "draining": self.draining,
            "executors": {name: _problem(provider) for name, provider in self.providers.items()},
        }
        ttl_ms = max(int(self.settings.visibility_timeout * 1000), 1000)
        await self.scripts.worker_report(self.consumer, dumps(report), ttl_ms=ttl_ms)

    # ---- run control -----------------------------------------------------------------------------

    async def _listen_control(self, closed: asyncio.Event) -> None:
        """Follow the control channel: `cancel <task id>`, `drain on|off`. Reconnects after an outage;
        what was pushed meanwhile is picked up by the heartbeat's re-check."""
        backoff = Backoff()
        while not closed.is_set():
            client, owned = pubsub_client(self.redis)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.control_channel)
                backoff.reset()
                # Subscribed: anything pushed before now is read from Redis instead.
                await self._recheck_control_bounded(list(self.inflight))
                while not closed.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        data = message["data"]
                        self._on_control(data.decode(errors="replace") if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except (*REDIS_UNAVAILABLE, TimeoutError) as exc:
                delay = backoff.next_delay()
                log.debug("control channel unavailable (%s); retrying in %.1fs", exc, delay)
                await sleep_or_stop(delay, closed)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                if owned:
                    with contextlib.suppress(Exception):
                        await client.aclose()

    def _on_control(self, message: str) -> None:
        verb, _, arg = message.partition(" ")
        if verb == "cancel":
            self.stop_task(arg)
        elif verb == "drain":
            self._set_draining(arg == "on")

    def _set_draining(self, on: bool) -> None:
        if on != self.draining:
            log.info("drain %s: %s", "started" if on else "ended", "taking nothing new" if on else "reading again")
        self.draining = on
        if not on:
            self._undrained.set()

    def _report(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _report_drained(self) -> None:
        """Tell the operators this worker reads nothing now, and what it still holds (drain progress)."""
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            if self.draining and self._reader_parked:
                holding = str(len(self.inflight))
                await self.redis.hset(self.keys.drained, drained_field(self.consumer, self.keys.lane), holding)

    def stop_task(self, task_id: str) -> bool:
        """Stop the run of a cancelled task, if this worker holds it: the run is cancelled (its sandbox
        killed, no further node started), then its entry acknowledged (the task is terminal already)."""
        entry_id = next((e for e, t in self._task_of.items() if t == task_id), None)
        if entry_id is None or entry_id not in self.inflight:
            return False
        log.info("entry %s: task %s was cancelled; stopping its run", entry_id, task_id)
        run = self.inflight[entry_id]
        stopping = asyncio.create_task(self._stop_cancelled(entry_id, run))
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)
        return True

    async def _stop_cancelled(self, entry_id: str, run: asyncio.Task[None]) -> None:
        slot = self.ctx.held.get(entry_id)
        await cancel_until_done([run])
        try:
            await self.redis.xack(self.keys.requests, self.keys.worker_group, entry_id)
            if slot is not None:
                # Only now that its run has stopped: the next waiter must not start beside it.
                await release_slot(self.ctx, slot)
        except REDIS_UNAVAILABLE:
            # Left pending: whoever reads it next finds the task terminal and acknowledges it; the slot
            # expires with its holder, and the promote loop hands it on.
            log.warning("entry %s of a cancelled task left pending (Redis unavailable)", entry_id)

    async def _recheck_control_bounded(self, entry_ids: list[str]) -> None:
        """The re-check after a heartbeat: bounded like the heartbeat, and never in its way (a hung or
        failed re-check must not delay the watchdog's view of whether Redis is reachable)."""
        try:
            await asyncio.wait_for(self._recheck_control(entry_ids), timeout=self.settings.visibility_timeout / 4)
        except (*REDIS_UNAVAILABLE, TimeoutError) as exc:
            log.debug("control re-check skipped: %s", exc)

    async def _recheck_control(self, entry_ids: list[str]) -> None:
        """Read the drain flag and the in-flight tasks' statuses from Redis: the push's safety net."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.keys.control, "drain")
        held = [(e, self._task_of.get(e, "")) for e in entry_ids]
        for _, task_id in held:
            pipe.hget(self.keys.task(task_id), "status")
        drain, *statuses = await pipe.execute()
        self._set_draining(bool(drain))
        if self.draining:
            await self._report_drained()
        for (_, task_id), status in zip(held, statuses, strict=True):
            if status in ("REVOKED", b"REVOKED"):
                self.stop_task(task_id)

    async def _watchdog(self) -> None:
        """Give every run up when the heartbeat has not reached Redis for half the visibility timeout.

        By then another worker may be about to reclaim the entries; a worker cut off from Redis (or
        frozen, e.g. SIGSTOP) that ran on would run the same nodes twice. Cancelling a run kills its
        sandbox; its entry stays pending, and whoever holds it next resumes from the checkpoint.
        """
        silent = time.monotonic() - self._fresh_at
        if not self.inflight or silent <= self.settings.visibility_timeout / 2:
            return
        try:
            # A late heartbeat may only mean a busy host (the loop ran late), not a lost Redis: renew
            # now, and keep the runs whose entries are still ours.
            await self._heartbeat()
            return
        except (*REDIS_UNAVAILABLE, TimeoutError):
            silent = time.monotonic() - self._fresh_at
        log.error(
            "no heartbeat reached Redis for %.1fs; giving up %d run(s) before they can be taken over",
            silent,
            len(self.inflight),
        )
        await cancel_until_done(self.inflight.values())

    async def _reclaim(self, free: int | None = None) -> list[tuple[str, dict[str, str]]]:
        """Take over entries idle past the visibility timeout; returns none (it starts them itself)."""
        free = self.free_slots if free is None else free
        if free <= 0 or time.monotonic() < self._reclaim_not_before or await self._redis_restarted_recently():
            return []
        idle_ms = int(self.settings.visibility_timeout * 1000)
        # Resume the scan where it stopped: restarting at 0-0 would re-read the same head of the
        # pending list each time and never reach entries behind it.
        self._reclaim_cursor, live = await autoclaim(
            self.redis,
            self.keys.requests,
            self.keys.worker_group,
            self.consumer,
            idle_ms,
            start=self._reclaim_cursor,
            count=free,
        )
        if not live:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _ in live:
            pipe.xpending_range(self.keys.requests, self.keys.worker_group, min=entry_id, max=entry_id, count=1)
        counts = await pipe.execute()
        for (entry_id, fields), info in zip(live, counts, strict=True):
            deliveries = int(info[0]["times_delivered"]) if info else 1
            log.info("reclaimed entry %s (delivery %d)", entry_id, deliveries)
            self._start(entry_id, fields, deliveries)
        return []

    async def _redis_restarted_recently(self) -> bool:
        # A restarted Redis (or a promoted replica) keeps delivery times from its AOF or replication
        # stream, so idle times include the downtime; wait until every live worker has been able to
        # send a heartbeat since.
        info = await info_of(self.redis, "server", self.keys.requests)
        return float(info.get("uptime_in_seconds", 0)) < self.settings.visibility_timeout

    async def _promote(self) -> None:
        await self.scripts.promote_due()
        if self.settings.readable_format > 1:
            # Requests older workers left for the format this one reads (during a rolling deploy).
            await self.scripts.take_from_older(self.settings.readable_format)
        # Slots freed by expiry (a crashed holder) are announced by nobody: hand them to the waiters.
        await self.scripts.wake_concurrency_waiters(int(self.settings.visibility_timeout * 1000))

    async def _every(self, interval: float, action: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await action()
            except asyncio.CancelledError:
                raise
            except (*REDIS_UNAVAILABLE, TimeoutError) as exc:
                self._outage()
                log.debug("%s skipped: Redis unavailable (%s)", getattr(action, "__name__", action), exc)
            except Exception:
                log.exception("%s failed", getattr(action, "__name__", action))
            await sleep_or_stop(interval, stop)

    async def _until_redis(self, action: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                await action()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Nothing may end a reader at start either (on a cluster: a connection the client
                # library closed under a concurrent command, seen as an AttributeError).
                delay = backoff.next_delay()
                log.warning("Redis unavailable at start (%r); retrying in %.1fs", exc, delay)
                await sleep_or_stop(delay, stop)

    async def _drain(self) -> None:
        """Give in-flight runs the grace period, then cancel them; their entries stay pending."""
        if not self.inflight:
            return
        log.info("draining %d in-flight run(s) for up to %.0fs", len(self.inflight), self.settings.shutdown_grace)
        _, pending = await asyncio.wait(set(self.inflight.values()), timeout=self.settings.shutdown_grace)
        if pending:
            log.warning("%d run(s) left pending for reclaim", len(pending))
            await cancel_until_done(pending)


def _problem(provider: SandboxProvider) -> str | None:
    # Optional in the provider protocol: a test double or an older provider has nothing to report.
    problem = getattr(provider, "problem", None)
    return problem() if callable(problem) else None


E2B_UNAVAILABLE = (
    "executor 'e2b' is not available: no E2B_API_KEY is configured on the workers (set it, or set "
    "NOVA_E2B_FALLBACK=local to run e2b nodes in the local sandbox)"
)


def default_providers(settings: Settings) -> dict[str, SandboxProvider]:
    from consumer.sandbox.local import LocalSandboxProvider

    local = LocalSandboxProvider(settings)
    providers: dict[str, SandboxProvider] = {"local": local}
    if settings.e2b_api_key:
        from consumer.sandbox.e2b import E2BSandboxProvider

        providers["e2b"] = E2BSandboxProvider(settings)
    elif settings.e2b_fallback == "local":
        providers["e2b"] = AliasProvider(local)
    else:
        # Without a key E2B refuses every sandbox: fail the node once, clearly, rather than retry and
        # dead-letter an execution that cannot succeed.
        providers["e2b"] = UnavailableProvider("e2b", E2B_UNAVAILABLE)
    return providers


async def _start_providers(providers: dict[str, SandboxProvider]) -> None:
    for provider in providers.values():
        await provider.start()


def settle_collector() -> None:
    """Tune the cycle collector for a worker process of its own, once it has started: what start-up
    made (modules, settings, clients) lives as long as the process, so it is frozen out of every later
    collection, and the youngest generation is collected only after GC_YOUNG_THRESHOLD allocations (run
    state is freed by reference counting as runs end; the collector only finds cycles, which are rare)."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event,
    providers: dict[str, SandboxProvider] | None = None,
    own_process: bool = False,
) -> None:
    """Run a worker (and the projector, unless disabled) until `stop` is set, then drain. `own_process`:
    the worker is the process's only occupant (`nova worker`), and may tune process-wide settings."""
    from consumer.projector import Projector
    from shared.reporting import init_reporting

    init_reporting(settings, "worker")
    if settings.test_only_format_version:
        log.warning(
            "NOVA_TEST_ONLY_FORMAT_VERSION=%d: this worker reads formats it does not know (a test stand-in for a "
            "newer release); never set it in a deployment",
            settings.test_only_format_version,
        )
    # Prompt writes: every run waits on a few small commands, each otherwise written in a task of its own;
    # the runs' script calls of one pass of the loop go in one batch.
    redis = create_redis(settings, prompt_writes=True, batch_commands=True)
    with contextlib.suppress(*REDIS_UNAVAILABLE):
        await prepare(redis)
    # Opened again on demand if PostgreSQL is down now, so the catalog and projector get it once it is back.
    lazy_pool = LazyPool(settings.database_url) if settings.database_url else None
    pool: asyncpg.Pool | None = None
    try:
        pool = await lazy_pool.get() if lazy_pool is not None else await open_pool(settings)
    except Exception as exc:
        # Workers do not need PostgreSQL to execute: workflows are read from Redis, and events
        # wait in the results stream until the projector can write them.
        log.warning("PostgreSQL unavailable at start (%s); executing without it", exc)
    providers = providers if providers is not None else default_providers(settings)
    await _start_providers(providers)
    keys = Keys.from_settings(settings)
    vault = Vault.from_settings(settings)
    clients = ClientStore(redis, pool, keys, vault)
    catalog = WorkflowCatalog(redis, lazy_pool, keys)
    # One reader per requests stream (every shard's), one consumer name and one set of slots.
    layout = Layout.from_settings(settings)
    streams = layout.streams
    budget = SlotBudget(settings.concurrency, readers=len(streams), weights=settings.lane_weight_map)
    consumer = settings.new_consumer_name()
    workers = [
        Worker(settings, redis, catalog, providers, clients.credentials_for, keys=k, budget=budget, consumer=consumer)
        for k in streams
    ]
    for shard in layout.shards:
        # One watcher per shard, in its normal lane's reader, for all its lanes' streams.
        lanes = [w for w in workers if w.keys.shard_index == shard.shard_index]
        for w in lanes:
            w.watches = lanes if w.keys.lane == Lane.NORMAL else []
    # The home shard's normal lane: the reader whose context the scheduler shares.
    worker = next(w for w in workers if w.keys.shard_index == 0 and w.keys.lane == Lane.NORMAL)
    tasks = [asyncio.create_task(w.run(stop), name=f"worker {w.keys.requests}") for w in workers]
    tasks.append(
        asyncio.create_task(
            Scheduler(settings, redis, worker.ctx.catalog, worker.consumer, lazy_pool).run(stop), name="scheduler"
        )
    )
    if settings.run_projector:
        for k in layout.shards:
            projector = Projector(settings, redis, lazy_pool, consumer=worker.consumer, keys=k)
            tasks.append(asyncio.create_task(projector.run(stop), name=f"projector {k.results}"))
    if settings.run_webhooks:
        from consumer.webhooks import WebhookDelivery

        webhooks = WebhookDelivery(settings, redis, consumer=worker.consumer)
        tasks.append(asyncio.create_task(webhooks.run(stop), name="webhooks"))
    if own_process:
        settle_collector()
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        if failed:
            # A part that ends on an unexpected error ends the process (its platform restarts it),
            # never leaving the other parts running on the resources closed below.
            log.error("%s failed; stopping the worker", failed[0].get_name(), exc_info=failed[0].exception())
            await cancel_until_done(tasks)
            raise failed[0].exception()  # type: ignore[misc]
    finally:
        for provider in providers.values():
            await provider.aclose()
        if lazy_pool is not None:
            await lazy_pool.close()
        await redis.aclose()
