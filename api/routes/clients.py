"""Operators manage clients, their API keys and their stored credentials (values are write-only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from api.deps import Admin, Res
from api.errors import ApiError
from api.schemas import SLUG_PATTERN, ClientIn, ClientKeyOut, CredentialIn, errors
from shared.clients import CREDENTIAL_NAME, ClientError

router = APIRouter(tags=["clients"])

# Checked before any store sees them: a slug or name no client or credential can have (U+0000 included,
# which PostgreSQL refuses with an error of its own) is a 422 that says what a valid one is.
Slug = Annotated[str, Path(pattern=SLUG_PATTERN, description="A client's slug")]
CredentialName = Annotated[str, Path(pattern=CREDENTIAL_NAME.pattern, description="A credential's name")]


@router.post("/clients", status_code=201, response_model=ClientKeyOut, responses=errors(401, 403, 409, 422, 503))
async def create_client(body: ClientIn, res: Res, _: Admin) -> ClientKeyOut:
    res.db()
    try:
        key = await res.clients.create(body.slug, body.name)
    except ClientError as exc:
        raise ApiError(409, str(exc)) from None
    # The execute route may name it at once, without asking PostgreSQL.
    await res.known_clients.remember(body.slug)
    return ClientKeyOut(slug=body.slug, api_key=key)


@router.get("/clients", responses=errors(401, 403, 503))
async def list_clients(res: Res, _: Admin) -> dict[str, Any]:
    res.db()
    items = await res.clients.list()
    return {"items": items, "count": len(items)}


@router.post("/clients/{slug}/rotate-key", response_model=ClientKeyOut, responses=errors(401, 403, 404, 422, 503))
async def rotate_key(slug: Slug, res: Res, _: Admin) -> ClientKeyOut:
    res.db()
    try:
        key = await res.clients.rotate(slug)
    except ClientError as exc:
        raise ApiError(404, str(exc)) from None
    return ClientKeyOut(slug=slug, api_key=key)


@router.put("/clients/{slug}/credentials/{name}", status_code=204, responses=errors(401, 403, 404, 422, 503))
async def set_credential(slug: Slug, name: str, body: CredentialIn, res: Res, _: Admin) -> Response:
    """Store a credential: a secret (masked wherever a run shows it) unless `"secret": false`.

    Node code of the client's runs reads it as `context[name]`, typed as stored, and as the
    environment variable `name`.
    """
    if not await res.clients.exists(slug):
        raise ApiError(404, f"client '{slug}' not found")
    try:
        await res.clients.set_credential(slug, name, body.value, body.secret)
    except ClientError as exc:
        raise ApiError(422, str(exc)) from None
    return Response(status_code=204)


@router.get("/clients/{slug}/credentials", responses=errors(401, 403, 422, 503))
async def credential_names(slug: Slug, res: Res, _: Admin) -> dict[str, Any]:
    # Names and kinds only: a stored credential's value is never returned.
    kinds = await res.clients.credential_kinds(slug)
    return {
        "items": list(kinds),
        "count": len(kinds),
        "credentials": [{"name": name, "secret": secret} for name, secret in kinds.items()],
    }


@router.delete("/clients/{slug}/credentials/{name}", status_code=204, responses=errors(401, 403, 404, 422, 503))
async def delete_credential(slug: Slug, name: CredentialName, res: Res, _: Admin) -> Response:
    if not await res.clients.delete_credential(slug, name):
        raise ApiError(404, f"credential '{name}' of client '{slug}' not found")
    return Response(status_code=204)
