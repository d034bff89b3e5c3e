"""What operators look at: stream lengths, each group's lag and pending, each consumer's work and idle time.

Everything here comes from the commands listed in the README (XLEN, XINFO STREAM/GROUPS/CONSUMERS,
XPENDING, ZCARD; HGETALL of the concurrency keys' index), so what `nova inspect`, `/metrics` and the
dashboard show can always be checked by hand with redis-cli.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.connections import redis_ms
from shared.control import RunControl
from shared.streams import FORMAT_VERSION, Keys, Lane, entry_id_parts, loads

# Redis 6.2 has no `lag` in XINFO GROUPS; counting undelivered entries by hand stops here.
_LAG_SCAN_LIMIT = 100_000


async def _lag(redis: Redis, stream: str, group: dict[str, Any]) -> int:
    if group.get("lag") is not None:
        return int(group["lag"])
    cursor = f"({group['last-delivered-id']}"
    total = 0
    while total < _LAG_SCAN_LIMIT:
        batch = await redis.xrange(stream, min=cursor, max="+", count=10_000)
        if not batch:
            break
        total += len(batch)
        cursor = f"({batch[-1][0]}"
    return total


async def inspect(redis: Redis, keys: Keys) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    streams: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    consumers: list[dict[str, Any]] = []
    # Every shard's streams: labelled `requests`, `requests:high`, ... with one shard, `requests:0`,
    # `requests:high:0`, ... with several.
    shards = keys.all_shards
    named = [
        (f"{label}:{k.shard_index}" if len(shards) > 1 else label, stream)
        for k in shards
        for label, stream in (
            *((_lane_label(lane), lane.requests) for lane in k.lanes),
            ("results", k.results),
            ("dead_letter", k.dead_letter),
        )
    ]
    for label, stream in named:
        length = await redis.xlen(stream)
        streams[label] = {"key": stream, "length": length}
        if label.startswith("dead_letter") or (not length and not await redis.exists(stream)):
            continue
        try:
            infos = await redis.xinfo_groups(stream)
        except ResponseError:
            continue
        for info in infos:
            name = info["name"]
            summary = await redis.xpending(stream, name)
            oldest = summary.get("min") if summary else None
            oldest_age = (now_ms - entry_id_parts(oldest)[0]) / 1000 if oldest else None
            members = await redis.xinfo_consumers(stream, name)
            groups.append(
                {
                    "stream": stream,
                    "group": name,
                    "consumers": len(members),
                    "pending": int(info["pending"]),
                    "lag": await _lag(redis, stream, info),
                    "last_delivered_id": info["last-delivered-id"],
                    "oldest_pending_age_s": oldest_age,
                }
            )
            for member in members:
                consumers.append(
                    {
                        "stream": stream,
                        "group": name,
                        "consumer": member["name"],
                        "pending": int(member["pending"]),
                        "idle_s": int(member["idle"]) / 1000,
                    }
                )
    return {
        "streams": streams,
        "groups": groups,
        "consumers": consumers,
        # What each live worker reports of itself: its executors and their lasting faults.
        "workers": await worker_reports(redis, keys),
        "delayed_retries": sum([int(await redis.zcard(k.delayed)) for k in shards]),
        "dead_letters": sum(v["length"] for label, v in streams.items() if label.startswith("dead_letter")),
        # Requests older workers left for a newer release's (a rolling deploy in progress, or one rolled
        # back): by format, the next few after this code's (a deploy skips no more), over every shard.
        "left_for_newer_workers": {
            str(v): n
            for v in range(FORMAT_VERSION + 1, FORMAT_VERSION + 5)
            if (n := sum([int(await redis.zcard(k.newer_format(v))) for k in shards]))
        },
        # Pauses, what they hold back, and drain progress (shared/control.py).
        "control": await RunControl(redis, keys, task_ttl=0).state(),
        "concurrency_waiting": await _concurrency_waiting(redis, keys),
    }


def _lane_label(keys: Keys) -> str:
    return "requests" if keys.lane == Lane.NORMAL else f"requests:{keys.lane}"


# Most concurrency keys listed one by one (the total of waiting runs counts them all).
_CONCURRENCY_KEYS_LISTED = 100


async def _concurrency_waiting(redis: Redis, keys: Keys) -> dict[str, Any]:
    """The concurrency keys that have runs waiting (ZCARD of their wait set and of their holders), in
    every shard: a key is counted per shard (shared/streams.py `Keys.concurrency_holders`), so with
    several shards each entry says its shard."""
    shards = keys.all_shards
    listed: list[dict[str, Any]] = []
    for k in shards:
        index = {_text(name): int(v) for name, v in (await redis.hgetall(k.concurrency_index)).items()}
        if not index:
            continue
        pipe = redis.pipeline(transaction=False)
        for key in index:
            pipe.zcard(k.concurrency_waiting(key))
            pipe.zcard(k.concurrency_holders(key))
        counts = await pipe.execute()
        for i, (key, limit) in enumerate(index.items()):
            entry: dict[str, Any] = {"key": key, "limit": limit, "waiting": int(counts[2 * i])}
            entry["holders"] = int(counts[2 * i + 1])
            if len(shards) > 1:
                entry["shard"] = k.shard_index
            listed.append(entry)
    listed.sort(key=lambda k: -k["waiting"])
    return {"runs": sum(k["waiting"] for k in listed), "keys": listed[:_CONCURRENCY_KEYS_LISTED]}


async def worker_reports(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """What each live worker last reported of itself (consumer/worker.py report_self): `consumer`,
    `at`, `concurrency`, `inflight`, `draining`, and `executors` (name -> its lasting fault, or None).
    A report past its deadline (by Redis's clock) is a dead worker's and is left out."""
    now_ms = await redis_ms(redis)
    pipe = redis.pipeline(transaction=False)
    pipe.zrange(keys.worker_report_deadlines, 0, -1, withscores=True)
    pipe.hgetall(keys.worker_reports)
    deadlines, raw = await pipe.execute()
    live = {_text(consumer) for consumer, deadline in deadlines if deadline > now_ms}
    reports = []
    for consumer, value in sorted((_text(k), v) for k, v in raw.items()):
        if consumer not in live:
            continue
        try:
            data = loads(value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(data, dict):
            reports.append({**data, "consumer": consumer})
    return reports


def executor_problems(reports: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every lasting executor fault the workers report, one row per worker and executor."""
    return [
        {"consumer": report["consumer"], "executor": str(executor), "error": str(error)}
        for report in reports
        for executor, error in (report.get("executors") or {}).items()
        if error
    ]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def render_text(report: dict[str, Any]) -> str:
    """The same report as aligned text for a terminal."""
    lines = ["streams:"]
    for label, s in report["streams"].items():
        lines.append(f"  {label:<12} {s['key']:<24} length {s['length']}")
    lines.append("groups:")
    for g in report["groups"]:
        age = "-" if g["oldest_pending_age_s"] is None else f"{g['oldest_pending_age_s']:.1f}s"
        lines.append(
            f"  {g['group']:<16} on {g['stream']:<16} lag {g['lag']:<7} pending {g['pending']:<6} "
            f"consumers {g['consumers']:<3} oldest pending {age}"
        )
    lines.append("consumers:")
    for c in report["consumers"]:
        lines.append(f"  {c['consumer']:<36} {c['group']:<16} pending {c['pending']:<5} idle {c['idle_s']:.1f}s")
    problems = executor_problems(report.get("workers") or [])
    if problems:
        lines.append("executor faults:")
        lines.extend(f"  {p['consumer']:<36} {p['executor']:<8} {p['error']}" for p in problems)
    lines.append(f"delayed retries: {report['delayed_retries']}")
    lines.append(f"dead letters:    {report['dead_letters']}")
    newer = report.get("left_for_newer_workers")
    if newer:
        shown = ", ".join(f"{n} of format {v}" for v, n in newer.items())
        lines.append(f"left for newer workers: {shown} (a newer release's workers take them)")
    control = report.get("control")
    if control:
        paused = ", ".join(f"{w['workflow_id']} ({w['parked']} parked)" for w in control["paused_workflows"])
        lines.append(
            f"queue paused:    {'yes' if control['queue_paused'] else 'no'} ({control['parked']} parked in all)"
        )
        lines.append(f"paused workflows: {paused or '-'}")
        if control["draining"]:
            workers = ", ".join(f"{c} holds {n}" for c, n in control["drained_workers"].items()) or "none yet"
            lines.append(
                f"draining:        since {control['draining_since']}; {control['held_by_workers']} run(s) still held;"
                f" stopped reading: {workers}"
            )
        else:
            lines.append("draining:        no")
    waiting = report.get("concurrency_waiting")
    if waiting:
        keys = ", ".join(
            f"{k['key']}{_shard_label(k)} ({k['waiting']} waiting, {k['holders']}/{k['limit']} held)"
            for k in waiting["keys"]
        )
        lines.append(f"concurrency:     {waiting['runs']} run(s) waiting for a key{': ' + keys if keys else ''}")
    return "\n".join(lines)


def _shard_label(key: dict[str, Any]) -> str:
    # Keys are counted per shard: with several shards the same key may show once per shard.
    return f" [shard {key['shard']}]" if "shard" in key else ""
