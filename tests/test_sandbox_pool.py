"""The local sandbox's warm pool: when it starts sandboxes ahead of need."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from consumer.sandbox.base import SandboxSpec
from consumer.sandbox.local import LocalSandbox, LocalSandboxProvider
from shared.settings import Settings


@pytest.fixture
async def provider() -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(Settings(sandbox_pool_size=2, sandbox_insecure=True))
    await p.start()
    yield p
    await p.aclose()


async def opened(provider: LocalSandboxProvider, execution_id: int) -> LocalSandbox:
    return await provider.open(SandboxSpec(execution_id=execution_id, client="acme"))


async def refills_done(provider: LocalSandboxProvider) -> None:
    await asyncio.gather(*provider._refilling)


async def test_a_warm_sandbox_left_means_the_pool_is_topped_up_only_when_the_taken_one_closes(
    provider: LocalSandboxProvider,
) -> None:
    assert len(provider._pool) == 2
    started = provider.started
    sb = await opened(provider, 1)
    # Its nodes run with no other sandbox starting beside them: one warm one is still there.
    await sb.run_action("n", "context['x'] = 1", {}, 5)
    await refills_done(provider)
    assert (len(provider._pool), provider.started) == (1, started)
    await sb.close()
    await refills_done(provider)
    assert (len(provider._pool), provider.started) == (2, started + 1)


async def test_the_last_warm_sandbox_taken_starts_the_refill_at_once(provider: LocalSandboxProvider) -> None:
    first = await opened(provider, 1)
    second = await opened(provider, 2)
    # Nothing is left for the next execution: it must not wait for these two to end.
    await refills_done(provider)
    assert len(provider._pool) == 2
    third = await opened(provider, 3)
    assert third.pid not in (first.pid, second.pid)
    for sb in (first, second, third):
        await sb.close()
    await refills_done(provider)
    assert len(provider._pool) == 2
