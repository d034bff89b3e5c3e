"""NOVA's clients against our API: the routes, bodies, field names and statuses NOVA's scripts use
(see the README's "Moving from NOVA's Celery setup"), with our additions beside them. Workflows here
are written in NOVA's format (edges with "true"/"false" conditions, a whole fixture file as the graph)."""

from __future__ import annotations

import itertools
import logging
import re
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from api.app import create_app
from api.routes import workflows
from cli.embedded import PostgresServer
from shared.catalog import WorkflowCatalog
from shared.clients import ClientStore, Vault
from shared.db import migrate, migrations
from shared.executions import NO_CLIENT
from shared.settings import Settings
from shared.streams import EventType, Keys
from tests.support import SECRETS_KEY, in_process_worker, wait_for_events, wait_projected, wait_terminal
from tests.test_api import add_clients, assert_error
from tests.test_projector import drain

# A NOVA fixture file as its loader scripts send it: the whole file is the graph_definition.
FIXTURE: dict[str, Any] = {
    "name": "Invoice totals",
    "description": "Sums the lines, then routes big invoices to review",
    "version": "1.0",
    "model": "gpt-4o-mini",
    "initial_context": {"lines": [1, 2]},
    "nodes": [
        {"id": "start", "type": "start"},
        {"id": "total", "type": "action", "code": "context['total'] = sum(context['lines'])", "executor": "local"},
        {"id": "big", "type": "decision", "code": "context['total'] > 100"},
        {"id": "review", "type": "action", "code": "context['route'] = 'review'"},
        {"id": "auto", "type": "action", "code": "context['route'] = 'auto'"},
        {"id": "end", "type": "end"},
    ],
    "edges": [
        {"from": "start", "to": "total"},
        {"from": "total", "to": "big"},
        {"from": "big", "to": "review", "condition": "true"},
        {"from": "big", "to": "auto", "condition": "false"},
        {"from": "review", "to": "end"},
        {"from": "auto", "to": "end"},
    ],
}


def graph(*codes: str) -> dict[str, Any]:
    """start -> one action per code -> end, in NOVA's edge form."""
    ids = ["start", *(f"a{i}" for i in range(1, len(codes) + 1)), "end"]
    nodes: list[dict[str, Any]] = [{"id": "start", "type": "start"}]
    nodes += [{"id": f"a{i}", "type": "action", "code": c} for i, c in enumerate(codes, 1)]
    nodes.append({"id": "end", "type": "end"})
    return {"nodes": nodes, "edges": [{"from": a, "to": b} for a, b in itertools.pairwise(ids)]}


async def post_workflow(api: httpx.AsyncClient, name: str, definition: dict[str, Any]) -> dict[str, Any]:
    response = await api.post("/workflows", json={"name": name, "graph_definition": definition})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def execute(api: httpx.AsyncClient, workflow_id: int, **body: Any) -> dict[str, Any]:
    response = await api.post(f"/workflows/{workflow_id}/execute", json=body)
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


# ---- workflows ------------------------------------------------------------------------------------


async def test_a_whole_fixture_file_is_a_graph_definition_and_is_kept_as_sent(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/workflows",
        json={"name": FIXTURE["name"], "description": FIXTURE["description"], "graph_definition": FIXTURE},
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["graph_definition"] == FIXTURE and created["warnings"] == []
    assert created["name"] == "Invoice totals" and created["description"] == FIXTURE["description"]
    read = (await api.get(f"/workflows/{created['id']}")).json()
    assert read["graph_definition"] == FIXTURE
    assert read["created_at"] and read["updated_at"] == read["created_at"] and read["version"] == 1
    # NOVA's schema errors are still 422: no graph, or not an object.
    assert_error(await api.post("/workflows", json={"name": "x"}), 422, "graph_definition")
    assert_error(await api.post("/workflows", json={"name": "x", "graph_definition": [1]}), 422, "graph_definition")


async def test_list_has_nova_shape_with_skip_limit_and_total(api: httpx.AsyncClient) -> None:
    ids = [(await post_workflow(api, f"w{i}", graph("pass")))["id"] for i in range(3)]
    page = (await api.get("/workflows", params={"skip": 1, "limit": 1})).json()
    assert page["total"] == 3 and page["count"] == 1 and [w["id"] for w in page["workflows"]] == ids[1:2]
    assert set(page["workflows"][0]) >= {"id", "name", "description", "graph_definition", "created_at", "updated_at"}
    past = (await api.get("/workflows", params={"skip": 10})).json()
    assert past == {"workflows": [], "total": 3, "count": 0}
    # Our earlier name for skip still works.
    assert [w["id"] for w in (await api.get("/workflows", params={"offset": 2})).json()["workflows"]] == ids[2:]


async def test_names_are_unique_among_live_workflows(api: httpx.AsyncClient) -> None:
    first = await post_workflow(api, "Invoice totals", graph("pass"))
    error = assert_error(
        await api.post("/workflows", json={"name": "Invoice totals", "graph_definition": graph("pass")}),
        409,
        "Workflow 'Invoice totals' already exists",
    )
    assert error["details"] == {"existing_id": first["id"]}
    other = await post_workflow(api, "Other", graph("pass"))
    renamed = await api.put(f"/workflows/{other['id']}", json={"name": "Invoice totals"})
    assert_error(renamed, 409, "already exists")
    # Once deleted, its name is free again.
    assert (await api.delete(f"/workflows/{first['id']}")).status_code == 200
    assert (await api.put(f"/workflows/{other['id']}", json={"name": "Invoice totals"})).status_code == 200


async def test_put_stores_a_new_version_and_keeps_what_it_leaves_out(api: httpx.AsyncClient) -> None:
    created = await post_workflow(api, "Totals", graph("context['v'] = 1"))
    updated = await api.put(f"/workflows/{created['id']}", json={"graph_definition": FIXTURE, "description": "v2"})
    assert updated.status_code == 200, updated.text
    body = updated.json()
    assert body["version"] == 2 and body["graph_definition"] == FIXTURE and body["description"] == "v2"
    assert body["name"] == "Totals" and body["created_at"] == created["created_at"]
    assert body["updated_at"] > created["updated_at"] and body["warnings"] == []
    assert (await api.get(f"/workflows/{created['id']}")).json() == {k: v for k, v in body.items() if k != "warnings"}
    # Nothing to change: no new version.
    assert (await api.put(f"/workflows/{created['id']}", json={})).json()["version"] == 2
    # `definition` is the same field as graph_definition; an invalid graph is refused naming its node.
    bad = {"nodes": [{"id": "start", "type": "start", "next": "gone"}, {"id": "end", "type": "end"}]}
    assert_error(await api.put(f"/workflows/{created['id']}", json={"definition": bad}), 422, "'gone'")
    assert_error(await api.put("/workflows/999", json={"name": "x"}), 404, "Workflow 999 not found")


async def test_an_execution_runs_the_version_it_was_queued_with(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = (await post_workflow(api, "Versioned", graph("context['ran'] = 'v1'")))["id"]
    first = await execute(api, wf)
    assert first["workflow_version"] == 1
    # Updated while the first execution waits in the queue (no worker yet).
    await api.put(f"/workflows/{wf}", json={"graph_definition": graph("context['ran'] = 'v2'")})
    second = await execute(api, wf)
    assert second["workflow_version"] == 2
    async with in_process_worker(settings):
        done = await wait_terminal(redis, settings, [first["task_id"], second["task_id"]])
        await wait_projected(pool, [first["execution_id"], second["execution_id"]], {"completed"})
    assert done[first["task_id"]].data["final_context"] == {"ran": "v1"}
    assert done[second["task_id"]].data["final_context"] == {"ran": "v2"}
    for accepted, version in ((first, 1), (second, 2)):
        record = (await api.get(f"/executions/{accepted['execution_id']}")).json()
        assert record["workflow_version"] == version and record["projected"] is True
        # The chain shows the code of the version that ran.
        chain = (await api.get(f"/executions/{accepted['execution_id']}/chain")).json()
        assert chain["entries"][1]["code_executed"] == f"context['ran'] = 'v{version}'"


async def test_a_worker_reads_a_version_only_postgresql_has(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, keys: Keys
) -> None:
    wf = (await post_workflow(api, "Cold", graph("context['ran'] = 'v1'")))["id"]
    accepted = await execute(api, wf)
    await api.put(f"/workflows/{wf}", json={"graph_definition": graph("context['ran'] = 'v2'")})
    # As after a Redis flush of the copies: PostgreSQL is the record of every version.
    await redis.delete(keys.workflow(wf), keys.workflow_version(wf, 1), keys.workflow_version(wf, 2))
    async with in_process_worker(settings):
        done = await wait_terminal(redis, settings, [accepted["task_id"]])
    assert done[accepted["task_id"]].data["final_context"] == {"ran": "v1"}


async def test_delete_refuses_while_executions_are_queued_then_hides_the_workflow(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = (await post_workflow(api, "Doomed", graph("context['x'] = 1")))["id"]
    queued = await execute(api, wf)
    # Queued and not yet in PostgreSQL (no projector ran): Redis tells.
    error = assert_error(await api.delete(f"/workflows/{wf}"), 409, "queued or running")
    assert error["details"] == {"active_executions": 1}
    # Queued and projected as pending: PostgreSQL tells.
    await drain(redis, settings, pool)
    assert await pool.fetchval("SELECT status FROM executions WHERE id = $1", queued["execution_id"]) == "pending"
    assert_error(await api.delete(f"/workflows/{wf}"), 409, "queued or running")
    # The refusals left the workflow executable.
    second = await execute(api, wf)
    async with in_process_worker(settings):
        await wait_terminal(redis, settings, [queued["task_id"], second["task_id"]])
        await wait_projected(pool, [queued["execution_id"], second["execution_id"]], {"completed"})
    deleted = await api.delete(f"/workflows/{wf}")
    assert deleted.status_code == 200 and deleted.json() == {"message": f"Workflow {wf} deleted successfully"}
    assert_error(await api.get(f"/workflows/{wf}"), 404, f"Workflow {wf} not found")
    assert_error(await api.delete(f"/workflows/{wf}"), 404, f"Workflow {wf} not found")
    assert_error(await api.post(f"/workflows/{wf}/execute", json={}), 404, f"Workflow {wf} not found")
    assert (await api.get("/workflows")).json()["total"] == 0
    # Its executions stay readable, chain of work included.
    record = (await api.get(f"/executions/{queued['execution_id']}")).json()
    assert record["status"] == "completed" and record["result"] == {"x": 1}
    assert (await api.get(f"/executions/{queued['execution_id']}/chain")).json()["total"] == 3
    assert (await api.get("/executions", params={"workflow_id": wf})).json()["total"] == 2


async def test_a_delete_between_reading_the_workflow_and_enqueueing_refuses_the_execution(
    api: httpx.AsyncClient, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    wf = (await post_workflow(api, "Racing", graph("context['x'] = 1")))["id"]
    real_enqueue = workflows.enqueue_execution

    async def deleted_first(*args: Any, **kwargs: Any) -> Any:
        # Another replica's DELETE lands after the route built its request, before the enqueue.
        monkeypatch.setattr(workflows, "enqueue_execution", real_enqueue)
        assert (await api.delete(f"/workflows/{wf}")).status_code == 200
        return await real_enqueue(*args, **kwargs)

    monkeypatch.setattr(workflows, "enqueue_execution", deleted_first)
    assert_error(await api.post(f"/workflows/{wf}/execute", json={}), 404, f"Workflow {wf} not found")
    assert await redis.xlen(keys.requests) == 0


async def test_an_execute_gives_up_with_a_503_while_the_workflow_keeps_changing(
    api: httpx.AsyncClient, redis: Redis, keys: Keys, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    wf = (await post_workflow(api, "Churning", graph("context['x'] = 1")))["id"]
    real_enqueue = workflows.enqueue_execution
    other_replica = WorkflowCatalog(redis, pool, keys)
    tries = 0

    async def updated_first(*args: Any, **kwargs: Any) -> Any:
        # Another replica stores a new version between each read of the head and its enqueue.
        nonlocal tries
        tries += 1
        await other_replica.update(wf, description=f"v{tries + 1}")
        return await real_enqueue(*args, **kwargs)

    monkeypatch.setattr(workflows, "enqueue_execution", updated_first)
    refused = await api.post(f"/workflows/{wf}/execute", json={})
    assert_error(refused, 503, "kept changing")
    assert refused.headers["retry-after"] == "1" and tries == workflows.ENQUEUE_TRIES
    assert await redis.xlen(keys.requests) == 0


async def test_an_execute_follows_an_update_made_by_another_replica(
    api: httpx.AsyncClient, redis: Redis, keys: Keys, pool: asyncpg.Pool
) -> None:
    wf = (await post_workflow(api, "Shared", graph("context['ran'] = 'v1'")))["id"]
    assert (await execute(api, wf))["workflow_version"] == 1
    # This process remembers version 1; another replica stores version 2.
    await WorkflowCatalog(redis, pool, keys).update(wf, definition=graph("context['ran'] = 'v2'"))
    accepted = await execute(api, wf)
    assert accepted["workflow_version"] == 2
    [*_, (_, request)] = await redis.xrange(keys.requests)
    assert request["task_id"] == accepted["task_id"] and '"workflow_version":2' in request["payload"]


async def test_a_deleted_workflows_failure_is_not_retried(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = (await post_workflow(api, "Fails", graph("raise ValueError('bad')")))["id"]
    accepted = await execute(api, wf)
    async with in_process_worker(settings):
        await wait_terminal(redis, settings, [accepted["task_id"]])
        await wait_projected(pool, [accepted["execution_id"]], {"failed"})
    assert (await api.delete(f"/workflows/{wf}")).status_code == 200
    assert_error(await api.post(f"/executions/{accepted['execution_id']}/retry"), 409, "deleted")


# ---- execute ---------------------------------------------------------------------------------------


async def test_execute_as_nova_did_client_slug_optional_and_null_context(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    wf = (await post_workflow(api, "Plain", graph("pass")))["id"]
    # The admin key without client_slug runs with no client's credentials, as NOVA did.
    accepted = await execute(api, wf, initial_context=None)
    task = (await api.get(f"/tasks/{accepted['task_id']}")).json()
    assert task["client_slug"] == NO_CLIENT
    [queued] = await wait_for_events(redis, settings, lambda e: e.type == EventType.QUEUED)
    assert queued.data["initial_context"] == {} and queued.data["workflow_version"] == 1
    # A named client must exist.
    assert_error(
        await api.post(f"/workflows/{wf}/execute", json={"client_slug": "ghost"}), 404, "Client 'ghost' not found"
    )
    await add_clients(api, "idom")
    assert (await execute(api, wf, client_slug="idom"))["status"] == "queued"


async def test_a_client_known_to_postgresql_only_can_execute(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool, keys: Keys
) -> None:
    # Created with the CLI (no API call to remember it), or Redis lost its copy.
    await ClientStore(redis, pool, keys, Vault(SECRETS_KEY)).create("cli-made", "CLI")
    await redis.delete(keys.clients)
    wf = (await post_workflow(api, "Plain", graph("pass")))["id"]
    assert (await execute(api, wf, client_slug="cli-made"))["status"] == "queued"
    assert await redis.sismember(keys.clients, "cli-made")


# ---- executions ------------------------------------------------------------------------------------


async def test_executions_list_in_nova_shape_with_nova_statuses_and_filters(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    ok = (await post_workflow(api, "Ok", graph("pass")))["id"]
    bad = (await post_workflow(api, "Bad", graph("1 / 0")))["id"]
    runs = [await execute(api, ok), await execute(api, ok), await execute(api, bad)]
    async with in_process_worker(settings):
        await wait_terminal(redis, settings, [r["task_id"] for r in runs])
        await wait_projected(pool, [r["execution_id"] for r in runs], {"completed", "failed"})
    listed = (await api.get("/executions")).json()
    assert listed["total"] == 3 and [e["id"] for e in listed["executions"]] == [r["execution_id"] for r in runs][::-1]
    assert [e["status"] for e in listed["executions"]] == ["failed", "completed", "completed"]
    failed = listed["executions"][0]
    assert failed["error"] == "Node a1 failed: ZeroDivisionError: division by zero"
    assert failed["completed_at"] == failed["finished_at"] and failed["created_at"] == failed["enqueued_at"]
    page = (await api.get("/executions", params={"status": "completed", "skip": 1, "limit": 1})).json()
    assert page["total"] == 2 and [e["id"] for e in page["executions"]] == [runs[0]["execution_id"]]
    # The earlier words still filter, and mean the same.
    assert (await api.get("/executions", params={"status": "success"})).json()["total"] == 2
    assert (await api.get("/executions", params={"status": "failed", "workflow_id": bad})).json()["total"] == 1
    assert (await api.get("/executions", params={"status": "pending"})).json()["total"] == 0
    assert_error(await api.get("/executions", params={"status": "done"}), 422, "status")


async def test_execution_record_has_nova_fields_beside_ours(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = (await post_workflow(api, "Fails", graph("context['a'] = 1", "raise ValueError('no vendor')")))["id"]
    accepted = await execute(api, wf, initial_context={"id": "INV-7"})
    async with in_process_worker(settings):
        await wait_terminal(redis, settings, [accepted["task_id"]])
        await wait_projected(pool, [accepted["execution_id"]], {"failed"})
    record = (await api.get(f"/executions/{accepted['execution_id']}")).json()
    assert record["status"] == "failed" and record["workflow_id"] == wf
    assert record["result"] == record["final_context"] == {"id": "INV-7", "a": 1}
    assert record["error"] == "Node a2 failed: ValueError: no vendor"
    assert record["error_detail"]["type"] == "ValueError" and record["error_detail"]["node_id"] == "a2"
    assert record["created_at"] and record["started_at"] and record["completed_at"]


async def test_an_execution_is_read_from_redis_until_postgresql_has_it(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = (await post_workflow(api, "Fresh", graph("context['x'] = 1")))["id"]
    accepted = await execute(api, wf, initial_context={"n": 1})
    # The moment the execute call returned: queued, nothing projected.
    pending = (await api.get(f"/executions/{accepted['execution_id']}")).json()
    assert pending["status"] == "pending" and pending["projected"] is False
    assert pending["initial_context"] == {"n": 1} and pending["workflow_version"] == 1 and pending["chain"] == []
    # Finished, still not projected (the worker runs without its projector).
    async with in_process_worker(settings, run_projector=False):
        await wait_terminal(redis, settings, [accepted["task_id"]])
    done = (await api.get(f"/executions/{accepted['execution_id']}")).json()
    assert done["status"] == "completed" and done["projected"] is False
    assert done["result"] == {"n": 1, "x": 1} and done["completed_at"]
    assert [run["node_id"] for run in done["chain"]] == ["start", "a1", "end"]
    chain = (await api.get(f"/executions/{accepted['execution_id']}/chain")).json()
    assert [e["node_id"] for e in chain["entries"]] == ["start", "a1", "end"]
    # The projector catches up: the same execution, now from PostgreSQL.
    await drain(redis, settings, pool)
    projected = (await api.get(f"/executions/{accepted['execution_id']}")).json()
    assert projected["projected"] is True and projected["result"] == done["result"]
    # Another client's execution is as missing from Redis as from PostgreSQL.
    key = await ClientStore(redis, pool, Keys.from_settings(settings), Vault(SECRETS_KEY)).create("globex", "G")
    accepted_again = await execute(api, wf)
    other = await api.get(f"/executions/{accepted_again['execution_id']}", headers={"Authorization": f"Bearer {key}"})
    assert_error(other, 404, "not found")


async def test_chain_has_nova_entries(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = (await post_workflow(api, FIXTURE["name"], FIXTURE))["id"]
    accepted = await execute(api, wf, initial_context={"lines": [70, 60]})
    async with in_process_worker(settings):
        await wait_terminal(redis, settings, [accepted["task_id"]])
        await wait_projected(pool, [accepted["execution_id"]], {"completed"})
    chain = (await api.get(f"/executions/{accepted['execution_id']}/chain")).json()
    assert chain["execution_id"] == accepted["execution_id"] and chain["total"] == 5
    entries = chain["entries"]
    assert [(e["node_id"], e["node_type"], e["status"]) for e in entries] == [
        ("start", "start", "success"),
        ("total", "action", "success"),
        ("big", "decision", "success"),
        ("review", "action", "success"),
        ("end", "end", "success"),
    ]
    total, big = entries[1], entries[2]
    assert total["code_executed"] == "context['total'] = sum(context['lines'])" and entries[0]["code_executed"] is None
    assert total["input_context"] == {"lines": [70, 60]} and total["output_result"]["total"] == 130
    assert isinstance(total["execution_time"], float) and total["error_message"] is None
    assert total["ai_metadata"]["_execution_metadata"]["exit_code"] == 0
    assert big["decision_result"] == "true" and big["path_taken"] == "review"
    assert total["decision_result"] is None and total["path_taken"] is None
    assert all(e["timestamp"] and e["steps"] == [] for e in entries)
    assert_error(await api.get("/executions/999/chain"), 404, "Execution 999 not found")


async def test_chain_marks_the_failed_node_as_nova_did(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = (await post_workflow(api, "Fails", graph("raise ValueError('no vendor')")))["id"]
    accepted = await execute(api, wf)
    async with in_process_worker(settings):
        await wait_terminal(redis, settings, [accepted["task_id"]])
        await wait_projected(pool, [accepted["execution_id"]], {"failed"})
    entries = (await api.get(f"/executions/{accepted['execution_id']}/chain")).json()["entries"]
    assert [(e["node_id"], e["status"]) for e in entries] == [("start", "success"), ("a1", "failed")]
    assert entries[1]["error_message"] == "ValueError: no vendor"
    assert entries[1]["ai_metadata"]["_execution_metadata"]["exit_code"] == 1


# ---- tasks -----------------------------------------------------------------------------------------


async def test_finished_tasks_answer_as_nova_clients_read_them(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    ok = (await post_workflow(api, FIXTURE["name"], FIXTURE))["id"]
    bad = (await post_workflow(api, "Bad", graph("context['a'] = 1", "1 / 0")))["id"]
    good, failing = await execute(api, ok, initial_context={"lines": [1]}), await execute(api, bad)
    async with in_process_worker(settings, run_projector=False):
        await wait_terminal(redis, settings, [good["task_id"], failing["task_id"]])
    success = (await api.get(f"/tasks/{good['task_id']}")).json()
    result = success["result"]
    assert success["status"] == "SUCCESS" and result["status"] == "success" and result["error"] is None
    assert result["execution_id"] == good["execution_id"] == success["execution_id"]
    assert result["final_context"] == {"lines": [1], "total": 1, "route": "auto"}
    trace = result["execution_trace"]
    assert [t["node_id"] for t in trace] == ["start", "total", "big", "auto", "end"]
    assert trace[2]["decision_result"] == "false" and trace[2]["path_taken"] == "auto"
    assert trace[1]["code_executed"] == FIXTURE["nodes"][1]["code"] and trace[1]["output_result"]["total"] == 1
    # A failed workflow is FAILURE (NOVA said SUCCESS), with what NOVA's clients check filled in.
    failure = (await api.get(f"/tasks/{failing['task_id']}")).json()
    assert failure["status"] == "FAILURE" and failure["message"] == "Task failed"
    assert failure["error"] == "Node a2 failed: ZeroDivisionError: division by zero"
    assert failure["error_detail"]["node_id"] == "a2"
    assert failure["result"]["status"] == "failed" and failure["result"]["error"] == failure["error"]
    assert failure["result"]["final_context"] == {"a": 1}
    assert [t["status"] for t in failure["result"]["execution_trace"]] == ["success", "success", "failed"]


# ---- middleware: request ids, CORS, errors ------------------------------------------------------


async def test_every_response_carries_a_request_id(api: httpx.AsyncClient, anonymous: httpx.AsyncClient) -> None:
    given = await api.get("/workflows", headers={"X-Request-ID": "nova-client-42"})
    assert given.headers["x-request-id"] == "nova-client-42"
    made = await api.get("/workflows")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    # Refusals from every layer: auth, validation, the body limit, an unknown route; and an id that
    # could forge a header or a log line is replaced.
    for response in (
        await anonymous.get("/workflows"),
        await api.get("/workflows", params={"limit": 0}),
        await api.post("/workflows", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"}),
        await api.get("/nowhere"),
        await api.get("/health", headers={"X-Request-ID": "bad id;x"}),
    ):
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"]), response.status_code


async def test_log_records_of_a_request_carry_its_id(
    api: httpx.AsyncClient, redis: Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    wf = (await post_workflow(api, "Plain", graph("pass")))["id"]
    # Makes the execute path log a warning (the id sequence is raised again from PostgreSQL).
    await redis.delete(keys.execution_seq)
    with caplog.at_level(logging.WARNING):
        response = await api.post(f"/workflows/{wf}/execute", json={}, headers={"X-Request-ID": "trace-me"})
    assert response.status_code == 202
    [record] = [r for r in caplog.records if "sequence" in r.getMessage()]
    assert record.request_id == "trace-me"  # type: ignore[attr-defined]


async def test_an_unexpected_error_is_a_500_in_our_shape_with_the_request_id(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(WorkflowCatalog, "list", broken)
    response = await api.get("/workflows", headers={"X-Request-ID": "bug-1"})
    error = assert_error(response, 500, "bug-1")
    assert error["code"] == "internal" and error["details"] == {"request_id": "bug-1"}
    assert response.headers["x-request-id"] == "bug-1"
    assert any(r.exc_info and r.request_id == "bug-1" for r in caplog.records)  # type: ignore[attr-defined]


async def _with_app(settings: Settings) -> tuple[FastAPI, httpx.AsyncClient]:
    app = create_app(settings)
    return app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nova")


async def test_cors_allows_the_configured_origins_only(settings: Settings) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    configured = settings.model_copy(update={"cors_origins": "https://dash.example, http://localhost:5173"})
    app, http = await _with_app(configured)
    async with app.router.lifespan_context(app), http:
        allowed = await http.options("/workflows", headers={"Origin": "https://dash.example", **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://dash.example"
        assert allowed.headers["access-control-max-age"] == "600"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        assert allowed.headers["x-request-id"]
        simple = await http.get("/health", headers={"Origin": "http://localhost:5173"})
        assert simple.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
        other = await http.options("/workflows", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
    # Not configured (the default): no CORS headers at all.
    app, http = await _with_app(settings)
    async with app.router.lifespan_context(app), http:
        plain = await http.get("/health", headers={"Origin": "https://dash.example"})
        assert "access-control-allow-origin" not in plain.headers


async def test_root_answers_nova_scripts_with_json_and_browsers_with_the_dashboard(
    anonymous: httpx.AsyncClient,
) -> None:
    as_script = await anonymous.get("/", headers={"Accept": "*/*"})
    assert as_script.json()["status"] == "healthy" and as_script.json()["docs"] == "/docs"
    as_browser = await anonymous.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert as_browser.headers["content-type"].startswith("text/html")
    health = (await anonymous.get("/health")).json()
    assert health["status"] == "healthy" and health["service"] and health["version"]


# ---- migration -------------------------------------------------------------------------------------


async def test_migration_keeps_duplicate_names_readable_and_rewrites_statuses(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await asyncpg.connect(pg_server.admin_url)
    try:
        await conn.execute("DROP DATABASE IF EXISTS nova_before_0003")
        await conn.execute("CREATE DATABASE nova_before_0003")
    finally:
        await conn.close()
    conn = await asyncpg.connect(pg_server.url_for("nova_before_0003", admin=True))
    try:
        # The schema as it stood before versions, with what it allowed then.
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in migrations():
            if m.version < 3:
                await conn.execute(m.sql)
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", m.version, m.name)
        await conn.execute(
            """INSERT INTO workflows (name, definition) VALUES ('Same', '{}'), ('Same', '{}'), ('Other', '{}');
               INSERT INTO clients (slug, name) VALUES ('acme', 'Acme');"""
        )
        for i, status in enumerate(("queued", "success", "failure", "dead"), 1):
            await conn.execute(
                """INSERT INTO executions (id, task_id, workflow_id, client_slug, status, last_event_ms,
                   last_event_seq) VALUES ($1, $2, 1, 'acme', $3, 0, 0)""",
                i,
                f"t{i}",
                status,
            )
        with caplog.at_level(logging.WARNING, logger="shared.db"):
            assert await migrate(conn) == [m.version for m in migrations() if m.version >= 3]
        names = await conn.fetch("SELECT id, name, version FROM workflows ORDER BY id")
        assert [(r["id"], r["name"], r["version"]) for r in names] == [
            (1, "Same", 1),
            (2, "Same #2", 1),
            (3, "Other", 1),
        ]
        assert await conn.fetchval("SELECT count(*) FROM workflow_versions") == 3
        statuses = await conn.fetch("SELECT status, workflow_version FROM executions ORDER BY id")
        assert [(r["status"], r["workflow_version"]) for r in statuses] == [
            ("pending", 1),
            ("completed", 1),
            ("failed", 1),
            ("dead", 1),
        ]
        assert any('renamed from "Same" to "Same #2"' in r.getMessage() for r in caplog.records)
    finally:
        await conn.close()
        conn = await asyncpg.connect(pg_server.admin_url)
        await conn.execute("DROP DATABASE IF EXISTS nova_before_0003 WITH (FORCE)")
        await conn.close()
