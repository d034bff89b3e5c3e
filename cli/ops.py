"""Operator commands: `nova inspect`, `nova dlq list|replay|delete|purge`, `nova cleanup`, `nova chaos`.

They talk to Redis directly (REDIS_URL), so they work when the API is down, which is when operators
need them most.

`nova` imports this module for every command (to know the commands' options), so what a command
needs beyond typer is imported inside it: each process pays only for its own command's imports.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

if TYPE_CHECKING:
    from shared.dead_letters import DeadLetters
    from shared.settings import Settings
    from shared.streams import Keys

T = TypeVar("T")

dlq_app = typer.Typer(help="Inspect, replay and purge the dead-letter stream.", no_args_is_help=True)


def _with_redis(action: Callable[[Any, Keys, Settings], Awaitable[T]]) -> T:
    from shared.connections import REDIS_UNAVAILABLE, NotConfigured, create_redis
    from shared.settings import Settings
    from shared.streams import Keys

    settings = Settings()

    async def run() -> T:
        redis = create_redis(settings)
        try:
            return await action(redis, Keys.from_settings(settings), settings)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except NotConfigured as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except REDIS_UNAVAILABLE as exc:
        typer.echo(f"error: Redis is unreachable at {settings.redis_url}: {exc}", err=True)
        raise typer.Exit(1) from None


def inspect_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text.")) -> None:
    """Stream lengths, group lag and pending, consumers with pending and idle time, DLQ size."""
    from shared.inspection import inspect, render_text

    report = _with_redis(lambda redis, keys, _settings: inspect(redis, keys))
    typer.echo(json.dumps(report, indent=2) if as_json else render_text(report))


def _dead_letters(redis: Any, keys: Keys, settings: Settings) -> DeadLetters:
    from shared.catalog import WorkflowCatalog
    from shared.dead_letters import DeadLetters

    # Without PostgreSQL: replays read workflows from their Redis copy.
    return DeadLetters(redis, keys, settings, WorkflowCatalog(redis, None, keys))


@dlq_app.command("list")
def dlq_list(
    count: int = typer.Option(50, help="How many entries."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Dead letters, oldest first, with their reason."""
    letters = _with_redis(lambda r, k, s: _dead_letters(r, k, s).list(count=count))
    if as_json:
        typer.echo(json.dumps([d.as_json() for d in letters], indent=2))
        return
    if not letters:
        typer.echo("the dead-letter stream is empty")
    for d in letters:
        info = d.as_json()
        typer.echo(f"{d.id}  {info['reason']:<18} task {info['task_id'] or '-'}  {info['error']}")


@dlq_app.command("replay")
def dlq_replay(entry_id: str = typer.Argument(..., help="Dead-letter entry id (see `nova dlq list`).")) -> None:
    """Run a dead letter again as a new task (once, however often this is called)."""
    from shared.dead_letters import NotReplayable
    from shared.enqueue import SequenceUnavailable

    async def replay(redis: Any, keys: Keys, settings: Settings) -> str:
        dlq = _dead_letters(redis, keys, settings)
        letter = await dlq.get(entry_id)
        if letter is None:
            raise LookupError(f"dead letter {entry_id} not found")
        return (await dlq.replay(letter)).task_id

    try:
        task_id = _with_redis(replay)
    except (LookupError, NotReplayable, SequenceUnavailable) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"replayed {entry_id} as task {task_id}")


@dlq_app.command("delete")
def dlq_delete(entry_id: str = typer.Argument(..., help="Dead-letter entry id.")) -> None:
    """Delete one dead letter."""
    if not _with_redis(lambda r, k, s: _dead_letters(r, k, s).delete(entry_id)):
        typer.echo(f"error: dead letter {entry_id} not found", err=True)
        raise typer.Exit(1)
    typer.echo(f"deleted {entry_id}")


@dlq_app.command("purge")
def dlq_purge(yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation.")) -> None:
    """Delete every dead letter."""
    if not yes:
        typer.confirm("Delete every entry of the dead-letter stream?", abort=True)
    removed = _with_redis(lambda r, k, s: _dead_letters(r, k, s).purge())
    typer.echo(f"purged {removed} dead letter(s)")


def cleanup_command(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted; delete nothing."),
    days: int | None = typer.Option(None, "--days", min=1, help="Keep this many days instead of NOVA_RETENTION_DAYS."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Delete finished executions, their chain of work and dead letters older than the retention, now.

    Workers do this by themselves on NOVA_CLEANUP_CRON; this is for doing it at once, or seeing what
    it would do. Needs REDIS_URL and DATABASE_URL."""
    import asyncpg

    from shared.db import create_pool
    from shared.retention import Retention, cutoff_for

    async def run(redis: Any, keys: Keys, settings: Settings) -> dict[str, Any]:
        keep = days if days is not None else settings.retention_days
        if not keep:
            typer.echo("NOVA_RETENTION_DAYS is 0: everything is kept; nothing to clean up (--days N to override)")
            raise typer.Exit(0)
        if not settings.database_url:
            typer.echo("error: DATABASE_URL is not set", err=True)
            raise typer.Exit(1)
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            retention = Retention(redis, keys, pool, batch=settings.cleanup_batch)
            cutoff = cutoff_for(keep)
            report = await (retention.plan(cutoff) if dry_run else retention.run(cutoff))
        finally:
            await pool.close()
        return report.as_json()

    try:
        report = _with_redis(run)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        typer.echo(f"error: PostgreSQL is unreachable or refused: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"finished before {report['cutoff']}: {verb}")
    typer.echo(f"  executions   {report['executions']}")
    typer.echo(f"  node_runs    {report['node_runs']}")
    for stream, n in report["dead_letters"].items():
        typer.echo(f"  {stream:<12} {n} dead letter(s)")
    if dry_run:
        typer.echo(f"oldest: {report['oldest'] or '-'}")
    if report["kept_reopened"]:
        verb = "would keep" if dry_run else "kept"
        typer.echo(f"{verb} {report['kept_reopened']} execution(s) a retry has reopened")


def chaos_command(
    executions: int | None = typer.Option(None, help="Executions to submit (2000; 200 for e2b-plan)."),
    workers: int = typer.Option(3, help="Worker processes."),
    seed: int = typer.Option(0, help="Random seed for the choice of victims."),
    long_nodes: bool = typer.Option(True, help="Some executions run a node longer than the visibility timeout."),
    lost_replies: bool = typer.Option(True, help="Workers reach Redis through a proxy that loses some replies."),
    drop_probability: float = typer.Option(0.01, help="Fraction of replies to workers that the proxy loses."),
    bad_bytes: bool = typer.Option(True, help="One request entry per hundred carries non-UTF-8 bytes."),
    scenario: str = typer.Option(
        "faults",
        help="faults: kill workers, restart Redis, stop PostgreSQL. e2b-plan: E2B's Hobby limits (20 sandboxes, "
        "1 create/s) against 3 workers x concurrency 10, through the local E2B stand-in.",
    ),
    node_seconds: float = typer.Option(20.0, help="e2b-plan: seconds each execution's E2B node runs."),
) -> None:
    """Check the delivery guarantees end to end while things break; print one JSON line."""
    if scenario == "e2b-plan":
        from cli.chaos_e2b import E2BPlanRun, passed

        report = asyncio.run(E2BPlanRun(executions=executions or 200, workers=workers, node_seconds=node_seconds).run())
        print(json.dumps(report))
        raise typer.Exit(0 if passed(report) else 1)
    if scenario != "faults":
        raise typer.BadParameter(f"unknown scenario '{scenario}' (faults, e2b-plan)", param_hint="--scenario")
    from cli.chaos import main

    raise typer.Exit(
        main(
            executions or 2000,
            workers,
            seed,
            long_nodes=long_nodes,
            lost_replies=lost_replies,
            bad_bytes=bad_bytes,
            drop_probability=drop_probability,
        )
    )
