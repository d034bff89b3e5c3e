"""Server-sent events: one task's events (replay, then live, then close) and the live feed of all events.

Each SSE event has `id` = its results-stream entry id, `event` = its type and `data` = the event as
JSON. A client that reconnects with `Last-Event-ID` gets exactly the events after that id: no gap (we
subscribe to the live feed before replaying) and no repeat (everything at or below the last id sent is
skipped).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header
from sse_starlette.sse import EventSourceResponse

from api.deps import Res, SseCaller
from api.errors import ApiError
from api.event_hub import EventHub, Filter, Subscription
from api.schemas import QueryId, errors, is_task_id
from shared.events import Event
from shared.streams import TERMINAL_EVENTS, TERMINAL_STATUSES, Keys, TaskField, entry_id_parts

router = APIRouter(tags=["events"])

KEEPALIVE_SECONDS = 15


def _sse(event: Event) -> dict[str, Any]:
    return {"id": event.id, "event": event.type.value, "data": event.encoded}


def _after(last_event_id: str | None) -> tuple[int, int]:
    if not last_event_id:
        return (0, 0)
    try:
        return entry_id_parts(last_event_id.strip())
    except ValueError:
        return (0, 0)


async def _live(sub: Subscription, last: tuple[int, int], *, until_terminal: bool) -> AsyncIterator[dict[str, Any]]:
    """The hub's events after `last`, in order and without repeats."""
    # None means dropped for lagging (or the server stopping): the client resumes by Last-Event-ID.
    while (event := await sub.queue.get()) is not None:
        if entry_id_parts(event.id) <= last:
            continue
        last = entry_id_parts(event.id)
        yield _sse(event)
        if until_terminal and event.type in TERMINAL_EVENTS:
            return


async def _replay_task(redis: Any, keys: Keys, task_id: str) -> list[Event]:
    ids = await redis.lrange(keys.task_events(task_id), 0, -1)
    if not ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(keys.results, min=entry_id, max=entry_id, count=1)
    events = []
    for reply in await pipe.execute():
        # An id whose entry was trimmed from the results stream has nothing left to replay.
        for entry_id, fields in reply:
            events.append(Event.from_entry(entry_id, fields))
    return events


async def task_event_stream(
    redis: Any, keys: Keys, hub: EventHub, task_id: str, last_event_id: str | None
) -> AsyncIterator[dict[str, Any]]:
    last = _after(last_event_id)
    # Subscribe first: an event published while we replay is then both replayed and queued, and
    # the id check drops the copy; subscribing after would lose it.
    with hub.subscribe(lambda e: e.task_id == task_id) as sub:
        for event in await _replay_task(redis, keys, task_id):
            if entry_id_parts(event.id) <= last:
                continue
            last = entry_id_parts(event.id)
            yield _sse(event)
            if event.type in TERMINAL_EVENTS:
                return
        status = await redis.hget(keys.task(task_id), TaskField.STATUS)
        if status in TERMINAL_STATUSES:
            # Terminal, but its terminal event was trimmed away: nothing more will come.
            return
        async for item in _live(sub, last, until_terminal=True):
            yield item


async def feed_stream(
    redis: Any, keys: Keys, hub: EventHub, accept: Filter, last_event_id: str | None, backlog: int = 10_000
) -> AsyncIterator[dict[str, Any]]:
    last = _after(last_event_id)
    with hub.subscribe(accept) as sub:
        if last_event_id:
            # Resume: what the client missed while disconnected, bounded.
            entries = await redis.xrange(keys.results, min=f"({last[0]}-{last[1]}", max="+", count=backlog)
            for entry_id, fields in entries:
                event = Event.from_entry(entry_id, fields)
                last = entry_id_parts(event.id)
                if accept(event):
                    yield _sse(event)
        async for item in _live(sub, last, until_terminal=False):
            yield item


def sse_response(events: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    return EventSourceResponse(events, ping=KEEPALIVE_SECONDS, headers={"Cache-Control": "no-cache"})


def feed_filter(workflow_id: int | None, client: str | None) -> Filter:
    def accept(event: Event) -> bool:
        if workflow_id is not None and event.workflow_id != workflow_id:
            return False
        return client is None or event.client == client

    return accept


@router.get("/events", summary="Live feed of all status events (SSE)", responses=errors(401, 503))
async def all_events(
    res: Res,
    caller: SseCaller,
    workflow_id: QueryId = None,
    last_event_id: str | None = Header(default=None, alias="Last-Event-ID"),
) -> EventSourceResponse:
    # A client key sees its own executions' events only.
    who = caller.principal
    accept = feed_filter(workflow_id, None if who.admin else who.client)
    return sse_response(feed_stream(res.redis, res.keys, res.hub, accept, last_event_id))


@router.get(
    "/tasks/{task_id}/events",
    summary="One task's events: past ones, then live, closing after the end (SSE)",
    responses=errors(401, 404, 503),
)
async def task_events(
    task_id: str,
    res: Res,
    caller: SseCaller,
    last_event_id: str | None = Header(default=None, alias="Last-Event-ID"),
) -> EventSourceResponse:
    if not is_task_id(task_id):
        # No task can have this id; answered like any unknown task.
        raise ApiError(404, f"task {task_id} not found")
    client = await res.redis.hget(res.keys.task(task_id), TaskField.CLIENT)
    if client is None or not caller.principal.may_see(client):
        raise ApiError(404, f"task {task_id} not found")
    return sse_response(task_event_stream(res.redis, res.keys, res.hub, task_id, last_event_id))
