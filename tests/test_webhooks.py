"""Webhooks through the real pipeline: a local HTTP receiver that checks Standard Webhooks signatures,
answers 500 for a while, stops answering, and comes back; real Redis, real workers, the API in-process."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from standardwebhooks import Webhook, WebhookVerificationError

from api.app import create_app
from api.worker_watch import WorkerWatch
from consumer.scheduler import Scheduler
from consumer.webhooks import DISPATCH_WINDOW, WebhookDelivery
from shared.alerts import check_workers
from shared.catalog import WorkflowCatalog
from shared.connections import redis_ms
from shared.schedules import ScheduleStore
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import EventType
from shared.webhooks import (
    Delivery,
    EgressPolicy,
    EgressRefused,
    RotationConflict,
    WebhookKeys,
    WebhookRegistry,
    delivery_id,
)
from tests.support import (
    ADMIN_KEY,
    SECRETS_KEY,
    create_workflow,
    enqueue,
    in_process_worker,
    kill9,
    linear,
    make_settings,
    start_worker_process,
    wait_terminal,
)

pytestmark = pytest.mark.timeout(60)

WANTED = {EventType.SUCCEEDED, EventType.FAILED, EventType.DEAD}
# Deliveries due at once for one hanging endpoint: more than the dispatcher looks at in a pass.
BACKLOG = 3000


class Receiver:
    """An HTTP server on 127.0.0.1 standing in for a customer's endpoint.

    Each path is one endpoint with its own secret; `script[path]` lists what the next requests get
    ("500", "hang" or "ok"); once it is empty they get `default[path]`.
    """

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.script: dict[str, list[str]] = defaultdict(list)
        self.default: dict[str, str] = defaultdict(lambda: "ok")
        self.requests: list[tuple[str, dict[str, str], bytes, str]] = []  # path, headers, body, answer
        self.bad_signatures: list[str] = []
        self.release = threading.Event()
        self.hanging = 0
        self.max_hanging = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                answer = receiver._answer(self.path, headers, body)
                if answer == "hang":
                    with receiver.lock:
                        receiver.hanging += 1
                        receiver.max_hanging = max(receiver.max_hanging, receiver.hanging)
                    receiver.release.wait(20)
                    with receiver.lock:
                        receiver.hanging -= 1
                code = 200 if answer == "ok" else 500
                try:
                    self.send_response(code)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting, as it should

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> str:
        with self.lock:
            secret = self.secrets.get(path)
            try:
                if secret is None:
                    raise WebhookVerificationError("unknown endpoint")
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError as exc:
                self.bad_signatures.append(f"{path}: {exc}")
                answer = "bad"
            else:
                answer = self.script[path].pop(0) if self.script[path] else self.default[path]
            self.requests.append((path, headers, body, answer))
            return answer

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def accepted(self, path: str) -> dict[str, list[bytes]]:
        """webhook-id -> bodies of the requests answered 200."""
        out: dict[str, list[bytes]] = defaultdict(list)
        with self.lock:
            for p, headers, body, answer in self.requests:
                if p == path and answer == "ok":
                    out[headers["webhook-id"]].append(body)
        return out

    def answers(self, path: str) -> Counter[str]:
        with self.lock:
            return Counter(answer for p, _, _, answer in self.requests if p == path)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.release.set()
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def overrides() -> dict[str, Any]:
    """Settings a test changes (with parametrize): the API and the workers must share them."""
    return {}


@pytest.fixture
def hook_settings(redis_url: str, db_url: str, overrides: dict[str, Any]) -> Settings:
    values: dict[str, Any] = {
        "webhook_allow": "127.0.0.1",
        "webhook_timeout": 0.3,
        "webhook_backoff": 0.05,
        "webhook_backoff_max": 0.2,
        "webhook_retry_for": 60.0,
    }
    return make_settings(redis_url, db_url, **{**values, **overrides})


@pytest.fixture
async def hook_api(hook_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(hook_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://nova", headers=headers) as client:
            yield client


async def register(api: httpx.AsyncClient, receiver: Receiver, path: str, **body: Any) -> dict[str, Any]:
    response = await api.post("/webhooks", json={"url": receiver.url(path), **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    assert created["secret"].startswith("whsec_")
    receiver.secrets[path] = created["secret"]
    return created


async def until(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll a condition the receiver's thread makes true (it has no notification to wait on)."""
    deadline = time.monotonic() + timeout
    while not (result := await condition() if asyncio.iscoroutinefunction(condition) else condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)
    return result


async def expected_ids(redis: Redis, settings: Settings, endpoint_id: str, client: str | None = None) -> dict[str, str]:
    """webhook-id -> type for every event on the results stream the endpoint subscribes to."""
    out: dict[str, str] = {}
    for entry_id, fields in await redis.xrange(settings.results_stream):
        if client is not None and fields["client"] != client:
            continue
        kind = fields["type"]
        if kind in WANTED:
            out[delivery_id(endpoint_id, entry_id)] = {
                "succeeded": "execution.succeeded",
                "failed": "execution.failed",
            }.get(kind, "execution.dead_lettered")
        elif kind == "node_finished" and orjson.loads(fields["data"])["status"] == "failure":
            out[delivery_id(endpoint_id, entry_id)] = "node.failed"
    return out


async def test_every_event_arrives_signed_through_500s_and_timeouts(
    redis: Redis, hook_settings: Settings, hook_api: httpx.AsyncClient, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    types = ["execution.succeeded", "execution.failed", "node.failed", "execution.dead_lettered"]
    endpoint = await register(hook_api, receiver, "/hook", event_types=types)
    # Three 500s, then two requests left unanswered past the timeout, then the endpoint is back.
    receiver.script["/hook"] = ["500", "500", "500", "hang", "hang"]
    good = await create_workflow(redis, hook_settings, pool, linear("context['x'] = 1"))
    bad = await create_workflow(redis, hook_settings, pool, linear("raise ValueError('boom')"))
    async with in_process_worker(hook_settings):
        tasks = [await enqueue(redis, hook_settings, good) for _ in range(3)]
        tasks += [await enqueue(redis, hook_settings, bad) for _ in range(2)]
        await wait_terminal(redis, hook_settings, [t.task_id for t in tasks])
        expected = await expected_ids(redis, hook_settings, endpoint["id"])
        assert Counter(expected.values()) == {"execution.succeeded": 3, "execution.failed": 2, "node.failed": 2}
        await until(lambda: set(receiver.accepted("/hook")) == set(expected))
    receiver.release.set()

    assert receiver.bad_signatures == []
    assert receiver.answers("/hook")["500"] == 3 and receiver.answers("/hook")["hang"] == 2
    accepted = receiver.accepted("/hook")
    for webhook_id, bodies in accepted.items():
        # A duplicate is the same delivery again: same webhook-id, same bytes.
        assert len(set(bodies)) == 1
        assert orjson.loads(bodies[0])["type"] == expected[webhook_id]
    # Nothing is left to retry, and the group keeps no pending entries that would pin trimming.
    assert await redis.zcard(WebhookKeys(hook_settings_keys(hook_settings)).due) == 0
    [group] = [g for g in await redis.xinfo_groups(hook_settings.results_stream) if g["name"] == "nova-webhooks"]
    assert group["pending"] == 0


def hook_settings_keys(settings: Settings) -> Any:
    from shared.streams import Keys

    return Keys.from_settings(settings)


@pytest.mark.parametrize("overrides", [{"webhook_retry_for": 0.3}])
async def test_a_dead_endpoint_is_dead_lettered_then_replayed(
    redis: Redis, hook_settings: Settings, hook_api: httpx.AsyncClient, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    settings = hook_settings
    endpoint = await register(hook_api, receiver, "/down", event_types=["execution.succeeded"])
    receiver.default["/down"] = "500"
    wf = await create_workflow(redis, settings, pool, linear("context['x'] = 1"))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, context={"note": "hello"})
        await wait_terminal(redis, settings, [task.task_id])

        async def dead() -> list[dict[str, Any]]:
            items = (await hook_api.get(f"/webhooks/{endpoint['id']}/deliveries")).json()["items"]
            return [i for i in items if i["state"] == "dead"]

        [parked] = await until(dead)
        assert parked["last_status"] == 500 and parked["attempts"] >= 1 and parked["last_error"] == "HTTP 500"
        assert parked["payload"]["type"] == "execution.succeeded"
        assert parked["payload"]["data"]["task_id"] == task.task_id
        [group] = [g for g in await redis.xinfo_groups(settings.results_stream) if g["name"] == "nova-webhooks"]
        assert group["pending"] == 0

        receiver.default["/down"] = "ok"
        replay = await hook_api.post(f"/webhooks/{endpoint['id']}/deliveries/{parked['id']}/replay")
        assert replay.status_code == 202
        await until(lambda: parked["id"] in receiver.accepted("/down"))
        again = await hook_api.post(f"/webhooks/{endpoint['id']}/deliveries/{parked['id']}/replay")
        assert again.status_code == 404

    async def emptied() -> bool:
        return (await hook_api.get(f"/webhooks/{endpoint['id']}/deliveries")).json()["count"] == 0

    await until(emptied)
    assert receiver.bad_signatures == []


async def test_listing_deliveries_never_returns_more_than_its_limit(
    redis: Redis, hook_settings: Settings, receiver: Receiver
) -> None:
    """With the retrying deliveries filling the limit, the dead ones were read with LRANGE 0 -1: the whole
    dead list (up to DEAD_LETTERS_KEPT) on top of a full page."""
    keys = hook_settings_keys(hook_settings)
    registry = WebhookRegistry(redis, keys, hook_settings)
    names = WebhookKeys(keys)
    endpoint = await registry.create(receiver.url("/x"), ["execution.succeeded"], None)
    for n in range(100):
        d = Delivery(delivery_id(endpoint.id, f"1-{n}"), endpoint.id, "execution.succeeded", "{}", first_at_ms=0)
        await redis.hset(names.deliveries, d.id, d.encode())
    for n in range(50):
        d = Delivery(delivery_id(endpoint.id, f"2-{n}"), endpoint.id, "execution.succeeded", "{}", first_at_ms=0)
        await redis.lpush(names.dead(endpoint.id), d.encode())
    assert len(await registry.deliveries(endpoint.id, limit=100)) == 100
    # Past the retrying ones, the page goes on with the newest dead ones, up to the limit.
    states = Counter(item["state"] for item in await registry.deliveries(endpoint.id, limit=120))
    assert states == {"retrying": 100, "dead": 20}


@pytest.mark.parametrize("overrides", [{"webhook_timeout": 0.5, "webhook_retry_for": 0.001}])
async def test_an_endpoint_deleted_during_its_last_attempt_leaves_no_dead_letters_behind(
    redis: Redis, hook_settings: Settings, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """The last attempt fails after the endpoint was deleted: its dead letter recreated the endpoint's
    dead list, which nothing lists or removes any more."""
    registry = WebhookRegistry(redis, hook_settings_keys(hook_settings), hook_settings)
    created = await registry.create(receiver.url("/gone"), ["execution.succeeded"], None)
    receiver.secrets["/gone"] = created.secret
    receiver.default["/gone"] = "hang"
    names = WebhookKeys(hook_settings_keys(hook_settings))
    wf = await create_workflow(redis, hook_settings, pool, linear("context['x'] = 1"))
    async with in_process_worker(hook_settings):
        task = await enqueue(redis, hook_settings, wf)
        await wait_terminal(redis, hook_settings, [task.task_id])
        await until(lambda: receiver.hanging == 1)
        assert await registry.delete(created.id)

        async def attempted() -> bool:  # the attempt timed out, and its delivery is gone
            return not await redis.hlen(names.deliveries)

        await until(attempted)
        receiver.release.set()
    assert not await redis.exists(names.dead(created.id))


@pytest.mark.parametrize("overrides", [{"webhook_timeout": 30.0, "webhook_endpoint_concurrency": 2}])
async def test_a_slow_endpoint_delays_neither_executions_nor_other_endpoints(
    redis: Redis, hook_settings: Settings, hook_api: httpx.AsyncClient, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    settings = hook_settings
    await register(hook_api, receiver, "/slow", event_types=["execution.succeeded"])
    fast = await register(hook_api, receiver, "/fast", event_types=["execution.succeeded"])
    receiver.default["/slow"] = "hang"
    wf = await create_workflow(redis, settings, pool, linear("context['x'] = 1"))
    async with in_process_worker(settings):
        tasks = [await enqueue(redis, settings, wf) for _ in range(5)]
        await wait_terminal(redis, settings, [t.task_id for t in tasks])
        expected = await expected_ids(redis, settings, fast["id"])
        await until(lambda: set(receiver.accepted("/fast")) == set(expected))
        # Still hanging: the slow endpoint holds only its own slots meanwhile.
        assert not receiver.release.is_set() and receiver.hanging >= 1
        # Two processes send here (the worker, and the API, which sends too): two slots each at most.
        assert receiver.max_hanging <= 4
        receiver.release.set()


async def due_deliveries(redis: Redis, names: WebhookKeys, endpoint_id: str, count: int, first_score: int) -> list[str]:
    """`count` deliveries for the endpoint written straight into the retry set, due from `first_score` on
    (ms) one after another, as an outage's backlog is."""
    ids = []
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            d = Delivery(delivery_id(endpoint_id, f"{first_score}-{n}"), endpoint_id, "execution.succeeded", "{}", 0)
            pipe.hset(names.deliveries, d.id, d.encode())
            pipe.zadd(names.due, {d.id: first_score + n})
            ids.append(d.id)
        await pipe.execute()
    return ids


@pytest.mark.parametrize("overrides", [{"webhook_timeout": 30.0, "webhook_endpoint_concurrency": 2}])
@pytest.mark.parametrize("backlog", [70, BACKLOG])
async def test_a_slow_endpoints_backlog_starves_no_other_endpoint(
    redis: Redis, hook_settings: Settings, receiver: Receiver, backlog: int
) -> None:
    """Deliveries due for a hanging endpoint (its two slots full): the dispatcher looked only at the first
    64 due, so a backlog of 70 hid every other endpoint's delivery behind it for as long as it lasted.
    With thousands, far more than one pass looks at, another endpoint's delivery due behind them, and one
    that becomes due while the backlog waits, still go out within a few passes; the backlog stays due
    (not delayed, not lost)."""
    assert BACKLOG > 4 * DISPATCH_WINDOW
    keys = hook_settings_keys(hook_settings)
    registry = WebhookRegistry(redis, keys, hook_settings)
    names = WebhookKeys(keys)
    slow = await registry.create(receiver.url("/slow"), ["execution.succeeded"], None)
    fast = await registry.create(receiver.url("/fast"), ["execution.succeeded"], None)
    receiver.secrets["/slow"], receiver.secrets["/fast"] = slow.secret, fast.secret
    receiver.default["/slow"] = "hang"
    waiting = await due_deliveries(redis, names, slow.id, backlog, first_score=0)
    [behind] = await due_deliveries(redis, names, fast.id, 1, first_score=backlog)
    stop = asyncio.Event()
    sender = WebhookDelivery(hook_settings, redis, consumer="c1")
    running = asyncio.create_task(sender.run(stop, fan_out=False))
    try:
        await until(lambda: receiver.hanging == 2)
        await until(lambda: behind in receiver.accepted("/fast"), timeout=10.0)
        # Due now, after the dispatcher has been through the backlog (and moved some of it) a while.
        [later] = await due_deliveries(redis, names, fast.id, 1, first_score=await redis_ms(redis))
        await until(lambda: later in receiver.accepted("/fast"), timeout=10.0)

        async def fast_ones_settled() -> bool:
            # The receiver has a delivery before its sender has the answer and drops its record.
            return not any(await redis.hmget(names.deliveries, [behind, later]))

        await until(fast_ones_settled, timeout=10.0)
        scores = await redis.zmscore(names.due, waiting)
        now_ms = await redis_ms(redis)  # read after them: every score the dispatcher wrote is at most this
        # Two are out (leased, due again only when the lease runs out); every other one is due now.
        assert sum(score > now_ms for score in scores) == 2
        assert await redis.hlen(names.deliveries) == backlog
    finally:
        receiver.release.set()
        stop.set()
        await running
    assert receiver.max_hanging == 2


async def test_moving_waiting_deliveries_back_undoes_no_other_process_s_work(
    redis: Redis, hook_settings: Settings
) -> None:
    """Between a pass's read of the due set and its move of the deliveries it cannot start, other
    processes go on: one completes a delivery, one leases another, one schedules a retry for later. The
    move keeps each of those, and moves only what is still due, to now."""
    names = WebhookKeys(hook_settings_keys(hook_settings))
    sender = WebhookDelivery(hook_settings, redis, consumer="c1")
    now_ms = await redis_ms(redis)
    due, done, leased, retry = (delivery_id("0123456789abcdef", f"1-{n}") for n in range(4))
    # As the pass read them: all four due.
    await redis.zadd(names.due, {due: now_ms - 40, done: now_ms - 30, leased: now_ms - 20, retry: now_ms - 10})
    # Meanwhile, elsewhere: completed, leased (out of the due range until the lease ends), failed again.
    await redis.zrem(names.due, done)
    await redis.zadd(names.due, {leased: now_ms + 90_000, retry: now_ms + 5_000}, xx=True)
    await sender._to_the_back([due, done, leased, retry], now_ms)
    assert await redis.zmscore(names.due, [due, done, leased, retry]) == [now_ms, None, now_ms + 90_000, now_ms + 5_000]


async def test_a_client_registers_endpoints_for_its_own_executions_only(
    redis: Redis, hook_settings: Settings, hook_api: httpx.AsyncClient, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    keys = {}
    for slug in ("acme", "globex"):
        created = await hook_api.post("/clients", json={"slug": slug, "name": slug.title()})
        keys[slug] = created.json()["api_key"]

    def as_client(slug: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[slug]}"}

    refused = await hook_api.post(
        "/webhooks", json={"url": receiver.url("/acme"), "client_slug": "globex"}, headers=as_client("acme")
    )
    assert refused.status_code == 403
    response = await hook_api.post("/webhooks", json={"url": receiver.url("/acme")}, headers=as_client("acme"))
    assert response.status_code == 201
    mine = response.json()
    assert mine["client_slug"] == "acme"
    receiver.secrets["/acme"] = mine["secret"]
    # The signing secret is at rest under NOVA_SECRETS_KEY, as credentials are.
    stored = await redis.hget(WebhookKeys(hook_settings_keys(hook_settings)).endpoints, mine["id"])
    assert mine["secret"] not in stored and '"secret":"sealed:' in stored

    listed = (await hook_api.get("/webhooks", headers=as_client("globex"))).json()
    assert listed["count"] == 0
    assert (await hook_api.get(f"/webhooks/{mine['id']}", headers=as_client("globex"))).status_code == 404
    assert (await hook_api.delete(f"/webhooks/{mine['id']}", headers=as_client("globex"))).status_code == 404
    assert (await hook_api.get(f"/webhooks/{mine['id']}/deliveries", headers=as_client("globex"))).status_code == 404
    assert "secret" not in (await hook_api.get("/webhooks", headers=as_client("acme"))).json()["items"][0]

    wf = await create_workflow(redis, hook_settings, pool, linear("context['x'] = 1"))
    async with in_process_worker(hook_settings):
        tasks = [await enqueue(redis, hook_settings, wf, client=c) for c in ("acme", "globex", "acme", "globex")]
        await wait_terminal(redis, hook_settings, [t.task_id for t in tasks])
        expected = await expected_ids(redis, hook_settings, mine["id"], client="acme")
        assert len(expected) == 2
        await until(lambda: set(receiver.accepted("/acme")) == set(expected))
    bodies = [orjson.loads(b[0]) for b in receiver.accepted("/acme").values()]
    assert {b["data"]["client_slug"] for b in bodies} == {"acme"}
    assert (await hook_api.delete(f"/webhooks/{mine['id']}", headers=as_client("acme"))).status_code == 204
    assert (await hook_api.get("/webhooks")).json()["count"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://[::1]/x",
        "http://10.1.2.3/x",
        "http://192.168.0.10/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://[fd00:ec2::254]/x",
        "ftp://example.com/x",
        "not a url",
    ],
)
async def test_internal_addresses_are_refused_unless_allow_listed(api: httpx.AsyncClient, url: str) -> None:
    response = await api.post("/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    assert (await api.get("/webhooks")).json()["count"] == 0


def test_the_allow_list_opens_only_what_it_names(settings: Settings) -> None:
    closed = EgressPolicy.from_settings(settings)
    opened = EgressPolicy.from_settings(settings.model_copy(update={"webhook_allow": "127.0.0.1/32, hooks.internal"}))
    loopback, private, public = (ipaddress.ip_address(a) for a in ("127.0.0.1", "10.0.0.7", "93.184.216.34"))
    assert closed.permits("example.com", public) and opened.permits("example.com", public)
    assert not closed.permits("x", loopback) and opened.permits("x", loopback)
    assert not opened.permits("x", private) and opened.permits("hooks.internal", private)


async def test_a_name_that_turns_internal_after_registration_is_not_called(
    redis: Redis, hook_settings: Settings, receiver: Receiver
) -> None:
    """The address is checked at every attempt, not only at registration (DNS may change meanwhile)."""
    registry = WebhookRegistry(redis, hook_settings_keys(hook_settings), hook_settings)
    endpoint = await registry.create(receiver.url("/x"), ["execution.succeeded"], None)
    receiver.secrets["/x"] = endpoint.secret
    names = WebhookKeys(hook_settings_keys(hook_settings))
    delivery = Delivery(delivery_id(endpoint.id, "1-1"), endpoint.id, "execution.succeeded", "{}", first_at_ms=0)
    await redis.hset(names.deliveries, delivery.id, delivery.encode())
    await redis.zadd(names.due, {delivery.id: 0})
    closed = hook_settings.model_copy(update={"webhook_allow": "", "webhook_retry_for": 3600.0 * 24 * 365 * 100})
    sender = WebhookDelivery(closed, redis, consumer="c1")
    sender._client = httpx.AsyncClient()
    try:
        assert await sender.attempt(delivery.id) == "retrying"
    finally:
        await sender._client.aclose()
    assert receiver.requests == []
    [stored] = await registry.deliveries(endpoint.id)
    assert stored["state"] == "retrying" and "NOVA_WEBHOOK_ALLOW" in stored["last_error"]
    with pytest.raises(EgressRefused):
        await EgressPolicy.from_settings(closed).resolve(receiver.url("/x"))


async def test_entries_a_crashed_process_read_are_taken_over(
    redis: Redis, hook_settings: Settings, receiver: Receiver
) -> None:
    """Read but never acknowledged (the process died between the two): another process fans them out."""
    keys = hook_settings_keys(hook_settings)
    registry = WebhookRegistry(redis, keys, hook_settings)
    endpoint = await registry.create(receiver.url("/x"), ["execution.succeeded"], None)
    fields = {
        "type": "succeeded",
        "task_id": "t1",
        "execution_id": "1",
        "workflow_id": "1",
        "client": "acme",
        "ts": "2026-01-01T00:00:00Z",
        "data": "{}",
    }
    entry_id = await redis.xadd(hook_settings.results_stream, fields)
    await redis.xreadgroup(hook_settings.webhook_group, "crashed", {hook_settings.results_stream: ">"}, count=10)
    survivor = WebhookDelivery(hook_settings, redis, consumer="survivor")
    survivor.stale_pending_ms = 0
    assert await survivor.fan_out_once(block_ms=10) == 1
    names = WebhookKeys(keys)
    assert await redis.zscore(names.due, delivery_id(endpoint.id, entry_id)) is not None
    assert (await redis.xpending(hook_settings.results_stream, hook_settings.webhook_group))["pending"] == 0
    # Read again (the group moved back, as after restoring an older snapshot): still one delivery.
    await redis.xgroup_setid(hook_settings.results_stream, hook_settings.webhook_group, "0")
    await survivor.fan_out_once(block_ms=10)
    assert await redis.hlen(names.deliveries) == 1


async def test_a_delivery_in_flight_when_its_worker_is_killed_is_sent_by_another(
    redis: Redis, hook_settings: Settings, pool: asyncpg.Pool, receiver: Receiver, tmp_path: Path
) -> None:
    # Registered without the API, which would send deliveries too: here only the worker may hold it.
    registry = WebhookRegistry(redis, hook_settings_keys(hook_settings), hook_settings)
    created = await registry.create(receiver.url("/hook"), ["execution.succeeded"], None)
    receiver.secrets["/hook"] = created.secret
    endpoint = created.as_json()
    receiver.script["/hook"] = ["hang"]
    wf = await create_workflow(redis, hook_settings, pool, linear("context['x'] = 1"))
    env = {
        "NOVA_WEBHOOK_ALLOW": "127.0.0.1",
        "NOVA_WEBHOOK_TIMEOUT": "0.6",
        "NOVA_RUN_PROJECTOR": "false",
        # The endpoint's secret is sealed with it: a worker without it cannot sign.
        "NOVA_SECRETS_KEY": SECRETS_KEY,
    }
    proc = start_worker_process(hook_settings, tmp_path / "worker.log", **env)
    try:
        task = await enqueue(redis, hook_settings, wf)
        await wait_terminal(redis, hook_settings, [task.task_id])
        await until(lambda: receiver.hanging == 1)
    finally:
        kill9(proc)
    [webhook_id] = await expected_ids(redis, hook_settings, endpoint["id"])
    names = WebhookKeys(hook_settings_keys(hook_settings))
    # Killed mid-request: the delivery is still there, never recorded as attempted.
    assert Delivery.decode(await redis.hget(names.deliveries, webhook_id)).attempts == 0
    async with in_process_worker(hook_settings, run_projector=False):
        await until(lambda: webhook_id in receiver.accepted("/hook"))
    assert receiver.bad_signatures == []


async def test_a_worker_without_the_secrets_key_does_not_send_unsigned(
    redis: Redis, hook_settings: Settings, receiver: Receiver
) -> None:
    registry = WebhookRegistry(redis, hook_settings_keys(hook_settings), hook_settings)
    endpoint = await registry.create(receiver.url("/x"), ["execution.succeeded"], None)
    names = WebhookKeys(hook_settings_keys(hook_settings))
    delivery = Delivery(delivery_id(endpoint.id, "1-1"), endpoint.id, "execution.succeeded", "{}", first_at_ms=0)
    await redis.hset(names.deliveries, delivery.id, delivery.encode())
    keyless = hook_settings.model_copy(update={"secrets_key": None, "webhook_retry_for": 3600.0 * 24 * 365 * 100})
    sender = WebhookDelivery(keyless, redis, consumer="c1")
    sender._client = httpx.AsyncClient()
    try:
        assert await sender.attempt(delivery.id) == "retrying"
    finally:
        await sender._client.aclose()
    assert receiver.requests == []
    [stored] = await registry.deliveries(endpoint.id)
    assert "NOVA_SECRETS_KEY" in stored["last_error"]


async def test_the_api_alerts_operators_when_no_worker_is_alive(
    redis: Redis, hook_settings: Settings, receiver: Receiver
) -> None:
    """The dead man's switch: raised and delivered by the API alone (no worker runs here)."""
    settings = hook_settings.model_copy(update={"alert_check_interval": 0.1})
    keys = hook_settings_keys(settings)
    registry = WebhookRegistry(redis, keys, settings)
    operators = await registry.create(receiver.url("/ops"), ["workers.unavailable"], None)
    receiver.secrets["/ops"] = operators.secret
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        [webhook_id] = await until(lambda: list(receiver.accepted("/ops")))
        # Raised once per repeat interval, however often the API checks meanwhile.
        assert await WorkerWatch(settings, redis).check_once() == []
    body = orjson.loads(receiver.accepted("/ops")[webhook_id][0])
    assert body["type"] == "workers.unavailable" and body["data"]["reason"] == "no_live_worker"
    assert receiver.bad_signatures == []


async def test_a_starting_api_waits_one_visibility_timeout_before_it_says_no_worker_is_alive(
    redis: Redis, hook_settings: Settings
) -> None:
    """A fresh install, or an API that comes up before its workers: no alert while the workers may still be
    starting; once the API has watched for one visibility timeout with none live, the alert goes out."""
    settings = hook_settings.model_copy(
        update={"visibility_timeout": 2.0, "run_webhooks": False, "key_prefix": f"fresh{uuid.uuid4().hex[:8]}"}
    )
    watch = WorkerWatch(settings, redis)
    assert await watch.check_once() == []
    await asyncio.sleep(2.0)
    assert [a.reason for a in await watch.check_once()] == ["no_live_worker"]


async def test_requests_waiting_past_the_threshold_raise_an_alert_until_a_worker_takes_them(
    redis: Redis, hook_settings: Settings, pool: asyncpg.Pool
) -> None:
    settings = hook_settings.model_copy(update={"alert_pending_age": 0.2, "run_webhooks": False})
    keys = hook_settings_keys(settings)
    wf = await create_workflow(redis, settings, pool, linear("context['x'] = 1"))
    task = await enqueue(redis, settings, wf)

    async def reasons() -> set[str]:
        return {a.reason for a in await check_workers(redis, keys, settings)}

    async def waiting() -> bool:
        return "requests_waiting" in await reasons()

    await until(waiting)
    assert "no_live_worker" in await reasons()
    async with in_process_worker(settings):
        await wait_terminal(redis, settings, [task.task_id])

        async def healthy() -> bool:
            return await reasons() == set()

        await until(healthy)


async def test_a_schedule_that_cannot_fire_is_announced_to_operators_and_its_client(
    redis: Redis, hook_settings: Settings, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    keys = hook_settings_keys(hook_settings)
    registry = WebhookRegistry(redis, keys, hook_settings)
    endpoints = {
        path: await registry.create(receiver.url(path), ["schedule.failed"], client)
        for path, client in (("/ops", None), ("/acme", "acme"), ("/globex", "globex"))
    }
    for path, endpoint in endpoints.items():
        receiver.secrets[path] = endpoint.secret
    schedule = await ScheduleStore(redis, keys).create(
        cron="* * * * * *", workflow_id=987654, client="acme", initial_context={}, name="gone"
    )
    scheduler = Scheduler(hook_settings, redis, WorkflowCatalog(redis, pool, keys), "c1")
    await scheduler.tick(now_ms=(await redis.time())[0] * 1000 + 5000)
    sender = WebhookDelivery(hook_settings, redis, consumer="c1")
    sender._client = httpx.AsyncClient(trust_env=False)
    try:
        for path in ("/ops", "/acme", "/globex"):
            for item in await registry.deliveries(endpoints[path].id):
                assert await sender.attempt(item["id"]) == "delivered"
    finally:
        await sender._client.aclose()
    assert set(receiver.accepted("/ops")) and set(receiver.accepted("/acme")) and not receiver.accepted("/globex")
    [body] = next(iter(receiver.accepted("/acme").values()))
    data = orjson.loads(body)
    assert data["type"] == "schedule.failed" and data["data"]["schedule_id"] == schedule.id
    assert data["data"]["reason"] == "workflow not found"


async def test_consumers_of_gone_processes_leave_the_group(redis: Redis, hook_settings: Settings) -> None:
    await WebhookRegistry(redis, hook_settings_keys(hook_settings), hook_settings).ensure_group()
    stream, group = hook_settings.results_stream, hook_settings.webhook_group
    first = await redis.xadd(stream, {"not": "an event"})
    await redis.xreadgroup(group, "gone", {stream: ">"}, count=1)
    await redis.xack(stream, group, first)
    await redis.xadd(stream, {"not": "an event"})
    await redis.xreadgroup(group, "busy", {stream: ">"}, count=1)  # owns a pending entry: kept
    survivor = WebhookDelivery(hook_settings, redis, consumer="survivor")
    import consumer.webhooks as module

    original = module.GONE_AFTER_MS
    module.GONE_AFTER_MS = 0
    try:
        assert await survivor.remove_gone_consumers() == ["gone"]
    finally:
        module.GONE_AFTER_MS = original
    assert {c["name"] for c in await redis.xinfo_consumers(stream, group)} == {"busy"}


async def test_a_stopping_worker_hands_its_unfinished_sends_back_at_once(
    redis: Redis, hook_settings: Settings, receiver: Receiver
) -> None:
    settings = hook_settings.model_copy(update={"webhook_timeout": 30.0})
    keys = hook_settings_keys(settings)
    registry = WebhookRegistry(redis, keys, settings)
    endpoint = await registry.create(receiver.url("/x"), ["execution.succeeded"], None)
    receiver.secrets["/x"] = endpoint.secret
    receiver.default["/x"] = "hang"
    names = WebhookKeys(keys)
    delivery = Delivery(delivery_id(endpoint.id, "1-1"), endpoint.id, "execution.succeeded", "{}", first_at_ms=0)
    await redis.hset(names.deliveries, delivery.id, delivery.encode())
    await redis.zadd(names.due, {delivery.id: 0})
    stop = asyncio.Event()
    sender = WebhookDelivery(settings, redis, consumer="c1")
    running = asyncio.create_task(sender.run(stop, fan_out=False))
    await until(lambda: receiver.hanging == 1)
    leased_until = await redis.zscore(names.due, delivery.id)
    stop.set()
    await running
    # Due now (not at the end of a 30 s request's lease), unleased, and never counted as an attempt.
    assert await redis.zscore(names.due, delivery.id) < leased_until
    assert not await redis.exists(names.lease(delivery.id))
    assert Delivery.decode(await redis.hget(names.deliveries, delivery.id)).attempts == 0


async def test_a_malformed_url_is_a_422_not_a_500(api: httpx.AsyncClient) -> None:
    """Found by the schema fuzz test: a host the URL parser rejects ended in an unbound variable."""
    response = await api.post("/webhooks", json={"url": "http://[::1/hook"})
    assert response.status_code == 422, response.text
    assert "malformed" in response.json()["error"]["message"]


async def test_registering_a_url_httpx_cannot_send_to_is_a_422(hook_api: httpx.AsyncClient, receiver: Receiver) -> None:
    """Registration checked the URL with urlsplit and DNS only: a URL httpx refuses (a control character
    in its path) was registered (201), then no attempt to it could ever be made."""
    response = await hook_api.post("/webhooks", json={"url": receiver.url("/hook\x7f")})
    assert response.status_code == 422, response.text
    assert "malformed" in response.json()["error"]["message"]


@pytest.mark.parametrize("overrides", [{"webhook_retry_for": 0.001}])
async def test_a_url_httpx_cannot_send_to_is_dead_lettered_not_retried_forever(
    redis: Redis, hook_settings: Settings, receiver: Receiver
) -> None:
    """An endpoint registered before that check: building its request raised httpx.InvalidURL, which is
    not an httpx.HTTPError, so the attempt escaped as an unexpected error, was never counted nor
    dead-lettered, and came back at every lease's end."""
    keys = hook_settings_keys(hook_settings)
    registry = WebhookRegistry(redis, keys, hook_settings)
    names = WebhookKeys(keys)
    endpoint = await registry.create(receiver.url("/hook"), ["execution.succeeded"], None)
    stored = orjson.loads(await redis.hget(names.endpoints, endpoint.id))
    await redis.hset(names.endpoints, endpoint.id, orjson.dumps({**stored, "url": receiver.url("/hook\x7f")}))
    delivery = Delivery(delivery_id(endpoint.id, "1-1"), endpoint.id, "execution.succeeded", "{}", first_at_ms=0)
    await redis.hset(names.deliveries, delivery.id, delivery.encode())
    await redis.zadd(names.due, {delivery.id: 0})
    sender = WebhookDelivery(hook_settings, redis, consumer="c1")
    sender._client = httpx.AsyncClient(trust_env=False)
    try:
        # Past its retry budget: this failed attempt dead-letters it.
        assert await sender.attempt(delivery.id) == "dead"
    finally:
        await sender._client.aclose()
    assert receiver.requests == []
    [parked] = await registry.deliveries(endpoint.id)
    assert parked["state"] == "dead" and parked["attempts"] == 1 and "malformed" in parked["last_error"]
    assert await redis.zcard(names.due) == 0


async def test_a_rotated_secret_signs_beside_the_new_one_until_its_grace_ends(
    redis: Redis, hook_settings: Settings, hook_api: httpx.AsyncClient, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    endpoint = await register(hook_api, receiver, "/rot", event_types=["execution.succeeded"])
    first = receiver.secrets["/rot"]
    wf = await create_workflow(redis, hook_settings, pool, linear("context['x'] = 1"))
    assert (await hook_api.post("/webhooks/nope/rotate-secret")).status_code == 404
    negative = await hook_api.post(f"/webhooks/{endpoint['id']}/rotate-secret", json={"grace_seconds": -1})
    assert negative.status_code == 422

    async def rotate(**body: Any) -> dict[str, Any]:
        response = await hook_api.post(f"/webhooks/{endpoint['id']}/rotate-secret", json=body)
        assert response.status_code == 200, response.text
        rotated: dict[str, Any] = response.json()
        assert rotated["secret"].startswith("whsec_")
        return rotated

    async def deliver(verify_with: str) -> list[str]:
        """One execution's delivery, checked by a receiver that knows only `verify_with`; the
        signatures it carried (the receiver refuses a delivery that none of them signs)."""
        receiver.secrets["/rot"] = verify_with
        seen = len(receiver.requests)
        task = await enqueue(redis, hook_settings, wf)
        await wait_terminal(redis, hook_settings, [task.task_id])
        await until(lambda: any(a == "ok" for _, _, _, a in receiver.requests[seen:]))
        [(_, headers, _, _)] = [r for r in receiver.requests[seen:] if r[3] == "ok"]
        return headers["webhook-signature"].split(" ")

    async with in_process_worker(hook_settings):
        second = await rotate()  # the default grace (a day)
        assert second["previous_secret_expires_at"] is not None
        assert len(await deliver(first)) == 2  # the old secret still verifies...
        assert len(await deliver(second["secret"])) == 2  # ...and so does the new one
        third = await rotate(grace_seconds=0)
        assert third["previous_secret_expires_at"] is None
        assert len(await deliver(third["secret"])) == 1  # no grace: the new secret alone
        fourth = await rotate(grace_seconds=1)
        until_ms = datetime.fromisoformat(fourth["previous_secret_expires_at"]).timestamp() * 1000

        async def grace_over() -> bool:
            seconds, micros = await redis.time()
            return seconds * 1000 + micros // 1000 > until_ms

        await until(grace_over)
        receiver.bad_signatures.clear()
        assert len(await deliver(fourth["secret"])) == 1  # the grace is over: only the new one signs
    assert receiver.bad_signatures == []
    # The previous secret rests sealed, as the current one does.
    stored = await redis.hget(WebhookKeys(hook_settings_keys(hook_settings)).previous, endpoint["id"])
    assert stored is not None and third["secret"] not in stored and "sealed:" in stored
    assert (await hook_api.delete(f"/webhooks/{endpoint['id']}")).status_code == 204
    assert await redis.hget(WebhookKeys(hook_settings_keys(hook_settings)).previous, endpoint["id"]) is None


async def test_a_rotation_racing_another_or_a_delete_writes_once_or_not_at_all(
    redis: Redis, hook_settings: Settings
) -> None:
    keys = hook_settings_keys(hook_settings)
    registry = WebhookRegistry(redis, keys, hook_settings)
    scripts = Scripts(redis, keys)
    endpoint = await registry.create("http://127.0.0.1/race", ["execution.succeeded"], None)
    raw = await redis.hget(registry.names.endpoints, endpoint.id)
    assert raw is not None

    def record(n: int) -> str:
        return orjson.dumps({**orjson.loads(raw), "description": f"rotation {n}"}).decode()

    def step(n: int) -> Any:
        return scripts.rotate_secret(
            registry.names.endpoints, registry.names.previous, endpoint_id=endpoint.id, expected=raw,
            record=record(n), previous=orjson.dumps({"secret": f"old-{n}", "until_ms": 1}).decode(),
        )  # fmt: skip

    # Six rotations that all read the same record: exactly one writes, with its own previous secret.
    written = await asyncio.gather(*(step(n) for n in range(6)))
    assert sum(written) == 1
    winner = written.index(True)
    assert await redis.hget(registry.names.endpoints, endpoint.id) == record(winner)
    assert orjson.loads(await redis.hget(registry.names.previous, endpoint.id))["secret"] == f"old-{winner}"
    # Through the registry: each caller gets a secret that signs, or a conflict, never a dead secret.
    outcomes = await asyncio.gather(
        *(registry.rotate_secret(endpoint.id, 60) for _ in range(4)), return_exceptions=True
    )
    secrets = [o.endpoint.secret for o in outcomes if not isinstance(o, BaseException) and o is not None]
    assert secrets and all(isinstance(o, RotationConflict) for o in outcomes if isinstance(o, BaseException))
    current = await registry.get(endpoint.id)
    assert current is not None and current.secret in secrets
    # A delete between the read and the write: the endpoint is not brought back.
    raw = await redis.hget(registry.names.endpoints, endpoint.id)
    await registry.delete(endpoint.id)
    assert not await step(99)
    assert await registry.get(endpoint.id) is None and await redis.hlen(registry.names.previous) == 0


@pytest.mark.parametrize("overrides", [{"shards": 3}])
async def test_every_shards_events_are_delivered_once_each(
    redis: Redis, hook_settings: Settings, hook_api: httpx.AsyncClient, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """With several shards each results stream is fanned out; entry ids repeat across streams, so a
    delivery is named by its shard too."""
    from shared.streams import Keys

    settings = hook_settings
    await register(hook_api, receiver, "/all", event_types=["execution.succeeded"])
    slugs: dict[int, str] = {}
    for i in range(1000):
        slugs.setdefault(Keys.shard_of_client(f"c{i}", 3), f"c{i}")
    wf = await create_workflow(redis, settings, pool, linear("context['x'] = 1"))
    async with in_process_worker(settings):
        tasks = [await enqueue(redis, settings, wf, client=slugs[n]) for n in range(3)]
        await wait_terminal(redis, settings, [t.task_id for t in tasks])
        await until(lambda: len(receiver.accepted("/all")) == 3)
    delivered = receiver.accepted("/all")
    assert sorted(orjson.loads(b[0])["data"]["task_id"] for b in delivered.values()) == sorted(t.task_id for t in tasks)
    assert {webhook_id.split("_")[2][:3] for webhook_id in delivered} == {"s0-", "s1-", "s2-"}
    assert receiver.bad_signatures == []


class Passes(WebhookDelivery):
    """Records how many entries each fan-out pass handled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled: list[int] = []

    async def fan_out_once(self, block_ms: int = 250, *, keys: Any = None) -> int:
        reply = await super().fan_out_once(block_ms, keys=keys)
        self.handled.append(reply)
        return reply


async def test_after_a_short_read_the_fan_out_lingers_and_takes_a_runs_next_events_in_one_pass(
    redis: Redis, hook_settings: Settings
) -> None:
    # The longest linger: the events below, 20 ms apart, all come during it even on a busy machine.
    settings = hook_settings.model_copy(update={"results_linger_ms": 1000})
    fan_out = Passes(settings, redis, consumer="c1")
    await fan_out.registry.ensure_group()
    # An endpoint (of other events): without any, the fan-out passes over the events unread.
    await fan_out.registry.create("http://127.0.0.1:9/hook", ["execution.failed"], None)
    fields = {"task_id": "t1", "execution_id": "1", "workflow_id": "1", "client": "acme", "data": "{}"}
    ts = "2026-01-01T00:00:00Z"

    async def one(type_: EventType) -> None:
        await redis.xadd(settings.results_stream, {**fields, "type": type_.value, "ts": ts})

    stop = asyncio.Event()
    task = asyncio.create_task(fan_out.run(stop))
    try:
        await one(EventType.QUEUED)
        deadline = time.monotonic() + 30
        while 1 not in fan_out.handled:
            assert time.monotonic() < deadline, fan_out.handled
            await asyncio.sleep(0.01)
        for type_ in (EventType.STARTED, EventType.NODE_STARTED, EventType.NODE_FINISHED, EventType.SUCCEEDED):
            await asyncio.sleep(0.02)  # a run's steps, each flushed on its own
            await one(type_)
        while 4 not in fan_out.handled:
            assert time.monotonic() < deadline and sum(fan_out.handled) <= 5, fan_out.handled
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert (await redis.xpending(settings.results_stream, settings.webhook_group))["pending"] == 0


async def test_a_fan_out_behind_its_stream_reads_more_at_once_and_less_again_once_it_keeps_up(
    redis: Redis, hook_settings: Settings
) -> None:
    """A full read doubles the next one (up to BATCH_GROWTH times FAN_OUT_BATCH), as the projector's: a
    fan-out behind a busy stream pays its per-read round trips for more events at once; a short read
    halves it again."""
    from consumer.webhooks import FAN_OUT_BATCH

    fan_out = WebhookDelivery(hook_settings, redis, consumer="c1")
    await fan_out.registry.ensure_group()
    await fan_out.registry.create("http://127.0.0.1:9/hook", ["execution.failed"], None)
    fields = {"task_id": "t1", "execution_id": "1", "workflow_id": "1", "client": "acme", "data": "{}"}
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(5 * FAN_OUT_BATCH):
            pipe.xadd(hook_settings.results_stream, {**fields, "type": "node_started", "ts": "2026-01-01T00:00:00Z"})
        await pipe.execute()
    handled = [await fan_out.fan_out_once(block_ms=10) for _ in range(3)]
    assert handled == [FAN_OUT_BATCH, 2 * FAN_OUT_BATCH, 2 * FAN_OUT_BATCH]
    # The last read was short: the next asks for half as many (back towards FAN_OUT_BATCH).
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(5 * FAN_OUT_BATCH):
            pipe.xadd(hook_settings.results_stream, {**fields, "type": "node_started", "ts": "2026-01-01T00:00:00Z"})
        await pipe.execute()
    assert await fan_out.fan_out_once(block_ms=10) == 2 * FAN_OUT_BATCH
    assert (await redis.xpending(hook_settings.results_stream, hook_settings.webhook_group))["pending"] == 0


async def test_with_no_endpoint_the_fan_out_passes_over_the_events_unread_until_one_is_registered(
    redis: Redis, hook_settings: Settings, receiver: Receiver
) -> None:
    """No endpoint, no failure reporting: no event can become a delivery, so the group moves past them
    without the fan-out reading one. The first event after a registration is delivered."""
    keys = hook_settings_keys(hook_settings)
    fan_out = WebhookDelivery(hook_settings, redis, consumer="c1")
    await fan_out.registry.ensure_group()
    fields = {"task_id": "t1", "execution_id": "1", "workflow_id": "1", "client": "acme", "data": "{}"}
    ts = "2026-01-01T00:00:00Z"
    last = None
    for type_ in ("queued", "started", "succeeded"):
        last = await redis.xadd(hook_settings.results_stream, {**fields, "type": type_, "ts": ts})
    assert await fan_out.fan_out_once(block_ms=10) == 0
    group = next(
        g for g in await redis.xinfo_groups(hook_settings.results_stream) if g["name"] == hook_settings.webhook_group
    )
    assert group["last-delivered-id"] == last and group["pending"] == 0
    # Nothing was read: the group's one consumer, if any, never received an entry.
    consumers = await redis.xinfo_consumers(hook_settings.results_stream, hook_settings.webhook_group)
    assert all(c["pending"] == 0 for c in consumers)
    endpoint = await fan_out.registry.create(receiver.url("/x"), ["execution.succeeded"], None)
    after = await redis.xadd(hook_settings.results_stream, {**fields, "type": "succeeded", "ts": ts})
    assert await fan_out.fan_out_once(block_ms=10) == 1
    assert await redis.hkeys(WebhookKeys(keys).deliveries) == [delivery_id(endpoint.id, after)]


async def test_at_the_memory_limit_the_fan_out_reads_instead_of_passing_over(
    versioned_redis: Redis, hook_settings: Settings
) -> None:
    """Redis 6.2 refuses a script's writes at its memory limit (noeviction) where reads still go: the
    fan-out falls back to reading the events (7.0 lets the script's move through)."""
    fan_out = WebhookDelivery(hook_settings, versioned_redis, consumer="c1")
    await fan_out.registry.ensure_group()
    fields = {"task_id": "t1", "execution_id": "1", "workflow_id": "1", "client": "acme", "data": "{}"}
    for type_ in ("queued", "started", "succeeded"):
        last = await versioned_redis.xadd(hook_settings.results_stream, {**fields, "type": type_, "ts": "x"})
    await versioned_redis.config_set("maxmemory-policy", "noeviction")
    await versioned_redis.config_set("maxmemory", "1")
    try:
        assert await fan_out.fan_out_once(block_ms=10) in (0, 3)
    finally:
        await versioned_redis.config_set("maxmemory", "0")
    [group] = await versioned_redis.xinfo_groups(hook_settings.results_stream)
    assert group["last-delivered-id"] == last and group["pending"] == 0
