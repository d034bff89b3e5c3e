"""Real worker processes: replicas share the group, kill -9 loses nothing, SIGTERM drains."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from shared.inspection import worker_reports
from shared.settings import Settings
from shared.streams import EventType, Keys
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    kill9,
    linear,
    start_worker_process,
    wait_for_events,
    wait_projected,
    wait_terminal,
)

TASKS = 60


async def until_workers(redis: Redis, keys: Keys, count: int, timeout: float = 60) -> None:
    """Until `count` workers have reported themselves live (each does as it starts its loops)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(await worker_reports(redis, keys)) < count:
        assert asyncio.get_running_loop().time() < deadline, f"fewer than {count} workers live in {timeout} s"
        await asyncio.sleep(0.05)


async def _exit_code(proc: object, timeout: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)  # type: ignore[attr-defined]


async def test_two_worker_processes_run_each_task_exactly_once(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("import time\ntime.sleep(0.01)\ncontext['n'] += 1"))
    procs = [start_worker_process(settings, tmp_path / f"w{i}.log", NOVA_CONCURRENCY="8") for i in range(2)]
    try:
        # Both replicas reading before the first request: then both take some without a long backlog
        # (a replica that started late on a busy host would otherwise find the work done).
        await until_workers(redis, Keys.from_settings(settings), 2)
        tasks = [await enqueue(redis, settings, wf, {"n": i}) for i in range(TASKS)]
        done = await wait_terminal(redis, settings, [t.task_id for t in tasks], timeout=90)
        assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
        assert all(done[t.task_id].data["final_context"]["n"] == i + 1 for i, t in enumerate(tasks))
        await wait_projected(pool, [t.execution_id for t in tasks], {"completed"}, timeout=60)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [await _exit_code(p, 30) for p in procs] == [0, 0]
    started = await wait_for_events(redis, settings, lambda e: e.type == EventType.STARTED, TASKS)
    per_task = Counter(e.task_id for e in started)
    assert set(per_task.values()) == {1}
    consumers = Counter(e.data["consumer"] for e in started)
    assert len(consumers) == 2, consumers
    assert await pool.fetchval("SELECT count(*) FROM node_runs") == TASKS * 3


async def test_kill9_mid_run_resumes_elsewhere_without_repeating_finished_nodes(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    shared = Path(tempfile.mkdtemp())
    shared.chmod(0o777)
    effects, marker = shared / "emails-sent.txt", shared / "a2-started"
    send_email = f"open({str(effects)!r}, 'a').write(context['_nova']['idempotency_key'] + '\\n')"
    slow_first_time = (
        f"import os, time\nif not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close()\n    time.sleep(60)\ncontext['done'] = True"
    )
    wf = await create_workflow(redis, settings, pool, linear(send_email, slow_first_time))
    # Sandboxes see the host read-only but for folders an operator shares.
    fast = settings.model_copy(update={"visibility_timeout": 1.0, "sandbox_writable": str(shared)})
    victim = start_worker_process(fast, tmp_path / "victim.log")
    task = await enqueue(redis, settings, wf)
    await wait_for_events(
        redis, settings, lambda e: e.type == EventType.NODE_STARTED and e.data["node_id"] == "a2", timeout=60
    )
    # The node has begun its side effect (the marker) when the worker dies.
    for _ in range(500):
        if marker.exists():
            break
        await asyncio.sleep(0.01)
    assert marker.exists()
    kill9(victim)
    async with in_process_worker(fast):
        done = await wait_terminal(redis, settings, [task.task_id], timeout=60)
        assert done[task.task_id].type == EventType.SUCCEEDED, done[task.task_id].data
        await wait_projected(pool, [task.execution_id], {"completed"})
    # The e-mail node finished before the crash: it ran once. Only a2, in flight, ran twice.
    assert effects.read_text().splitlines() == [f"{task.execution_id}:a1:2"]
    started = await wait_for_events(
        redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.STARTED, 2
    )
    assert [e.data["delivery"] for e in started] == [1, 2] and started[1].data["resumed_from_step"] == 2
    rows = await pool.fetch(
        "SELECT step, node_id, status FROM node_runs WHERE execution_id = $1 ORDER BY step", task.execution_id
    )
    assert [(r["step"], r["node_id"], r["status"]) for r in rows] == [
        (1, "start", "success"),
        (2, "a1", "success"),
        (3, "a2", "success"),
        (4, "end", "success"),
    ]
    shutil.rmtree(shared)


async def test_sigterm_lets_in_flight_runs_finish_and_exits_zero(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("import time\ntime.sleep(1.5)\ncontext['ok'] = 1"))
    proc = start_worker_process(settings, tmp_path / "w.log", NOVA_SHUTDOWN_GRACE="20")
    task = await enqueue(redis, settings, wf)
    await wait_for_events(redis, settings, lambda e: e.type == EventType.NODE_STARTED and e.data["node_id"] == "a1")
    proc.send_signal(signal.SIGTERM)
    assert await _exit_code(proc, 30) == 0
    done = await wait_terminal(redis, settings, [task.task_id], timeout=5)
    assert done[task.task_id].type == EventType.SUCCEEDED


async def test_sigterm_past_the_grace_leaves_the_entry_pending_for_others(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("import time\ntime.sleep(2)\ncontext['ok'] = 1"))
    proc = start_worker_process(settings, tmp_path / "w.log", NOVA_SHUTDOWN_GRACE="0.2")
    task = await enqueue(redis, settings, wf)
    await wait_for_events(redis, settings, lambda e: e.type == EventType.NODE_STARTED and e.data["node_id"] == "a1")
    proc.send_signal(signal.SIGTERM)
    assert await _exit_code(proc, 30) == 0
    pending = await redis.xpending(settings.requests_stream, settings.worker_group)
    assert pending["pending"] == 1
    async with in_process_worker(settings, visibility_timeout=0.5):
        done = await wait_terminal(redis, settings, [task.task_id], timeout=30)
    assert done[task.task_id].type == EventType.SUCCEEDED


async def test_second_signal_exits_at_once(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("import time\ntime.sleep(30)"))
    proc = start_worker_process(settings, tmp_path / "w.log", NOVA_SHUTDOWN_GRACE="60")
    await enqueue(redis, settings, wf)
    await wait_for_events(redis, settings, lambda e: e.type == EventType.NODE_STARTED and e.data["node_id"] == "a1")
    proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)  # the first signal must be handled before the second one means "now"
    proc.send_signal(signal.SIGTERM)
    assert await _exit_code(proc, 10) == 128 + signal.SIGTERM
