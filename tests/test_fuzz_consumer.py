"""The stream consumer fed random and malformed entries: it never crashes, and every entry ends
acknowledged, either run to a terminal state or dead-lettered with its reason."""

from __future__ import annotations

import random
import string
from typing import Any

import asyncpg
from redis.asyncio import Redis

from shared.settings import Settings
from shared.streams import dumps
from tests.support import create_workflow, enqueue, in_process_worker, linear, wait_terminal

FIELDS = ["task_id", "execution_id", "workflow_id", "workflow_name", "client", "enqueued_at", "payload"]


def junk(rng: random.Random) -> str:
    choices: list[Any] = [
        "", "0", "-1", "1e9", "99999999999999999999999", "null", "{}", "[]", '{"initial_context": 5}',
        '{"initial_context": {"a": [1, 2]}}', "{not json", "\u0000\u00ff", "🙂" * 5, " " * 3,
        "".join(rng.choices(string.printable, k=rng.randint(1, 40))),
    ]  # fmt: skip
    return rng.choice(choices)


def random_entry(rng: random.Random, workflow_id: int) -> dict[str, str]:
    entry: dict[str, str] = {}
    for name in FIELDS:
        roll = rng.random()
        if roll < 0.15:
            continue  # missing field
        if roll < 0.55:
            entry[name] = junk(rng)
        else:
            entry[name] = {
                "task_id": f"fuzz-{rng.randrange(10**9)}",
                "execution_id": str(rng.randrange(10**6, 10**7)),
                "workflow_id": str(rng.choice([workflow_id, workflow_id + 1000])),
                "workflow_name": "fuzzed",
                "client": "fuzz",
                "enqueued_at": "2026-01-01T00:00:00Z",
                "payload": dumps({"initial_context": {"n": rng.randrange(100)}}),
            }[name]
    if rng.random() < 0.1:
        entry[junk(rng) or "extra"] = junk(rng) or "x"
    return entry or {"only": "junk"}


async def test_random_entries_never_crash_the_worker_and_nothing_is_left_unacknowledged(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    rng = random.Random(1234)
    wf = await create_workflow(redis, settings, pool, linear("context['ok'] = True"))
    stream = settings.requests_stream
    async with in_process_worker(settings, concurrency=16) as worker:
        # Kept here: the worker's maintenance trims acknowledged entries from the stream meanwhile.
        sent = [random_entry(rng, wf.id) for _ in range(150)]
        ids = [await redis.xadd(stream, fields) for fields in sent]
        # A well-formed request after the garbage: once it is done, the worker is still healthy.
        marker = await enqueue(redis, settings, wf)
        done = await wait_terminal(redis, settings, [marker.task_id], timeout=60)
        assert done[marker.task_id].data["final_context"]["ok"] is True
        # Every fuzzed entry leaves the PEL: acknowledged after running, or dead-lettered.
        for _ in range(500):
            pending = await redis.xpending(stream, settings.worker_group)
            group = (await redis.xinfo_groups(stream))[0]
            undelivered = await redis.xrange(stream, min=f"({group['last-delivered-id']}", max="+", count=1)
            if pending["pending"] == 0 and not undelivered:
                break
            await redis.xread({settings.results_stream: "$"}, block=50)
        assert pending["pending"] == 0 and not undelivered
        assert not worker.task.done()
    letters = {f["dlq_original_id"]: f for _, f in await redis.xrange(settings.dead_letter_stream)}
    assert all(f["dlq_reason"] and f["dlq_error"] for f in letters.values())
    ended = {
        f["task_id"]
        for _, f in await redis.xrange(settings.results_stream)
        if f["type"] in ("succeeded", "failed", "dead")
    }
    # Each fuzzed entry was dead-lettered with its reason, or belongs to a task that ended (run by
    # it, or by an earlier entry with the same task id, which makes this one a no-op redelivery).
    for entry_id, fields in zip(ids, sent, strict=True):
        if entry_id in letters:
            continue
        assert fields.get("task_id") in ended, (entry_id, fields)
    assert len(letters) > 100
