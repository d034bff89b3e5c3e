"""Operator routes: queue inspection, Prometheus metrics, and the dead-letter stream."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import Admin, Res, Resources
from api.errors import ApiError
from api.schemas import DEAD_LETTER_ID_PATTERN, DeadLetterId, errors
from shared.dead_letters import DeadLetters, NotALetterId, NotReplayable
from shared.enqueue import SequenceUnavailable
from shared.inspection import inspect

router = APIRouter(tags=["operations"])


def _dead_letters(res: Resources) -> DeadLetters:
    return DeadLetters(res.redis, res.keys, res.settings, res.catalog)


@router.get("/inspect", summary="Stream lengths, group lag and pending, consumers, dead letters", responses=errors())
async def inspect_queue(res: Res, _: Admin) -> dict[str, Any]:
    return await inspect(res.redis, res.keys)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse, responses=errors())
async def metrics(res: Res, _: Admin) -> Response:
    body = await res.metrics.render(res.redis, res.keys, res.pool)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)


@router.get("/dlq", summary="Dead-lettered requests, oldest first", responses=errors())
async def list_dead_letters(
    res: Res,
    _: Admin,
    count: int = Query(default=100, ge=1, le=1000),
    after: str | None = Query(
        default=None, pattern=DEAD_LETTER_ID_PATTERN, description="Letters after this one (paging: the last id listed)"
    ),
) -> dict[str, Any]:
    try:
        letters = await _dead_letters(res).list(count=count, after=after)
    except NotALetterId as exc:
        raise ApiError(422, str(exc)) from None
    return {"items": [d.as_json() for d in letters], "count": len(letters)}


@router.post(
    "/dlq/{entry_id}/replay",
    status_code=202,
    summary="Run a dead-lettered request again as a new task",
    responses=errors(404, 422, 503),
)
async def replay_dead_letter(res: Res, _: Admin, entry_id: DeadLetterId) -> dict[str, Any]:
    dlq = _dead_letters(res)
    letter = await dlq.get(entry_id)
    if letter is None:
        raise ApiError(404, f"dead letter {entry_id} not found")
    try:
        result = await dlq.replay(letter)
    except NotReplayable as exc:
        raise ApiError(422, str(exc)) from None
    except SequenceUnavailable as exc:
        # As execute answers it: the letter stays, and a later replay (same idempotency key) runs it once.
        raise ApiError(503, str(exc), headers={"Retry-After": "5"}) from None
    return {
        "task_id": result.task_id,
        "execution_id": result.execution_id,
        "status": "queued",
        "replay_of": letter.fields.get("task_id"),
        "message": f"Replayed as task {result.task_id}. Use GET /tasks/{result.task_id} to check status.",
    }


@router.delete("/dlq/{entry_id}", status_code=204, summary="Delete a dead letter", responses=errors(404))
async def delete_dead_letter(res: Res, _: Admin, entry_id: DeadLetterId) -> Response:
    if not await _dead_letters(res).delete(entry_id):
        raise ApiError(404, f"dead letter {entry_id} not found")
    return Response(status_code=204)
