"""Webhook endpoints: operators register them for every execution, a client for its own executions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from api.deps import Caller, Res
from api.errors import ApiError, unavailable
from api.schemas import errors
from shared.clients import Principal
from shared.executions import CatalogUnavailable, UnknownClient
from shared.webhooks import (
    EgressRefused,
    Endpoint,
    InvalidEndpoint,
    RotationConflict,
    WebhookEvent,
    WebhookRegistry,
    endpoint_event_types,
)

router = APIRouter(tags=["webhooks"])


class WebhookIn(BaseModel):
    url: str = Field(max_length=2048, pattern=r"^https?://", examples=["https://hooks.example.com/nova"])
    event_types: list[WebhookEvent] = Field(
        default_factory=lambda: list(WebhookEvent), description="Event types to receive; default: all"
    )
    client_slug: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="Only this client's executions (a client key: its own, whether given or not)",
    )
    description: str | None = Field(default=None, max_length=500)


def _registry(res: Res) -> WebhookRegistry:
    return WebhookRegistry(res.redis, res.keys, res.settings)


async def _visible(res: Res, caller: Principal, endpoint_id: str) -> Endpoint:
    endpoint = await _registry(res).get(endpoint_id)
    # Another client's endpoint answers exactly as a missing one does.
    if endpoint is None or not (caller.admin or endpoint.client == caller.client):
        raise ApiError(404, f"webhook {endpoint_id} not found")
    return endpoint


@router.post(
    "/webhooks",
    status_code=201,
    summary="Register a webhook endpoint (the signing secret is shown once)",
    responses=errors(403, 404, 422),
)
async def create_webhook(res: Res, caller: Caller, body: WebhookIn) -> dict[str, Any]:
    client = body.client_slug
    if not caller.admin:
        if client is not None and client != caller.client:
            raise ApiError(403, "a client key registers webhooks for its own executions only")
        client = caller.client
    elif client is not None:
        try:
            await res.known_clients.require(res.pool, client)
        except UnknownClient:
            raise ApiError(404, f"Client '{client}' not found") from None
        except CatalogUnavailable:
            raise unavailable("PostgreSQL") from None
    requested = [t.value for t in body.event_types] if "event_types" in body.model_fields_set else None
    try:
        types = endpoint_event_types(requested, client)
    except InvalidEndpoint as exc:
        raise ApiError(422, str(exc)) from None
    try:
        endpoint = await _registry(res).create(body.url, types, client, body.description)
    except EgressRefused as exc:
        raise ApiError(422, f"webhook URL refused: {exc}") from None
    return endpoint.as_json(with_secret=True)


@router.get("/webhooks", summary="List webhook endpoints (a client sees its own)", responses=errors())
async def list_webhooks(res: Res, caller: Caller) -> dict[str, Any]:
    items = [e.as_json() for e in await _registry(res).list() if caller.admin or e.client == caller.client]
    return {"items": items, "count": len(items)}


@router.get("/webhooks/{endpoint_id}", summary="One webhook endpoint", responses=errors(404))
async def get_webhook(res: Res, caller: Caller, endpoint_id: str) -> dict[str, Any]:
    return (await _visible(res, caller, endpoint_id)).as_json()


@router.delete("/webhooks/{endpoint_id}", status_code=204, summary="Delete a webhook endpoint", responses=errors(404))
async def delete_webhook(res: Res, caller: Caller, endpoint_id: str) -> Response:
    await _visible(res, caller, endpoint_id)
    await _registry(res).delete(endpoint_id)
    return Response(status_code=204)


class RotateIn(BaseModel):
    grace_seconds: float | None = Field(
        default=None,
        ge=0,
        le=7 * 86400,
        description="Seconds the old secret goes on signing beside the new one (default NOVA_WEBHOOK_SECRET_GRACE)",
    )


@router.post(
    "/webhooks/{endpoint_id}/rotate-secret",
    summary="Give an endpoint a new signing secret (shown once); the old one signs too for a grace period",
    responses=errors(404, 409, 422),
)
async def rotate_secret(res: Res, caller: Caller, endpoint_id: str, body: RotateIn | None = None) -> dict[str, Any]:
    await _visible(res, caller, endpoint_id)
    grace = body.grace_seconds if body is not None and body.grace_seconds is not None else None
    try:
        rotated = await _registry(res).rotate_secret(
            endpoint_id, res.settings.webhook_secret_grace if grace is None else grace
        )
    except RotationConflict as exc:
        raise ApiError(409, str(exc)) from None
    if rotated is None:
        raise ApiError(404, f"webhook {endpoint_id} not found")
    return rotated.as_json()


@router.get(
    "/webhooks/{endpoint_id}/deliveries",
    summary="Deliveries being retried and dead-lettered ones (newest first)",
    responses=errors(404),
)
async def list_deliveries(res: Res, caller: Caller, endpoint_id: str) -> dict[str, Any]:
    await _visible(res, caller, endpoint_id)
    items = await _registry(res).deliveries(endpoint_id)
    return {"items": items, "count": len(items)}


@router.post(
    "/webhooks/{endpoint_id}/deliveries/{delivery_id}/replay",
    status_code=202,
    summary="Send a dead-lettered delivery again (same webhook-id, a fresh retry budget)",
    responses=errors(404),
)
async def replay_delivery(res: Res, caller: Caller, endpoint_id: str, delivery_id: str) -> dict[str, Any]:
    await _visible(res, caller, endpoint_id)
    if not await _registry(res).replay(endpoint_id, delivery_id):
        raise ApiError(404, f"no dead delivery {delivery_id} for webhook {endpoint_id}")
    return {"id": delivery_id, "state": "retrying"}
