"""Task status, read from the task hash and the task's events in Redis: fresh, and independent of
PostgreSQL. A finished task answers as NOVA's clients read a Celery result (`result.status`,
`result.execution_trace`, `error` as text); unlike NOVA, a failed workflow is FAILURE, not SUCCESS."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import Caller, Res
from api.errors import ApiError
from api.schemas import TaskOut, errors, is_task_id
from shared.executions import Executions, error_message
from shared.streams import Lane, TaskField, TaskStatus, loads

router = APIRouter(tags=["tasks"])

MESSAGES = {
    TaskStatus.PENDING: "Task is queued, waiting for worker",
    TaskStatus.RUNNING: "Task is executing",
    TaskStatus.RETRY: "Task hit a transient error and will be retried",
    TaskStatus.SUCCESS: "Task completed successfully",
    TaskStatus.FAILURE: "Task failed",
    TaskStatus.DEAD: "Task was dead-lettered",
    TaskStatus.REVOKED: "Task was cancelled",
}


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def task_view(task: dict[str, str], trace: list[dict[str, Any]] | None = None, final_context: Any = None) -> TaskOut:
    """The task as GET /tasks/{id} shows it; `trace` and `final_context` (from the task's events) for a
    finished task."""
    status = TaskStatus(task[TaskField.STATUS])
    execution_id = _int(task.get(TaskField.EXECUTION_ID))
    out: dict[str, Any] = {
        "task_id": task[TaskField.TASK_ID],
        "status": status.value,
        "message": MESSAGES[status],
        "execution_id": execution_id,
        "workflow_id": _int(task.get(TaskField.WORKFLOW_ID)),
        "workflow_name": task.get(TaskField.WORKFLOW_NAME),
        "client_slug": task.get(TaskField.CLIENT),
        "enqueued_at": task.get(TaskField.ENQUEUED_AT),
        "started_at": task.get(TaskField.STARTED_AT),
        "finished_at": task.get(TaskField.FINISHED_AT),
        "priority": task.get(TaskField.LANE) or Lane.NORMAL,
    }
    if status in (TaskStatus.PENDING, TaskStatus.RETRY) and task.get(TaskField.WAITING_FOR):
        out["waiting_for"] = task[TaskField.WAITING_FOR]
        out["message"] = f"Task is queued, waiting for a slot of concurrency key '{task[TaskField.WAITING_FOR]}'"
    if status in (TaskStatus.RUNNING, TaskStatus.RETRY):
        out["meta"] = {
            "execution_id": execution_id,
            "workflow_id": out["workflow_id"],
            "workflow_name": out["workflow_name"],
            "started_at": out["started_at"],
            "current_node": task.get(TaskField.CURRENT_NODE),
            "nodes_executed": _int(task.get(TaskField.NODES_EXECUTED)) or 0,
            "attempt": _int(task.get(TaskField.ATTEMPT)) or 0,
        }
        waiting = loads(task.get(TaskField.NODE_RETRY)) if status == TaskStatus.RETRY else None
        if isinstance(waiting, dict):
            # A node's own retry policy is waiting out its backoff (the worker's slot given back).
            out["meta"]["node_retry"] = waiting
            out["message"] = (
                f"Node '{waiting.get('node_id')}' failed and will be retried (attempt {waiting.get('attempt')} of "
                f"{waiting.get('max_attempts')}) at {waiting.get('retry_at')}"
            )
    error = loads(task.get(TaskField.ERROR)) if status != TaskStatus.SUCCESS else None
    if status in (TaskStatus.FAILURE, TaskStatus.DEAD, TaskStatus.RETRY, TaskStatus.REVOKED):
        out["error"] = error_message(error)
        out["error_detail"] = error
    if status == TaskStatus.SUCCESS:
        result = loads(task.get(TaskField.RESULT)) or {}
        out["result"] = {
            "execution_id": execution_id,
            "status": "success",
            **result,
            "execution_trace": trace or [],
            "error": None,
        }
    elif status in (TaskStatus.FAILURE, TaskStatus.DEAD):
        # What NOVA's clients check after a run: result.status and result.error.
        out["result"] = {
            "execution_id": execution_id,
            "status": "failed",
            "final_context": final_context,
            "execution_trace": trace or [],
            "nodes_executed": _int(task.get(TaskField.NODES_EXECUTED)),
            "error": out["error"],
        }
    return TaskOut(**out)


@router.get("/tasks/{task_id}", response_model=TaskOut, responses=errors(401, 404, 503))
async def get_task(task_id: str, res: Res, caller: Caller) -> TaskOut:
    if not is_task_id(task_id):
        # No task can have this id; answered like any unknown task.
        raise ApiError(404, f"task {task_id} not found")
    task = await res.redis.hgetall(res.keys.task(task_id))
    # Another client's task answers exactly like a missing one: its existence is not ours to reveal.
    if not task or TaskField.STATUS not in task or not caller.may_see(task.get(TaskField.CLIENT)):
        raise ApiError(404, f"task {task_id} not found")
    if task[TaskField.STATUS] not in (TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.DEAD):
        return task_view(task)
    trace, final_context = await Executions(res.redis, res.keys, res.pool, res.catalog).trace(task)
    return task_view(task, trace, final_context)
