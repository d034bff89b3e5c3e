"""The `nova` command: one entry point for every process of the system."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import typer

from cli.control import cancel_command, drain_command, pause_command, resume_command
from cli.ops import chaos_command, cleanup_command, dlq_app, inspect_command
from cli.webhooks import webhooks_app
from shared.settings import Settings, describe_settings

HELP = f"""NOVA Streams: workflow executions on Redis Streams.

Every setting comes from the environment:

\b
{describe_settings()}
"""

app = typer.Typer(
    help=HELP, no_args_is_help=True, rich_markup_mode=None, add_completion=False, pretty_exceptions_enable=False
)
clients_app = typer.Typer(help="Manage clients and their API keys.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
app.add_typer(clients_app, name="clients")
app.add_typer(webhooks_app, name="webhooks")
app.command("inspect")(inspect_command)
app.command("chaos")(chaos_command)
app.command("cleanup")(cleanup_command)
app.command("cancel")(cancel_command)
app.command("pause")(pause_command)
app.command("resume")(resume_command)
app.command("drain")(drain_command)


def _configure_logging(settings: Settings, role: str, *, request_ids: bool = False) -> None:
    """`request_ids`: the API's lines name the request they belong to (its X-Request-ID)."""
    request = "[%(request_id)s] " if request_ids else ""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: {request}%(message)s",
        stream=sys.stderr,
        force=True,
    )
    if request_ids:
        from api.request_context import RequestIdLogFilter

        for handler in logging.getLogger().handlers:
            handler.addFilter(RequestIdLogFilter())


def _settings(**overrides: object) -> Settings:
    settings = Settings()
    updates = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=updates) if updates else settings


def _run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)`; the first SIGTERM/SIGINT sets `stop` (drain), a second one exits at once."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                logging.getLogger("nova").warning("second signal: exiting now")
                os._exit(128 + signum)
            logging.getLogger("nova").info("%s: finishing in-flight work, then exiting", signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await main(stop)

    try:
        import uvloop

        uvloop.run(runner())
    except ImportError:
        asyncio.run(runner())


@app.command()
def worker(
    concurrency: int | None = typer.Option(None, help="Executions in flight in this process (NOVA_CONCURRENCY)."),
    no_projector: bool = typer.Option(False, "--no-projector", help="Do not project events to PostgreSQL here."),
) -> None:
    """Run a worker: a member of the consumer group that executes workflows."""
    settings = _settings(concurrency=concurrency, run_projector=False if no_projector else None)
    _configure_logging(settings, "worker")
    from consumer.worker import serve

    _run_until_signal(lambda stop: serve(settings, stop=stop, own_process=True))


@app.command()
def projector() -> None:
    """Run only the projector (results stream -> PostgreSQL), for deployments that separate it."""
    settings = _settings()
    _configure_logging(settings, "projector")
    from consumer.projector import serve_projector

    _run_until_signal(lambda stop: serve_projector(settings, stop=stop))


@app.command()
def api(
    port: int | None = typer.Option(None, help="Port (default: $PORT, else 8000)."),
    host: str | None = typer.Option(None, help="Address to bind (NOVA_HOST)."),
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    from api.app import create_app
    from api.server import uvicorn_options

    settings = _settings(port=port, host=host)
    _configure_logging(settings, "api", request_ids=True)
    uvicorn.run(
        create_app(settings, settle_heap=True),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        loop="uvloop",
        **uvicorn_options(settings),
    )


@app.command()
def migrate() -> None:
    """Apply missing PostgreSQL migrations (safe to run any number of times, concurrently)."""
    settings = _settings()
    _configure_logging(settings, "migrate")
    if not settings.database_url:
        typer.echo("error: DATABASE_URL is not set", err=True)
        raise typer.Exit(1)
    from shared.db import migrate_url, migrations

    if not migrations():
        # An install that left the .sql files out would otherwise report "up to date" on an empty database.
        typer.echo("error: no migration files are installed (shared/migrations/*.sql)", err=True)
        raise typer.Exit(1)
    try:
        applied = asyncio.run(migrate_url(settings.database_url))
    except (OSError, ConnectionError) as exc:
        typer.echo(f"error: PostgreSQL is unreachable: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:
        typer.echo(f"error: migration failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"applied migrations {', '.join(map(str, applied))}" if applied else "database is up to date")


@app.command()
def dev(
    workers: int = typer.Option(2, help="Worker processes to start."),
    port: int | None = typer.Option(None, help="API port (default: $PORT, else 8000)."),
) -> None:
    """Everything locally: embedded Redis and PostgreSQL when no URLs are set, the API and workers."""
    from cli.dev import run_dev

    raise typer.Exit(run_dev(_settings(port=port), workers))


@app.command("secrets-key")
def secrets_key() -> None:
    """Print a new key for NOVA_SECRETS_KEY (credentials encryption)."""
    from shared.clients import Vault

    typer.echo(Vault.new_key())


def _clients(action: Callable[..., Awaitable[object]]) -> object:
    settings = _settings()
    from shared.clients import ClientStore, Vault
    from shared.connections import create_redis, open_pool
    from shared.streams import Keys

    async def run() -> object:
        redis = create_redis(settings)
        pool = await open_pool(settings)
        try:
            vault = Vault.from_settings(settings)
            return await action(ClientStore(redis, pool, Keys.from_settings(settings), vault))
        finally:
            await pool.close()
            await redis.aclose()

    from shared.clients import ClientError

    try:
        return asyncio.run(run())
    except ClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None


@clients_app.command("create")
def clients_create(slug: str, name: str = typer.Option(..., help="Display name.")) -> None:
    """Create a client and print its API key (shown once)."""
    key = _clients(lambda store: store.create(slug, name))
    typer.echo(f"client {slug} created; API key (store it now, it is not shown again):\n{key}")


@clients_app.command("rotate-key")
def clients_rotate(slug: str) -> None:
    """Revoke a client's keys and print a new one."""
    key = _clients(lambda store: store.rotate(slug))
    typer.echo(f"new API key for {slug} (the old one no longer works):\n{key}")


@clients_app.command("list")
def clients_list() -> None:
    """List clients with their number of active keys."""
    rows = _clients(lambda store: store.list())
    assert isinstance(rows, list)
    for row in rows:
        typer.echo(f"{row['slug']:<24} {row['name']:<32} active keys: {row['active_keys']}")


if __name__ == "__main__":
    app()
