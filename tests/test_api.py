"""The HTTP contract: shapes clients rely on, the pipeline behind them, and one error shape."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api import fast_paths, heap
from api.app import create_app
from cli.embedded import PostgresServer, RedisServer
from cli.faultproxy import FaultProxy
from shared.connections import CPacking, PromptWrites, create_redis
from shared.db import migrate_url
from shared.settings import Settings
from shared.streams import EventType, Keys, Lane
from tests.support import (
    ADMIN_KEY,
    BRANCHING,
    in_process_worker,
    linear,
    make_settings,
    wait_for_events,
    wait_projected,
    wait_terminal,
)


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], (fragment, body)
    return body["error"]


async def create(api: httpx.AsyncClient, definition: dict[str, Any], name: str = "Invoice Processing V3") -> int:
    response = await api.post("/workflows", json={"name": name, "description": "test", "definition": definition})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


async def add_clients(api: httpx.AsyncClient, *slugs: str) -> None:
    """Executing as a client needs the client to exist."""
    for slug in slugs:
        response = await api.post("/clients", json={"slug": slug, "name": slug.title()})
        assert response.status_code == 201, response.text


async def test_workflow_create_list_get(api: httpx.AsyncClient) -> None:
    response = await api.post("/workflows", json={"name": "Triage", "definition": BRANCHING})
    assert response.status_code == 201
    created = response.json()
    assert isinstance(created["id"], int) and created["name"] == "Triage"
    assert created["graph_definition"] == BRANCHING and created["warnings"] == [] and created["version"] == 1
    assert created["description"] is None and created["created_at"] == created["updated_at"]
    listed = (await api.get("/workflows")).json()
    assert listed["total"] == listed["count"] == 1 and listed["workflows"][0]["id"] == created["id"]
    stored = {k: v for k, v in created.items() if k != "warnings"}
    assert (await api.get(f"/workflows/{created['id']}")).json() == stored
    assert_error(await api.get("/workflows/999"), 404, "Workflow 999 not found")


async def test_execute_returns_202_and_task_is_pending_at_once(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    wf = await create(api, linear("pass"))
    await add_clients(api, "idom")
    response = await api.post(
        f"/workflows/{wf}/execute", json={"client_slug": "idom", "initial_context": {"invoice": "A-1"}}
    )
    assert response.status_code == 202
    body = response.json()
    assert set(body) == {
        "task_id",
        "status",
        "workflow_id",
        "workflow_name",
        "workflow_version",
        "message",
        "execution_id",
        "priority",
    }
    assert body["workflow_version"] == 1 and body["priority"] == "normal"
    assert body["status"] == "queued" and body["workflow_id"] == wf and body["workflow_name"] == "Invoice Processing V3"
    assert f"GET /tasks/{body['task_id']}" in body["message"]
    task = (await api.get(f"/tasks/{body['task_id']}")).json()
    assert task["status"] == "PENDING" and task["message"] == "Task is queued, waiting for worker"
    assert task["execution_id"] == body["execution_id"] and task["client_slug"] == "idom"
    [(_, entry)] = await redis.xrange(settings.requests_stream)
    assert entry == {
        "task_id": body["task_id"],
        "execution_id": str(body["execution_id"]),
        "workflow_id": str(wf),
        "workflow_name": "Invoice Processing V3",
        "client": "idom",
        "enqueued_at": entry["enqueued_at"],
        "payload": '{"workflow_version":1,"initial_context":{"invoice":"A-1"}}',
        "v": "1",  # the format version (shared/streams.py FORMAT_VERSION)
    }
    queued = await wait_for_events(redis, settings, lambda e: e.type == EventType.QUEUED)
    assert queued[0].task_id == body["task_id"]


async def test_idempotency_key_returns_the_same_task(api: httpx.AsyncClient, redis: Redis, settings: Settings) -> None:
    wf = await create(api, linear("pass"))
    await add_clients(api, "idom", "acme")
    body = {"client_slug": "idom", "initial_context": {}}
    first = (await api.post(f"/workflows/{wf}/execute", json=body, headers={"Idempotency-Key": "k-1"})).json()
    again = await api.post(f"/workflows/{wf}/execute", json=body, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 202 and again.json()["task_id"] == first["task_id"]
    assert "Already queued" in again.json()["message"]
    other = await api.post(
        f"/workflows/{wf}/execute", json={**body, "client_slug": "acme"}, headers={"Idempotency-Key": "k-1"}
    )
    assert other.json()["task_id"] != first["task_id"]
    assert await redis.xlen(settings.requests_stream) == 2
    # A key stands for one request: used again for another workflow or priority, it is a conflict (it
    # answered 202 for a request that never ran, naming the workflow asked for).
    wf2 = await create(api, linear("pass"), "another")
    for path, change in ((f"/workflows/{wf2}/execute", {}), (f"/workflows/{wf}/execute", {"priority": "high"})):
        conflict = await api.post(path, json={**body, **change}, headers={"Idempotency-Key": "k-1"})
        error = assert_error(conflict, 409, "Idempotency-Key 'k-1' was used for task", f"of workflow {wf}")
        assert error["details"] == {"task_id": first["task_id"], "workflow_id": wf, "priority": "normal"}
    assert await redis.xlen(settings.requests_stream) == 2
    # The same request again after the workflow's own priority changed is still the same request.
    changed = await api.put(f"/workflows/{wf}", json={"graph_definition": {**linear("pass"), "priority": "high"}})
    assert changed.status_code == 200, changed.text
    same = await api.post(f"/workflows/{wf}/execute", json=body, headers={"Idempotency-Key": "k-1"})
    assert same.status_code == 202 and same.json()["priority"] == "normal", same.text
    # The scheduler's keys are its own: a caller could otherwise fire a tick, or stop it from firing.
    reserved = await api.post(f"/workflows/{wf}/execute", json=body, headers={"Idempotency-Key": "schedule:s1:1"})
    assert_error(reserved, 422, "are the scheduler's")
    replay = await api.post(f"/workflows/{wf}/execute", json=body, headers={"Idempotency-Key": "replay:1-0"})
    assert_error(replay, 422, "replays")


async def test_task_lifecycle_shapes_and_execution_chain(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: Any
) -> None:
    wf = await create(api, BRANCHING)
    await add_clients(api, "idom")
    async with in_process_worker(settings):
        body = (
            await api.post(
                f"/workflows/{wf}/execute", json={"client_slug": "idom", "initial_context": {"items": [700, 600]}}
            )
        ).json()
        await wait_terminal(redis, settings, [body["task_id"]])
        await wait_projected(pool, [body["execution_id"]], {"completed"})
    task = (await api.get(f"/tasks/{body['task_id']}")).json()
    assert task["status"] == "SUCCESS" and task["message"] == "Task completed successfully"
    assert task["execution_id"] == body["execution_id"]
    trace = task["result"].pop("execution_trace")
    assert task["result"] == {
        "execution_id": body["execution_id"],
        "status": "success",
        "final_context": {"items": [700, 600], "total": 1300, "route": "manual"},
        "nodes_executed": 5,
        "error": None,
    }
    assert [t["node_id"] for t in trace] == ["start", "total", "big", "approve", "end"]
    execution = (await api.get(f"/executions/{body['execution_id']}")).json()
    assert execution["status"] == "completed" and execution["task_id"] == body["task_id"]
    assert execution["final_context"]["route"] == "manual" and execution["duration_ms"] >= 0
    chain = execution["chain"]
    assert [n["node_id"] for n in chain] == ["start", "total", "big", "approve", "end"]
    assert chain[2]["decision"] is True and chain[2]["next_node"] == "approve"
    assert chain[1]["input_context"] == {"items": [700, 600]} and chain[1]["output_context"]["total"] == 1300
    listed = (await api.get("/executions", params={"workflow_id": wf})).json()
    assert listed["total"] == 1 and listed["executions"][0]["id"] == body["execution_id"]


async def test_running_task_carries_meta_and_failure_carries_error(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    wf = await create(api, linear("import time\ntime.sleep(1)", "raise RuntimeError('no vendor')"))
    await add_clients(api, "idom")
    async with in_process_worker(settings):
        body = (await api.post(f"/workflows/{wf}/execute", json={"client_slug": "idom"})).json()
        await wait_for_events(redis, settings, lambda e: e.type == EventType.NODE_STARTED and e.data["node_id"] == "a1")
        running = (await api.get(f"/tasks/{body['task_id']}")).json()
        assert running["status"] == "RUNNING" and running["message"] == "Task is executing"
        meta = running["meta"]
        assert meta["execution_id"] == body["execution_id"] and meta["workflow_id"] == wf
        assert meta["workflow_name"] == "Invoice Processing V3" and meta["started_at"] and meta["current_node"] == "a1"
        await wait_terminal(redis, settings, [body["task_id"]])
    failed = (await api.get(f"/tasks/{body['task_id']}")).json()
    assert failed["status"] == "FAILURE"
    detail = failed["error_detail"]
    assert detail["node_id"] == "a2" and detail["type"] == "RuntimeError"
    assert detail["message"] == "no vendor" and "Traceback" in detail["traceback"]
    assert failed["error"] == "Node a2 failed: RuntimeError: no vendor"


async def test_retry_of_a_failure_resumes_at_the_failed_node(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: Any
) -> None:
    # Fails until the context says otherwise: the retry runs a2 again with the context it had there.
    wf = await create(api, linear("context['a1_runs'] = context.get('a1_runs', 0) + 1", "assert context.get('fixed')"))
    await add_clients(api, "idom")
    async with in_process_worker(settings):
        body = (await api.post(f"/workflows/{wf}/execute", json={"client_slug": "idom"})).json()
        await wait_terminal(redis, settings, [body["task_id"]])
        await wait_projected(pool, [body["execution_id"]], {"failed"})
        # Mend the checkpointed context the way an operator fix would, then retry.
        key = Keys.from_settings(settings).task(body["task_id"])
        import orjson

        checkpoint = orjson.loads(await redis.hget(key, "checkpoint"))
        assert checkpoint["next_node"] == "a2" and checkpoint["context"] == {"a1_runs": 1}
        checkpoint["context"]["fixed"] = True
        await redis.hset(key, "checkpoint", orjson.dumps(checkpoint).decode())
        retried = await api.post(f"/executions/{body['execution_id']}/retry")
        assert retried.status_code == 202 and retried.json()["task_id"] == body["task_id"]
        assert_error(await api.post(f"/executions/{body['execution_id']}/retry"), 409, "not FAILURE")
        done = await wait_for_events(
            redis, settings, lambda e: e.task_id == body["task_id"] and e.type == EventType.SUCCEEDED
        )
        await wait_projected(pool, [body["execution_id"]], {"completed"})
    assert done[0].data["final_context"] == {"a1_runs": 1, "fixed": True}
    steps = await pool.fetch(
        "SELECT step, node_id, status FROM node_runs WHERE execution_id = $1 ORDER BY step", body["execution_id"]
    )
    assert [(r["node_id"], r["status"]) for r in steps] == [
        ("start", "success"),
        ("a1", "success"),
        ("a2", "success"),
        ("end", "success"),
    ]


@pytest.mark.parametrize(
    ("definition", "node", "fragment"),
    [
        (
            linear("pass")
            | {
                "nodes": [
                    *linear("pass")["nodes"][:1],
                    {"id": "a1", "type": "action", "code": "pass", "next": "nope"},
                    {"id": "end", "type": "end"},
                ]
            },
            "a1",
            "'nope', which is not a node",
        ),
        ({"nodes": [{"id": "end", "type": "end"}]}, None, "no start node"),
        (
            # Issue 12: an unreachable node is only a warning now; a prompt-only AI node is refused.
            {
                "nodes": [
                    {"id": "s", "type": "start", "next": "ask"},
                    {"id": "ask", "type": "action", "executor": "cached", "prompt": "sum it", "next": "e"},
                    {"id": "e", "type": "end"},
                ]
            },
            "ask",
            "AI code generation is not available here",
        ),
        (
            # Issue 12: a loop through a decision is accepted now; one that nothing can leave is not.
            {
                "nodes": [
                    {"id": "s", "type": "start", "next": "b"},
                    {"id": "a", "type": "action", "code": "pass", "next": "c"},
                    {"id": "b", "type": "decision", "code": "True", "on_true": "a", "on_false": "e"},
                    {"id": "c", "type": "action", "code": "pass", "next": "a"},
                    {"id": "e", "type": "end"},
                ]
            },
            "a",
            "cycle",
        ),
        (
            {
                "nodes": [
                    {"id": "s", "type": "start", "next": "d"},
                    {"id": "d", "type": "decision", "code": "True", "on_true": "e"},
                    {"id": "e", "type": "end"},
                ]
            },
            "d",
            "no on_false",
        ),
        (linear("def x(:"), "a1", "does not compile"),
    ],
)
async def test_invalid_definitions_are_422_naming_the_node(
    api: httpx.AsyncClient, definition: dict[str, Any], node: str | None, fragment: str
) -> None:
    error = assert_error(await api.post("/workflows", json={"name": "bad", "definition": definition}), 422, fragment)
    if node:
        assert f"'{node}'" in error["message"] and any(p["node"] == node for p in error["details"])


async def test_bad_bodies_are_422_with_the_field_named(api: httpx.AsyncClient) -> None:
    wf = await create(api, linear("pass"))
    assert_error(await api.post(f"/workflows/{wf}/execute", json={"client_slug": "Not A Slug"}), 422, "client_slug")
    assert_error(
        await api.post(f"/workflows/{wf}/execute", json={"client_slug": "a", "initial_context": [1]}),
        422,
        "initial_context",
    )
    assert_error(
        await api.post(f"/workflows/{wf}/execute", content=b"{not json", headers={"Content-Type": "application/json"}),
        422,
    )
    assert_error(await api.post("/workflows", json={"definition": {}}), 422, "name")
    assert_error(
        await api.post("/workflows", json={"name": "x", "definition": {"nodes": "start"}}), 422, "definition.nodes"
    )
    assert_error(await api.post("/workflows/999/execute", json={"client_slug": "a"}), 404, "Workflow 999")
    assert_error(await api.get("/tasks/nope"), 404, "task nope not found")
    assert_error(await api.get("/executions/424242"), 404, "Execution 424242")
    assert_error(await api.delete("/workflows"), 405)
    assert_error(
        await api.post(
            f"/workflows/{wf}/execute", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"}
        ),
        413,
        "limit",
    )


async def test_health_ok(api: httpx.AsyncClient) -> None:
    body = (await api.get("/health")).json()
    assert body["status"] == "healthy" and body["redis"]["ok"] and body["postgres"]["ok"]
    assert body["service"] == "NOVA Streams" and body["version"]


async def test_redis_down_gives_503_never_202_and_recovers(
    redis_factory: Callable[..., RedisServer], db_url: str
) -> None:
    server = redis_factory()
    settings = make_settings(server.url, db_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://n", headers=headers
        ) as api:
            wf = await create(api, linear("pass"))
            await add_clients(api, "idom")
            server.stop()
            down = await api.post(f"/workflows/{wf}/execute", json={"client_slug": "idom"})
            assert_error(down, 503, "Redis")
            assert down.headers["Retry-After"]
            health = await api.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "degraded"
            server.start()
            up = await api.post(f"/workflows/{wf}/execute", json={"client_slug": "idom"})
            assert up.status_code == 202
    client = Redis.from_url(server.url, decode_responses=True)
    # Only the request accepted after the restart is in the stream (this Redis keeps nothing across restarts).
    assert await client.xlen(settings.requests_stream) == 1
    await client.aclose()


async def test_postgres_down_keeps_enqueue_and_task_status_working(
    redis: Redis, settings: Settings, pg_factory: Callable[..., PostgresServer]
) -> None:
    pg = pg_factory()
    await migrate_url(pg.url)
    settings = settings.model_copy(update={"database_url": pg.url})
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://n", headers=headers
        ) as api:
            wf = await create(api, linear("pass"))
            await add_clients(api, "idom")
            pg.stop()
            accepted = await api.post(f"/workflows/{wf}/execute", json={"client_slug": "idom"})
            assert accepted.status_code == 202
            assert (await api.get(f"/tasks/{accepted.json()['task_id']}")).json()["status"] == "PENDING"
            # Redis knows the execution PostgreSQL has not recorded; one neither knows cannot be answered.
            pending = (await api.get(f"/executions/{accepted.json()['execution_id']}")).json()
            assert pending["status"] == "pending" and pending["projected"] is False
            assert_error(await api.get("/executions/999"), 503, "PostgreSQL")
            # Every route that needs PostgreSQL names it (a refused connection is an OSError, which the
            # Redis outage handler took as Redis's).
            for method, path, body in (
                ("GET", "/workflows", None),
                ("PUT", f"/workflows/{wf}", {"description": "d"}),
                ("GET", "/clients", None),
                ("POST", "/clients/idom/rotate-key", None),
            ):
                assert_error(await api.request(method, path, json=body), 503, "PostgreSQL is unavailable")
            assert (await api.get("/health")).status_code == 503
            pg.start()
            assert (await api.get("/health")).status_code == 200


async def test_one_client_flooding_gets_429_while_others_are_served(db_url: str, redis_url: str) -> None:
    settings = make_settings(redis_url, db_url, client_rate=2.0, client_burst=5)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://n", headers=headers
        ) as api:
            wf = await create(api, linear("pass"))
            await add_clients(api, "flood", "calm")
            flood = [await api.post(f"/workflows/{wf}/execute", json={"client_slug": "flood"}) for _ in range(8)]
            assert [r.status_code for r in flood[:5]] == [202] * 5
            limited = flood[5]
            error = assert_error(limited, 429, "'flood'", "2 executions/s")
            assert error["code"] == "rate_limited" and int(limited.headers["Retry-After"]) >= 1
            # Another client is not slowed down by the flood.
            assert (await api.post(f"/workflows/{wf}/execute", json={"client_slug": "calm"})).status_code == 202


async def test_limits_answer_with_the_limit_named(api: httpx.AsyncClient) -> None:
    wf = await create(api, linear("pass"))
    await add_clients(api, "a")
    big_context = {"blob": "x" * (300 * 1024)}
    assert_error(
        await api.post(f"/workflows/{wf}/execute", json={"client_slug": "a", "initial_context": big_context}),
        413,
        "initial_context",
        "limit",
    )
    huge_code = linear("x = 1\n" * 20_000)
    assert_error(await api.post("/workflows", json={"name": "big", "definition": huge_code}), 422, "code")
    many = {"nodes": [{"id": f"n{i}", "type": "end"} for i in range(501)]}
    assert_error(await api.post("/workflows", json={"name": "many", "definition": many}), 422, "nodes")


async def test_a_serving_api_freezes_its_start_up_heap_and_collects_young_objects_less_often(
    settings: Settings,
) -> None:
    threshold = gc.get_threshold()
    plain = create_app(settings)
    async with plain.router.lifespan_context(plain):
        # Tests and other embedders keep the interpreter's collector as it is.
        assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold
    serving = create_app(settings, settle_heap=True)
    try:
        async with serving.router.lifespan_context(serving):
            assert gc.get_freeze_count() > 0
            assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, *threshold[1:])
            # The application itself is among what start-up made: a full collection no longer walks it.
            assert all(o is not serving for o in gc.get_objects())
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def _scope(path: str, headers: dict[str, str], query: bytes = b"") -> dict[str, Any]:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": "POST", "path": path, "query_string": query, "root_path": "", "headers": raw}


def test_the_execute_fast_path_takes_only_requests_fastapi_would_accept_as_they_are() -> None:
    plain = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    body = b'{"client_slug": "acme", "initial_context": {"a": 1}}'
    taken = fast_paths._plain(_scope("/workflows/7/execute", plain), body, 7)
    assert taken is not None and taken[:2] == (7, ADMIN_KEY)
    assert taken[2].client_slug == "acme" and taken[2].initial_context == {"a": 1} and taken[3] is None
    assert fast_paths._plain(_scope("/workflows/7/execute", plain), b"{}", 7) is not None
    refused = [
        (plain, b'{"client_slug": "acme\\n"}'),  # a slug its pattern refuses
        (plain, b'{"client_slug": "Acme"}'),
        (plain, b'{"client_slug": 5}'),
        (plain, b'{"initial_context": [1]}'),
        (plain, b'{"client_slug": "acme", "client_slug": 5}'),  # the last one counts, as for FastAPI
        (plain, b'{"other": 1}'),
        (plain, b"[]"),
        (plain, b""),
        ({**plain, "Idempotency-Key": "k" * 201}, b"{}"),
        ({"Authorization": f"Basic {ADMIN_KEY}", "Content-Type": "application/json"}, b"{}"),
        ({"Content-Type": "application/json", "Cookie": "nova_session=x"}, b"{}"),
        ({"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "text/plain"}, b"{}"),
    ]
    for headers, refused_body in refused:
        assert fast_paths._plain(_scope("/workflows/7/execute", headers), refused_body, 7) is None, headers
    assert fast_paths._plain(_scope("/workflows/7/execute", plain, b"x=1"), b"{}", 7) is None
    doubled = _scope("/workflows/7/execute", plain)
    doubled["headers"].insert(0, (b"content-type", b"text/plain"))
    assert fast_paths._plain(doubled, b"{}", 7) is None
    assert fast_paths._plain(_scope("/workflows/7/execute", plain), b"{}", 2**63) is None


async def test_execute_requests_of_one_pass_of_the_loop_share_one_redis_connection(
    api: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    """The API's script calls go as the worker's do (CommandBatcher, shared/connections.py): requests that
    reach their enqueue in the same pass of the event loop share one connection and one write."""
    wf = await create(api, linear("pass"))
    await add_clients(api, "idom")
    # Warm: the workflow's head known to the API, the script loaded, a connection open.
    assert (await api.post(f"/workflows/{wf}/execute", json={"client_slug": "idom"})).status_code == 202
    before = (await redis.info("stats"))["total_connections_received"]
    responses = await asyncio.gather(
        *(
            api.post(f"/workflows/{wf}/execute", json={"client_slug": "idom", "initial_context": {"i": i}})
            for i in range(20)
        )
    )
    # Each request got its own answer, as if it had been alone...
    assert [r.status_code for r in responses] == [202] * 20
    bodies = [r.json() for r in responses]
    assert len({b["task_id"] for b in bodies}) == len({b["execution_id"] for b in bodies}) == 20
    assert await redis.xlen(keys.requests) == 21
    # ...and all went on the connection already open: one at a time, they would have opened about 20.
    assert (await redis.info("stats"))["total_connections_received"] == before


async def test_the_execute_fast_path_answers_as_the_fastapi_route_does(api: httpx.AsyncClient) -> None:
    wf = await create(api, linear("pass"))
    await add_clients(api, "acme")
    body = {"client_slug": "acme", "initial_context": {"invoice": 1}}
    # A query string sends the same request through FastAPI's route (it has no query parameters).
    fast, routed = (
        await api.post(f"/workflows/{wf}/execute", json=body),
        await api.post(f"/workflows/{wf}/execute?via=fastapi", json=body),
    )
    assert fast.status_code == routed.status_code == 202
    assert fast.headers["content-type"] == routed.headers["content-type"]
    one, other = fast.json(), routed.json()
    assert list(one) == list(other)
    assert one["execution_id"] == other["execution_id"] - 1
    for varying in ("task_id", "execution_id", "message"):
        one.pop(varying), other.pop(varying)
    assert one == other
    # Errors come from the same handlers.
    for path, headers, status in (
        ("/workflows/999999/execute", {}, 404),
        (f"/workflows/{wf}/execute", {"Authorization": "Bearer not-a-key"}, 401),
    ):
        fast, routed = (
            await api.post(path, json=body, headers=headers),
            await api.post(f"{path}?via=fastapi", json=body, headers=headers),
        )
        assert fast.status_code == routed.status_code == status
        assert fast.json() == routed.json() and fast.headers.get("www-authenticate") == routed.headers.get(
            "www-authenticate"
        )


def test_the_task_fast_path_takes_only_requests_fastapi_would_read_as_they_are() -> None:
    assert fast_paths._TASK.match("/tasks/abc") and fast_paths._TASK.match("/tasks/abc").group(1) == "abc"
    for other in ("/tasks/abc/events", "/tasks/abc/cancel", "/tasks/", "/tasks/abc/"):
        assert fast_paths._TASK.match(other) is None, other
    bearer = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert fast_paths._headers(_scope("/tasks/abc", bearer)) == (ADMIN_KEY, None)
    for headers, query in (
        ({}, b""),
        ({"Authorization": f"bearer {ADMIN_KEY}"}, b""),  # another spelling of the scheme: FastAPI's to read
        ({"Authorization": "Bearer  "}, b""),
        ({**bearer, "Cookie": "nova_session=x"}, b""),
        (bearer, b"access_token=x"),
    ):
        assert fast_paths._headers(_scope("/tasks/abc", headers, query)) is None, (headers, query)
    doubled = _scope("/tasks/abc", bearer)
    doubled["headers"].append((b"authorization", b"Bearer other"))
    assert fast_paths._headers(doubled) is None


async def test_the_task_fast_path_answers_as_the_fastapi_route_does(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    ok = await create(api, BRANCHING)
    failing = await create(api, linear("raise RuntimeError('no vendor')"), name="Failing")
    keys = {}
    for slug in ("idom", "acme"):
        created = await api.post("/clients", json={"slug": slug, "name": slug.title()})
        keys[slug] = created.json()["api_key"]
    body = {"client_slug": "idom", "initial_context": {"items": [700, 600]}}
    pending = (await api.post(f"/workflows/{ok}/execute", json=body)).json()["task_id"]

    async def same(task_id: str, key: str = ADMIN_KEY) -> dict[str, Any]:
        # A query string sends the same request through FastAPI's route (it has no query parameters).
        headers = {"Authorization": f"Bearer {key}"}
        fast = await api.get(f"/tasks/{task_id}", headers=headers)
        routed = await api.get(f"/tasks/{task_id}?via=fastapi", headers=headers)
        assert fast.status_code == routed.status_code, (fast.text, routed.text)
        assert fast.headers["content-type"] == routed.headers["content-type"]
        assert fast.headers.get("www-authenticate") == routed.headers.get("www-authenticate")
        assert fast.json() == routed.json() and list(fast.json()) == list(routed.json())
        return dict(fast.json())

    assert (await same(pending))["status"] == "PENDING"
    assert (await same(pending, keys["idom"]))["status"] == "PENDING"
    async with in_process_worker(settings):
        done = (await api.post(f"/workflows/{ok}/execute", json=body)).json()["task_id"]
        failed = (await api.post(f"/workflows/{failing}/execute", json={"client_slug": "idom"})).json()["task_id"]
        await wait_terminal(redis, settings, [pending, done, failed])
    succeeded = await same(done)
    assert succeeded["status"] == "SUCCESS" and succeeded["result"]["final_context"]["route"] == "manual"
    assert [t["node_id"] for t in succeeded["result"]["execution_trace"]] == ["start", "total", "big", "approve", "end"]
    assert (await same(failed, keys["idom"]))["error"].endswith("no vendor")
    # Errors come from the same handlers: another client's task is unknown, a bad key is 401.
    assert (await same(done, keys["acme"]))["error"]["message"] == f"task {done} not found"
    for missing in ("nope", "0" * 32):
        assert "not found" in (await same(missing))["error"]["message"]
    assert "unknown or revoked" in (await same(done, "not-a-key"))["error"]["message"]


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "f" * 40, 2, "nova:task:a", "nova:requests", "héllo ✓", b"\x00raw", 7, -3, 0.1, 1e300, 2**70),
        ("CLIENT SETINFO", "LIB-NAME", "nova"),  # several words: redis-py splits them
        ("SET", "k", "bytes\udcffthat are not UTF-8"),  # surrogate-escaped, as the client decodes them
        ("SET", "k", Lane.HIGH),  # a str subclass
        ("SET", "k", memoryview(b"view")),
    ],
)
def test_the_apis_redis_client_packs_in_c_the_bytes_redis_py_would(settings: Settings, args: tuple[Any, ...]) -> None:
    api = create_redis(settings, prompt_writes=True).connection_pool.make_connection()
    plain = create_redis(settings).connection_pool.make_connection()
    assert isinstance(api, CPacking) and not isinstance(plain, CPacking)
    assert b"".join(api.pack_command(*args)) == b"".join(plain.pack_command(*args))
    for refused in (True, None, 1.5j):
        with pytest.raises(DataError):
            api.pack_command("SET", "k", refused)


async def test_the_apis_redis_client_writes_small_commands_promptly_and_still_times_out_a_silent_redis(
    redis_server: RedisServer, settings: Settings
) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port, seed=1, credentials=redis_server.credentials) as proxy:
        client = create_redis(
            settings.model_copy(update={"redis_url": proxy.url}),
            prompt_writes=True,
            socket_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            assert await client.set("k", "v")
            connection = await client.connection_pool.get_connection()
            assert isinstance(connection, PromptWrites)
            await client.connection_pool.release(connection)
            proxy.pause()
            # Written without wait_for, the command still fails on the read's timeout: no hang.
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(client.get("k"), 30)
            assert connection.socket_timeout == 1
        finally:
            proxy.resume()
            await client.aclose()


async def test_a_schedule_is_refused_now_for_what_its_ticks_would_be_refused(api: httpx.AsyncClient) -> None:
    """Each tick enqueues as the execute route does: a schedule it would refuse at every tick (or never
    fire) is refused when it is created, with the execute route's answer."""
    wf = await create(api, linear("pass"))
    await add_clients(api, "acme")
    base = {"cron": "*/5 * * * *", "workflow_id": wf, "client_slug": "acme"}
    for change, status, fragment in (
        ({"cron": "0 0 31 2 *"}, 422, "never fires"),
        ({"initial_context": {"n": 2**70}}, 422, "initial_context"),
        ({"initial_context": {"text": "x" * 300_000}}, 413, "the limit is"),
        ({"client_slug": "ghost"}, 404, "Client 'ghost' not found"),
        ({"workflow_id": wf + 1}, 404, "not found"),
    ):
        assert_error(await api.post("/schedules", json={**base, **change}), status, fragment)
    assert (await api.get("/schedules")).json()["count"] == 0
    created = await api.post("/schedules", json=base)
    assert created.status_code == 201 and created.json()["next_fire_at"], created.text
