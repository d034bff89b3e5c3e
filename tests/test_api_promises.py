"""Delivery promises of the API under hostile input: bounded SSE replay and connections, 4xx (never a
5xx) for pathological bodies and ids, a header size limit, and the query-string token only on SSE."""

from __future__ import annotations

import httpx

from tests.conftest import ADMIN_KEY
from tests.test_api import assert_error


async def test_access_token_query_is_refused_off_the_sse_routes(anonymous: httpx.AsyncClient) -> None:
    token = {"access_token": ADMIN_KEY}
    for path in ("/workflows", "/executions", "/tasks/" + "0" * 32):
        error = assert_error(await anonymous.get(path, params=token), 401, "Authorization")
        assert error["code"] == "unauthorized"
    # On the SSE routes the token still authenticates (an unknown task: 404, not 401).
    assert_error(await anonymous.get("/tasks/" + "0" * 32 + "/events", params=token), 404, "not found")
