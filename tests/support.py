"""Helpers the pipeline and fault tests share: run workers in-process or as real processes, enqueue,
and wait for events on the results stream (blocking reads, never sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.crc import key_slot

from api.app import create_app
from cli.embedded import RedisServer, find_redis_server, free_port, packaged_redis_server
from consumer.sandbox.base import SandboxProvider
from consumer.worker import serve
from shared.catalog import StoredWorkflow, WorkflowCatalog
from shared.clients import Vault
from shared.connections import REDIS_UNAVAILABLE
from shared.enqueue import NewExecution, enqueue_execution
from shared.events import Event, event_fields
from shared.scripts import EnqueueResult, Scripts
from shared.settings import Settings
from shared.streams import TERMINAL_EVENTS, EventType, Keys, Lane, Layout

ROOT = Path(__file__).resolve().parent.parent


def linear(*actions: str, **extra: Any) -> dict[str, Any]:
    """start -> action 1 -> ... -> action n -> end."""
    nodes: list[dict[str, Any]] = [{"id": "start", "type": "start", "next": "a1" if actions else "end"}]
    for i, code in enumerate(actions, 1):
        nxt = f"a{i + 1}" if i < len(actions) else "end"
        nodes.append({"id": f"a{i}", "type": "action", "code": code, "next": nxt})
    nodes.append({"id": "end", "type": "end"})
    return {"nodes": nodes, "edges": [], **extra}


BRANCHING = {
    "nodes": [
        {"id": "start", "type": "start", "next": "total"},
        {"id": "total", "type": "action", "code": "context['total'] = sum(context['items'])", "next": "big"},
        {"id": "big", "type": "decision", "code": "context['total'] > 100", "on_true": "approve", "on_false": "auto"},
        {"id": "approve", "type": "action", "code": "context['route'] = 'manual'", "next": "end"},
        {"id": "auto", "type": "action", "code": "context['route'] = 'auto'", "next": "end"},
        {"id": "end", "type": "end"},
    ],
    "edges": [],
}


async def create_workflow(
    redis: Redis, settings: Settings, pool: Any, definition: dict[str, Any], name: str | None = None
) -> StoredWorkflow:
    # Names are unique among live workflows: a test that makes several gets a new one each time.
    name = name or f"wf-{uuid.uuid4().hex[:8]}"
    return await WorkflowCatalog(redis, pool, Keys.from_settings(settings)).create(name, None, definition)


async def enqueue(
    redis: Redis,
    settings: Settings,
    workflow: StoredWorkflow,
    context: dict[str, Any] | None = None,
    client: str = "acme",
    key: str | None = None,
    lane: Lane = Lane.NORMAL,
    scripts: Scripts | None = None,
) -> EnqueueResult:
    """`scripts`: a long-lived one, as an API process holds (it remembers the id sequence it saw)."""

    async def floor() -> int:
        # The tests' PostgreSQL, as the API's catalog would read it.
        conn = await asyncpg.connect(settings.database_url)
        try:
            return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM executions"))
        finally:
            await conn.close()

    execution = NewExecution(
        workflow_id=workflow.id,
        workflow_name=workflow.name,
        workflow_version=workflow.version,
        client=client,
        initial_context=context or {},
        idempotency_key=key,
        lane=lane,
    )
    keys = Layout.from_settings(settings).of_client(client)
    return await enqueue_execution(scripts or Scripts(redis, keys), execution, floor=floor)


async def wait_for_events(
    redis: Redis, settings: Settings, predicate: Any, count: int = 1, timeout: float = 30.0
) -> list[Event]:
    """Block on the results stream (every shard's) until `count` events match `predicate`; returns them."""
    found: list[Event] = []
    streams = [keys.results for keys in Layout.from_settings(settings).shards]
    cursors = dict.fromkeys(streams, "0")
    deadline = time.monotonic() + timeout
    while len(found) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"saw {len(found)} of {count} expected events within {timeout}s")
        # One stream per read: on a cluster, shards' streams live in different slots.
        block = int(min(remaining, 1.0 if len(streams) == 1 else 0.1) * 1000) or 1
        for stream in streams:
            try:
                reply = await redis.xread({stream: cursors[stream]}, block=block)
            except REDIS_UNAVAILABLE:
                # The fault tests restart Redis under our feet; the events are still there afterwards.
                await asyncio.sleep(0.05)
                continue
            for _stream, items in reply or []:
                for entry_id, fields in items:
                    cursors[stream] = entry_id
                    event = Event.from_entry(entry_id, fields)
                    if predicate(event):
                        found.append(event)
    return found


async def wait_terminal(
    redis: Redis, settings: Settings, task_ids: list[str], timeout: float = 30.0
) -> dict[str, Event]:
    wanted = set(task_ids)
    events = await wait_for_events(
        redis, settings, lambda e: e.task_id in wanted and e.type in TERMINAL_EVENTS, len(wanted), timeout
    )
    return {e.task_id: e for e in events}


async def wait_projected(pool: Any, execution_ids: list[int], statuses: set[str], timeout: float = 30.0) -> None:
    """PostgreSQL has no notification for the projector's commits; poll it, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        n = await pool.fetchval(
            "SELECT count(*) FROM executions WHERE id = ANY($1::bigint[]) AND status = ANY($2::text[])",
            execution_ids,
            list(statuses),
        )
        if n == len(execution_ids):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} of {len(execution_ids)} executions projected within {timeout}s")
        await asyncio.sleep(0.02)


@dataclass
class RunningWorker:
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


@asynccontextmanager
async def operator_api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API with these settings in-process (its lifespan run), as the operator (admin key): for a test
    whose settings are its own (a server it stops, shards), where the `api` fixture's are not."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://nova", headers=headers) as client:
            yield client


@asynccontextmanager
async def in_process_worker(
    settings: Settings, providers: dict[str, SandboxProvider] | None = None, **overrides: Any
) -> AsyncIterator[RunningWorker]:
    s = settings.model_copy(update=overrides) if overrides else settings
    stop = asyncio.Event()
    task = asyncio.create_task(serve(s, stop=stop, providers=providers))
    worker = RunningWorker(stop, task)
    try:
        yield worker
    finally:
        if not task.done():
            await worker.shutdown()
        else:
            task.result()


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVA_")}
    env.update(
        REDIS_URL=settings.redis_url or "",
        DATABASE_URL=settings.database_url or "",
        NOVA_VISIBILITY_TIMEOUT=str(settings.visibility_timeout),
        NOVA_CONCURRENCY=str(settings.concurrency),
        NOVA_RETRY_BACKOFF=str(settings.retry_backoff),
        NOVA_RETRY_BACKOFF_MAX=str(settings.retry_backoff_max),
        NOVA_SHUTDOWN_GRACE=str(settings.shutdown_grace),
        NOVA_SANDBOX_POOL_SIZE=str(settings.sandbox_pool_size),
        NOVA_SANDBOX_WRITABLE=settings.sandbox_writable,
        NOVA_REDIS_CLUSTER="true" if settings.redis_cluster else "false",
        NOVA_SHARDS=str(settings.shards),
        NOVA_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


def start_worker_process(settings: Settings, log_path: Path, **extra: str) -> subprocess.Popen[bytes]:
    """`nova worker` as a real process (its own interpreter), logging to a file."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker"],
            cwd=ROOT,
            env=worker_env(settings, **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def kill9(proc: subprocess.Popen[bytes]) -> None:
    # The whole group: the worker's sandbox children die with it, as in a container crash.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---- settings and servers shared by conftest and the tests ------------------------------------------

ADMIN_KEY = "test-admin-key"
SECRETS_KEY = Vault.new_key()


def redis_version(binary: str) -> str:
    """A redis-server binary's version, as test ids name it (redis-6.2.14, redis-7.0.15)."""
    return "redis-" + RedisServer(Path("/nonexistent"), binary=binary, port=1).version()


def redis_binaries() -> list[str]:
    """Every distinct redis-server here: the packaged 6.2 and the one on PATH (7.x) when present."""
    seen: dict[str, str] = {}
    for binary in (packaged_redis_server(), find_redis_server()):
        if binary:
            version = RedisServer(Path("/nonexistent"), binary=binary, port=1).version()
            seen.setdefault(version, binary)
    return list(seen.values())


@contextlib.contextmanager
def private_dir(name: str) -> Iterator[Path]:
    """A data folder outside pytest's temp tree.

    As root, PostgreSQL runs as an unprivileged user that must traverse to its data; pytest resets its
    own temp root to mode 0700 when it finds it opened up, which would cut a running server off.
    """
    root = Path(tempfile.mkdtemp(prefix=f"nova-test-{name}-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_settings(redis_url: str, db_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "database_url": db_url,
        "concurrency": 4,
        "node_timeout": 10.0,
        "execution_timeout": 30.0,
        "visibility_timeout": 5.0,
        "retry_backoff": 0.05,
        "retry_backoff_max": 0.2,
        "shutdown_grace": 5.0,
        "sandbox_pool_size": 1,
        "admin_key": ADMIN_KEY,
        "secrets_key": SECRETS_KEY,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# ---- a Redis Cluster the suite starts itself ---------------------------------------------------------

CLUSTER_SLOTS = 16384


class ClusterServers:
    """Three masters with a replica each, from one redis-server binary, slots assigned here
    (CLUSTER ADDSLOTSRANGE, MEET, REPLICATE), all on free ports in one temp folder. The nodes share
    their logins (one app password, one admin password), as a managed cluster does."""

    def __init__(self, root: Path, *, masters: int = 3, binary: str | None = None) -> None:
        self.root = root
        first = RedisServer(root / "node0", binary=binary, cluster=True)
        self.nodes = [first] + [
            RedisServer(root / f"node{i}", binary=binary, cluster=True, passwords_of=first)
            for i in range(1, masters * 2)
        ]
        self.masters = masters
        # Ports are picked before any node binds one: the same free port may come up twice.
        taken: set[int] = set()
        for node in self.nodes:
            while node.port in taken:
                node.port = free_port()
            taken.add(node.port)
            while node.bus_port in taken:
                node.bus_port = free_port()
            taken.add(node.bus_port)

    @property
    def url(self) -> str:
        """NOVA's login to one node; the cluster client finds the others."""
        return self.nodes[0].url

    def admin(self, node: RedisServer) -> SyncRedis:
        return SyncRedis.from_url(node.admin_url, decode_responses=True)

    def start(self, timeout: float = 30.0) -> ClusterServers:
        for node in self.nodes:
            node.start()
        ids = []
        for node in self.nodes:
            with self.admin(node) as r:
                ids.append(r.execute_command("CLUSTER MYID"))
        per = CLUSTER_SLOTS // self.masters
        for i, node in enumerate(self.nodes[: self.masters]):
            last = CLUSTER_SLOTS - 1 if i == self.masters - 1 else (i + 1) * per - 1
            with self.admin(node) as r:
                r.execute_command("CLUSTER ADDSLOTSRANGE", i * per, last)
        with self.admin(self.nodes[0]) as r:
            for node in self.nodes[1:]:
                r.execute_command("CLUSTER MEET", "127.0.0.1", node.port, node.bus_port)
        self._until(lambda: all(self._known(n) == len(self.nodes) for n in self.nodes), timeout, "nodes to meet")
        for i, replica in enumerate(self.nodes[self.masters :]):
            with self.admin(replica) as r:
                r.execute_command("CLUSTER REPLICATE", ids[i])
        self._until(self.healthy, timeout, "the cluster to be ok with its replicas in sync")
        return self

    def _known(self, node: RedisServer) -> int:
        with self.admin(node) as r:
            # The client parses CLUSTER NODES into {address: node}.
            return len(r.execute_command("CLUSTER NODES"))

    def healthy(self) -> bool:
        """Every live node says the cluster is ok, and every live master has a replica in sync."""
        for node in self.nodes:
            if not node.running:
                continue
            with self.admin(node) as r:
                if r.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                    return False
                info = r.info("replication")
                if info.get("role") == "master" and info.get("connected_slaves", 0) < 1:
                    return False
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
        return True

    def _until(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {what}")
            time.sleep(0.05)

    def master_of(self, key: str) -> RedisServer:
        """The node that serves `key`'s slot now."""
        slot = key_slot(key.encode())
        for node in self.nodes:
            if not node.running:
                continue
            with self.admin(node) as r:
                reply = r.execute_command("CLUSTER SLOTS")
                # Parsed into {(start, end): {"primary": (host, port), ...}} or left as the raw list.
                ranges = (
                    [(int(a), int(b), int(v["primary"][1])) for (a, b), v in reply.items()]
                    if isinstance(reply, dict)
                    else [(int(a), int(b), int(master[1])) for a, b, master, *_ in reply]
                )
                for start, end, port in ranges:
                    if start <= slot <= end:
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def live_masters(self) -> list[RedisServer]:
        """The running nodes that are masters now: a failover swaps a master and its replica."""
        live = []
        for node in self.nodes:
            if node.running:
                with self.admin(node) as admin:
                    if admin.info("replication").get("role") == "master":
                        live.append(node)
        return live

    def node_id(self, node: RedisServer) -> str:
        with self.admin(node) as r:
            return str(r.execute_command("CLUSTER MYID"))

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def script_keys(prefix: str) -> Keys:
    """Keys of a test of the atomic steps alone, under their own prefix."""
    return Keys(
        requests=f"{prefix}:requests",
        results=f"{prefix}:results",
        dead_letter=f"{prefix}:dlq",
        worker_group="workers",
        projector_group="projector",
        prefix=prefix,
    )


async def ready_for_scripts(redis: Redis, keys: Keys) -> Redis:
    """The workers' group on the requests stream and the id sequence, as a running system has them."""
    await redis.xgroup_create(keys.requests, keys.worker_group, id="0", mkstream=True)
    await Scripts(redis, keys).raise_sequence(0)
    return redis


async def sse_events(response: Any) -> AsyncIterator[dict[str, str]]:
    """The events of a server-sent event stream (an httpx streaming response), each as its fields."""
    current: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line and current:
            yield current
            current = {}
        elif line and not line.startswith(":"):
            field, _, value = line.partition(":")
            current[field] = value.removeprefix(" ")


async def stop_in_a_lost_cancel_window(
    monkeypatch: Any, stop: Callable[[], Awaitable[None]], what: str
) -> asyncio.Task[None]:
    """Starts `stop` (which cancels a task that sends Redis commands) right after that task's next send,
    inside redis-py's asyncio.wait_for: on Python 3.11 a cancel landing as the awaited send completes is
    lost, and the task runs on. Returns the task running `stop`; the caller checks that it ends."""
    stopping: list[asyncio.Task[None]] = []
    send = Connection._send_packed_command

    async def send_then_stop(self: Connection, command: Any) -> None:
        await send(self, command)
        if not stopping:
            # Runs in wait_for's inner task, which ends right after this: `stop` cancels while wait_for's
            # inner future is already done, the exact window in which the cancel is dropped.
            stopping.append(asyncio.ensure_future(stop()))

    monkeypatch.setattr(Connection, "_send_packed_command", send_then_stop)
    try:
        for _ in range(500):
            if stopping:
                break
            await asyncio.sleep(0.01)
    finally:
        monkeypatch.undo()
    assert stopping, f"{what} sent no command"
    return stopping[0]


def process_alive(pid: int) -> bool:
    """Whether `pid` is a running process: a zombie is dead for a test's purposes (reaped later)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def node_event(type_: EventType, entry_id: str, workflow_id: int, **data: object) -> Event:
    """An event of step 1 (node a1) of execution 77 (task t77, client acme), as read from its entry."""
    fields = event_fields(
        type_,
        task_id="t77",
        execution_id=77,
        workflow_id=workflow_id,
        client="acme",
        data={"step": 1, "node_id": "a1", "node_type": "action", **data},
    )
    return Event.from_entry(entry_id, fields)
