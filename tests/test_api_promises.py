"""Delivery promises of the API under hostile input: bounded SSE replay and connections, 4xx (never a
5xx) for pathological bodies and ids, a header size limit, and the query-string token only on SSE."""

from __future__ import annotations

import httpx
from redis.asyncio import Redis

from shared.settings import Settings
from shared.streams import Keys
from tests.conftest import ADMIN_KEY
from tests.support import linear
from tests.test_api import assert_error, create


def nested(depth: int) -> str:
    """A JSON value `depth` objects deep: {"a":{"a":...{}...}}."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


async def execute_raw(api: httpx.AsyncClient, workflow_id: int, context_json: str) -> httpx.Response:
    body = '{"client_slug":"acme","initial_context":' + context_json + "}"
    return await api.post(
        f"/workflows/{workflow_id}/execute", content=body.encode(), headers={"Content-Type": "application/json"}
    )


async def test_deeply_nested_context_is_refused_with_422(api: httpx.AsyncClient) -> None:
    wf = await create(api, linear("pass"))
    for depth in (300, 5000):
        error = assert_error(await execute_raw(api, wf, nested(depth)), 422, "nest", "limit of 64")
        assert error["code"] == "invalid"
    # Within the limit (the body's own object is one level): accepted.
    assert (await execute_raw(api, wf, nested(63))).status_code == 202


async def test_lone_surrogate_in_context_is_refused_with_422(api: httpx.AsyncClient) -> None:
    wf = await create(api, linear("pass"))
    for text in ('{"k":"\\ud800"}', '{"\\udfff":1}'):
        error = assert_error(await execute_raw(api, wf, text), 422, "not valid JSON")
        assert error["code"] == "invalid"
    # A proper surrogate pair is a character like any other.
    assert (await execute_raw(api, wf, '{"k":"\\ud83d\\ude00"}')).status_code == 202


async def test_integer_beyond_64_bits_in_context_is_refused_with_422(api: httpx.AsyncClient) -> None:
    wf = await create(api, linear("pass"))
    error = assert_error(await execute_raw(api, wf, '{"n":' + str(2**64) + "}"), 422, "initial_context", "64-bit")
    assert error["code"] == "invalid"


async def test_task_ids_outside_the_issued_format_are_not_found(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    wf = await create(api, linear("pass"))
    task_id = (await api.post(f"/workflows/{wf}/execute", json={"client_slug": "acme"})).json()["task_id"]
    keys = Keys.from_settings(settings)
    # The task's event list lives at "<task key>:events": an id ending in ":events" must never reach Redis.
    assert await redis.type(keys.task_events(task_id)) == "list"
    for path in (f"/tasks/{task_id}:events", f"/tasks/{task_id}:events/events"):
        assert_error(await api.get(path), 404, "not found")
    assert (await api.get(f"/tasks/{task_id}")).status_code == 200


async def test_access_token_query_is_refused_off_the_sse_routes(anonymous: httpx.AsyncClient) -> None:
    token = {"access_token": ADMIN_KEY}
    for path in ("/workflows", "/executions", "/tasks/" + "0" * 32):
        error = assert_error(await anonymous.get(path, params=token), 401, "Authorization")
        assert error["code"] == "unauthorized"
    # On the SSE routes the token still authenticates (an unknown task: 404, not 401).
    assert_error(await anonymous.get("/tasks/" + "0" * 32 + "/events", params=token), 404, "not found")
