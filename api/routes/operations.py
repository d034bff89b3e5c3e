"""Operator routes: queue inspection, Prometheus metrics, and the dead-letter stream."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from shared.dead_letters import DeadLetters, NotReplayable
from shared.inspection import inspect

router = APIRouter(tags=["operations"])


def _dead_letters(request: Request) -> DeadLetters:
    state = request.app.state
    return DeadLetters(state.redis, state.keys, state.settings, state.catalog)


@router.get("/inspect", summary="Stream lengths, group lag and pending, consumers, dead letters")
async def inspect_queue(request: Request) -> dict[str, Any]:
    return await inspect(request.app.state.redis, request.app.state.keys)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    state = request.app.state
    body = await state.metrics.render(state.redis, state.keys, state.pool)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)


@router.get("/dlq", summary="Dead-lettered requests, oldest first")
async def list_dead_letters(
    request: Request,
    count: int = Query(default=100, ge=1, le=1000),
    after: str | None = Query(default=None, description="Return entries after this id (paging)"),
) -> dict[str, Any]:
    letters = await _dead_letters(request).list(count=count, after=after)
    return {"items": [d.as_json() for d in letters], "count": len(letters)}


@router.post("/dlq/{entry_id}/replay", status_code=202, summary="Run a dead-lettered request again as a new task")
async def replay_dead_letter(request: Request, entry_id: str) -> dict[str, Any]:
    dlq = _dead_letters(request)
    letter = await dlq.get(entry_id)
    if letter is None:
        raise HTTPException(status_code=404, detail=f"dead letter {entry_id} not found")
    try:
        result = await dlq.replay(letter)
    except NotReplayable as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    return {
        "task_id": result.task_id,
        "execution_id": result.execution_id,
        "status": "queued",
        "replay_of": letter.fields.get("task_id"),
        "message": f"Replayed as task {result.task_id}. Use GET /tasks/{result.task_id} to check status.",
    }


@router.delete("/dlq/{entry_id}", status_code=204, summary="Delete a dead letter")
async def delete_dead_letter(request: Request, entry_id: str) -> Response:
    if not await _dead_letters(request).delete(entry_id):
        raise HTTPException(status_code=404, detail=f"dead letter {entry_id} not found")
    return Response(status_code=204)
