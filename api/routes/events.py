"""Server-sent events routes: one task's events and the live feed (the streams: api/event_streams.py).

Each SSE event has `id` = its results-stream entry id, `event` = its type and `data` = the event as
JSON; every stream holds one of the key's connection slots until it ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Header
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Receive, Scope, Send

from api.deps import Res, Resources, SseCaller, StreamCaller
from api.errors import ApiError
from api.event_streams import feed_filter, feed_stream, task_event_stream
from api.schemas import QueryId, errors, is_task_id
from shared.streams import TaskField

router = APIRouter(tags=["events"])

KEEPALIVE_SECONDS = 15
# The scope key under which the application (api/app.py NovaApi) leaves the server's own send.
SERVER_SEND = "nova.server_send"
STREAM_RETRY_AFTER_SECONDS = 5


class HeldStream(EventSourceResponse):
    """An event stream that gives its connection slot back however it ends (done, client gone, error)."""

    def __init__(self, events: AsyncIterator[ServerSentEvent], release: Callable[[], None]) -> None:
        super().__init__(events, ping=KEEPALIVE_SECONDS, headers={"Cache-Control": "no-cache"})
        self._release = release
        self._server_send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Events go straight to the server once the response has started through every layer; the
        # closing message still takes the whole chain, so each layer sees how the response ended.
        self._server_send = scope.get(SERVER_SEND)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        """sse-starlette's send of one event, without its per-send cancel scope when there is no send
        timeout (ours): with a thousand subscribers, entering and leaving an anyio cancel scope for
        each send was a fifth of the API's CPU per event."""
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        if self._server_send is not None and message.get("more_body"):
            send = self._server_send
        try:
            await send(message)
        except BaseException:
            # As the library's own: after a send that never returned the transport's state is unknown,
            # and the response must not try to send its end.
            self._send_interrupted = True
            raise


def sse_response(res: Resources, caller: StreamCaller, events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    slots = res.stream_slots
    if not slots.acquire(caller.key_digest):
        raise ApiError(
            429,
            f"this API key already has {slots.limit} open event streams, the limit (counted per API process); "
            "close one or retry later",
            headers={"Retry-After": str(STREAM_RETRY_AFTER_SECONDS)},
        )
    return HeldStream(events, lambda: slots.release(caller.key_digest))


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
    stream = feed_stream(
        res.redis,
        res.keys,
        res.hub,
        accept,
        last_event_id,
        max_bytes=res.settings.sse_replay_max_bytes,
        max_entries=res.settings.sse_replay_max_entries,
        shards=res.keys.all_shards,
    )
    return sse_response(res, caller, stream)


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
    return sse_response(res, caller, task_event_stream(res.redis, res.keys, res.hub, task_id, last_event_id))
