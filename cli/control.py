"""Run control from the command line: `nova cancel`, `nova pause`, `nova resume`, `nova drain`.

Like the other operator commands they write to Redis directly (REDIS_URL), so they work while the API
is down; a bulk cancel by filter also reads PostgreSQL (DATABASE_URL) to find what matches.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.ops import _with_redis

# Imported by every `nova` command: what these commands need is imported when they run (see cli/ops.py).
if TYPE_CHECKING:
    import asyncpg

    from shared.control import RunControl
    from shared.settings import Settings
    from shared.streams import Keys


def _control(redis: Any, keys: Keys, settings: Settings, pool: asyncpg.Pool | None = None) -> RunControl:
    from shared.control import RunControl

    return RunControl(
        redis, keys, task_ttl=settings.task_ttl, visibility_timeout=settings.visibility_timeout, pool=pool
    )


def cancel_command(
    ids: Annotated[list[str] | None, typer.Argument(help="Execution ids (or task ids with --task).")] = None,
    task: bool = typer.Option(False, "--task", help="The ids are task ids."),
    workflow: int | None = typer.Option(None, "--workflow", help="Every unfinished execution of this workflow."),
    client: str | None = typer.Option(None, "--client", help="Every unfinished execution of this client."),
    status: str | None = typer.Option(
        None, "--status", help="Only those with this status: pending, running, retrying."
    ),
) -> None:
    """Cancel executions: queued ones never start, running ones stop (REVOKED, execution `cancelled`).

    Filters (--workflow, --client, --status, combined with AND) need DATABASE_URL."""
    ids = ids or []
    if not ids and workflow is None and client is None and status is None:
        typer.echo("error: name execution ids, or a filter (--workflow, --client, --status)", err=True)
        raise typer.Exit(2)
    if status is not None and status not in ("pending", "running", "retrying"):
        typer.echo("error: --status is one of pending, running, retrying", err=True)
        raise typer.Exit(2)
    if not task and not all(i.isdigit() for i in ids):
        typer.echo("error: execution ids are numbers (task ids need --task)", err=True)
        raise typer.Exit(2)

    import asyncpg

    from shared.control import CancelFilter
    from shared.scripts import CancelOutcome

    async def run(redis: Any, keys: Keys, settings: Settings) -> list[dict[str, Any]]:
        by_query = workflow is not None or client is not None or status is not None
        pool = None
        if by_query:
            if not settings.database_url:
                typer.echo("error: a filter needs DATABASE_URL", err=True)
                raise typer.Exit(1)
            pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            control = _control(redis, keys, settings, pool)
            if task:
                results = [await control.cancel_task(t, by="operator (cli)") for t in ids]
                if by_query:
                    where = CancelFilter(workflow_id=workflow, client_slug=client, status=status)
                    results += await control.cancel_many(where, by="operator (cli)")
            else:
                where = CancelFilter(
                    execution_ids=[int(i) for i in ids], workflow_id=workflow, client_slug=client, status=status
                )
                results = await control.cancel_many(where, by="operator (cli)")
        finally:
            if pool is not None:
                await pool.close()
        return [
            {
                "task_id": r.task_id,
                "execution_id": r.execution_id,
                "outcome": r.outcome.name.lower(),
                "status": r.status,
            }
            for r in results
        ]

    from shared.executions import ProjectionBehind

    try:
        results = _with_redis(run)
    except ProjectionBehind as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for r in results:
        typer.echo(
            f"{r['execution_id'] or '-'} {r['task_id'] or '-'}: "
            + {"cancelled": "cancelled", "already_terminal": f"already {r['status']}", "missing": "not found"}[
                r["outcome"]
            ]
        )
    cancelled = sum(1 for r in results if r["outcome"] == CancelOutcome.CANCELLED.name.lower())
    typer.echo(f"cancelled {cancelled} of {len(results)}")
    if any(r["outcome"] == "missing" for r in results):
        raise typer.Exit(1)


def _scope(workflow: int | None) -> str:
    from shared.control import QUEUE, workflow_scope

    return workflow_scope(workflow) if workflow is not None else QUEUE


def pause_command(
    workflow: int | None = typer.Option(
        None, "--workflow", help="Pause this workflow only (default: the whole queue)."
    ),
) -> None:
    """Pause the whole queue, or one workflow: executions are accepted and queued, none starts."""
    _with_redis(lambda redis, keys, settings: _control(redis, keys, settings).pause(_scope(workflow)))
    typer.echo(f"paused {'workflow ' + str(workflow) if workflow is not None else 'the queue'}")


def resume_command(
    workflow: int | None = typer.Option(None, "--workflow", help="Resume this workflow (default: the whole queue)."),
) -> None:
    """Resume what `nova pause` paused: its parked executions start, in the order they were queued."""
    moved = _with_redis(lambda redis, keys, settings: _control(redis, keys, settings).resume(_scope(workflow)))
    typer.echo(f"resumed {'workflow ' + str(workflow) if workflow is not None else 'the queue'}; {moved} put back")


def drain_command(
    off: bool = typer.Option(False, "--off", help="End the drain: workers read again."),
    wait: float = typer.Option(0, "--wait", help="Wait up to this many seconds for the workers to finish."),
    as_json: bool = typer.Option(False, "--json", help="Print the control state as JSON."),
) -> None:
    """Drain the workers for a deploy: they finish what they hold and take nothing new (progress shown)."""

    async def run(redis: Any, keys: Keys, settings: Settings) -> dict[str, Any]:
        control = _control(redis, keys, settings)
        await control.drain(not off)
        deadline = time.monotonic() + wait
        state = await control.state()
        while not off and state["held_by_workers"] and time.monotonic() < deadline:
            typer.echo(f"draining: {state['held_by_workers']} run(s) still held", err=True)
            await asyncio.sleep(1.0)
            state = await control.state()
        return state

    state = _with_redis(run)
    if as_json:
        typer.echo(json.dumps(state, indent=2))
    elif off:
        typer.echo("drain ended: workers read again")
    else:
        typer.echo(f"draining: {state['held_by_workers']} run(s) still held")
    if not off and wait and state["held_by_workers"]:
        raise typer.Exit(1)
