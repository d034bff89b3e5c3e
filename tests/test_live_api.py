"""The API over real HTTP (uvicorn on a free port): SSE, metrics, inspection, isolation between clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import orjson
import pytest
import uvicorn
from redis.asyncio import Redis

from api.app import create_app
from cli.embedded import free_port
from shared.clients import ClientStore, Vault
from shared.settings import Settings
from shared.streams import Keys
from tests.support import (
    ADMIN_KEY,
    SECRETS_KEY,
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    sse_events,
    wait_projected,
    wait_terminal,
)


@dataclass
class Live:
    base: str
    admin: dict[str, str]


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[Live]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.01)
    yield Live(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {ADMIN_KEY}"})
    server.should_exit = True
    await asyncio.wait_for(task, 15)


async def read_sse(response: httpx.Response, limit: int = 1000) -> list[dict[str, str]]:
    """Parse an SSE body into events (id, event, data); comments (keep-alives) are skipped."""
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if current:
                events.append(current)
                current = {}
                if len(events) >= limit:
                    break
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        current[field] = value.removeprefix(" ")
    return events


async def test_task_sse_replays_follows_and_resumes(
    live: Live, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("import time\ntime.sleep(0.3)", "context['x'] = 2"))
    task = await enqueue(redis, settings, wf)
    async with httpx.AsyncClient(base_url=live.base, headers=live.admin, timeout=30) as http:
        async with in_process_worker(settings):
            async with http.stream("GET", f"/tasks/{task.task_id}/events") as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                events = await read_sse(response)
        assert events[0]["event"] == "queued" and events[-1]["event"] == "succeeded"
        assert all(orjson.loads(e["data"])["id"] == e["id"] for e in events)
        assert orjson.loads(events[-1]["data"])["data"]["final_context"] == {"x": 2}
        # Reconnect after the third event: exactly the rest, no gap, no repeat.
        resume = {"Last-Event-ID": events[2]["id"]}
        async with http.stream("GET", f"/tasks/{task.task_id}/events", headers=resume) as response:
            rest = await read_sse(response)
        assert [e["id"] for e in rest] == [e["id"] for e in events[3:]]
        missing = await http.get("/tasks/nope/events")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_events_feed_streams_live_events(
    live: Live, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    async with httpx.AsyncClient(base_url=live.base, headers=live.admin, timeout=30) as http:
        async with http.stream("GET", "/events", params={"workflow_id": wf.id}) as response:
            async with in_process_worker(settings):
                task = await enqueue(redis, settings, wf)
                events = []
                async for event in sse_events(response):
                    events.append(event)
                    if event["event"] == "succeeded":
                        break
    assert {orjson.loads(e["data"])["task_id"] for e in events} == {task.task_id}


async def test_metrics_after_known_work(live: Live, redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    ok = await create_workflow(redis, settings, pool, linear("pass"))
    bad = await create_workflow(redis, settings, pool, linear("1 / 0"))
    async with in_process_worker(settings):
        tasks = [await enqueue(redis, settings, ok) for _ in range(3)] + [await enqueue(redis, settings, bad)]
        await wait_terminal(redis, settings, [t.task_id for t in tasks])
        await wait_projected(pool, [t.execution_id for t in tasks], {"completed", "failed"})
    await redis.xadd(settings.dead_letter_stream, {"dlq_reason": "malformed"})
    async with httpx.AsyncClient(base_url=live.base, headers=live.admin, timeout=30) as http:
        text = (await http.get("/metrics")).text
    values = _samples(text)
    assert values['nova_executions{status="completed"}'] == 3
    assert values['nova_executions{status="failed"}'] == 1
    assert values["nova_dead_letters"] == 1
    assert values['nova_stream_length{stream="nova:requests"}'] == 4
    assert values['nova_group_pending{group="nova-workers",stream="nova:requests"}'] == 0
    assert values["nova_run_duration_seconds_count" + '{outcome="succeeded"}'] == 3
    assert values["nova_run_duration_seconds_count" + '{outcome="failed"}'] == 1
    assert values["nova_enqueue_to_start_seconds_count"] == 4


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_inspect_shows_a_stuck_consumer(live: Live, redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    async with in_process_worker(settings):
        done = await enqueue(redis, settings, wf)
        await wait_terminal(redis, settings, [done.task_id])
    await enqueue(redis, settings, wf)
    await redis.xreadgroup(settings.worker_group, "stuck-host-1", {settings.requests_stream: ">"})
    await enqueue(redis, settings, wf)
    async with httpx.AsyncClient(base_url=live.base, headers=live.admin, timeout=30) as http:
        report = (await http.get("/inspect")).json()
    workers = next(
        g for g in report["groups"] if g["group"] == settings.worker_group and g["stream"] == settings.requests_stream
    )
    assert workers["pending"] == 1 and workers["lag"] == 1 and workers["oldest_pending_age_s"] >= 0
    stuck = next(c for c in report["consumers"] if c["consumer"] == "stuck-host-1")
    assert stuck["pending"] == 1 and stuck["idle_s"] >= 0
    assert report["streams"]["requests"]["length"] == 3


async def _client_key(redis: Redis, pool: asyncpg.Pool, settings: Settings, slug: str) -> dict[str, str]:
    store = ClientStore(redis, pool, Keys.from_settings(settings), Vault(SECRETS_KEY))
    return {"Authorization": f"Bearer {await store.create(slug, slug.title())}"}


async def test_clients_see_only_their_own_work(
    live: Live, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    acme = await _client_key(redis, pool, settings, "acme")
    globex = await _client_key(redis, pool, settings, "globex")
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    async with httpx.AsyncClient(base_url=live.base, timeout=30) as http, in_process_worker(settings):
        mine = await http.post(f"/workflows/{wf.id}/execute", json={"initial_context": {}}, headers=acme)
        assert mine.status_code == 202
        task_id, execution_id = mine.json()["task_id"], mine.json()["execution_id"]
        impostor = await http.post(f"/workflows/{wf.id}/execute", json={"client_slug": "acme"}, headers=globex)
        assert impostor.status_code == 403
        await wait_terminal(redis, settings, [task_id])
        await wait_projected(pool, [execution_id], {"completed"})
        assert (await http.get(f"/tasks/{task_id}", headers=acme)).json()["client_slug"] == "acme"
        for path in (f"/tasks/{task_id}", f"/executions/{execution_id}", f"/tasks/{task_id}/events"):
            other = await http.get(path, headers=globex)
            assert other.status_code == 404, path
            assert other.json()["error"]["code"] == "not_found"
        assert (await http.get("/executions", headers=globex)).json()["count"] == 0
        assert (await http.get("/executions", headers=acme)).json()["count"] == 1
        # The SSE token form for browsers is scoped the same way.
        token = globex["Authorization"].removeprefix("Bearer ")
        assert (await http.get(f"/tasks/{task_id}/events", params={"access_token": token})).status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/workflows"),
        ("POST", "/workflows"),
        ("POST", "/workflows/1/execute"),
        ("GET", "/tasks/x"),
        ("GET", "/tasks/x/events"),
        ("GET", "/events"),
        ("GET", "/executions"),
        ("GET", "/executions/1"),
        ("POST", "/executions/1/retry"),
        ("GET", "/dlq"),
        ("POST", "/dlq/1-0/replay"),
        ("DELETE", "/dlq/1-0"),
        ("GET", "/schedules"),
        ("POST", "/schedules"),
        ("GET", "/inspect"),
        ("GET", "/metrics"),
        ("GET", "/clients"),
        ("POST", "/clients"),
    ],
)
async def test_every_route_family_needs_a_valid_key(
    live: Live, redis: Redis, settings: Settings, pool: asyncpg.Pool, method: str, path: str
) -> None:
    client_key = await _client_key(redis, pool, settings, "acme")
    async with httpx.AsyncClient(base_url=live.base, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
            response = await http.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (headers, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
        admin_only = path.startswith(("/dlq", "/schedules", "/inspect", "/metrics", "/clients")) or (
            method == "POST" and path == "/workflows"
        )
        if admin_only:
            response = await http.request(method, path, headers=client_key, json={})
            assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
    assert (await httpx.AsyncClient(base_url=live.base).get("/health")).status_code == 200


async def test_credentials_never_leave_the_sandbox(
    live: Live, redis: Redis, settings: Settings, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "imap-pass-7f3a9c-never-shown"
    caplog.set_level(logging.DEBUG)
    acme = await _client_key(redis, pool, settings, "acme")
    code = "import os\ncontext['password_length'] = len(os.environ['IMAP_PASSWORD'])\nprint('logged in')"
    wf = await create_workflow(redis, settings, pool, linear(code))
    seen: list[str] = []
    async with httpx.AsyncClient(base_url=live.base, timeout=30) as http:
        put = await http.put("/clients/acme/credentials/IMAP_PASSWORD", json={"value": secret}, headers=live.admin)
        assert put.status_code == 204
        names = await http.get("/clients/acme/credentials", headers=live.admin)
        assert names.json()["items"] == ["IMAP_PASSWORD"]
        seen.append(names.text)
        async with in_process_worker(settings):
            accepted = await http.post(f"/workflows/{wf.id}/execute", json={}, headers=acme)
            body = accepted.json()
            done = await wait_terminal(redis, settings, [body["task_id"]])
            assert done[body["task_id"]].data["final_context"]["password_length"] == len(secret)
            await wait_projected(pool, [body["execution_id"]], {"completed"})
        for path in (f"/tasks/{body['task_id']}", f"/executions/{body['execution_id']}", "/clients"):
            seen.append((await http.get(path, headers=live.admin)).text)
        async with http.stream("GET", f"/tasks/{body['task_id']}/events", headers=acme) as response:
            seen.extend(e["data"] for e in await read_sse(response))
    seen.extend(str(fields) for _, fields in await redis.xrange(settings.results_stream))
    seen.append(str(await redis.hgetall(Keys.from_settings(settings).task(body["task_id"]))))
    seen.extend(str(dict(r)) for r in await pool.fetch("SELECT * FROM executions"))
    seen.extend(str(dict(r)) for r in await pool.fetch("SELECT * FROM node_runs"))
    seen.extend(str(dict(r)) for r in await pool.fetch("SELECT * FROM client_credentials"))
    seen.append(caplog.text)
    leaks = [text[:200] for text in seen if secret in text]
    assert leaks == []
    assert any("logged in" in text for text in seen)


async def test_a_flooding_client_is_capped_and_others_are_not_starved(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    capped = settings.model_copy(update={"client_max_inflight": 4})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(capped), host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.01)
    wf = await create_workflow(redis, settings, pool, linear("import time\ntime.sleep(0.3)"))
    for slug in ("flood", "calm"):
        await _client_key(redis, pool, settings, slug)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as http:
            flood = [await http.post(f"/workflows/{wf.id}/execute", json={"client_slug": "flood"}) for _ in range(20)]
            assert [r.status_code for r in flood].count(202) == 4
            refused = next(r for r in flood if r.status_code == 429)
            assert "4 executions in flight (limit 4)" in refused.json()["error"]["message"]
            calm = await http.post(f"/workflows/{wf.id}/execute", json={"client_slug": "calm"})
            assert calm.status_code == 202
            async with in_process_worker(capped, concurrency=2):
                ids = [r.json()["task_id"] for r in flood if r.status_code == 202] + [calm.json()["task_id"]]
                done = await wait_terminal(redis, settings, ids)
                # The calm client waited behind at most the flood's cap, not behind the whole flood.
                assert done[calm.json()["task_id"]].type == "succeeded"
                again = await http.post(f"/workflows/{wf.id}/execute", json={"client_slug": "flood"})
                assert again.status_code == 202
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
