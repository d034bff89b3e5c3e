"""The dashboard's sign-in (session cookie, CSRF token), its Content-Security-Policy, its graph library
route and the graph route, through the API (no browser; tests/test_dashboard.py drives one)."""

from __future__ import annotations

import re
from collections.abc import Callable

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from redis.asyncio import Redis

from api import vendor
from api.app import create_app
from api.sessions import COOKIE
from cli.embedded import RedisServer
from shared.clients import hash_key
from shared.settings import Settings
from tests.support import ADMIN_KEY, BRANCHING, create_workflow, enqueue, linear, make_settings

HTML = {"Accept": "text/html"}


def _cookie(response: httpx.Response) -> str:
    header = response.headers["set-cookie"]
    match = re.match(rf"{COOKIE}=([^;]+)", header)
    assert match, header
    return match.group(1)


async def _sign_in(client: httpx.AsyncClient, key: str) -> tuple[dict[str, str], str]:
    """(the Cookie header of a new session, its CSRF token)."""
    response = await client.post("/session", json={"key": key})
    assert response.status_code == 200, response.text
    client.cookies.clear()  # each test sends the cookie it means to, by hand
    return {"Cookie": f"{COOKIE}={_cookie(response)}"}, response.json()["csrf_token"]


async def _client_key(api: httpx.AsyncClient, slug: str) -> str:
    response = await api.post("/clients", json={"slug": slug, "name": slug})
    assert response.status_code == 201, response.text
    return str(response.json()["api_key"])


async def test_sign_in_sets_an_httponly_strict_cookie_that_stands_for_the_key(
    anonymous: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    response = await anonymous.post("/session", json={"key": ADMIN_KEY})
    assert response.status_code == 200
    anonymous.cookies.clear()
    header = response.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in header.split(";")}
    assert {"httponly", "path", "max-age"} <= attributes
    assert "samesite=strict" in header.lower()
    assert "secure" not in attributes  # plain http here; over https (or behind a TLS proxy) it is set
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["admin"] is True and body["client"] is None and len(body["csrf_token"]) >= 32
    cookie = _cookie(response)
    assert ADMIN_KEY not in cookie
    # Redis holds the session under the cookie's digest, with the key's digest, never the key or the cookie.
    names = [name async for name in redis.scan_iter(f"{settings.key_prefix}:session:*")]
    assert names == [f"{settings.key_prefix}:session:{hash_key(cookie)}"]
    stored = await redis.get(names[0])
    assert ADMIN_KEY not in stored and cookie not in stored
    assert 0 < await redis.ttl(names[0]) <= settings.session_ttl

    jar = {"Cookie": f"{COOKIE}={cookie}"}
    assert (await anonymous.get("/inspect", headers=jar)).status_code == 200
    again = await anonymous.get("/session", headers=jar)
    assert again.status_code == 200 and again.json()["csrf_token"] == body["csrf_token"]
    assert 0 < again.json()["expires_in"] <= settings.session_ttl
    # Without the cookie, nothing: the page has no key of its own.
    assert (await anonymous.get("/inspect")).status_code == 401
    assert (await anonymous.get("/session")).status_code == 401


async def test_behind_a_tls_proxy_the_cookie_is_secure(anonymous: httpx.AsyncClient) -> None:
    response = await anonymous.post("/session", json={"key": ADMIN_KEY}, headers={"X-Forwarded-Proto": "https"})
    attributes = {part.strip().lower() for part in response.headers["set-cookie"].split(";")}
    assert "secure" in attributes and "httponly" in attributes


async def test_a_bad_key_gets_no_session(anonymous: httpx.AsyncClient) -> None:
    wrong = await anonymous.post("/session", json={"key": "not-a-key"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    assert (await anonymous.post("/session", json={})).status_code == 422
    forged = await anonymous.get("/inspect", headers={"Cookie": f"{COOKIE}=made-up"})
    assert forged.status_code == 401 and "sign in again" in forged.json()["error"]["message"]


async def test_a_client_session_sees_only_its_own_executions(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    acme_key = await _client_key(api, "acme")
    await _client_key(api, "other")
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    mine = await enqueue(redis, settings, wf, client="acme")
    theirs = await enqueue(redis, settings, wf, client="other")
    jar, _ = await _sign_in(anonymous, acme_key)
    me = await anonymous.get("/session", headers=jar)
    assert me.json()["admin"] is False and me.json()["client"] == "acme"
    assert (await anonymous.get(f"/executions/{mine.execution_id}", headers=jar)).status_code == 200
    assert (await anonymous.get(f"/executions/{theirs.execution_id}", headers=jar)).status_code == 404
    assert (await anonymous.get(f"/tasks/{theirs.task_id}", headers=jar)).status_code == 404
    assert (await anonymous.get(f"/tasks/{theirs.task_id}/events", headers=jar)).status_code == 404
    # Operators' routes stay operators'.
    assert (await anonymous.get("/inspect", headers=jar)).status_code == 403


async def test_changes_made_with_the_cookie_need_the_csrf_token(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    task = await enqueue(redis, settings, wf)
    jar, csrf = await _sign_in(anonymous, ADMIN_KEY)
    path = f"/executions/{task.execution_id}/cancel"
    missing = await anonymous.post(path, headers=jar)
    assert missing.status_code == 403 and "X-CSRF-Token" in missing.json()["error"]["message"]
    wrong = await anonymous.post(path, headers={**jar, "X-CSRF-Token": csrf[:-1] + ("A" if csrf[-1] != "A" else "B")})
    assert wrong.status_code == 403
    # Refused before anything happened: the run is still queued.
    assert (await api.get(f"/tasks/{task.task_id}")).json()["status"] == "PENDING"
    done = await anonymous.post(path, headers={**jar, "X-CSRF-Token": csrf})
    assert done.status_code == 200 and done.json()["cancelled"] is True
    # Another session's token is not this one's.
    _, other_csrf = await _sign_in(anonymous, ADMIN_KEY)
    assert other_csrf != csrf
    crossed = await anonymous.post(f"/workflows/{wf.id}/execute", json={}, headers={**jar, "X-CSRF-Token": other_csrf})
    assert crossed.status_code == 403
    # A Bearer key needs no token: no browser sends it by itself.
    assert (await api.post(f"/workflows/{wf.id}/execute", json={})).status_code == 202


async def test_sign_out_ends_the_session_on_the_server(anonymous: httpx.AsyncClient) -> None:
    jar, csrf = await _sign_in(anonymous, ADMIN_KEY)
    assert (await anonymous.delete("/session", headers=jar)).status_code == 403
    out = await anonymous.delete("/session", headers={**jar, "X-CSRF-Token": csrf})
    assert out.status_code == 204
    anonymous.cookies.clear()
    cleared = out.headers["set-cookie"]
    assert cleared.startswith(f'{COOKIE}=""') and "Max-Age=0" in cleared
    # The old cookie is dead, even if a browser kept it.
    assert (await anonymous.get("/session", headers=jar)).status_code == 401
    assert (await anonymous.get("/executions", headers=jar)).status_code == 401
    # Signing out twice, or without a session, is harmless.
    assert (await anonymous.delete("/session", headers=jar)).status_code == 204


async def test_a_rotated_client_key_ends_the_sessions_opened_with_it(
    api: httpx.AsyncClient, anonymous: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    key = await _client_key(api, "acme")
    jar, _ = await _sign_in(anonymous, key)
    assert (await anonymous.get("/executions", headers=jar)).status_code == 200
    assert (await api.post("/clients/acme/rotate-key")).status_code == 200
    assert (await anonymous.get("/executions", headers=jar)).status_code == 401
    assert [name async for name in redis.scan_iter(f"{settings.key_prefix}:session:*")] == []


async def test_a_changed_admin_key_ends_admin_sessions(settings: Settings) -> None:
    jar: dict[str, str] = {}
    for admin_key, expected in ((ADMIN_KEY, 200), ("a-new-admin-key", 401)):
        app = create_app(settings.model_copy(update={"admin_key": SecretStr(admin_key)}))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://n") as client,
        ):
            if not jar:
                jar, _ = await _sign_in(client, ADMIN_KEY)
            assert (await client.get("/inspect", headers=jar)).status_code == expected


async def test_signing_in_with_redis_down_is_503(redis_factory: Callable[..., RedisServer], db_url: str) -> None:
    server = redis_factory()
    app = create_app(make_settings(server.url, db_url))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://n") as client,
    ):
        jar, _ = await _sign_in(client, ADMIN_KEY)
        server.stop()
        assert (await client.post("/session", json={"key": ADMIN_KEY})).status_code == 503
        down = await client.get("/session", headers=jar)
        assert down.status_code == 503 and "Redis" in down.json()["error"]["message"]
        server.start()
        # This Redis keeps nothing across a restart: the session is gone, and says so.
        assert (await client.get("/session", headers=jar)).status_code == 401


async def test_the_dashboard_page_has_a_strict_csp_and_no_key_in_script(anonymous: httpx.AsyncClient) -> None:
    page = await anonymous.get("/", headers=HTML)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    # Inline script or style would be refused by that policy: everything is in our static files.
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == [] and "<style" not in html and " style=" not in html
    script = await anonymous.get("/dashboard/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "localStorage" not in script.text and "access_token" not in script.text and "?key=" not in script.text
    assert "X-CSRF-Token" in script.text
    revalidated = await anonymous.get("/dashboard/app.js", headers={"If-None-Match": script.headers["etag"]})
    assert revalidated.status_code == 304
    assert (await anonymous.get("/dashboard/app.css")).status_code == 200
    assert (await anonymous.get("/dashboard/secrets.txt")).status_code == 404
    # NOVA's scripts still get its JSON greeting.
    assert (await anonymous.get("/")).json()["status"] == "healthy"


async def test_the_graph_library_is_served_from_the_installed_package(anonymous: httpx.AsyncClient) -> None:
    vis = vendor.find_vis_network()
    assert vis is not None, "pyvis (a dependency) is not installed"
    html = (await anonymous.get("/", headers=HTML)).text
    assert f'src="{vis.base}/vis-network.min.js"' in html
    script = await anonymous.get(f"{vis.base}/vis-network.min.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert script.content == vis.script.read_bytes()
    css = await anonymous.get(f"{vis.base}/vis-network.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert (await anonymous.get("/vendor/vis-network/0.0.1/vis-network.min.js")).status_code == 404
    assert (await anonymous.get(f"{vis.base}/../../../etc/passwd")).status_code == 404


async def test_a_missing_graph_library_is_named_plainly(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vendor, "find_vis_network", lambda: None)
    app: FastAPI = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://n") as client:
        html = (await client.get("/", headers=HTML)).text
        src = re.search(r'src="(/vendor/vis-network/[^"]+)"', html)
        assert src is not None
        missing = await client.get(src.group(1))
    assert missing.status_code == 503 and "pip install 'pyvis" in missing.json()["error"]["message"]


async def test_the_graph_route_gives_nodes_and_labelled_branches(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, BRANCHING)
    graph = (await api.get(f"/workflows/{wf.id}/graph")).json()
    assert graph["version"] == 1 and [n["id"] for n in graph["nodes"]][:2] == ["start", "total"]
    edges = {(e["from"], e["to"]): e["label"] for e in graph["edges"]}
    assert edges[("big", "approve")] == "true" and edges[("big", "auto")] == "false"
    assert edges[("start", "total")] is None and len(edges) == 6
    # NOVA's labelled edges, a loop among them.
    looping = {
        "nodes": [
            {"id": "start", "type": "start"},
            {"id": "fetch", "type": "action", "code": "context['n'] = context.get('n', 0) + 1"},
            {"id": "more", "type": "decision", "code": "context['n'] < 3", "on_true": "fetch", "on_false": "end"},
            {"id": "end", "type": "end"},
        ],
        "edges": [{"from": "start", "to": "fetch"}, {"from": "fetch", "to": "more"}],
    }
    loop = await create_workflow(redis, settings, pool, looping)
    edges = {(e["from"], e["to"]): e["label"] for e in (await api.get(f"/workflows/{loop.id}/graph")).json()["edges"]}
    assert edges == {
        ("start", "fetch"): None,
        ("fetch", "more"): None,
        ("more", "fetch"): "true",
        ("more", "end"): "false",
    }
    assert (await api.get(f"/workflows/{wf.id}/graph?version=9")).status_code == 404
    assert (await api.get("/workflows/999999/graph")).status_code == 404
