"""The event streams SSE routes send: one task's events (replay, then live, until its end) and the
feed of all events a caller may see (bounded resume, then live).

A client that reconnects with `Last-Event-ID` gets exactly the events after that id: no gap (each
stream subscribes to the live feed before replaying) and no repeat (everything at or below the last id
sent is skipped).

With several shards (NOVA_SHARDS), a task's events all live in its shard, so its stream is unchanged;
the feed of all events interleaves every shard's results stream, whose ids are independent, so the
feed's SSE id is a cursor with one position per shard (`<id of shard 0>,<id of shard 1>,...`): resume
is exact in every shard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from sse_starlette import ServerSentEvent

from api.event_hub import EventHub, Filter, Subscription
from shared.events import Event
from shared.executions import task_events
from shared.streams import TERMINAL_EVENTS, TERMINAL_STATUSES, Keys, TaskField, dumps, entry_id_parts


class EncodedEvent(ServerSentEvent):
    """A server-sent event whose bytes are built once per event, not once per subscriber: the response
    sends what encode() returns, and a thousand subscribers of one event share one frame."""

    def __init__(self, event: Event, frame: bytes, sse_id: str | None) -> None:
        super().__init__(event.encoded, event=event.type.value, id=sse_id)
        self.frame = frame

    def encode(self) -> bytes:
        return self.frame


def _sse(event: Event) -> EncodedEvent:
    return EncodedEvent(event, event.sse_frame, event.id)


# A stream id's parts are 64-bit unsigned. The greatest id is no position either: a range cannot
# start after it, and no entry is ever given it.
_ID_PART_MAX = 2**64 - 1


def _position(last_event_id: str | None) -> tuple[int, int] | None:
    """The position a Last-Event-ID names, or None for none: absent, or an id that is no position (not
    an id, past 64 bits, the greatest id: Redis refuses a range after them), taken as if none were sent."""
    if not last_event_id:
        return None
    try:
        ms, seq = entry_id_parts(last_event_id.strip())
    except ValueError:
        return None
    if not (0 <= ms <= _ID_PART_MAX and 0 <= seq <= _ID_PART_MAX) or (ms, seq) == (_ID_PART_MAX, _ID_PART_MAX):
        return None
    return ms, seq


def _after(last_event_id: str | None) -> tuple[int, int]:
    """A task stream's start: after the client's position, else from its first event."""
    return _position(last_event_id) or (0, 0)


def _newer(event: Event, last: tuple[int, int]) -> bool:
    """Whether the client has not had this event yet (stream ids order events totally)."""
    return event.id_parts > last


async def _live(
    sub: Subscription, last: tuple[int, int], *, until_terminal: bool, undone: frozenset[str] = frozenset()
) -> AsyncIterator[ServerSentEvent]:
    """The hub's events after `last`, in order and without repeats. `undone`: ids of terminal events
    that did not end the task (the replay sent them, and a retry's events after them)."""
    # None means dropped for lagging (or the server stopping): the client resumes by Last-Event-ID.
    while (event := await sub.next()) is not None:
        if _newer(event, last):
            last = event.id_parts
            yield _sse(event)
        # The end, whether or not the client had it: nothing comes after it (a Last-Event-ID ahead of
        # every event kept the stream open with pings after the task ended). Not the queued copy of an
        # end the replay sent and a retry undid (it reaches the queue when it lands after subscribing).
        if until_terminal and event.type in TERMINAL_EVENTS and event.id not in undone:
            return


async def task_event_stream(
    redis: Any, keys: Keys, hub: EventHub, task_id: str, last_event_id: str | None
) -> AsyncIterator[ServerSentEvent]:
    last = _after(last_event_id)
    # Subscribe first: an event published while we replay is then both replayed and queued, and
    # the id check drops the copy; subscribing after would lose it.
    with hub.subscribe(lambda e: e.task_id == task_id) as sub:
        replays = 0
        undone: frozenset[str] = frozenset()
        while True:
            events = await task_events(redis, keys, task_id)
            for event in events:
                if _newer(event, last):
                    last = entry_id_parts(event.id)
                    yield _sse(event)
            # The end is the task's last event being terminal: one followed by more was the end of a run
            # that a retry re-opened (the stream stopped there, at a cancel the retry had undone).
            if events and events[-1].type in TERMINAL_EVENTS:
                return
            undone = frozenset(e.id for e in events if e.type in TERMINAL_EVENTS)
            status = await redis.hget(keys.task(task_id), TaskField.STATUS)
            if status not in TERMINAL_STATUSES:
                break
            if replays:
                # Terminal, and its terminal event not in the task's list: trimmed away, nothing more comes.
                return
            # The task may have ended between the replay and this read (its terminal event and status
            # are written in one step): replay once more, or that event would never be sent.
            replays += 1
        async for item in _live(sub, last, until_terminal=True, undone=undone):
            yield item


# Resume bounds for GET /events (the settings override the bytes and entries). The results stream
# holds every client's events; a client's resume scans them all and keeps its own, so the scan is
# read in small pages (at most one page of other clients' events in memory) and stops at a budget.
REPLAY_PAGE = 64
REPLAY_MAX_BYTES = 4 << 20
REPLAY_MAX_ENTRIES = 10_000
REPLAY_TRUNCATED = "replay_truncated"


def _entry_bytes(fields: dict[Any, Any]) -> int:
    return sum(len(v.encode() if isinstance(v, str) else v) for pair in fields.items() for v in pair)


async def feed_stream(
    redis: Any,
    keys: Keys,
    hub: EventHub,
    accept: Filter,
    last_event_id: str | None,
    *,
    max_bytes: int = REPLAY_MAX_BYTES,
    max_entries: int = REPLAY_MAX_ENTRIES,
    page: int = REPLAY_PAGE,
    shards: Sequence[Keys] = (),
) -> AsyncIterator[ServerSentEvent]:
    streams = list(shards) or [keys]
    positions = _positions(last_event_id, len(streams))
    cursor = [p or (0, 0) for p in positions]
    with hub.subscribe(accept) as sub:
        if len(streams) > 1:
            for shard, shard_keys in enumerate(streams):
                if positions[shard] is None:
                    # Live from here: the id this feed sends names a position in every shard, its stream's
                    # end for a shard with no event yet. From (0, 0), a reconnect with it replayed the
                    # shard's whole history. Read after subscribing: an event appended after the end read
                    # is queued for this feed, and one the end covers is before the feed's start. Read
                    # before, an event appended in between was neither sent nor before the start, and the
                    # next event's id claimed it had been sent.
                    latest = await redis.xrevrange(shard_keys.results, count=1)
                    cursor[shard] = entry_id_parts(latest[0][0]) if latest else (0, 0)
        if any(p is not None for p in positions):
            # Resume: what the client missed while disconnected, bounded by entries and bytes scanned
            # (across every shard together).
            scanned = scanned_bytes = 0
            reason = None
            for shard, shard_keys in enumerate(streams):
                while reason is None:
                    count = min(page, max_entries - scanned)
                    last = cursor[shard]
                    entries = await redis.xrange(shard_keys.results, min=f"({last[0]}-{last[1]}", max="+", count=count)
                    for entry_id, fields in entries:
                        scanned += 1
                        scanned_bytes += _entry_bytes(fields)
                        cursor[shard] = entry_id_parts(entry_id)
                        try:
                            event: Event | None = Event.from_entry(entry_id, fields, shard)
                        except (KeyError, ValueError):
                            event = None  # not a well-formed event: skipped, as the hub does
                        if event is not None and accept(event):
                            yield _feed_sse(event, cursor)
                        if scanned_bytes >= max_bytes or scanned >= max_entries:
                            reason = "bytes" if scanned_bytes >= max_bytes else "entries"
                            break
                    if reason is None and len(entries) < count:
                        break  # caught up with this shard's stream
                    del entries  # one page at a time
            if reason is not None:
                yield _truncated(cursor, reason, scanned, scanned_bytes)
        # None means dropped for lagging (or the server stopping): the client resumes by Last-Event-ID.
        while (event := await sub.next()) is not None:
            if event.shard >= len(cursor) or event.id_parts <= cursor[event.shard]:
                continue
            cursor[event.shard] = event.id_parts
            yield _feed_sse(event, cursor)


def _positions(last_event_id: str | None, shards: int) -> list[tuple[int, int] | None]:
    """Each shard's position in a feed's Last-Event-ID: one id per shard, or a plain id (one shard,
    or a client that kept an id from before sharding: then it is every shard's position). With none
    (or none usable), the feed starts live: nothing is replayed."""
    parts = [p.strip() for p in (last_event_id or "").split(",")]
    if len(parts) != shards:
        parts = [parts[0]] * shards
    return [_position(p) for p in parts]


def _feed_sse(event: Event, cursor: list[tuple[int, int]]) -> EncodedEvent:
    if len(cursor) == 1:
        return _sse(event)
    # The id is this feed's cursor, its own; the rest of the frame is the event's, shared.
    sse_id = _cursor_text(cursor)
    return EncodedEvent(event, b"id: " + sse_id.encode() + b"\r\n" + event.sse_lines, sse_id)


def _cursor_text(cursor: list[tuple[int, int]]) -> str:
    return ",".join(f"{ms}-{seq}" for ms, seq in cursor)


def _truncated(cursor: list[tuple[int, int]], reason: str, scanned: int, scanned_bytes: int) -> ServerSentEvent:
    """Where a resume stopped: live events follow, and what lies between is the client's to fetch.

    No SSE id: the client's Last-Event-ID stays its last real event. Reconnecting with
    Last-Event-ID set to `stopped_after` continues the replay from where it stopped.
    """
    stopped_after = _cursor_text(cursor)
    data = {
        "type": REPLAY_TRUNCATED,
        "reason": reason,
        "stopped_after": stopped_after,
        "scanned_entries": scanned,
        "scanned_bytes": scanned_bytes,
        "message": f"replay stopped after {stopped_after} ({reason} limit); live events follow. Reconnect with "
        f"Last-Event-ID: {stopped_after} for the rest.",
    }
    return ServerSentEvent(dumps(data), event=REPLAY_TRUNCATED)


def feed_filter(workflow_id: int | None, client: str | None) -> Filter:
    def accept(event: Event) -> bool:
        if workflow_id is not None and event.workflow_id != workflow_id:
            return False
        return client is None or event.client == client

    return accept
