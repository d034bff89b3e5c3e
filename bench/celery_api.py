"""A FastAPI endpoint that enqueues through Celery's apply_async: the enqueue baseline."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from bench.celery_app import noop

app = FastAPI()


@app.post("/workflows/{workflow_id}/execute", status_code=202)
async def execute(workflow_id: int, body: dict[str, Any]) -> dict[str, Any]:
    result = noop.apply_async(args=[body.get("initial_context", {})])
    return {"task_id": result.id, "status": "queued", "workflow_id": workflow_id}
