"""Dead letters: listed with their reason, replayed once as a new linked task, deleted, purged."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from redis.asyncio import Redis

from consumer.sandbox.local import LocalSandboxProvider
from shared.catalog import WorkflowCatalog
from shared.dead_letters import DeadLetters, NotReplayable
from shared.executions import Owner, retry_failure
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import EventType, Keys, loads
from tests.support import create_workflow, enqueue, in_process_worker, linear, wait_for_events, wait_terminal
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
