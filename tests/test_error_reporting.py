"""Error reporting through the official Sentry SDK, against a local HTTP endpoint standing in for
Sentry's ingest (the SDK posts envelopes to whatever DSN it is given)."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import sentry_sdk
from redis.asyncio import Redis

from api.app import create_app
from shared.clients import ClientStore, Vault
from shared.reporting import active_sentry
from shared.settings import Settings
from shared.streams import Keys
from tests.support import (
    ADMIN_KEY,
    ROOT,
    SECRETS_KEY,
    create_workflow,
    enqueue,
    kill9,
    linear,
    start_worker_process,
    wait_terminal,
)

pytestmark = pytest.mark.timeout(60)

SECRET = "hunter2-very-secret"
MARKER = "context-marker-7781"


class Ingest:
    """Sentry's envelope endpoint: keeps every item it is sent, decoded."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.items: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        ingest = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the standard library's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                encoding = (self.headers.get("content-encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":
                    import brotli  # type: ignore[import-not-found]

                    body = brotli.decompress(body)
                ingest.receive(body)
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, envelope: bytes) -> None:
        # An envelope: a header line, then (item header line, payload line) pairs.
        lines = envelope.split(b"\n")
        with self.lock:
            self.raw.append(envelope)
            for header, item in zip(lines[1::2], lines[2::2], strict=False):
                if orjson.loads(header).get("type") == "event" and item.strip():
                    self.items.append(orjson.loads(item))

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.server.server_address[1]}/1"

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [item for item in self.items if predicate(item)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching event among {len(self.items)}")
            await asyncio.sleep(0.05)


@pytest.fixture
def ingest() -> Iterator[Ingest]:
    server = Ingest()
    yield server
    server.server.shutdown()
    server.server.server_close()


async def test_a_failed_execution_reaches_sentry_tagged_and_without_secrets(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, ingest: Ingest, tmp_path: Path
) -> None:
    clients = ClientStore(redis, pool, Keys.from_settings(settings), Vault(SECRETS_KEY))
    await clients.create("acme", "Acme")
    await clients.set_credential("acme", "db_password", SECRET)
    code = "context['copy'] = context['db_password']\nraise ValueError('cannot log in with ' + context['db_password'])"
    wf = await create_workflow(redis, settings, pool, linear("context['x'] = 1", code))
    env = {"SENTRY_DSN": ingest.dsn, "NOVA_SECRETS_KEY": SECRETS_KEY}
    proc = start_worker_process(settings, tmp_path / "worker.log", **env)
    try:
        task = await enqueue(redis, settings, wf, context={"note": MARKER}, client="acme")
        await wait_terminal(redis, settings, [task.task_id])
        event = await ingest.wait_for(lambda e: e.get("tags", {}).get("task_id") == task.task_id)
    finally:
        kill9(proc)
    tags = event["tags"]
    assert tags["client"] == "acme" and tags["execution_id"] == str(task.execution_id)
    assert tags["node_id"] == "a2" and tags["workflow_id"] == str(wf.id) and tags["component"] == "worker"
    assert event["fingerprint"] == ["nova-execution", str(wf.id), "a2", "failed"]
    message = orjson.dumps(event.get("message") or event.get("logentry")).decode()
    assert "ValueError" in message and "***" in message
    everything = b"".join(ingest.raw)
    at = everything.find(SECRET.encode())
    assert at < 0, everything[max(0, at - 1500) : at + 300]
    assert SECRET.encode() not in everything and MARKER.encode() not in everything


@pytest.fixture
async def reporting_api(settings: Settings, ingest: Ingest) -> AsyncIterator[httpx.AsyncClient]:
    # The dead man's switch checks often and holds back only a second (not a visibility timeout) before it
    # may call workers missing: the alert the test waits for comes in a second or two, not after 15 s.
    watch = {"alert_check_interval": 0.2, "visibility_timeout": 1.0}
    app = create_app(settings.model_copy(update={"sentry_dsn": ingest.dsn, **watch}))
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()
    try:
        async with app.router.lifespan_context(app):
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://nova", headers=headers) as client:
                yield client
    finally:
        # The SDK is process-wide: the rest of the suite runs without it.
        sentry_sdk.get_client().flush(timeout=2)
        sentry_sdk.init()
        # Its asyncio integration wrapped the loop's task factory, and the loop is the whole session's:
        # later tests' tasks would run wrapped (and a task cancelled before it starts warns that its
        # coroutine was never awaited).
        loop.set_task_factory(factory)


async def test_an_unhandled_api_error_reaches_sentry_without_the_key(
    reporting_api: httpx.AsyncClient, pool: asyncpg.Pool, ingest: Ingest
) -> None:
    # A schema broken under the API (an operator's mistake): an error no handler expects.
    await pool.execute("DROP TABLE executions CASCADE")
    response = await reporting_api.get("/executions")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal"
    sentry_sdk.get_client().flush(timeout=5)
    event = await ingest.wait_for(lambda e: e.get("tags", {}).get("component") == "api" and "exception" in e)
    assert any(v["type"] == "UndefinedTableError" for v in event["exception"]["values"])
    # No worker runs here: the API's dead man's switch reports that too.
    alert = await ingest.wait_for(lambda e: e.get("tags", {}).get("alert") == "no_live_worker")
    assert alert["level"] == "fatal" and alert["fingerprint"] == ["nova-alert", "no_live_worker"]
    everything = b"".join(ingest.raw)
    assert ADMIN_KEY.encode() not in everything


def test_a_worker_without_sentry_dsn_never_loads_the_sdk() -> None:
    # The SDK with its FastAPI integration was about 27 MB of every worker's memory, reporting or not.
    code = (
        "import sys\n"
        "import consumer.worker, consumer.webhooks, consumer.projector, shared.webhooks\n"
        "from shared.reporting import active_sentry, init_reporting\n"
        "from shared.settings import Settings\n"
        "assert not init_reporting(Settings(sentry_dsn=''), 'worker') and active_sentry() is None\n"
        "print(sorted(m for m in ('sentry_sdk', 'fastapi', 'starlette') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_sentry_client_without_a_dsn_does_not_count_as_reporting() -> None:
    # Active as the SDK sees it (the reporting_api fixture resets it so), yet it sends nothing: the webhook
    # fan-out would otherwise read every event for no one in the rest of the process.
    sentry_sdk.init()
    assert sentry_sdk.get_client().is_active() and active_sentry() is None
