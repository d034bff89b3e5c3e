"""Retries of a node's own failures (a node's `retry` policy), through the real pipeline: the local
sandbox, real Redis and PostgreSQL, in-process and real worker processes.

Node code fails its first N runs by a counter file in a folder the sandboxes may write
(NOVA_SANDBOX_WRITABLE); each run appends one line to it, so the file also counts the runs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from shared.control import CancelOutcome, RunControl
from shared.events import Event
from shared.settings import Settings
from shared.streams import EventType, Keys
from shared.workflow import RetryPolicy
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
from tests.test_api import assert_error


@pytest.fixture
def settings(settings: Settings, shared_dir: Path) -> Settings:
    return settings.model_copy(update={"sandbox_writable": str(shared_dir)})


def flaky(counter: Path, fail_first: int, raise_: str = "ConnectionError('IMAP server went away')") -> str:
    """Node code that records its run (attempt, idempotency key, worker, the input it was given) and
    raises `raise_` on its first `fail_first` runs; it changes the context before raising, which a
    retry must not see."""
    return (
        "import json\n"
        f"with open({str(counter)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'attempt': context['_nova'].get('attempt'),"
        " 'key': context['_nova']['idempotency_key'], 'worker': context['_nova']['worker'],"
        " 'seen': sorted(k for k in context if k not in ('_nova', 'client_slug')),"
        " 'n': context.get('n')}) + '\\n')\n"
        f"runs = len(open({str(counter)!r}).read().splitlines())\n"
        "context['n'] = context.get('n', 0) + 100\n"
        "context['partial'] = runs\n"
        f"if runs <= {fail_first}:\n"
        f"    raise {raise_}\n"
        "del context['partial']\n"
        "context['fetched'] = runs\n"
    )


def shared_file(folder: Path, name: str) -> Path:
    """A file every sandbox may append to: a retry in a fresh sandbox, or on another worker, may run
    under another uid than the attempt that came before it."""
    path = folder / name
    path.touch()
    path.chmod(0o666)
    return path


def runs_of(counter: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in counter.read_text().splitlines()] if counter.exists() else []


def with_retry(definition: dict[str, Any], node: str, policy: dict[str, Any]) -> dict[str, Any]:
    for n in definition["nodes"]:
        if n["id"] == node:
            n["retry"] = policy
    return definition


FAST = {"initial": 0.05, "factor": 2, "max": 0.2}


async def _chain(pool: asyncpg.Pool, execution_id: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT step, node_id, status, attempt, max_attempts, error, input_context, duration_ms, output_context"
        " FROM node_runs WHERE execution_id = $1 ORDER BY step",
        execution_id,
    )


def _events(events: list[Event], type_: EventType, node_id: str) -> list[Event]:
    return [e for e in events if e.type == type_ and e.data.get("node_id") == node_id]


# ---- through the pipeline -------------------------------------------------------------------------


async def test_a_node_succeeds_on_its_third_attempt_of_three(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path, api: httpx.AsyncClient
) -> None:
    counter = shared_file(shared_dir, "runs")
    # Its errors qualify by a base class (ConnectionRefusedError is a ConnectionError) and by a qualified
    # name (imaplib's abort is a nested class), as the runner reports them.
    code = flaky(counter, 2, "imaplib.IMAP4.abort('socket error: EOF') if runs == 1 else ConnectionRefusedError(111)")
    code = "import imaplib\n" + code
    policy = {"attempts": 3, "backoff": FAST, "on": ["ConnectionError", "imaplib.IMAP4.abort"]}
    wf = await create_workflow(redis, settings, pool, with_retry(linear(code, "context['after'] = True"), "a1", policy))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {"mailbox": "inbox"})
        done = await wait_terminal(redis, settings, [task.task_id])
        await wait_projected(pool, [task.execution_id], {"completed"})
    final = done[task.task_id]
    assert final.type == EventType.SUCCEEDED, final.data
    # The retry ran from a1's input context: neither `partial` nor a doubled `n` leaked from the failures.
    assert final.data["final_context"] == {"mailbox": "inbox", "n": 100, "fetched": 3, "after": True}
    runs = runs_of(counter)
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    assert all(r["seen"] == ["mailbox"] and r["n"] is None for r in runs), runs
    # One idempotency key for every attempt: an external system deduplicates a half-done first try.
    assert {r["key"] for r in runs} == {f"{task.execution_id}:a1:2"}
    rows = await _chain(pool, task.execution_id)
    assert [(r["node_id"], r["status"], r["attempt"], r["max_attempts"]) for r in rows] == [
        ("start", "success", None, None),
        ("a1", "failure", 1, 3),
        ("a1", "failure", 2, 3),
        ("a1", "success", 3, 3),
        ("a2", "success", None, None),
        ("end", "success", None, None),
    ]
    assert [r["error"]["type"] for r in rows[1:3]] == ["abort", "ConnectionRefusedError"]
    assert all(r["input_context"] == {"mailbox": "inbox"} for r in rows[1:4])
    assert all(r["duration_ms"] is not None for r in rows)
    # Events: one node_finished per attempt, the failed ones saying when the next one is due.
    events = await wait_for_events(redis, settings, lambda e: e.task_id == task.task_id, 15)
    finished = _events(events, EventType.NODE_FINISHED, "a1")
    assert [(e.data["attempt"], e.data["status"], e.data["retry_at"] is not None) for e in finished] == [
        (1, "failure", True),
        (2, "failure", True),
        (3, "success", False),
    ]
    assert [e.data["attempt"] for e in _events(events, EventType.NODE_STARTED, "a1")] == [1, 2, 3]
    # NOVA's chain of work lists each attempt as an entry.
    chain = (await api.get(f"/executions/{task.execution_id}/chain")).json()
    entries = [(e["node_id"], e["status"], e["attempt"]) for e in chain["entries"]]
    assert entries[1:4] == [("a1", "failed", 1), ("a1", "failed", 2), ("a1", "success", 3)]
    execution = (await api.get(f"/executions/{task.execution_id}")).json()
    assert execution["status"] == "completed" and execution["nodes_executed"] == 6


async def test_exhausted_attempts_fail_with_the_last_error_and_every_attempt_in_the_chain(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    counter = shared_file(shared_dir, "runs")
    code = flaky(counter, 99, "TimeoutError(f'read timed out (run {runs})')")
    policy = {"attempts": 3, "backoff": FAST, "on": ["TimeoutError"]}
    wf = await create_workflow(redis, settings, pool, with_retry(linear(code, "context['never'] = 1"), "a1", policy))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {})
        done = await wait_terminal(redis, settings, [task.task_id])
        await wait_projected(pool, [task.execution_id], {"failed"})
    final = done[task.task_id]
    assert final.type == EventType.FAILED
    error = final.data["error"]
    assert (error["node_id"], error["type"], error["message"]) == ("a1", "TimeoutError", "read timed out (run 3)")
    assert (error["attempt"], error["max_attempts"]) == (3, 3) and "retry_stopped" not in error
    assert len(runs_of(counter)) == 3
    rows = await _chain(pool, task.execution_id)
    assert [(r["node_id"], r["status"], r["attempt"]) for r in rows] == [
        ("start", "success", None),
        ("a1", "failure", 1),
        ("a1", "failure", 2),
        ("a1", "failure", 3),
    ]
    assert [r["error"]["message"] for r in rows[1:]] == [f"read timed out (run {i})" for i in (1, 2, 3)]
    row = await pool.fetchrow("SELECT status, error, nodes_executed FROM executions WHERE id = $1", task.execution_id)
    assert row["status"] == "failed" and row["error"]["message"] == "read timed out (run 3)"
    assert row["nodes_executed"] == 4


async def test_an_error_the_policy_does_not_name_fails_at_once(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    counter = shared_file(shared_dir, "runs")
    code = flaky(counter, 99, "KeyError('vendor')")
    policy = {"attempts": 5, "backoff": FAST, "on": ["ConnectionError", "TimeoutError"]}
    wf = await create_workflow(redis, settings, pool, with_retry(linear(code), "a1", policy))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {})
        done = await wait_terminal(redis, settings, [task.task_id])
        await wait_projected(pool, [task.execution_id], {"failed"})
    error = done[task.task_id].data["error"]
    assert (error["type"], error["attempt"], error["max_attempts"]) == ("KeyError", 1, 5)
    assert len(runs_of(counter)) == 1
    rows = await _chain(pool, task.execution_id)
    assert [(r["node_id"], r["status"], r["attempt"]) for r in rows] == [
        ("start", "success", None),
        ("a1", "failure", 1),
    ]


async def test_a_node_killed_at_its_time_limit_is_retried_in_a_fresh_sandbox(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    counter = shared_file(shared_dir, "runs")
    # The first run hangs (a dead connection) and is killed at its limit; the sandbox dies with it.
    hang = (
        f"import time\nopen({str(counter)!r}, 'a').write('x\\n')\n"
        f"if len(open({str(counter)!r}).read().splitlines()) == 1:\n    time.sleep(60)\ncontext['ok'] = True"
    )
    definition = with_retry(
        linear("context['before'] = 1", hang), "a2", {"attempts": 2, "backoff": FAST, "on": ["TimeoutError"]}
    )
    definition["nodes"][2]["timeout"] = 2
    wf = await create_workflow(redis, settings, pool, definition)
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {})
        done = await wait_terminal(redis, settings, [task.task_id])
    assert done[task.task_id].type == EventType.SUCCEEDED, done[task.task_id].data
    assert done[task.task_id].data["final_context"] == {"before": 1, "ok": True}
    events = await wait_for_events(redis, settings, lambda e: e.task_id == task.task_id, 13)
    failed = _events(events, EventType.NODE_FINISHED, "a2")[0]
    assert (failed.data["error"]["reason"], failed.data["attempt"]) == ("timeout", 1)


async def _always_failing(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, counter: Path, wait: float, attempts: int, timeout: float
) -> tuple[str, dict[str, Any]]:
    """Run a workflow whose a1 always fails with a retryable error, waits `wait` s between attempts and
    has `timeout` s in all: the task id and its terminal error (it must fail)."""
    policy = {
        "attempts": attempts,
        "backoff": {"initial": wait, "max": wait, "jitter": False},
        "on": ["ConnectionError"],
    }
    wf = await create_workflow(
        redis, settings, pool, with_retry(linear(flaky(counter, 99)), "a1", policy) | {"timeout": timeout}
    )
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {})
        done = await wait_terminal(redis, settings, [task.task_id], timeout=30)
    assert done[task.task_id].type == EventType.FAILED
    return task.task_id, done[task.task_id].data["error"]


async def test_the_wait_never_runs_past_the_execution_deadline(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    counter = shared_file(shared_dir, "runs")
    # A 60 s wait in a workflow given 20 s: the node fails at once with its error rather than wait.
    _, error = await _always_failing(redis, settings, pool, counter, wait=60, attempts=3, timeout=20)
    assert (error["type"], error["attempt"], error["retry_stopped"]) == ("ConnectionError", 1, "deadline")
    assert len(runs_of(counter)) == 1


async def test_parked_waits_count_against_the_execution_deadline(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    counter = shared_file(shared_dir, "runs")
    # Waits of 1.2 s, each parked (past NOVA_NODE_RETRY_PARK_AFTER, 1 s), in a workflow given 3 s: a run
    # resumed from a parked wait keeps its first deadline, so at most 3 attempts start (at 0, 1.2 and 2.4 s)
    # and the 4th wait is not begun. A resume that started the clock again would run all 5.
    task_id, error = await _always_failing(redis, settings, pool, counter, wait=1.2, attempts=5, timeout=3)
    assert (error["type"], error.get("retry_stopped")) == ("ConnectionError", "deadline")
    events = await wait_for_events(redis, settings, lambda e: e.task_id == task_id and e.type == EventType.RETRY)
    assert events, "the waits were parked"
    assert 1 <= len(runs_of(counter)) <= 3


async def test_cancel_during_the_backoff_wait_stops_the_run(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    counter = shared_file(shared_dir, "runs")
    policy = {"attempts": 3, "backoff": {"initial": 120, "max": 120, "jitter": False}, "on": ["ConnectionError"]}
    wf = await create_workflow(
        redis, settings, pool, with_retry(linear(flaky(counter, 1)), "a1", policy) | {"timeout": 600}
    )
    control = RunControl(redis, Keys.from_settings(settings), task_ttl=settings.task_ttl, pool=pool)
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.NODE_FINISHED
            and e.data.get("node_id") == "a1",
        )  # fmt: skip
        assert (await control.cancel_task(task.task_id)).outcome == CancelOutcome.CANCELLED
        await wait_projected(pool, [task.execution_id], {"cancelled"})
        # The worker let go of the run (its entry acknowledged) long before the 120 s wait could end.
        for _ in range(1500):
            if (await redis.xpending(settings.requests_stream, settings.worker_group))["pending"] == 0:
                break
            await asyncio.sleep(0.02)
        assert (await redis.xpending(settings.requests_stream, settings.worker_group))["pending"] == 0
    assert len(runs_of(counter)) == 1
    events = await wait_for_events(redis, settings, lambda e: e.task_id == task.task_id, 7)
    assert [e.data["attempt"] for e in _events(events, EventType.NODE_STARTED, "a1")] == [1]


async def test_kill9_during_the_backoff_resumes_at_the_node_with_the_attempt_count_kept(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path, tmp_path: Path
) -> None:
    counter = shared_file(shared_dir, "runs")
    effects = shared_file(shared_dir, "effects")
    # a1's side effect ran before the crash: it must not run again. a2 fails once, then waits 6 s.
    send = f"open({str(effects)!r}, 'a').write(context['_nova']['idempotency_key'] + '\\n')"
    policy = {"attempts": 3, "backoff": {"initial": 6, "max": 6, "jitter": False}, "on": ["ConnectionError"]}
    wf = await create_workflow(redis, settings, pool, with_retry(linear(send, flaky(counter, 1)), "a2", policy))
    # The wait is kept in the worker's slot here (parking is the next test's): the kill lands in it.
    fast = settings.model_copy(update={"visibility_timeout": 1.0, "node_retry_park_after": 60.0})
    victim = start_worker_process(fast, tmp_path / "victim.log", NOVA_NODE_RETRY_PARK_AFTER="60")
    try:
        task = await enqueue(redis, settings, wf, {})
        failed = await wait_for_events(
            redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.NODE_FINISHED
            and e.data.get("node_id") == "a2", timeout=60,
        )  # fmt: skip
    finally:
        kill9(victim)
    assert failed[0].data["attempt"] == 1 and failed[0].data["retry_at"]
    async with in_process_worker(fast):
        done = await wait_terminal(redis, settings, [task.task_id], timeout=60)
        await wait_projected(pool, [task.execution_id], {"completed"})
    assert done[task.task_id].type == EventType.SUCCEEDED, done[task.task_id].data
    runs = runs_of(counter)
    # Attempt 1 on the killed worker, attempt 2 (not 1 again) on the one that resumed: nothing lost or
    # repeated, and the key is the same.
    assert [r["attempt"] for r in runs] == [1, 2]
    assert runs[0]["worker"] != runs[1]["worker"]
    assert len({r["key"] for r in runs}) == 1
    assert effects.read_text().splitlines() == [f"{task.execution_id}:a1:2"]
    events = await wait_for_events(redis, settings, lambda e: e.task_id == task.task_id, 14)
    started = [e for e in events if e.type == EventType.STARTED]
    assert [e.data["delivery"] for e in started] == [1, 2] and started[1].data["resumed_from_step"] == 3
    second = _events(events, EventType.NODE_STARTED, "a2")[-1]
    # The resumed worker kept the wait: attempt 2 began no earlier than attempt 1 said it would.
    assert second.data["attempt"] == 2 and second.data["started_at"] >= failed[0].data["retry_at"]
    rows = await _chain(pool, task.execution_id)
    assert [(r["node_id"], r["status"], r["attempt"]) for r in rows] == [
        ("start", "success", None),
        ("a1", "success", None),
        ("a2", "failure", 1),
        ("a2", "success", 2),
        ("end", "success", None),
    ]


async def test_a_run_resumed_before_its_retry_is_due_keeps_the_time_it_had_after_the_wait(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path, tmp_path: Path
) -> None:
    counter = shared_file(shared_dir, "runs")
    # a1 fails once, then waits 6 s in the worker's slot, in a workflow given 8 s: under 2 s are left after
    # the wait. The worker is killed during it and another resumes the run after the visibility timeout (1 s),
    # seconds before the retry is due: it waits the rest, and the node must still have what was left, not
    # have it spent on the wait a second time.
    policy = {"attempts": 2, "backoff": {"initial": 6, "max": 6, "jitter": False}, "on": ["ConnectionError"]}
    wf = await create_workflow(
        redis, settings, pool, with_retry(linear(flaky(counter, 1)), "a1", policy) | {"timeout": 8}
    )
    fast = settings.model_copy(update={"visibility_timeout": 1.0, "node_retry_park_after": 60.0})
    victim = start_worker_process(fast, tmp_path / "victim.log", NOVA_NODE_RETRY_PARK_AFTER="60")
    try:
        task = await enqueue(redis, settings, wf, {})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.NODE_FINISHED
            and e.data.get("node_id") == "a1", timeout=60,
        )  # fmt: skip
    finally:
        kill9(victim)
    async with in_process_worker(fast):
        done = await wait_terminal(redis, settings, [task.task_id], timeout=60)
    assert done[task.task_id].type == EventType.SUCCEEDED, done[task.task_id].data
    assert [r["attempt"] for r in runs_of(counter)] == [1, 2]


async def test_a_long_wait_gives_the_slot_back_and_get_tasks_shows_it(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path, api: httpx.AsyncClient
) -> None:
    counter = shared_file(shared_dir, "runs")
    # A 2 s wait, past NOVA_NODE_RETRY_PARK_AFTER (1 s): the run waits in the delayed set.
    policy = {"attempts": 3, "backoff": {"initial": 2, "max": 2, "jitter": False}, "on": ["ConnectionError"]}
    wf = await create_workflow(redis, settings, pool, with_retry(linear(flaky(counter, 1)), "a1", policy))
    quick = await create_workflow(redis, settings, pool, linear("context['quick'] = True"))
    # One slot: the quick run can only start while the first one waits if the wait gave the slot back.
    async with in_process_worker(settings, concurrency=1):
        task = await enqueue(redis, settings, wf, {})
        [waiting] = await wait_for_events(
            redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.RETRY
        )
        assert waiting.data["node_retry"]["node_id"] == "a1" and waiting.data["attempt"] == 0
        shown = (await api.get(f"/tasks/{task.task_id}")).json()
        other = await enqueue(redis, settings, quick, {})
        done = await wait_terminal(redis, settings, [task.task_id, other.task_id])
        await wait_projected(pool, [task.execution_id], {"completed"})
    assert shown["status"] == "RETRY" and shown["meta"]["node_retry"] == waiting.data["node_retry"]
    assert shown["meta"]["node_retry"]["attempt"] == 2 and shown["meta"]["node_retry"]["max_attempts"] == 3
    assert "Node 'a1' failed and will be retried (attempt 2 of 3)" in shown["message"]
    assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
    # The quick run finished before the waiting node's second attempt began.
    # Every event of both (13 of the retried run, 9 of the quick one), in the order they were written.
    events = await wait_for_events(redis, settings, lambda e: e.task_id in (task.task_id, other.task_id), 22)
    second = _events([e for e in events if e.task_id == task.task_id], EventType.NODE_STARTED, "a1")[-1]
    assert events.index(done[other.task_id]) < events.index(second)
    assert second.data["attempt"] == 2 and second.data["started_at"] >= waiting.data["retry_at"]
    assert [r["attempt"] for r in runs_of(counter)] == [1, 2]
    rows = await _chain(pool, task.execution_id)
    assert [(r["node_id"], r["status"], r["attempt"]) for r in rows] == [
        ("start", "success", None),
        ("a1", "failure", 1),
        ("a1", "success", 2),
        ("end", "success", None),
    ]
    # Running again, the task no longer says it waits.
    assert (await api.get(f"/tasks/{task.task_id}")).json()["meta"] is None


async def test_graphs_without_a_policy_run_as_before(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("raise ConnectionError('down')"))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {})
        done = await wait_terminal(redis, settings, [task.task_id])
        await wait_projected(pool, [task.execution_id], {"failed"})
    error = done[task.task_id].data["error"]
    assert set(error) == {"node_id", "type", "message", "traceback", "reason"}
    events = await wait_for_events(redis, settings, lambda e: e.task_id == task.task_id, 7)
    for event in events:
        if event.type in (EventType.NODE_STARTED, EventType.NODE_FINISHED):
            assert not {"attempt", "max_attempts", "retry_at"} & set(event.data)
    rows = await _chain(pool, task.execution_id)
    assert [(r["node_id"], r["status"], r["attempt"]) for r in rows] == [
        ("start", "success", None),
        ("a1", "failure", None),
    ]


# ---- validation -----------------------------------------------------------------------------------


def _graph(retry: Any, node_type: str = "action") -> dict[str, Any]:
    node: dict[str, Any] = {"id": "fetch", "type": node_type, "retry": retry, "next": "end"}
    if node_type != "start":
        node["code"] = "pass"
    nodes = [{"id": "start", "type": "start", "next": "fetch"}, node, {"id": "end", "type": "end"}]
    if node_type == "start":
        nodes = [node | {"id": "fetch"}, {"id": "end", "type": "end"}]
    return {"nodes": nodes, "edges": []}


@pytest.mark.parametrize(
    ("retry", "fragment"),
    [
        ({"attempts": 3, "on": ["limit:memory"]}, "never retried"),
        ({"attempts": 3, "on": ["ConnectionError", "MemoryLimitExceeded"]}, "never retried"),
        ({"attempts": 3, "on": ["connection error"]}, "not an exception type name"),
        ({"attempts": 3, "on": []}, "retry.on"),
        ({"attempts": 3}, "retry.on"),
        ({"attempts": 0, "on": ["ConnectionError"]}, "retry.attempts"),
        ({"attempts": 11, "on": ["ConnectionError"]}, "retry.attempts"),
        ({"attempts": 3, "on": ["ConnectionError"], "tries": 2}, "retry.tries"),
        ({"attempts": 3, "on": ["ConnectionError"], "backoff": {"initial": -1}}, "retry.backoff.initial"),
        ({"attempts": 3, "on": ["ConnectionError"], "backoff": {"factor": 0.5}}, "retry.backoff.factor"),
        ({"attempts": 3, "on": ["ConnectionError"], "backoff": {"initial": 10, "max": 5}}, "below its initial"),
        ("three times", "retry"),
    ],
)
async def test_invalid_retry_policies_are_422_naming_the_node(
    api: httpx.AsyncClient, retry: Any, fragment: str
) -> None:
    response = await api.post("/workflows", json={"name": "bad-retry", "definition": _graph(retry)})
    error = assert_error(response, 422, fragment, "'fetch'")
    assert any(p["node"] == "fetch" for p in error["details"])


async def test_a_retry_policy_on_a_start_node_is_refused_and_one_attempt_is_a_warning(api: httpx.AsyncClient) -> None:
    policy = {"attempts": 2, "on": ["ConnectionError"]}
    assert_error(
        await api.post("/workflows", json={"name": "bad-start", "definition": _graph(policy, "start")}),
        422,
        "only action and decision nodes",
    )
    response = await api.post(
        "/workflows", json={"name": "one-try", "definition": _graph({"attempts": 1, "on": ["ConnectionError"]})}
    )
    assert response.status_code == 201, response.text
    assert any("never retried" in w["message"] and w["node"] == "fetch" for w in response.json()["warnings"])


def test_policy_matching_and_backoff() -> None:
    policy = RetryPolicy.model_validate(
        {"attempts": 4, "backoff": {"initial": 1, "factor": 3, "max": 5, "jitter": False}, "on": ["OSError", "abort"]}
    )
    assert [policy.delay(n) for n in (1, 2, 3)] == [1, 3, 5]
    assert policy.matches("ConnectionRefusedError", ["ConnectionRefusedError", "ConnectionError", "OSError"])
    assert policy.matches("abort", ["imaplib.IMAP4.abort", "imaplib.IMAP4.error", "Exception"])
    assert not policy.matches("KeyError", ["KeyError", "LookupError", "Exception"])
    # Errors a sandbox makes carry no bases: a wall-time kill is a TimeoutError by name only.
    assert not policy.matches("TimeoutError")
    jittered = RetryPolicy.model_validate({"attempts": 2, "backoff": {"initial": 2}, "on": ["OSError"]})
    assert all(1 <= jittered.delay(1) <= 2 for _ in range(50))
