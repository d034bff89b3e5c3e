"""One reader of the results stream per API process, fanned out to every live subscriber.

Subscribers (SSE clients, metrics) get events through bounded in-memory queues, so a thousand
clients cost one XREAD loop, not a thousand. A subscriber that falls too far behind is dropped rather
than allowed to grow memory: its client reconnects with Last-Event-ID and replays from Redis.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.backoff import Backoff
from shared.connections import REDIS_UNAVAILABLE
from shared.events import Event
from shared.streams import Keys
from shared.tasks import cancel_until_done

log = logging.getLogger(__name__)

Filter = Callable[[Event], bool]


class Subscription:
    """One subscriber's bounded queue of events, read by one task.

    Not an asyncio.Queue: an event reaches every subscriber, so what offering and taking one cost is
    paid a thousand times per event with a thousand subscribers; a deque and the reader's one waiting
    future do the same for a fraction of it.
    """

    def __init__(self, hub: EventHub, accept: Filter | None, maxsize: int) -> None:
        self.hub = hub
        self.accept = accept
        self.maxsize = maxsize
        self.items: collections.deque[Event | None] = collections.deque()
        self.overflowed = False
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, event: Event) -> None:
        if self.overflowed or (self.accept is not None and not self.accept(event)):
            return
        if len(self.items) < self.maxsize:
            self.items.append(event)
        else:
            self.overflowed = True
            # Make room for the end-of-stream marker so the reader wakes up and leaves.
            self.items.popleft()
            self.items.append(None)
        self._wake()

    def end(self) -> None:
        """Tell the reader to leave once it has taken what is queued (the server is stopping)."""
        self.overflowed = True
        self.items.append(None)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> Event | None:
        """The next event; None when dropped for lagging (or the server stopping)."""
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.items.popleft()

    async def get(self, timeout: float) -> Event | None:
        """next(), raising TimeoutError when idle for `timeout`."""
        return await asyncio.wait_for(self.next(), timeout)

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """With several shards, one reading loop per shard's results stream (on a cluster they live in
    different slots, so one XREAD cannot name them all); each event says its shard."""

    def __init__(
        self, redis: Redis, keys: Keys, *, block_ms: int = 1000, batch: int = 1000, shards: Sequence[Keys] = ()
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.shards = list(shards) or [keys]
        self.block_ms = block_ms
        self.batch = batch
        self.subscribers: set[Subscription] = set()
        self.observers: list[Callable[[Event], None]] = []
        self.last_ids = {k.results: "$" for k in self.shards}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def last_id(self) -> str:
        return self.last_ids[self.keys.results]

    def subscribe(self, accept: Filter | None = None, maxsize: int = 10_000) -> Subscription:
        sub = Subscription(self, accept, maxsize)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    def observe(self, observer: Callable[[Event], None]) -> None:
        """Called for every event (metrics); must be fast and must not raise."""
        self.observers.append(observer)

    async def start(self) -> None:
        # Pin the position now, not when the task first runs: events appended in between count.
        for keys in self.shards:
            try:
                await self._pin(keys.results)
            except REDIS_UNAVAILABLE as exc:
                log.warning("event hub: Redis unavailable at start (%s)", exc)
        self._tasks = [
            asyncio.create_task(self._run(n, keys.results), name=f"event-hub {keys.results}")
            for n, keys in enumerate(self.shards)
        ]

    async def _pin(self, stream: str) -> None:
        if self.last_ids[stream] == "$":
            # A concrete id, not "$", so a reconnect after an outage misses nothing.
            latest = await self.redis.xrevrange(stream, count=1)
            self.last_ids[stream] = latest[0][0] if latest else "0-0"

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        if tasks:
            # A single cancel can be lost (see cancel_until_done), and the loop would read on forever.
            await cancel_until_done(tasks)
        for sub in list(self.subscribers):
            # Wake every reader so SSE responses end with the process.
            sub.end()

    async def _run(self, shard: int, stream: str) -> None:
        backoff = Backoff()
        while True:
            try:
                await self._pin(stream)
                reply = await self.redis.xread({stream: self.last_ids[stream]}, count=self.batch, block=self.block_ms)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Nothing may end a reader: the API would serve no live events until restarted.
                delay = backoff.next_delay()
                if isinstance(exc, (*REDIS_UNAVAILABLE, ResponseError)):
                    # ResponseError: on a cluster, a read unblocked by a slot move (UNBLOCKED) or a stream
                    # not there yet on a promoted replica; the next read finds it.
                    log.warning("event hub: Redis unavailable (%s); retrying in %.1fs", exc, delay)
                else:
                    # Seen: redis-py's cluster client failing a read with an AttributeError when it closes
                    # its own connections under a command.
                    log.exception("event hub: reading %s failed; retrying in %.1fs", stream, delay)
                await asyncio.sleep(delay)
                continue
            for _stream, items in reply or []:
                for entry_id, fields in items:
                    self.last_ids[stream] = entry_id
                    try:
                        event = Event.from_entry(entry_id, fields, shard)
                    except (KeyError, ValueError):
                        continue
                    for observer in self.observers:
                        observer(event)
                    for sub in list(self.subscribers):
                        sub.offer(event)
