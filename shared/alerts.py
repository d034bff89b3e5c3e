"""The dead man's switch: the API (not the workers, which may be the problem) raises an alert when no
worker is alive in the group, or when requests wait longer than `NOVA_ALERT_PENDING_AGE`.

What is checked lives here; the API's loop that checks and raises (api/worker_watch.py) sends the alert
to Sentry and as a `workers.unavailable` webhook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.connections import redis_ms
from shared.settings import Settings
from shared.streams import Keys, entry_id_parts


@dataclass(frozen=True)
class Alert:
    reason: str  # "no_live_worker" | "requests_waiting"
    message: str
    details: dict[str, Any]


async def check_workers(redis: Redis, keys: Keys, settings: Settings) -> list[Alert]:
    """What is wrong with the workers' group now (empty: nothing), in any shard (one alert per reason:
    the first shard's that has it)."""
    alerts: dict[str, Alert] = {}
    for shard in keys.all_shards:
        for alert in await _check_shard(redis, shard, settings):
            alerts.setdefault(alert.reason, alert)
    return list(alerts.values())


async def _check_shard(redis: Redis, keys: Keys, settings: Settings) -> list[Alert]:
    now_ms = await redis_ms(redis)
    group = keys.worker_group
    # A worker reads every lane of the shard, but a lane it has no slots for goes unread for a while:
    # it is live if it is live in any of them.
    live: set[str] = set()
    consumers = 0
    oldest: tuple[int, str] | None = None
    for lane in keys.lanes:
        lane_live, lane_consumers, lane_oldest = await _check_stream(redis, lane, settings)
        live |= lane_live
        consumers = max(consumers, lane_consumers)
        if lane_oldest is not None and (oldest is None or lane_oldest < oldest[0]):
            oldest = (lane_oldest, lane.requests)
    alerts: list[Alert] = []
    if not live:
        alerts.append(
            Alert(
                "no_live_worker",
                f"no live worker in group {group} (none read or heartbeat within {settings.visibility_timeout:g}s)",
                {"group": group, "consumers": consumers},
            )
        )
    threshold_ms = int(settings.alert_pending_age * 1000)
    if oldest is not None and now_ms - oldest[0] > threshold_ms:
        age = (now_ms - oldest[0]) / 1000
        alerts.append(
            Alert(
                "requests_waiting",
                f"the oldest request in {oldest[1]} has waited {age:.0f}s (threshold {settings.alert_pending_age:g}s)",
                {"group": group, "oldest_waiting_s": round(age, 1), "live_workers": len(live)},
            )
        )
    return alerts


async def _check_stream(redis: Redis, keys: Keys, settings: Settings) -> tuple[set[str], int, int | None]:
    """One requests stream: its live consumers, how many it has, and the time (ms) of its oldest request
    that waits too long to be taken or was left without a heartbeat."""
    group = keys.worker_group
    try:
        consumers = await redis.xinfo_consumers(keys.requests, group)
        [info] = [g for g in await redis.xinfo_groups(keys.requests) if g["name"] == group] or [None]
    except ResponseError:
        consumers, info = [], None
    # A live worker reads (an idle one blocks in XREADGROUP) or heartbeats its entries (a busy one)
    # more often than the visibility timeout; past it, its peers would take its work for dead too.
    live_ms = int(settings.visibility_timeout * 1000)
    live = {c["name"] for c in consumers if int(c["idle"]) < live_ms}
    threshold_ms = int(settings.alert_pending_age * 1000)
    oldest_ms: int | None = None
    # The oldest request no worker has taken yet (all of them when no worker ever made the group)...
    after = f"({info['last-delivered-id']}" if info is not None else "-"
    waiting = await redis.xrange(keys.requests, min=after, max="+", count=1)
    if waiting:
        oldest_ms = entry_id_parts(waiting[0][0])[0]
    if info is not None:
        # ...or one taken and then left without a heartbeat for longer than the threshold.
        stuck = await redis.xpending_range(keys.requests, group, min="-", max="+", count=1, idle=threshold_ms)
        if stuck:
            first = entry_id_parts(stuck[0]["message_id"])[0]
            oldest_ms = first if oldest_ms is None else min(oldest_ms, first)
    return live, len(consumers), oldest_ms
