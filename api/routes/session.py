"""Sign in and out of the dashboard: a key once, then an HttpOnly session cookie (see api/sessions.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.deps import Res, authenticate
from api.errors import ApiError, unavailable
from api.schemas import SessionIn, SessionOut, errors
from api.sessions import COOKIE, CSRF_HEADER, Session
from shared.connections import REDIS_UNAVAILABLE

router = APIRouter(tags=["session"])


def _secure(request: Request) -> bool:
    # Behind a TLS-terminating proxy (Railway) the app sees http; the cookie still travels over https only.
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _out(session: Session, expires_in: int | None) -> SessionOut:
    p = session.principal
    return SessionOut(admin=p.admin, client=p.client, csrf_token=session.csrf, expires_in=expires_in)


@router.post("/session", response_model=SessionOut, responses=errors(401, 503))
async def sign_in(body: SessionIn, request: Request, response: Response, res: Res) -> SessionOut:
    """Sign in with the admin key or a client key: answers with an HttpOnly, SameSite=Strict session cookie
    (a client's session sees only its own executions) and the CSRF token its changes must carry."""
    principal = await authenticate(res, body.key.strip())
    try:
        cookie, session = await res.sessions.open(principal, body.key.strip())
    except REDIS_UNAVAILABLE:
        raise unavailable("Redis") from None
    ttl = res.settings.session_ttl
    response.set_cookie(
        COOKIE, cookie, max_age=ttl, path="/", httponly=True, samesite="strict", secure=_secure(request)
    )
    response.headers["Cache-Control"] = "no-store"
    return _out(session, ttl)


@router.get("/session", response_model=SessionOut, responses=errors(401, 503))
async def current_session(request: Request, response: Response, res: Res) -> SessionOut:
    """Who this browser's session cookie signs in, and its CSRF token (401 when it has none or it ended)."""
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        raise ApiError(401, "not signed in: POST /session with a key")
    admin = res.settings.admin_key.get_secret_value() if res.settings.admin_key else None
    try:
        session = await res.sessions.get(cookie, admin)
        left = await res.sessions.remaining(cookie) if session else None
    except REDIS_UNAVAILABLE:
        raise unavailable("Redis") from None
    if session is None:
        raise ApiError(401, "the session has expired or was signed out: sign in again (POST /session)")
    response.headers["Cache-Control"] = "no-store"
    return _out(session, left)


@router.delete("/session", status_code=204, responses=errors(403, 503))
async def sign_out(request: Request, res: Res) -> Response:
    """Sign out: the session ends on the server, and the cookie is cleared. Needs the CSRF token while the
    session is live (a page of another site must not sign a user out)."""
    cookie = request.cookies.get(COOKIE)
    if cookie:
        admin = res.settings.admin_key.get_secret_value() if res.settings.admin_key else None
        try:
            session = await res.sessions.get(cookie, admin)
            if session is not None:
                if not session.csrf_matches(request.headers.get(CSRF_HEADER)):
                    raise ApiError(403, f"signing out needs the session's {CSRF_HEADER}")
                await res.sessions.close(cookie)
        except REDIS_UNAVAILABLE:
            raise unavailable("Redis") from None
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request))
    return response
