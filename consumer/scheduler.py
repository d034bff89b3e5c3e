"""Fires scheduled executions from inside the workers.

Exactly once per tick, however many replicas run: each tick is enqueued with the idempotency key
`schedule:{id}:{tick_ms}`, so the atomic enqueue step itself refuses a second copy. Those keys, and the
schedules' scores, are in Redis, which can come back from an older state (an RDB snapshot, an AOF
fsynced every second, a lagging replica promoted) that has forgotten a tick that ran. So before firing
a tick the scheduler also asks PostgreSQL whether it holds that tick's execution (one lookup in the
unique index on `executions.task_id`, per tick fired, none on a pass with nothing due); if so the tick
is not fired again and the schedule moves on as if it had been. While PostgreSQL cannot answer, due ticks
wait (a tick fired late beats a tick fired twice, and none is dropped), as enqueues refuse to hand out
ids that PostgreSQL cannot vouch for (shared/enqueue.py SequenceUnavailable). A tick so recent that the
projector has not yet written it is in PostgreSQL's blind spot: only its Redis key protects it then.

A lease (`nova:scheduler:lease`, SET NX PX) makes one replica do the work at a time so the others do not
even try; if the holder dies the lease expires and another replica takes over within a few seconds.
A tick missed during downtime fires once on recovery (the schedule's score is the missed tick), and
the next fire time is then computed from now, not from the missed tick, so a long outage does not
produce a burst of one execution per missed minute.

Built-in schedules need no operator: the retention cleanup (shared/retention.py) fires on
NOVA_CLEANUP_CRON. Its tick is claimed by one atomic step that also moves it on (shared/lua/
claim_tick.lua), so exactly one worker claims each tick even when leases overlap; the claimant runs
the cleanup in a task of its own, beside the scheduler, which keeps firing schedules meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from croniter import CroniterError
from redis.asyncio import Redis

from shared.catalog import StoredWorkflow, WorkflowCatalog
from shared.connections import REDIS_UNAVAILABLE, redis_ms
from shared.cron import next_tick
from shared.db import LazyPool
from shared.enqueue import NewExecution, enqueue_execution
from shared.retention import Retention, cutoff_for
from shared.schedules import Schedule, ScheduleStore, tick_key, tick_task_id
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import Keys, dumps, now_iso
from shared.webhooks import announce_schedule_failure
from shared.workflow import workflow_lane

log = logging.getLogger(__name__)

LEASE_MS = 5000
# Due schedules a pass reads (beside those failing, which it reads past).
DUE_PER_PASS = 100
# Ticks of one schedule a pass finds already run, after Redis lost them, before it leaves the rest to the next.
CATCH_UP_PER_PASS = 100
# How long a pass waits for PostgreSQL to say whether a tick ran: well within the lease, so that a pass
# stuck on an unreachable PostgreSQL does not outlive it.
RAN_CHECK_TIMEOUT = 2.0
# The built-in schedules' names (members of Keys.builtin_schedules).
CLEANUP = "cleanup"
# Renew well before expiry; a release is compare-and-delete so we never drop someone else's lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        catalog: WorkflowCatalog,
        consumer: str,
        pool: LazyPool | asyncpg.Pool | None = None,
    ) -> None:
        """`pool`: PostgreSQL, for the retention cleanup; None runs no cleanup here."""
        self.settings = settings
        self.redis = redis
        self.keys = Keys.from_settings(settings)
        self.store = ScheduleStore(redis, self.keys)
        self.scripts = Scripts(redis, self.keys)
        self.catalog = catalog
        self.consumer = consumer
        self.lease_key = f"{self.keys.prefix}:scheduler:lease"
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self.fired = 0
        self.pool = pool
        # Cleanup ticks this scheduler claimed, and the cleanup it runs now (one at a time).
        self.cleanups = 0
        self.cleanup: asyncio.Task[None] | None = None
        # Whether the cleanup's cron was found to have no next tick (logged once, not at every pass).
        self._cleanup_cron_refused = False
        # Whether PostgreSQL could not say if a tick ran, holding due ticks back (logged on each change).
        self._ticks_held = False
        # Schedules whose due tick failed at the last pass (logged when they start failing, not each pass).
        self._failing: set[str] = set()

    async def run(self, stop: asyncio.Event, interval: float = 0.5) -> None:
        try:
            while not stop.is_set():
                try:
                    if await self.hold_lease():
                        await self.tick()
                except asyncio.CancelledError:
                    raise
                except REDIS_UNAVAILABLE as exc:
                    log.debug("scheduler skipped a tick: %s", exc)
                except Exception:
                    log.exception("scheduler tick failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            if self.cleanup is not None and not self.cleanup.done():
                # Cut short between or inside a batch: that batch rolls back, the next tick goes on.
                self.cleanup.cancel()
                await asyncio.gather(self.cleanup, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._release(keys=[self.lease_key], args=[self.consumer])

    async def hold_lease(self) -> bool:
        return bool(await self._renew(keys=[self.lease_key], args=[self.consumer, LEASE_MS]))

    async def tick(self, now_ms: int | None = None) -> int:
        """Fire every due schedule once; returns how many executions were enqueued."""
        if now_ms is None:
            # Redis's clock, not this host's: replicas with skewed clocks must agree on what is due.
            now_ms = await redis_ms(self.redis)
        await self._after_a_step_back(now_ms)
        fired = 0
        failing: set[str] = set()
        # The schedules failing at each pass stay first in line (their ticks are the oldest due): read past
        # them, or as many failing ones as a read takes would hold every other schedule back.
        for schedule_id, tick_ms in await self.store.due(now_ms, limit=DUE_PER_PASS + len(self._failing)):
            try:
                outcome = await self._due(schedule_id, tick_ms, now_ms)
            except (asyncio.CancelledError, *REDIS_UNAVAILABLE):
                raise
            except Exception:
                # This schedule's own trouble (a record a newer release wrote, its workflow unreadable):
                # it stays due and is tried again next pass, and the schedules after it fire meanwhile.
                # Said once until it fires again, not twice a second.
                failing.add(schedule_id)
                if schedule_id not in self._failing:
                    log.exception("schedule %s: tick %d not fired; tried again at each pass", schedule_id, tick_ms)
                continue
            if outcome is None:
                # PostgreSQL cannot say whether the tick ran: it stays due, and so do the ticks after it
                # in this pass, which would only wait on PostgreSQL in turn (those not reached keep their
                # failing state).
                failing |= self._failing
                break
            fired += outcome
        self._failing = failing
        self.fired += fired
        await self.claim_cleanup(now_ms)
        return fired

    async def _due(self, schedule_id: str, tick_ms: int, now_ms: int) -> int | None:
        """Fire one due tick and move its schedule on; how many executions that enqueued (0 or 1), or
        None when the tick must wait (left due)."""
        schedule = await self.store.get(schedule_id)
        if schedule is None:
            await self.store.drop_orphan(schedule_id)
            return 0
        # The score this pass read: the schedule moves on from it only (advance_schedule.lua).
        read_ms = tick_ms
        fired = 0
        workflow = await self.catalog.get(schedule.workflow_id)
        if workflow is None:
            log.error("schedule %s names missing workflow %s; skipping its tick", schedule_id, schedule.workflow_id)
            await announce_schedule_failure(self.settings, self.redis, schedule, tick_ms, "workflow not found")
        else:
            ran = await self._tick_ran(schedule, tick_ms)
            if ran is None:
                return None
            if ran:
                # Redis lost it (its key and its score are older than PostgreSQL's record). Moved on to the
                # tick after it, not after now: a tick that passed while Redis was down, which never ran,
                # then fires (as any tick missed during downtime does), or is found run in turn.
                next_ms = schedule.next_after(tick_ms)
                # The ticks after it that ran too (Redis came back from further back), a bounded number per
                # pass: the rest are the next pass's, each a PostgreSQL query.
                not_run = unknown = False
                for _ in range(CATCH_UP_PER_PASS):
                    if next_ms > now_ms:
                        break
                    ran_next = await self._tick_ran(schedule, next_ms)
                    if ran_next is None:
                        # PostgreSQL cannot say: the tick waits, due, and the pass ends (the schedules
                        # after this one would only wait on PostgreSQL in turn).
                        unknown = True
                        break
                    if not ran_next:
                        not_run = True
                        break
                    next_ms = schedule.next_after(next_ms)
                log.warning(
                    "schedule %s tick %d already ran (PostgreSQL holds its execution); not fired again; next %d",
                    schedule.id,
                    tick_ms,
                    next_ms,
                )
                if not not_run:
                    await self.store.advance(schedule_id, read_ms, next_ms)
                    return None if unknown else 0
                # Due and not run (as the loop just found): fired now, as the tick this pass read would be.
                tick_ms = next_ms
            if await self._fire(schedule, workflow, tick_ms):
                fired = 1
        await self.store.advance(schedule_id, read_ms, schedule.next_after(max(now_ms, tick_ms)))
        return fired

    async def _after_a_step_back(self, now_ms: int) -> None:
        """If Redis's clock is earlier than at the last pass (a forward step corrected, a replica with
        an earlier clock promoted), bring back the schedules, and the built-in cleanup, that moved on
        from the later time: until it came round again they would not fire. Ticks that fired early (at
        the wrong time) and come due again are not run twice: their idempotency key refuses them, or,
        if the step expired it, PostgreSQL's record of their execution does. One GET and one SET a pass;
        the schedules are read only after a step back."""
        last = await self.store.clock_stepped_back(now_ms)
        if last is not None:
            moved = await self.store.bring_back(now_ms)
            cleanup = await self._bring_back_cleanup(now_ms)
            log.warning(
                "Redis's clock is %d ms behind the scheduler's last pass: %d schedule(s)%s brought back to"
                " their cron's next tick from now",
                last - now_ms,
                len(moved),
                " and the retention cleanup" if cleanup else "",
            )
        # After the bring-back: had it failed, the next pass would see the step and try again.
        await self.store.passed(now_ms)

    async def _bring_back_cleanup(self, now_ms: int) -> bool:
        """Re-score the retention cleanup at its cron's next tick after `now_ms` if it is later; True if so."""
        if not self.settings.retention_days or self.pool is None:
            return False
        try:
            expected = next_tick(self.settings.cleanup_cron, now_ms)
        except CroniterError:
            return False  # said by claim_cleanup
        # LT: only ever earlier; XX: not registered here (claim_cleanup does that); CH: whether it moved.
        return bool(await self.redis.zadd(self.keys.builtin_schedules, {CLEANUP: expected}, xx=True, lt=True, ch=True))

    async def _fire(self, schedule: Schedule, workflow: StoredWorkflow, tick_ms: int) -> bool:
        """Enqueue the tick's execution; False if its idempotency key shows it was enqueued already."""
        context = {**schedule.initial_context, "_schedule": {"id": schedule.id, "tick_ms": tick_ms}}
        result = await enqueue_execution(
            self.scripts,
            NewExecution(
                workflow_id=workflow.id,
                workflow_name=workflow.name,
                workflow_version=workflow.version,
                client=schedule.client,
                initial_context=context,
                extra={"schedule_id": schedule.id},
                task_id=tick_task_id(schedule.id, tick_ms),
                idempotency_key=tick_key(schedule.id, tick_ms),
                idempotency_ttl=max(24 * 3600, self.settings.task_ttl),
                lane=workflow_lane(workflow.definition),
            ),
            floor=self.catalog.highest_execution_id,
        )
        if result.created:
            log.info("schedule %s fired tick %d as task %s", schedule.id, tick_ms, result.task_id)
        return result.created

    async def _tick_ran(self, schedule: Schedule, tick_ms: int) -> bool | None:
        """Whether PostgreSQL holds the execution of this tick; None when it cannot say."""
        if self.catalog.pool is None:
            return False  # a deployment without PostgreSQL: the tick's key in Redis is all there is
        task_id = tick_task_id(schedule.id, tick_ms)
        # The enqueue gives the task this id on the client's shard (a suffix names the shard when the
        # bare id does not map to it); the bare one too, as a deployment's shard count may change.
        placed = self.keys.of_client(schedule.client).placed_task_id(task_id)
        try:
            ran = await asyncio.wait_for(self.catalog.holds_any_task(sorted({task_id, placed})), RAN_CHECK_TIMEOUT)
        except Exception as exc:
            # Down, restarting, out of connections, or too slow: all the same to a tick that must not
            # run twice. It waits for PostgreSQL, as an enqueue waits when it cannot vouch for an id.
            if not self._ticks_held:
                self._ticks_held = True
                log.warning(
                    "schedules' due ticks wait: PostgreSQL cannot say whether tick %d of schedule %s ran (%s: %s)",
                    tick_ms,
                    schedule.id,
                    type(exc).__name__,
                    exc,
                )
            return None
        if self._ticks_held:
            self._ticks_held = False
            log.info("PostgreSQL answers again: schedules' due ticks fire")
        return ran

    async def claim_cleanup(self, now_ms: int) -> bool:
        """Claim the retention cleanup's tick if it is due, and start the cleanup; True if claimed."""
        if not self.settings.retention_days or self.pool is None:
            return False
        try:
            next_ms = next_tick(self.settings.cleanup_cron, now_ms)
        except CroniterError as exc:
            # The settings refuse such a cron at start; one that got past them (settings built without
            # validation) must not fail every pass, and must not go unnoticed: said once, as an error.
            if not self._cleanup_cron_refused:
                self._cleanup_cron_refused = True
                log.error(
                    "NOVA_CLEANUP_CRON '%s' has no next tick (%s): no retention cleanup runs until it is fixed",
                    self.settings.cleanup_cron,
                    exc,
                )
            return False
        tick = await self.scripts.claim_tick(CLEANUP, now_ms=now_ms, next_ms=next_ms)
        if tick is None:
            return False
        self.cleanups += 1
        if self.cleanup is not None and not self.cleanup.done():
            # Still deleting since an earlier tick: that run takes what this tick would.
            log.info("retention cleanup of an earlier tick still running; tick %d joins it", tick)
            return True
        self.cleanup = asyncio.create_task(self._clean(tick), name="retention cleanup")
        return True

    async def _clean(self, tick: int) -> None:
        started = now_iso()
        try:
            assert self.pool is not None
            pool = await self.pool.get() if isinstance(self.pool, LazyPool) else self.pool
            retention = Retention(self.redis, self.keys, pool, batch=self.settings.cleanup_batch)
            report = await retention.run(cutoff_for(self.settings.retention_days))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # PostgreSQL or Redis away: nothing is lost, the next tick deletes what this one did not.
            log.warning("retention cleanup of tick %d stopped: %s: %s", tick, type(exc).__name__, exc)
            return
        summary = {"tick_ms": tick, "consumer": self.consumer, "started_at": started, "finished_at": now_iso()}
        summary.update(report.as_json())
        log.info(
            "retention cleanup: %d execution(s), %d node run(s), %s dead letter(s) older than %s deleted",
            report.executions,
            report.node_runs,
            sum(report.dead_letters.values()),
            report.cutoff.isoformat(),
        )
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await self.redis.set(self.keys.cleanup_last, dumps(summary))
