"""`nova webhooks list|add|delete|deliveries|replay|rotate-secret`: webhook endpoints from the command line.

Like the other operator commands they work on Redis directly (REDIS_URL), where endpoints and their
deliveries live, so they work while the API is down; `add --client` also asks PostgreSQL
(DATABASE_URL) whether the client exists when Redis does not know it yet. Endpoints added here are the
operators' (every execution) or, with `--client`, one client's, exactly as `POST /webhooks` makes them.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.ops import _with_redis
from shared.webhook_events import WebhookEvent

# Imported by every `nova` command: the registry is imported by the commands that use it (see cli/ops.py).
if TYPE_CHECKING:
    from shared.settings import Settings
    from shared.streams import Keys

webhooks_app = typer.Typer(
    help="Webhook endpoints: list, add, delete, their deliveries, and replays.", no_args_is_help=True
)

_EVENT_HELP = "An event type to receive (repeat it); default all: " + ", ".join(e.value for e in WebhookEvent)
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@webhooks_app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every endpoint: id, URL, whose executions (operators' or a client's) and its event types."""
    from shared.webhooks import WebhookRegistry

    endpoints = _with_redis(lambda redis, keys, settings: WebhookRegistry(redis, keys, settings).list())
    if as_json:
        typer.echo(json.dumps([e.as_json() for e in endpoints], indent=2))
        return
    if not endpoints:
        typer.echo("no webhook endpoints")
    for e in endpoints:
        scope = f"client {e.client}" if e.client else "operators"
        typer.echo(f"{e.id}  {e.url}  ({scope})  {', '.join(e.event_types)}")


@webhooks_app.command("add")
def add_command(
    url: str = typer.Argument(..., help="http:// or https:// URL that receives the signed posts."),
    event: Annotated[list[str] | None, typer.Option("--event", help=_EVENT_HELP)] = None,
    client: str | None = typer.Option(None, "--client", help="Only this client's executions."),
    description: str | None = typer.Option(None, "--description", help="A note shown in listings."),
) -> None:
    """Register an endpoint and print its signing secret (shown once)."""
    from shared.db import create_pool
    from shared.executions import CatalogUnavailable, KnownClients, UnknownClient
    from shared.webhooks import EgressRefused, InvalidEndpoint, WebhookRegistry, endpoint_event_types

    if client is not None and not _SLUG.match(client):
        raise _fail(f"'{client}' is not a client slug (lower-case letters, digits, '-' and '_')", 2)
    if description is not None and len(description) > 500:
        raise _fail("--description is at most 500 characters", 2)
    if len(url) > 2048:
        raise _fail("the URL is longer than 2048 characters", 2)
    try:
        types = endpoint_event_types(event or None, client)
    except InvalidEndpoint as exc:
        raise _fail(str(exc), 2) from None

    async def run(redis: Any, keys: Keys, settings: Settings) -> dict[str, Any]:
        if client is not None:
            pool = await create_pool(settings.database_url, min_size=1, max_size=1) if settings.database_url else None
            try:
                await KnownClients(redis, keys).require(pool, client)
            finally:
                if pool is not None:
                    await pool.close()
        endpoint = await WebhookRegistry(redis, keys, settings).create(url, types, client, description)
        return endpoint.as_json(with_secret=True)

    try:
        created = _with_redis(run)
    except EgressRefused as exc:
        raise _fail(f"webhook URL refused: {exc}") from None
    except (UnknownClient, CatalogUnavailable) as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"PostgreSQL is unreachable: {exc}") from None
    typer.echo(f"webhook {created['id']} registered for {', '.join(created['event_types'])}")
    typer.echo(f"signing secret (store it now, it is not shown again):\n{created['secret']}")


@webhooks_app.command("delete")
def delete_command(endpoint_id: str = typer.Argument(..., help="Endpoint id (see `nova webhooks list`).")) -> None:
    """Delete an endpoint with its dead-lettered deliveries; nothing more is sent to it."""
    from shared.webhooks import WebhookRegistry

    if not _with_redis(lambda redis, keys, settings: WebhookRegistry(redis, keys, settings).delete(endpoint_id)):
        raise _fail(f"webhook {endpoint_id} not found")
    typer.echo(f"deleted webhook {endpoint_id}")


@webhooks_app.command("deliveries")
def deliveries_command(
    endpoint_id: str = typer.Argument(..., help="Endpoint id."),
    count: int = typer.Option(100, min=1, max=1000, help="How many deliveries."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with each payload)."),
) -> None:
    """Deliveries being retried, then dead-lettered ones (newest first), with attempts and last error."""
    from shared.webhooks import WebhookRegistry

    async def run(redis: Any, keys: Keys, settings: Settings) -> list[dict[str, Any]] | None:
        registry = WebhookRegistry(redis, keys, settings)
        if await registry.get(endpoint_id) is None:
            return None
        return await registry.deliveries(endpoint_id, limit=count)

    items = _with_redis(run)
    if items is None:
        raise _fail(f"webhook {endpoint_id} not found")
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    if not items:
        typer.echo("nothing being retried or dead-lettered")
    for d in items:
        status = f"HTTP {d['last_status']}" if d["last_status"] else "-"
        error = d["last_error"] or ""
        typer.echo(f"{d['id']}  {d['state']:<8} {d['type']:<24} attempts {d['attempts']:<3} {status:<8} {error}")


@webhooks_app.command("replay")
def replay_command(
    endpoint_id: str = typer.Argument(..., help="Endpoint id."),
    delivery_id: str = typer.Argument(..., help="A dead delivery's id (see `nova webhooks deliveries`)."),
) -> None:
    """Send a dead-lettered delivery again (same webhook-id, a fresh retry budget)."""
    from shared.webhooks import WebhookRegistry

    async def run(redis: Any, keys: Keys, settings: Settings) -> str:
        registry = WebhookRegistry(redis, keys, settings)
        if await registry.get(endpoint_id) is None:
            return "no endpoint"
        return "replayed" if await registry.replay(endpoint_id, delivery_id) else "not dead"

    outcome = _with_redis(run)
    if outcome == "no endpoint":
        raise _fail(f"webhook {endpoint_id} not found")
    if outcome == "not dead":
        raise _fail(f"no dead delivery {delivery_id} for webhook {endpoint_id}")
    typer.echo(f"replaying {delivery_id}: it is sent again now")


@webhooks_app.command("rotate-secret")
def rotate_command(
    endpoint_id: str = typer.Argument(..., help="Endpoint id."),
    grace: float | None = typer.Option(
        None,
        "--grace",
        min=0,
        max=7 * 86400,
        help="Seconds the old secret still signs beside the new one (default NOVA_WEBHOOK_SECRET_GRACE; 0: none).",
    ),
) -> None:
    """Give an endpoint a new signing secret and print it (shown once); during the grace period every
    delivery carries signatures from both, so the receiver can switch at its own pace."""
    from shared.webhooks import RotationConflict, WebhookRegistry

    async def run(redis: Any, keys: Keys, settings: Settings) -> dict[str, Any] | None:
        registry = WebhookRegistry(redis, keys, settings)
        rotated = await registry.rotate_secret(endpoint_id, settings.webhook_secret_grace if grace is None else grace)
        return rotated.as_json() if rotated is not None else None

    try:
        rotated = _with_redis(run)
    except RotationConflict as exc:
        raise _fail(str(exc)) from None
    if rotated is None:
        raise _fail(f"webhook {endpoint_id} not found")
    until = rotated["previous_secret_expires_at"]
    typer.echo(f"the old secret signs beside the new one until {until}" if until else "the old secret no longer signs")
    typer.echo(f"new signing secret (store it now, it is not shown again):\n{rotated['secret']}")
