"""An execution's result is recorded before its sandbox is torn down: the client does not wait for it."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from redis.asyncio import Redis

from consumer.sandbox.base import Sandbox, SandboxProvider, SandboxSpec
from consumer.sandbox.local import LocalSandboxProvider
from shared.settings import Settings
from shared.streams import EventType, TaskField, TaskStatus
from tests.support import create_workflow, enqueue, in_process_worker, linear, wait_terminal


class Watched:
    """The real local sandbox; its close first reads the task's status, as a client would see it then."""

    def __init__(self, inner: Sandbox, execution_id: int, redis: Redis, seen: list[str | None]) -> None:
        self.inner = inner
        self.execution_id = execution_id
        self.redis = redis
        self.seen = seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def close(self) -> None:
        async for key in self.redis.scan_iter(match="*:task:*"):
            if key.endswith(":events") or await self.redis.type(key) != "hash":
                continue
            task = await self.redis.hgetall(key)
            if task.get(TaskField.EXECUTION_ID) == str(self.execution_id):
                self.seen.append(task.get(TaskField.STATUS))
        await self.inner.close()


class WatchedProvider:
    def __init__(self, inner: SandboxProvider, redis: Redis) -> None:
        self.inner = inner
        self.redis = redis
        self.seen: list[str | None] = []

    async def start(self) -> None:
        await self.inner.start()

    async def open(self, spec: SandboxSpec) -> Sandbox:
        return Watched(await self.inner.open(spec), spec.execution_id, self.redis, self.seen)  # type: ignore[return-value]

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_the_terminal_status_is_written_before_the_sandbox_closes(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    provider = WatchedProvider(LocalSandboxProvider(settings), redis)
    ok = await create_workflow(redis, settings, pool, linear("context['ok'] = True"))
    failing = await create_workflow(redis, settings, pool, linear("raise ValueError('no')"))
    async with in_process_worker(settings, providers={"local": provider}):  # type: ignore[dict-item]
        first = await enqueue(redis, settings, ok)
        done = await wait_terminal(redis, settings, [first.task_id])
        second = await enqueue(redis, settings, failing)
        done |= await wait_terminal(redis, settings, [second.task_id])
    assert done[first.task_id].type == EventType.SUCCEEDED and done[second.task_id].type == EventType.FAILED
    # What a client polling each task saw as its sandbox closed: the result, not "running".
    assert provider.seen == [TaskStatus.SUCCESS, TaskStatus.FAILURE]


class SlowToClose:
    """The real local sandbox, whose close takes a while longer (a busy host, an E2B call): the run has
    recorded its outcome, its entry is acknowledged, and heartbeats come meanwhile."""

    def __init__(self, inner: Sandbox, ends: list[str]) -> None:
        self.inner = inner
        self.ends = ends

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def close(self) -> None:
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            self.ends.append("cancelled")
            await self.inner.close()
            raise
        await self.inner.close()
        self.ends.append("closed")


class SlowProvider:
    def __init__(self, inner: SandboxProvider) -> None:
        self.inner = inner
        self.ends: list[str] = []

    async def start(self) -> None:
        await self.inner.start()

    async def open(self, spec: SandboxSpec) -> Sandbox:
        return SlowToClose(await self.inner.open(spec), self.ends)  # type: ignore[return-value]

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_heartbeat_during_the_close_of_a_finished_run_does_not_cancel_it(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    # A heartbeat every quarter of the visibility timeout: several come while the sandbox closes. The run's
    # entry is acknowledged already; it is not "taken over by another worker", and its close completes
    # (a cancelled close would leave the sandbox's uid, network slot and cgroup held).
    fast = settings.model_copy(update={"visibility_timeout": 1.0})
    provider = SlowProvider(LocalSandboxProvider(fast))
    wf = await create_workflow(redis, fast, pool, linear("context['ok'] = True"))
    async with in_process_worker(fast, providers={"local": provider}):  # type: ignore[dict-item]
        task = await enqueue(redis, fast, wf)
        done = await wait_terminal(redis, fast, [task.task_id])
        for _ in range(300):
            if provider.ends:
                break
            await asyncio.sleep(0.01)
    assert done[task.task_id].type == EventType.SUCCEEDED
    assert provider.ends == ["closed"]
