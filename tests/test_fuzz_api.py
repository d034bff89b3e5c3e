"""The API fuzzed from its own OpenAPI schema: no 5xx, and every response matches its declared schema.

Examples per operation: NOVA_FUZZ_EXAMPLES, 10 by default in the suite; `NOVA_FUZZ_EXAMPLES=20` (or more)
for a longer run of this test alone:

    NOVA_FUZZ_EXAMPLES=50 pytest -q tests/test_fuzz_api.py
"""

from __future__ import annotations

import asyncio
import os
import threading

import uvicorn

from api.app import create_app
from cli.embedded import free_port
from shared.settings import Settings
from tests.support import ADMIN_KEY

EXAMPLES = int(os.environ.get("NOVA_FUZZ_EXAMPLES", "10"))


class ServerThread:
    """uvicorn in a thread with its own loop: schemathesis calls it synchronously."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            self.thread.join(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def test_api_fuzz(settings: Settings) -> None:
    # Imported here, not at collection: without a bytecode cache (PYTHONDONTWRITEBYTECODE) pytest parses
    # and rewrites hypothesis and schemathesis (plugin packages) on import, seconds of every process's start.
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from schemathesis import checks

    # What the API promises under any input: never a 5xx, and responses (status codes, bodies, content
    # types) as the schema declares them. Semantic refusals of schema-valid input (an invalid graph,
    # an unknown workflow) are the API working, so "positive data acceptance" is not among them.
    promises = [
        checks.not_a_server_error,
        checks.response_schema_conformance,
        checks.status_code_conformance,
        checks.content_type_conformance,
    ]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with ServerThread(settings) as base:
        # SSE responses never end by design: they are tested on their own.
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json").exclude(path_regex=r"/events$")
        tested = []
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @hypothesis_settings(
                max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
            )
            def fuzz(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=headers, checks=promises)

            fuzz()
            tested.append(operation.label)
    assert len(tested) >= 20, tested
