"""Dead letters: listed with their reason, replayed once as a new linked task, deleted, purged."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest
from redis.asyncio import Redis

from cli.embedded import PostgresServer
from consumer.sandbox.local import LocalSandboxProvider
from shared.catalog import WorkflowCatalog
from shared.db import create_pool, migrate_url
from shared.dead_letters import DeadLetters, NotReplayable
from shared.executions import Owner, retry_failure
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import EventType, Keys, loads
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    make_settings,
    operator_api,
    wait_for_events,
    wait_terminal,
)
from tests.test_faults import FlakyProvider


def dead_letters(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> DeadLetters:
    keys = Keys.from_settings(settings)
    return DeadLetters(redis, keys, settings, WorkflowCatalog(redis, pool, keys))


async def test_replay_runs_a_new_linked_task_once(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['replayed'] = True"))
    broken = {"local": FlakyProvider(LocalSandboxProvider(settings), 100)}
    async with in_process_worker(settings, providers=broken, max_retries=0):
        task = await enqueue(redis, settings, wf, {"invoice": 42})
        assert (await wait_terminal(redis, settings, [task.task_id]))[task.task_id].type == EventType.DEAD
    dlq = dead_letters(redis, settings, pool)
    [letter] = await dlq.list()
    assert letter.reason == "retries_exhausted" and letter.as_json()["task_id"] == task.task_id
    # Two operators press replay at once: one new task.
    first, second = await asyncio.gather(dlq.replay(letter), dlq.replay(letter))
    assert first.task_id == second.task_id and first.task_id != task.task_id
    assert await dlq.list() == []
    async with in_process_worker(settings):
        done = await wait_terminal(redis, settings, [first.task_id])
    replayed = done[first.task_id]
    assert replayed.type == EventType.SUCCEEDED
    assert replayed.data["final_context"] == {"invoice": 42, "replayed": True}
    [(_, entry)] = await redis.xrange(settings.requests_stream, min=first.entry_id, max=first.entry_id)
    assert loads(entry["payload"])["replay_of"] == task.task_id


async def test_a_dead_letter_of_a_retry_replays_as_a_task_of_its_own(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """A retry's request carries the re-open token of the task it re-opened. Replayed with it, the new
    task's run took itself for a run superseded by a retry: its entry was acknowledged, nothing ran,
    and the request was gone."""
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("if context.get('fail'): raise ValueError('boom')"))
    async with in_process_worker(settings, max_retries=0):
        task = await enqueue(redis, settings, wf, {"fail": True})
        assert (await wait_terminal(redis, settings, [task.task_id]))[task.task_id].type == EventType.FAILED
    await retry_failure(Scripts(redis, keys), task.execution_id, Owner(task.task_id, "acme", wf.id, wf.version))
    broken = {"local": FlakyProvider(LocalSandboxProvider(settings), 100)}
    async with in_process_worker(settings, providers=broken, max_retries=0):
        await wait_for_events(redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.DEAD)
    dlq = dead_letters(redis, settings, pool)
    [letter] = await dlq.list()
    assert "reopen_token" in loads(letter.fields["payload"])
    replayed = await dlq.replay(letter)
    [(_, entry)] = await redis.xrange(settings.requests_stream, min=replayed.entry_id, max=replayed.entry_id)
    assert "reopen_token" not in loads(entry["payload"]) and "retry_of" not in loads(entry["payload"])
    async with in_process_worker(settings):
        done = await wait_terminal(redis, settings, [replayed.task_id])
    # It ran (a retry's request carries no context of its own: its task's checkpoint held it).
    assert done[replayed.task_id].type == EventType.SUCCEEDED


async def test_malformed_letters_are_not_replayable_but_can_be_deleted(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    await redis.xadd(settings.requests_stream, {"garbage": "yes"})
    async with in_process_worker(settings):
        marker = await enqueue(redis, settings, wf)
        await wait_terminal(redis, settings, [marker.task_id])
    dlq = dead_letters(redis, settings, pool)
    [letter] = await dlq.list()
    assert letter.reason == "malformed"
    with pytest.raises(NotReplayable, match="not a complete request"):
        await dlq.replay(letter)
    assert await dlq.delete(letter.id)
    assert not await dlq.delete(letter.id)
    await redis.xadd(settings.dead_letter_stream, {"a": "1"})
    await redis.xadd(settings.dead_letter_stream, {"a": "2"})
    assert await dlq.purge() == 2
    assert await dlq.list() == []


async def test_a_letter_of_another_shard_is_replayed_and_deleted_through_the_api(
    redis: Redis, redis_url: str, db_url: str, pool: asyncpg.Pool
) -> None:
    """With several shards a letter's id names its shard (`s1-<entry id>`), as GET /dlq lists it; the
    replay and delete routes took only a plain entry id and answered 422 for every letter outside the
    home shard, and a shard this install does not have reached Redis as an entry id (a 500)."""
    settings = make_settings(redis_url, db_url, shards=2)
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    for _ in range(2):
        await redis.xadd(
            keys.sibling(1).dead_letter,
            {"task_id": "0" * 32, "workflow_id": str(wf.id), "client": "acme", "payload": "{}", "reason": "test"},
        )
    async with operator_api(settings) as api:
        first, second = (await api.get("/dlq")).json()["items"]
        assert first["id"].startswith("s1-")
        assert [d["id"] for d in (await api.get("/dlq", params={"after": first["id"]})).json()["items"]] == [
            second["id"]
        ]
        replayed = await api.post(f"/dlq/{first['id']}/replay")
        assert replayed.status_code == 202, replayed.text
        deleted = await api.delete(f"/dlq/{second['id']}")
        assert deleted.status_code == 204, deleted.text
        assert (await api.get("/dlq")).json()["items"] == []
        # A shard past this install's: not found, as any id that names no letter.
        assert (await api.delete("/dlq/s7-1-0")).status_code == 404
        assert (await api.post("/dlq/s7-1-0/replay")).status_code == 404
        assert (await api.get("/dlq", params={"after": "s7-1-0"})).status_code == 422
        assert (await api.delete("/dlq/x1-1-0")).status_code == 422
    dlq = DeadLetters(redis, keys, settings, WorkflowCatalog(redis, pool, keys))
    assert not await dlq.delete("s7-1-0") and await dlq.get("s7-1-0") is None
    assert not await dlq.delete("garbage") and await dlq.get("garbage") is None


async def test_a_replay_that_cannot_hand_out_an_id_safely_is_a_503(
    redis: Redis, pg_factory: Callable[..., PostgresServer], settings: Settings
) -> None:
    """Redis lost its id sequence and PostgreSQL, which holds the floor, is down: execute answers 503
    (try again), and the replay of a dead letter, which enqueues the same way, answered 500."""
    pg = pg_factory()
    await migrate_url(pg.url)
    settings = settings.model_copy(update={"database_url": pg.url})
    keys = Keys.from_settings(settings)
    pool = await create_pool(pg.url)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    await pool.close()
    entry_id = await redis.xadd(
        keys.dead_letter,
        {"task_id": "0" * 32, "workflow_id": str(wf.id), "client": "acme", "payload": "{}", "reason": "test"},
    )
    async with operator_api(settings) as api:
        await redis.delete(keys.execution_seq)
        pg.stop()
        response = await api.post(f"/dlq/{entry_id}/replay")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
        assert "PostgreSQL" in response.json()["error"]["message"]
        # Nothing was lost: the letter is still there to replay once PostgreSQL is back.
        pg.start()
        assert (await api.post(f"/dlq/{entry_id}/replay")).status_code == 202


async def test_paging_dead_letters_over_shards_neither_repeats_nor_skips(
    redis: Redis, redis_url: str, db_url: str, pool: asyncpg.Pool
) -> None:
    """Shards' letters were merged in time order only when there were more than a page: an exactly
    full page came in shard order, and paging after its last letter listed one again."""
    """Each shard's dead-letter stream numbers its entries independently, so two shards dead-lettering in
    the same millisecond give the same entry id (ms-0), and a page that is exactly full is not sorted.
    Paging `after` the last id listed must still give every letter exactly once."""
    settings = make_settings(redis_url, db_url, shards=2)
    keys = Keys.from_settings(settings)
    letter = {"task_id": "0" * 32, "workflow_id": "1", "client": "acme", "payload": "{}", "reason": "test"}
    await redis.xadd(keys.sibling(0).dead_letter, letter, id="2000-0")
    await redis.xadd(keys.sibling(1).dead_letter, letter, id="1000-0")
    dlq = DeadLetters(redis, keys, settings, WorkflowCatalog(redis, pool, keys))

    async def page_through(count: int) -> list[str]:
        seen: list[str] = []
        after = None
        while True:
            page = await dlq.list(count=count, after=after)
            seen += [d.id for d in page]
            if len(page) < count or len(seen) > 10:
                return seen
            after = page[-1].id

    # A full page, oldest first: s1-1000-0 then s0-2000-0, and nothing after it.
    assert await page_through(2) == ["s1-1000-0", "s0-2000-0"]


async def test_paging_dead_letters_over_shards_keeps_letters_with_the_same_entry_id(
    redis: Redis, redis_url: str, db_url: str, pool: asyncpg.Pool
) -> None:
    """Shards number their entries apart: two letters dead in the same millisecond in two shards have
    the same entry id, and paging after one of them (`after`, a time for every shard) skipped the other."""
    settings = make_settings(redis_url, db_url, shards=2)
    keys = Keys.from_settings(settings)
    letter = {"task_id": "0" * 32, "workflow_id": "1", "client": "acme", "payload": "{}", "reason": "test"}
    await redis.xadd(keys.sibling(0).dead_letter, letter, id="1000-0")
    await redis.xadd(keys.sibling(1).dead_letter, letter, id="1000-0")  # the same millisecond, its own stream
    await redis.xadd(keys.sibling(0).dead_letter, letter, id="2000-0")
    dlq = DeadLetters(redis, keys, settings, WorkflowCatalog(redis, pool, keys))
    seen: list[str] = []
    after = None
    for _ in range(5):
        page = await dlq.list(count=1, after=after)
        if not page:
            break
        seen += [d.id for d in page]
        after = page[-1].id
    assert sorted(seen) == ["s0-1000-0", "s0-2000-0", "s1-1000-0"]
