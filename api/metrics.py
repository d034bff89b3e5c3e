"""Prometheus metrics for `GET /metrics`.

Queue gauges (depth, lag, pending, dead letters, per-consumer in-flight) are read from Redis at scrape
time, and execution counts by status from PostgreSQL, so every API replica reports the same global
values. Latency histograms are observed from the results stream by this process's event hub: each
replica sees every event, so take one replica's histograms (or max across them), not their sum.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from redis.asyncio import Redis

from shared.connections import info_of
from shared.events import Event
from shared.inspection import inspect
from shared.streams import EventType, Keys, parse_iso

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)


def per_consumer(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, float]]:
    """A consumer's rows of every stream it reads (each shard's, in each lane) as one: what it holds in
    all of them, and its idle time in the stream it last read (a worker process is one consumer)."""
    merged: dict[tuple[str, str], tuple[int, float]] = {}
    for row in rows:
        key = (row["group"], row["consumer"])
        pending, idle_s = merged.get(key, (0, float(row["idle_s"])))
        merged[key] = (pending + int(row["pending"]), min(idle_s, float(row["idle_s"])))
    return merged


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stream_length = Gauge("nova_stream_length", "Entries in a stream", ["stream"], registry=r)
        self.group_lag = Gauge(
            "nova_group_lag", "Entries not yet delivered to a group", ["stream", "group"], registry=r
        )
        self.group_pending = Gauge(
            "nova_group_pending", "Entries delivered but not acknowledged", ["stream", "group"], registry=r
        )
        self.oldest_pending = Gauge(
            "nova_oldest_pending_age_seconds", "Age of the oldest pending entry", ["stream", "group"], registry=r
        )
        self.consumer_inflight = Gauge(
            "nova_consumer_inflight", "Entries a consumer holds (in-flight work)", ["group", "consumer"], registry=r
        )
        self.consumer_idle = Gauge(
            "nova_consumer_idle_seconds", "Consumer idle time", ["group", "consumer"], registry=r
        )
        # 1 while a worker reports a lasting fault of an executor (a refused E2B key, an unknown
        # template), else 0; the message is in /health and /inspect (a label would multiply series).
        self.executor_problem = Gauge(
            "nova_worker_executor_problem",
            "1 while a live worker reports a lasting fault of an executor (see /health)",
            ["consumer", "executor"],
            registry=r,
        )
        self.dead_letters = Gauge("nova_dead_letters", "Entries in the dead-letter stream", registry=r)
        self.delayed = Gauge("nova_delayed_retries", "Requests parked for a retry", registry=r)
        # Alarm on used/max: with maxmemory-policy noeviction, a full Redis refuses every write, and
        # no run can then finish or be dead-lettered.
        self.redis_memory = Gauge(
            "nova_redis_memory_bytes", "Redis memory: used, and maxmemory (0: no limit)", ["kind"], registry=r
        )
        self.queue_paused = Gauge("nova_queue_paused", "1 while the whole queue is paused", registry=r)
        self.paused_workflows = Gauge("nova_paused_workflows", "Workflows paused", registry=r)
        self.parked = Gauge("nova_parked", "Requests parked while paused", registry=r)
        self.concurrency_waiting = Gauge(
            "nova_concurrency_waiting", "Runs waiting for a slot of their workflow's concurrency key", registry=r
        )
        self.draining = Gauge("nova_draining", "1 while the workers are drained", registry=r)
        self.drain_held = Gauge(
            "nova_drain_held", "Runs the workers still hold (drain progress: 0 when done)", registry=r
        )
        self.executions = Gauge("nova_executions", "Executions by status (PostgreSQL)", ["status"], registry=r)
        self.enqueue_to_start = Histogram(
            "nova_enqueue_to_start_seconds",
            "From enqueue to a worker starting the run",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.run_duration = Histogram(
            "nova_run_duration_seconds",
            "From start to terminal state",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def observe(self, event: Event) -> None:
        """Event hub observer: cheap, never raises."""
        try:
            if event.type == EventType.STARTED and event.data.get("delivery") == 1:
                enqueued, started = parse_iso(event.data.get("enqueued_at")), parse_iso(event.data.get("started_at"))
                if enqueued and started:
                    self.enqueue_to_start.observe(max(0.0, (started - enqueued).total_seconds()))
            elif event.type in (EventType.SUCCEEDED, EventType.FAILED):
                duration = event.data.get("duration_ms")
                if isinstance(duration, int | float):
                    self.run_duration.labels(event.type.value).observe(duration / 1000)
        except (TypeError, ValueError):
            pass

    async def render(self, redis: Redis, keys: Keys, pool: asyncpg.Pool | None) -> bytes:
        report = await inspect(redis, keys)
        for stream in report["streams"].values():
            self.stream_length.labels(stream["key"]).set(stream["length"])
        for group in report["groups"]:
            labels = (group["stream"], group["group"])
            self.group_lag.labels(*labels).set(group["lag"])
            self.group_pending.labels(*labels).set(group["pending"])
            self.oldest_pending.labels(*labels).set(group["oldest_pending_age_s"] or 0)
        self.consumer_inflight.clear()
        self.consumer_idle.clear()
        for (group, consumer), (pending, idle_s) in per_consumer(report["consumers"]).items():
            self.consumer_inflight.labels(group, consumer).set(pending)
            self.consumer_idle.labels(group, consumer).set(idle_s)
        self.executor_problem.clear()
        for worker in report["workers"]:
            for executor, problem in (worker.get("executors") or {}).items():
                self.executor_problem.labels(worker["consumer"], str(executor)).set(1 if problem else 0)
        self.dead_letters.set(report["dead_letters"])
        self.delayed.set(report["delayed_retries"])
        control = report["control"]
        self.queue_paused.set(1 if control["queue_paused"] else 0)
        self.paused_workflows.set(len(control["paused_workflows"]))
        self.parked.set(control["parked"])
        self.draining.set(1 if control["draining"] else 0)
        self.drain_held.set(control["held_by_workers"])
        self.concurrency_waiting.set(report["concurrency_waiting"]["runs"])
        # On a cluster: the master of the home shard (each master's memory is its own).
        memory = await info_of(redis, "memory", keys.requests)
        self.redis_memory.labels("used").set(int(memory.get("used_memory", 0)))
        self.redis_memory.labels("max").set(int(memory.get("maxmemory", 0)))
        if pool is not None:
            try:
                rows = await pool.fetch("SELECT status, count(*) AS n FROM executions GROUP BY status")
                self.executions.clear()
                for row in rows:
                    self.executions.labels(row["status"]).set(row["n"])
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("metrics: PostgreSQL unavailable (%s); execution counts are stale", exc)
        return generate_latest(self.registry)
