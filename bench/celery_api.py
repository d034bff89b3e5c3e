"""FastAPI endpoints in front of the Celery baselines: a no-op enqueued through apply_async (the enqueue
baseline), and NOVA's routes for its workflow task (bench/celery_nova.py): execute, and the task's
state read from Celery's result backend, as NOVA's API answers GET /tasks/{task_id}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from bench import celery_nova
from bench.celery_app import noop

app = FastAPI()


@app.post("/workflows/{workflow_id}/execute", status_code=202)
async def execute(workflow_id: int, body: dict[str, Any]) -> dict[str, Any]:
    result = noop.apply_async(args=[body.get("initial_context", {})])
    return {"task_id": result.id, "status": "queued", "workflow_id": workflow_id}


@app.post("/nova/workflows/{workflow_id}/execute", status_code=202)
def execute_nova(workflow_id: int, body: dict[str, Any]) -> dict[str, Any]:
    result = celery_nova.execute_workflow_task.apply_async(args=[workflow_id, body.get("initial_context", {})])
    return {"task_id": result.id, "status": "queued", "workflow_id": workflow_id}


@app.get("/nova/tasks/{task_id}")
def task_state(task_id: str) -> dict[str, Any]:
    result = celery_nova.app.AsyncResult(task_id)
    state = result.state
    out: dict[str, Any] = {"task_id": task_id, "status": state}
    if state == "SUCCESS":
        out["result"] = result.result
    return out
