"""Rolling deploys: old and new workers, projectors and API replicas side by side.

Entries, events and task hashes carry a format version (`v`, shared/streams.py FORMAT_VERSION). A
worker runs what it reads and leaves a newer format to the workers that read it (parked, never run,
never dead-lettered); a projector leaves newer events pending for a newer projector. The newer
release is played by this code with the test-only setting `test_only_format_version` (it then reads
one format more than it writes); the previous release is the repository's own history, exported with
git and run as a real process beside this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from cli.embedded import RedisServer
from consumer.projector import Projector
from consumer.requests import MalformedRequest, parse_request
from consumer.webhooks import WebhookDelivery
from shared.connections import ensure_groups
from shared.db import Migration, migrate, migrations
from shared.events import event_fields
from shared.inspection import inspect, render_text
from shared.scripts import Scripts, lua_source
from shared.settings import Settings
from shared.streams import FORMAT_VERSION, EventType, Keys, TaskField, TaskStatus, dumps, loads, now_iso
from shared.webhooks import WebhookKeys, WebhookRegistry, delivery_id
from tests.support import (
    ROOT,
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    ready_for_scripts,
    script_keys,
    wait_projected,
    wait_terminal,
    worker_env,
)

NEWER = FORMAT_VERSION + 1

KEYS = script_keys("t")


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    """Wait for a condition with a generous deadline (no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


# ---- the atomic steps, on every Redis version here ------------------------------------------------


@pytest.fixture
async def r(versioned_redis: Redis) -> Redis:
    return await ready_for_scripts(versioned_redis, KEYS)


async def newer_entry(r: Redis, task_id: str) -> tuple[str, dict[str, str]]:
    """A request of a newer format, delivered to consumer w1."""
    fields = {"task_id": task_id, "execution_id": "1", "workflow_id": "1", "client": "acme", "payload": "{}"}
    await r.xadd(KEYS.requests, {**fields, "v": str(NEWER)})
    reply = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"}, count=1)
    entry_id, delivered = reply[0][1][0]
    return entry_id, delivered


async def leave(scripts: Scripts, entry_id: str, fields: dict[str, str], consumer: str = "w1") -> int:
    return await scripts.leave_to_newer(
        entry_id=entry_id, consumer=consumer, version=NEWER, score=int(entry_id.split("-")[0]), member=dumps(fields)
    )


async def state(r: Redis) -> dict[str, Any]:
    """Everything these steps touch, to compare a step run twice with the step run once."""
    return {
        "stream": [f for _, f in await r.xrange(KEYS.requests)],
        "pending": (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"],
        "newer": await r.zrange(KEYS.newer_format(NEWER), 0, -1, withscores=True),
    }


async def test_leaving_to_newer_workers_parks_and_acks_once(r: Redis) -> None:
    scripts = Scripts(r, KEYS)
    entry_id, fields = await newer_entry(r, "a")
    # Racing copies of the step (a re-sent call, a second thread): exactly one parks.
    replies = await asyncio.gather(*(leave(scripts, entry_id, fields) for _ in range(4)))
    assert sorted(replies) == [-1, -1, -1, 1]
    once = await state(r)
    assert once["pending"] == 0 and len(once["newer"]) == 1
    assert await leave(scripts, entry_id, fields) == -1  # run twice: nothing more
    assert await state(r) == once


async def test_leaving_loses_to_a_reclaim_and_writes_nothing(r: Redis) -> None:
    scripts = Scripts(r, KEYS)
    entry_id, fields = await newer_entry(r, "a")
    # w1 went silent; w2 took the entry over before w1's step ran.
    await r.xclaim(KEYS.requests, KEYS.worker_group, "w2", 0, [entry_id])
    assert await leave(scripts, entry_id, fields, consumer="w1") == -1
    assert await r.zcard(KEYS.newer_format(NEWER)) == 0
    pending = await r.xpending_range(KEYS.requests, KEYS.worker_group, min="-", max="+", count=10)
    assert [p["consumer"] for p in pending] == ["w2"]


async def test_old_workers_leaving_while_new_ones_take_moves_each_request_once(r: Redis) -> None:
    old, new_a, new_b = Scripts(r, KEYS), Scripts(r, KEYS), Scripts(r, KEYS)
    delivered = [await newer_entry(r, f"t{i}") for i in range(20)]

    async def leave_all() -> None:
        for entry_id, fields in delivered:
            assert await leave(old, entry_id, fields) == 1
            await asyncio.sleep(0)

    async def take(scripts: Scripts) -> int:
        moved = 0
        for _ in range(30):
            moved += await scripts.take_from_older(NEWER, limit=3)
            await asyncio.sleep(0)
        return moved

    _, a, b = await asyncio.gather(leave_all(), take(new_a), take(new_b))
    rest = await new_a.take_from_older(NEWER)
    assert a + b + rest == 20
    entries = await r.xrange(KEYS.requests)
    copies = [f["task_id"] for i, f in entries if i not in {e for e, _ in delivered}]
    # Every request is back on the stream exactly once, as it was written (its format included).
    assert sorted(copies) == sorted(f"t{i}" for i in range(20))
    assert all(f["v"] == str(NEWER) for i, f in entries)
    assert await r.zcard(KEYS.newer_format(NEWER)) == 0
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 0
    # Taking needs no flag and clears none: the control hash is untouched.
    assert await r.exists(KEYS.control) == 0


async def test_two_versions_of_a_script_under_one_name_each_run_their_own_code(
    r: Redis, versioned_server: RedisServer
) -> None:
    # The previous release's enqueue step (no format field) and this one's, side by side on one Redis,
    # as an old and a new API replica during a deploy: each is called by its own hash.
    old, new = Scripts(r, KEYS), Scripts(r, KEYS)
    old._registered["enqueue"] = r.register_script(previous_enqueue_source())  # type: ignore[assignment]
    assert isinstance(old._registered["enqueue"], AsyncScript)
    args: dict[str, Any] = {
        "workflow_id": 1,
        "workflow_name": "wf",
        "client": "acme",
        "enqueued_at": now_iso(),
        "payload": dumps({"initial_context": {}}),
        "queued_data": dumps({}),
    }
    await old.enqueue(task_id="old", **args)
    await new.enqueue(task_id="new", **args)
    # After a SCRIPT FLUSH (or a restart) each is loaded again from its own source (NOSCRIPT fallback).
    await r.script_flush()
    await old.enqueue(task_id="old2", **args)
    await new.enqueue(task_id="new2", **args)
    written = {f["task_id"]: f.get("v") for _, f in await r.xrange(KEYS.requests)}
    assert written == {"old": None, "new": str(FORMAT_VERSION), "old2": None, "new2": str(FORMAT_VERSION)}
    assert await r.hget(KEYS.task("new"), TaskField.VERSION) == str(FORMAT_VERSION)
    assert await r.hget(KEYS.task("old"), TaskField.VERSION) is None


def previous_enqueue_source() -> str:
    """The enqueue step as releases before format versions had it (no `v` written anywhere)."""
    current = lua_source("enqueue")
    previous = current
    for written, before in ((",\n  'v', format}", "}"), (", 'v', format}", "}"), (", 'v', format)", ")")):
        previous = previous.replace(written, before)
    assert previous != current and "'v', format" not in previous
    return previous


async def test_a_request_an_old_api_replica_wrote_is_run_and_projected_by_this_release(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("context['n'] = 7"))
    old_api = Scripts(redis, keys)
    old_api._registered["enqueue"] = redis.register_script(previous_enqueue_source())  # type: ignore[assignment]
    await old_api.raise_sequence(0)  # a fresh Redis: the API raises its id sequence first
    result = await old_api.enqueue(
        task_id="from-old-api",
        workflow_id=wf.id,
        workflow_name=wf.name,
        client="acme",
        enqueued_at=now_iso(),
        payload=dumps({"workflow_version": wf.version, "initial_context": {}}),
        queued_data=dumps({"workflow_name": wf.name, "initial_context": {}}),
    )
    [(_, entry)] = await redis.xrange(keys.requests)
    assert "v" not in entry  # format 1, unsaid
    async with in_process_worker(settings):
        done = await wait_terminal(redis, settings, ["from-old-api"])
        await wait_projected(pool, [result.execution_id], {"completed"})
    assert done["from-old-api"].type == EventType.SUCCEEDED
    assert done["from-old-api"].data["final_context"] == {"n": 7}


def test_the_format_steps_touch_one_slot_under_a_shard_tag() -> None:
    from redis.crc import key_slot

    keys = Keys.shard(Settings(redis_url="redis://unused"), 3)
    for names in ([keys.requests, keys.newer_format(2)], [keys.control, keys.newer_format(2), keys.requests]):
        assert len({key_slot(n.encode()) for n in names}) == 1, names


def test_a_format_that_is_not_a_positive_integer_is_malformed() -> None:
    base = {"task_id": "t", "execution_id": "1", "workflow_id": "1", "client": "acme", "payload": "{}"}
    assert parse_request("1-0", base).task_id == "t"  # no field: format 1
    assert parse_request("1-0", {**base, "v": "1"}).task_id == "t"
    for bad in ("abc", "0", "-2", "1.5"):
        with pytest.raises(MalformedRequest, match="format version"):
            parse_request("1-0", {**base, "v": bad})


# ---- through the pipeline: an old and a new worker on one Redis and PostgreSQL --------------------


async def enqueue_newer(
    redis: Redis, settings: Settings, workflow: Any, monkeypatch: pytest.MonkeyPatch, n: int
) -> list[Any]:
    """What a newer release's API writes: entry, task hash and queued event of the newer format."""
    with monkeypatch.context() as m:
        m.setattr("shared.scripts.FORMAT_VERSION", NEWER)
        return [await enqueue(redis, settings, workflow, {"i": i}) for i in range(n)]


async def test_an_old_worker_leaves_newer_requests_to_a_new_worker_which_runs_each_once(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("context['n'] = context['i'] * 2"))
    newer = await enqueue_newer(redis, settings, wf, monkeypatch, 3)
    assert {f.get("v") for _, f in await redis.xrange(keys.requests)} == {str(NEWER)}
    current = [await enqueue(redis, settings, wf, {"i": 10 + i}) for i in range(2)]
    # A request of today's format whose task a newer worker has already run in part: its state (the
    # checkpoint) is in the newer format, and an old worker that reclaims it must not resume from it.
    touched = await enqueue(redis, settings, wf, {"i": 20})
    await redis.hset(keys.task(touched.task_id), TaskField.VERSION, str(NEWER))
    left = [*newer, touched]

    async with in_process_worker(settings, consumer_name="old-worker"):
        await wait_terminal(redis, settings, [t.task_id for t in current])
        await until(
            lambda: _zcard(redis, keys.newer_format(NEWER), len(left)), "the newer requests left to newer workers"
        )
        # Never run, never dead-lettered, nothing pending: parked, still PENDING.
        for t in left:
            assert await redis.hget(keys.task(t.task_id), TaskField.STATUS) == TaskStatus.PENDING
        assert await redis.xlen(keys.dead_letter) == 0
        assert (await redis.xpending(keys.requests, keys.worker_group))["pending"] == 0
        started = [f for _, f in await redis.xrange(keys.results) if f["type"] == EventType.STARTED]
        assert {f["task_id"] for f in started} == {t.task_id for t in current}
        # Operators see what waits for the new release.
        report = await inspect(redis, keys)
        assert report["left_for_newer_workers"] == {str(NEWER): len(left)}
        assert f"{len(left)} of format {NEWER}" in render_text(report)

        async with in_process_worker(settings, consumer_name="new-worker", test_only_format_version=NEWER):
            done = await wait_terminal(redis, settings, [t.task_id for t in left])
    assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
    assert sorted(e.data["final_context"]["n"] for e in done.values()) == [0, 2, 4, 40]
    events = [f for _, f in await redis.xrange(keys.results)]
    for t in left:
        mine = [f for f in events if f["task_id"] == t.task_id]
        started = [loads_data(f) for f in mine if f["type"] == EventType.STARTED]
        # Run once, by the new worker, on its first delivery.
        assert [(s["consumer"], s["delivery"]) for s in started] == [("new-worker", 1)], t.task_id
        assert sum(f["type"] == EventType.NODE_STARTED for f in mine) == 3  # start, a1, end: once each
    assert await redis.zcard(keys.newer_format(NEWER)) == 0
    assert await redis.xlen(keys.dead_letter) == 0
    # Projected, the newer queued events too (by the new worker's projector).
    await wait_projected(pool, [t.execution_id for t in [*left, *current]], {"completed"})


async def test_with_shards_each_shards_newer_requests_are_left_counted_and_taken_back(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOVA_SHARDS=3: an old worker's reader of each shard leaves that shard's newer requests in the
    shard's own set; inspection counts every shard's; a new worker's readers take each shard's back."""
    sharded = settings.model_copy(update={"shards": 3})
    shards = Keys.from_settings(sharded).all_shards
    slugs: dict[int, str] = {}
    for i in range(1000):
        slugs.setdefault(Keys.shard_of_client(f"r{i}", 3), f"r{i}")
    wf = await create_workflow(redis, sharded, pool, linear("context['n'] = context['i'] * 2"))
    with monkeypatch.context() as m:
        m.setattr("shared.scripts.FORMAT_VERSION", NEWER)
        left = [await enqueue(redis, sharded, wf, {"i": n}, client=slugs[n]) for n in range(3)]
    async with in_process_worker(sharded, consumer_name="old-worker"):
        for k in shards:
            await until(lambda k=k: _zcard(redis, k.newer_format(NEWER), 1), f"shard {k.shard_index}'s request left")
        report = await inspect(redis, shards[0])
        assert report["left_for_newer_workers"] == {str(NEWER): 3}
    async with in_process_worker(sharded, consumer_name="new-worker", test_only_format_version=NEWER):
        done = await wait_terminal(redis, sharded, [t.task_id for t in left])
    assert sorted(e.data["final_context"]["n"] for e in done.values()) == [0, 2, 4]
    assert [await redis.zcard(k.newer_format(NEWER)) for k in shards] == [0, 0, 0]


async def test_a_newer_request_a_crashed_worker_held_is_reclaimed_left_and_run_once(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(update={"visibility_timeout": 1.0})
    keys = Keys.from_settings(settings)
    await ensure_groups(redis, keys)
    wf = await create_workflow(redis, settings, pool, linear("context['n'] = 1"))
    [task] = await enqueue_newer(redis, settings, wf, monkeypatch, 1)
    # Workers read it and died (kill -9) before doing anything with it, more times than max_deliveries.
    await redis.xreadgroup(keys.worker_group, "crashed", {keys.requests: ">"})
    for _ in range(settings.max_deliveries):
        await redis.xclaim(keys.requests, keys.worker_group, "crashed", 0, [task.entry_id])
    [held] = await redis.xpending_range(keys.requests, keys.worker_group, min="-", max="+", count=1)
    assert held["times_delivered"] > settings.max_deliveries
    async with in_process_worker(settings, consumer_name="old-worker"):
        # The old worker reclaims it past max_deliveries: still not dead-lettered, only left.
        await until(lambda: _zcard(redis, keys.newer_format(NEWER), 1), "the reclaimed request left to newer workers")
    assert await redis.xlen(keys.dead_letter) == 0
    assert await redis.hget(keys.task(task.task_id), TaskField.STATUS) == TaskStatus.PENDING
    async with in_process_worker(settings, consumer_name="new-worker", test_only_format_version=NEWER):
        done = await wait_terminal(redis, settings, [task.task_id])
    assert done[task.task_id].type == EventType.SUCCEEDED
    started = [loads_data(f) for _, f in await redis.xrange(keys.results) if f["type"] == EventType.STARTED]
    # One run, on a fresh entry: the deliveries of the old one do not follow it.
    assert [(s["consumer"], s["delivery"]) for s in started] == [("new-worker", 1)]


def loads_data(fields: dict[str, str]) -> dict[str, Any]:
    return loads(fields["data"])  # type: ignore[no-any-return]


async def _zcard(redis: Redis, key: str, n: int) -> bool:
    return int(await redis.zcard(key)) == n


async def test_an_old_projector_leaves_newer_events_pending_for_a_new_one(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    settings = settings.model_copy(update={"visibility_timeout": 1.0})
    keys = Keys.from_settings(settings)
    await ensure_groups(redis, keys)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    t = "2024-05-01T10:00:00.000Z"

    async def queued(execution_id: int, version: int) -> None:
        fields = event_fields(
            EventType.QUEUED,
            task_id=f"t{execution_id}",
            execution_id=execution_id,
            workflow_id=wf.id,
            client="acme",
            data={"workflow_name": "wf", "enqueued_at": t, "initial_context": {"x": execution_id}},
        )
        await redis.xadd(keys.results, {**fields, "v": str(version)})  # type: ignore[arg-type]

    for i in range(1, 7):
        await queued(i, NEWER if i % 2 else FORMAT_VERSION)
    newer_ids, current_ids = [1, 3, 5], [2, 4, 6]
    stop = asyncio.Event()
    old = Projector(settings, redis, pool, consumer="old-projector")
    runs = [asyncio.create_task(old.run(stop))]
    try:
        await wait_projected(pool, current_ids, {"pending"})
        await until(lambda: _true(old.left_to_newer >= 3), "the old projector saw the newer events")
        # Not written, not dead-lettered, not acknowledged: pending in the group.
        assert await pool.fetchval("SELECT count(*) FROM executions WHERE id = ANY($1::bigint[])", newer_ids) == 0
        assert await redis.xlen(keys.projector_dead_letter) == 0
        assert (await redis.xpending(keys.results, keys.projector_group))["pending"] == 3
        # Events after them are read: the group is not blocked.
        await queued(8, FORMAT_VERSION)
        await wait_projected(pool, [8], {"pending"})
        new = Projector(
            settings.model_copy(update={"test_only_format_version": NEWER}), redis, pool, consumer="new-projector"
        )
        runs.append(asyncio.create_task(new.run(stop)))
        await wait_projected(pool, newer_ids, {"pending"})
        await until(lambda: _pending_is(redis, keys, 0), "every event acknowledged once the new projector wrote them")
    finally:
        stop.set()
        await asyncio.gather(*runs)
    assert await redis.xlen(keys.projector_dead_letter) == 0
    rows = await pool.fetch("SELECT id, initial_context FROM executions ORDER BY id")
    assert [(r["id"], r["initial_context"]) for r in rows] == [(i, {"x": i}) for i in (1, 2, 3, 4, 5, 6, 8)]


async def _true(value: bool) -> bool:
    return value


async def _pending_is(redis: Redis, keys: Keys, n: int) -> bool:
    return int((await redis.xpending(keys.results, keys.projector_group))["pending"]) == n


# ---- the previous release's worker beside this one ---------------------------------------------------


def previous_release(root: Path) -> str | None:
    """The newest commit on the first-parent history whose code predates format versions: the release
    this one replaces (on main, the merge's first parent). None when the checkout has no such history."""
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        return None

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([git, *args], cwd=root, capture_output=True, text=True, check=False)

    commits = run("rev-list", "--first-parent", "--max-count=200", "HEAD")
    if commits.returncode != 0:
        return None
    for commit in commits.stdout.split():
        streams = run("show", f"{commit}:shared/streams.py")
        if streams.returncode == 0 and "FORMAT_VERSION" not in streams.stdout:
            return commit
    return None


def export(root: Path, commit: str, into: Path) -> None:
    """The commit's files (git archive), as a release would be installed."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=root, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")


@pytest.fixture(scope="module")
def previous_release_dir() -> Iterator[Path]:
    commit = previous_release(ROOT)
    if commit is None:
        pytest.skip(
            "no previous release to run: this checkout has no git history reaching a commit before format "
            "versions (a shallow clone or an export); CI runs a full clone of main"
        )
    into = Path(tempfile.mkdtemp(prefix="nova-previous-"))
    into.chmod(0o755)
    try:
        export(ROOT, commit, into)
        yield into
    finally:
        shutil.rmtree(into, ignore_errors=True)


def start_previous_worker(code: Path, settings: Settings, log_path: Path, consumer: str) -> subprocess.Popen[bytes]:
    """The previous release's `nova worker`, its own code first on the path, on the same servers."""
    env = worker_env(settings, NOVA_CONSUMER_NAME=consumer, PYTHONPATH=str(code), NOVA_CONCURRENCY="2")
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker"],
            cwd=code,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def test_the_previous_release_worker_runs_beside_this_one(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, tmp_path: Path, previous_release_dir: Path
) -> None:
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("context['n'] = context['i'] + 1", "context['n'] *= 2"))
    log_path = tmp_path / "previous.log"
    old = start_previous_worker(previous_release_dir, settings, log_path, "previous-worker")
    try:
        # This release's API writes today's format (1, now said explicitly); the previous worker, alone
        # first, reads it as its own.
        first = [await enqueue(redis, settings, wf, {"i": i}) for i in range(4)]
        done = await wait_terminal(redis, settings, [t.task_id for t in first], timeout=60)
        assert [done[t.task_id].data["final_context"]["n"] for t in first] == [2, 4, 6, 8]
        # Then side by side, as during a deploy.
        async with in_process_worker(settings, consumer_name="this-worker", concurrency=2):
            rest = [await enqueue(redis, settings, wf, {"i": i}) for i in range(4, 16)]
            done.update(await wait_terminal(redis, settings, [t.task_id for t in rest], timeout=90))
            tasks = [*first, *rest]
            await wait_projected(pool, [t.execution_id for t in tasks], {"completed"}, timeout=60)
    finally:
        old.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(asyncio.to_thread(old.wait), 30)
    assert code == 0, log_path.read_text()[-3000:]
    assert [done[t.task_id].data["final_context"]["n"] for t in tasks] == [2 * (i + 1) for i in range(16)]
    events = [(i, f) for i, f in await redis.xrange(keys.results)]
    started = [(f, loads_data(f)) for _, f in events if f["type"] == EventType.STARTED]
    # Each task ran once, and the previous release ran the first ones with its own code: its events
    # have no format field (it predates them), this release's say format 1.
    assert sorted(f["task_id"] for f, _ in started) == sorted(t.task_id for t in tasks)
    by_consumer = {d["consumer"] for _, d in started}
    assert "previous-worker" in by_consumer, by_consumer
    for f, d in started:
        expected = None if d["consumer"] == "previous-worker" else str(FORMAT_VERSION)
        assert f.get("v") == expected, (d["consumer"], f)
    assert {done[t.task_id].type for t in tasks} == {EventType.SUCCEEDED}
    assert await redis.xlen(keys.dead_letter) == 0
    assert await pool.fetchval("SELECT count(*) FROM node_runs") == len(tasks) * 4


# ---- migrations while the previous release serves ----------------------------------------------------

# The additive rule (shared/db.py): statements a migration after 0003 may not contain, since the
# previous release still reads and writes the schema while `nova migrate` runs.
NOT_ADDITIVE = re.compile(
    r"\bDROP\s+(TABLE|COLUMN|INDEX|CONSTRAINT|VIEW|TYPE)\b|\bRENAME\b|\bALTER\s+COLUMN\s+\w+\s+(SET\s+DATA\s+)?TYPE\b"
    r"|\bSET\s+NOT\s+NULL\b|\bTRUNCATE\b|\bDELETE\s+FROM\b|\bADD\s+COLUMN\s+\w+\s+[^,;]*\bNOT\s+NULL\b(?![^,;]*\bDEFAULT\b)",
    re.IGNORECASE,
)


def test_migrations_after_0003_are_additive() -> None:
    for migration in migrations():
        if migration.version > 3:
            sql = re.sub(r"--[^\n]*", "", migration.sql)
            found = NOT_ADDITIVE.search(sql)
            assert found is None, f"migration {migration.version:04d} is not additive: {found.group(0)!r}"
    # The rule itself catches what it is meant to.
    assert NOT_ADDITIVE.search("ALTER TABLE executions DROP COLUMN error")
    assert NOT_ADDITIVE.search("ALTER TABLE executions RENAME COLUMN error TO failure")
    assert NOT_ADDITIVE.search("ALTER TABLE executions ALTER COLUMN attempt TYPE bigint")
    assert NOT_ADDITIVE.search("ALTER TABLE executions ADD COLUMN note text NOT NULL")
    assert not NOT_ADDITIVE.search("ALTER TABLE executions ADD COLUMN note text NOT NULL DEFAULT ''")
    assert not NOT_ADDITIVE.search("ALTER TABLE executions ADD COLUMN note text; CREATE INDEX i ON executions (note)")


def extra_migrations(sleep: float = 0.0) -> list[Migration]:
    """The packaged migrations and two additive ones of a next release (one slow, to overlap)."""
    return [
        *migrations(),
        Migration(9001, "note", f"SELECT pg_sleep({sleep}); ALTER TABLE executions ADD COLUMN note text;"),
        Migration(9002, "node_note", "ALTER TABLE node_runs ADD COLUMN note text DEFAULT '';"),
    ]


async def test_two_replicas_migrating_at_once_apply_each_migration_once(settings: Settings) -> None:
    conns = [await asyncpg.connect(settings.database_url) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(migrate(c, extra_migrations(sleep=0.3)) for c in conns))
        rows = await conns[0].fetch("SELECT version FROM schema_migrations WHERE version > 9000 ORDER BY version")
    finally:
        for c in conns:
            await c.close()
    assert sorted(v for a in applied for v in a) == [9001, 9002]
    assert [r["version"] for r in rows] == [9001, 9002]


async def test_a_migration_waiting_for_a_lock_does_not_hold_up_the_projector(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    async with in_process_worker(settings, consumer_name="serving-worker"):
        before = [await enqueue(redis, settings, wf) for _ in range(3)]
        await wait_projected(pool, [t.execution_id for t in before], {"completed"})
        # A long transaction (an operator's report, an API read) holds a lock on executions: the
        # migration's ALTER TABLE must wait for it.
        blocker = await asyncpg.connect(settings.database_url)
        migrator = await asyncpg.connect(settings.database_url)
        migrating: asyncio.Task[list[int]] | None = None
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.fetchval("SELECT count(*) FROM executions")
            migrating = asyncio.create_task(migrate(migrator, extra_migrations(), lock_timeout="100ms"))
            await until(lambda: _has_lock_wait(pool), "the migration waiting for its lock")
            # Meanwhile the projector still writes: the waiting ALTER gives way between its tries, rather
            # than queue every later upsert behind it for as long as the report runs.
            during = [await enqueue(redis, settings, wf) for _ in range(3)]
            # Bounded from outside too: were the upserts queued behind the ALTER, so would this read be.
            await asyncio.wait_for(wait_projected(pool, [t.execution_id for t in during], {"completed"}), 40)
            assert not migrating.done()
            await tx.rollback()
            assert await asyncio.wait_for(migrating, 60) == [9001, 9002]
        finally:
            # The lock goes with the blocker; then the migration ends either way.
            await blocker.close()
            if migrating is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(migrating, 60)
            await migrator.close()
        # And after the migration, with its new columns, the projector goes on as before.
        after = [await enqueue(redis, settings, wf) for _ in range(3)]
        await wait_projected(pool, [t.execution_id for t in after], {"completed"})
    assert await pool.fetchval("SELECT count(*) FROM executions WHERE note IS NULL") == 9


async def _has_lock_wait(pool: asyncpg.Pool) -> bool:
    waiting = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%ADD COLUMN note%'"
    )
    return int(waiting) > 0


async def test_an_old_webhook_consumer_leaves_newer_events_to_a_new_one(redis: Redis, settings: Settings) -> None:
    settings = settings.model_copy(update={"webhook_allow": "127.0.0.1"})
    keys = Keys.from_settings(settings)
    endpoint = await WebhookRegistry(redis, keys, settings).create(
        "http://127.0.0.1:9/hook", ["execution.succeeded"], None
    )
    ids = {}
    for version in (NEWER, FORMAT_VERSION):
        fields = event_fields(
            EventType.SUCCEEDED, task_id=f"t{version}", execution_id=version, workflow_id=1, client="acme", data={}
        )
        ids[version] = await redis.xadd(keys.results, {**fields, "v": str(version)})  # type: ignore[arg-type]
    deliveries = WebhookKeys(keys).deliveries
    old = WebhookDelivery(settings, redis, consumer="old")
    assert await old.fan_out_once(block_ms=10) == 2
    # Only today's event is announced; the newer one is neither announced nor acknowledged.
    assert await redis.hkeys(deliveries) == [delivery_id(endpoint.id, ids[FORMAT_VERSION])]
    assert (await redis.xpending(keys.results, settings.webhook_group))["pending"] == 1
    # An old consumer that takes it over (it went stale) leaves it again.
    old.stale_pending_ms = 0
    await old.fan_out_once(block_ms=10)
    assert await redis.hlen(deliveries) == 1
    new = WebhookDelivery(settings.model_copy(update={"test_only_format_version": NEWER}), redis, consumer="new")
    new.stale_pending_ms = 0
    await new.fan_out_once(block_ms=10)
    assert sorted(await redis.hkeys(deliveries)) == sorted(delivery_id(endpoint.id, i) for i in ids.values())
    assert (await redis.xpending(keys.results, settings.webhook_group))["pending"] == 0
