"""Parsing a requests-stream entry into a typed request, or saying exactly why it is malformed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from shared.streams import RequestField, decode_fields, format_version, printable

_BIGINT_MAX = 2**63 - 1


class MalformedRequest(ValueError):
    """An entry the worker cannot run; its message becomes the dead-letter reason."""


@dataclass(frozen=True)
class ExecutionRequest:
    entry_id: str
    task_id: str
    execution_id: int
    workflow_id: int
    workflow_name: str
    client: str
    enqueued_at: str
    initial_context: dict[str, Any]
    payload: dict[str, Any]
    fields: dict[str, str]


def parse_request(entry_id: str, raw: dict[Any, Any]) -> ExecutionRequest:
    return parse_fields(entry_id, decode_fields(raw))


def parse_fields(entry_id: str, fields: dict[str, str]) -> ExecutionRequest:
    """parse_request for fields decoded already (decode_fields): the worker has them so."""
    # All names and values at once (a request's are all UTF-8); field by field only to name the one that is not.
    if not _is_utf8("".join(fields)) or not _is_utf8("".join(fields.values())):
        for name, value in fields.items():
            if not _is_utf8(name) or not _is_utf8(value):
                raise MalformedRequest(f"field {printable(name)!r} is not valid UTF-8: {printable(value)[:80]!r}")
    missing = [
        f.value
        for f in (
            RequestField.TASK_ID,
            RequestField.EXECUTION_ID,
            RequestField.WORKFLOW_ID,
            RequestField.CLIENT,
            RequestField.PAYLOAD,
        )
        if not fields.get(f)
    ]
    if missing:
        raise MalformedRequest(f"missing field(s): {', '.join(missing)}")
    if format_version(fields) is None:
        raise MalformedRequest(f"field v (the format version) must be a positive integer, not {fields['v'][:20]!r}")
    try:
        execution_id = int(fields[RequestField.EXECUTION_ID])
        workflow_id = int(fields[RequestField.WORKFLOW_ID])
    except ValueError as exc:
        raise MalformedRequest(f"execution_id and workflow_id must be integers ({exc})") from None
    if not (0 < execution_id <= _BIGINT_MAX and 0 < workflow_id <= _BIGINT_MAX):
        raise MalformedRequest("execution_id and workflow_id must be between 1 and 2^63-1")
    try:
        payload = orjson.loads(fields[RequestField.PAYLOAD])
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise MalformedRequest("payload must be a JSON object")
    context = payload.get("initial_context", {})
    if not isinstance(context, dict):
        raise MalformedRequest("payload.initial_context must be a JSON object")
    return ExecutionRequest(
        entry_id=entry_id,
        task_id=fields[RequestField.TASK_ID],
        execution_id=execution_id,
        workflow_id=workflow_id,
        workflow_name=fields.get(RequestField.WORKFLOW_NAME, ""),
        client=fields[RequestField.CLIENT],
        enqueued_at=fields.get(RequestField.ENQUEUED_AT, ""),
        initial_context=context,
        payload=payload,
        fields=fields,
    )


def _is_utf8(value: str) -> bool:
    # Bytes that are not UTF-8 arrive as lone surrogates (the Redis client decodes with surrogateescape).
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
