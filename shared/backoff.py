"""Waiting out an outage: the one backoff every reconnecting loop uses (worker, projector, start-up)."""

from __future__ import annotations

import asyncio
import contextlib

from tenacity import RetryCallState, wait_exponential, wait_random


class Backoff:
    """Exponential delays with jitter (tenacity's strategy) for a loop that retries until it succeeds."""

    def __init__(self, *, first: float = 0.1, maximum: float = 5.0) -> None:
        # Spelled with strategies every supported tenacity has (8.2 on); the jitter keeps replicas that
        # lost Redis together from reconnecting in lockstep.
        self._wait = wait_exponential(multiplier=first, max=maximum) + wait_random(0, first)
        # tenacity's strategies read the attempt number from a call state; a loop has no call of its own.
        self._state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        self._state.attempt_number = self.failures
        return float(self._wait(self._state))

    def reset(self) -> None:
        self.failures = 0


async def sleep_or_stop(seconds: float, stop: asyncio.Event) -> None:
    """Sleep, but wake at once when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def linger(ms: int, stop: asyncio.Event) -> None:
    """After a read of the results stream that found fewer events than it asked for (the stream is quiet,
    or a run is between its steps): wait NOVA_RESULTS_LINGER_MS before the next, so that the rest of a
    run's events come in one batch after it rather than one flush at a time between its steps. The
    projector's and the webhook fan-out's reads both do."""
    if ms:
        await sleep_or_stop(ms / 1000, stop)
