"""Status events: the schema of a results-stream entry and the `data` each type carries.

data by type (JSON in the `data` field):
- queued:        {workflow_name, enqueued_at, initial_context}
- started:       {workflow_name, enqueued_at, started_at, consumer, delivery, attempt, resumed_from_step}
- node_started:  {step, node_id, node_type, started_at, input_context}
- node_finished: {step, node_id, node_type, status, started_at, finished_at, duration_ms,
                  output_context, stdout, stderr, decision, decision_result, next_node, error}
  A node with a retry policy runs once per attempt, each a step: both node events then also carry
  {attempt, max_attempts}, and a failed attempt that will run again {retry_at}.
- retry:         {attempt, error, retry_at}
- succeeded:     {started_at, finished_at, duration_ms, final_context, nodes_executed}
- failed:        {started_at, finished_at, duration_ms, final_context, nodes_executed, error}
- dead:          {finished_at, reason, error, attempts}
- cancelled:     {finished_at, cancelled_by, previous_status, current_node, error}
An `error` is {node_id, type, message, traceback, reason}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import orjson

from shared.streams import FORMAT_VERSION, EventField, EventType, decode_fields, dumps, entry_id_parts, now_iso


def event_fields(
    type_: EventType,
    *,
    task_id: str,
    execution_id: int,
    workflow_id: int,
    client: str,
    data: dict[str, Any],
    ts: str | None = None,
) -> dict[str, str]:
    return {
        EventField.TYPE: type_.value,
        EventField.TASK_ID: task_id,
        EventField.EXECUTION_ID: str(execution_id),
        EventField.WORKFLOW_ID: str(workflow_id),
        EventField.CLIENT: client,
        EventField.TS: ts or now_iso(),
        EventField.DATA: dumps(data),
        EventField.VERSION: str(FORMAT_VERSION),
    }


# An event type by its value: a dict lookup is a tenth of EventType(value)'s time.
_EVENT_TYPES = {t.value: t for t in EventType}
# The fields' names as plain text (from_fields): a dict lookup by an enum member compares it by its
# class's equality, by plain text at once.
# The fields of an entry event_fields made (record.lua writes a run's events the same), in its order:
# what Event.from_pairs reads by position. As plain text: a dict lookup by an enum member (from_fields)
# compares it by its class's equality, by plain text at once.
_FIELD_ORDER = [
    str(f.value)
    for f in (
        EventField.TYPE,
        EventField.TASK_ID,
        EventField.EXECUTION_ID,
        EventField.WORKFLOW_ID,
        EventField.CLIENT,
        EventField.TS,
        EventField.DATA,
        EventField.VERSION,
    )
]
_TYPE, _TASK_ID, _EXECUTION_ID, _WORKFLOW_ID, _CLIENT, _TS, _DATA, _ = _FIELD_ORDER
_new_object = object.__new__
_set_attribute = object.__setattr__
_FORMAT_TEXT = str(FORMAT_VERSION)


def _data_of(raw: str | None) -> dict[str, Any]:
    """An event's data from its JSON text (none: empty); ValueError if it is not a JSON object."""
    data = (orjson.loads(raw) if raw else None) or {}
    if not isinstance(data, dict):
        raise ValueError("event data is not a JSON object")
    return data


def _type_of(text: str) -> EventType:
    type_ = _EVENT_TYPES.get(text)
    if type_ is None:
        raise ValueError(f"{text!r} is not an event type")
    return type_


def _made(
    cls: type[Event],
    entry_id: str,
    type_: EventType,
    task_id: str,
    execution_id: int,
    workflow_id: int,
    client: str,
    ts: str,
    data: dict[str, Any],
    shard: int,
    nul_free: bool,
) -> Event:
    """An event with every field as __init__ would set it, in one dict made here: without the frozen
    dataclass's __init__, which sets each field through object.__setattr__ (a third of the time of
    reading an event), and without a call taking them as keywords. Every event read (by the projector,
    the fan-out, the API's streams) is made so."""
    event = _new_object(cls)
    _set_attribute(
        event,
        "__dict__",
        {
            "id": entry_id,
            "type": type_,
            "task_id": task_id,
            "execution_id": execution_id,
            "workflow_id": workflow_id,
            "client": client,
            "ts": ts,
            "data": data,
            "shard": shard,
            "nul_free": nul_free,
        },
    )
    return event


@dataclass(frozen=True)
class Event:
    id: str
    type: EventType
    task_id: str
    execution_id: int
    workflow_id: int
    client: str
    ts: str
    data: dict[str, Any]
    # The shard whose results stream holds it (entry ids are per stream; see NOVA_SHARDS).
    shard: int = 0
    # True when no string of the event (its data's keys and values included) can hold U+0000, known
    # from the entry's text; False when it may, or is not known (PostgreSQL's copy then replaces them).
    nul_free: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def from_entry(cls, entry_id: str | bytes, fields: dict[Any, Any], shard: int = 0) -> Event:
        """Raises ValueError/KeyError on an entry that is not a well-formed event."""
        return cls.from_fields(entry_id, decode_fields(fields), shard)

    @classmethod
    def from_fields(cls, entry_id: str | bytes, f: dict[str, str], shard: int = 0) -> Event:
        """from_entry for fields already decoded (decode_fields)."""
        raw = f.get(_DATA)
        data = _data_of(raw)
        # JSON can carry U+0000 only as the escape \u0000 (or, from a lenient writer, raw): a data text
        # without either, and fields without one, hold none. A false alarm only costs the scan.
        nul_free = "\x00" not in "".join(f.values()) and (raw is None or "\\u0000" not in raw)
        type_ = _type_of(f[_TYPE])
        return _made(
            cls,
            entry_id.decode() if type(entry_id) is bytes else entry_id,
            type_,
            f[_TASK_ID],
            int(f[_EXECUTION_ID]),
            int(f[_WORKFLOW_ID]),
            f[_CLIENT],
            f[_TS],
            data,
            shard,
            nul_free,
        )

    @classmethod
    def from_pairs(cls, entry_id: str, pairs: list[str], shard: int = 0) -> Event | None:
        """from_fields for an entry's fields as Redis answers them, in text (field, value, field, value,
        ...), when event_fields made it in this format (its fields, in its order, and FORMAT_VERSION): read
        by position, without making a dict or looking its fields up, at half the cost. None for any other
        entry, which the caller reads the whole way (a dict: its format version, then from_fields). Raises
        as from_fields does on a value that is not an event's."""
        if pairs[0::2] != _FIELD_ORDER or pairs[15] != _FORMAT_TEXT:
            return None
        raw = pairs[13]
        data = _data_of(raw)
        nul_free = "\x00" not in "".join(pairs) and "\\u0000" not in raw
        type_ = _type_of(pairs[1])
        execution_id, workflow_id = int(pairs[5]), int(pairs[7])
        return _made(
            cls, entry_id, type_, pairs[3], execution_id, workflow_id, pairs[9], pairs[11], data, shard, nul_free
        )

    @cached_property
    def encoded(self) -> str:
        """as_json() encoded once: fanned out to many SSE clients, it is not re-encoded for each."""
        return dumps(self.as_json())

    @cached_property
    def id_parts(self) -> tuple[int, int]:
        """The entry id as (ms, seq), for ordering: computed once, though every subscriber compares it."""
        return entry_id_parts(self.id)

    @cached_property
    def sse_lines(self) -> bytes:
        """The event's server-sent-event lines after its `id:` line (`event:`, `data:`, the blank line
        ending it), CRLF-separated, encoded once: one event goes to every subscriber as the same bytes."""
        # `encoded` is JSON, whose strings escape CR and LF: it always fits on one `data:` line.
        return b"event: " + self.type.value.encode() + b"\r\ndata: " + self.encoded.encode() + b"\r\n\r\n"

    @cached_property
    def sse_frame(self) -> bytes:
        """The whole server-sent event with the entry id as its SSE id, encoded once (see sse_lines)."""
        return b"id: " + self.id.encode() + b"\r\n" + self.sse_lines

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type.value,
            "task_id": self.task_id,
            "execution_id": self.execution_id,
            "workflow_id": self.workflow_id,
            "client": self.client,
            "ts": self.ts,
            "data": self.data,
        }
