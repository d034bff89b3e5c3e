"""Scheduled executions (cron), fired by the workers' scheduler exactly once per tick."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from api.deps import Admin, Res
from api.errors import ApiError
from api.routes.workflows import encoded_context, existing_client
from api.schemas import SLUG_PATTERN, errors
from shared.cron import InvalidSchedule
from shared.schedules import Schedule, ScheduleStore
from shared.streams import dumps

router = APIRouter(tags=["schedules"])


class ScheduleIn(BaseModel):
    cron: str = Field(description="Five cron fields, or six with seconds last", examples=["*/5 * * * *"])
    workflow_id: int = Field(ge=1, le=2**63 - 1)
    client_slug: str = Field(pattern=SLUG_PATTERN)
    initial_context: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(default=None, max_length=200)


def _out(schedule: Schedule, next_ms: int | None) -> dict[str, Any]:
    data = schedule.as_json()
    data["client_slug"] = data.pop("client")
    data["next_fire_at"] = (
        datetime.fromtimestamp(next_ms / 1000, UTC).isoformat().replace("+00:00", "Z") if next_ms else None
    )
    return data


def _store(res: Res) -> ScheduleStore:
    return ScheduleStore(res.redis, res.keys)


@router.post("/schedules", status_code=201, summary="Create a schedule", responses=errors(404, 413, 422, 503))
async def create_schedule(res: Res, _: Admin, body: ScheduleIn) -> dict[str, Any]:
    """Each tick enqueues as POST /workflows/{id}/execute would, so what that route refuses is refused
    here, now, rather than at every tick."""
    if await res.catalog.get(body.workflow_id) is None:
        raise ApiError(404, f"workflow {body.workflow_id} not found")
    await existing_client(res, body.client_slug)
    encoded_context(lambda: dumps(body.initial_context))
    store = _store(res)
    try:
        schedule = await store.create(
            cron=body.cron,
            workflow_id=body.workflow_id,
            client=body.client_slug,
            initial_context=body.initial_context,
            name=body.name,
        )
    except InvalidSchedule as exc:
        raise ApiError(422, str(exc)) from None
    # The tick as stored (on Redis's clock, as the scheduler counts it), not one worked out again here.
    return _out(schedule, await store.next_fire(schedule.id))


@router.get("/schedules", summary="List schedules with their next fire time", responses=errors())
async def list_schedules(res: Res, _: Admin) -> dict[str, Any]:
    items = [_out(s, n) for s, n in await _store(res).list()]
    return {"items": items, "count": len(items)}


@router.delete("/schedules/{schedule_id}", status_code=204, summary="Delete a schedule", responses=errors(404))
async def delete_schedule(res: Res, _: Admin, schedule_id: str) -> Response:
    if not await _store(res).delete(schedule_id):
        raise ApiError(404, f"schedule {schedule_id} not found")
    return Response(status_code=204)
