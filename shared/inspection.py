"""What operators look at: stream lengths, each group's lag and pending, each consumer's work and idle time.

Everything here comes from the commands listed in the README (XLEN, XINFO STREAM/GROUPS/CONSUMERS,
XPENDING, ZCARD), so what `nova inspect`, `/metrics` and the dashboard show can always be checked
by hand with redis-cli.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.control import RunControl
from shared.streams import Keys, entry_id_parts

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
    # Every shard's streams: labelled `requests`, ... with one shard, `requests:0`, ... with several.
    shards = keys.all_shards
    named = [
        (f"{label}:{k.shard_index}" if len(shards) > 1 else label, stream)
        for k in shards
        for label, stream in (("requests", k.requests), ("results", k.results), ("dead_letter", k.dead_letter))
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
        "delayed_retries": sum([int(await redis.zcard(k.delayed)) for k in shards]),
        "dead_letters": sum(v["length"] for label, v in streams.items() if label.startswith("dead_letter")),
        # Pauses, what they hold back, and drain progress (shared/control.py).
        "control": await RunControl(redis, keys, task_ttl=0).state(),
    }


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
    lines.append(f"delayed retries: {report['delayed_retries']}")
    lines.append(f"dead letters:    {report['dead_letters']}")
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
    return "\n".join(lines)
