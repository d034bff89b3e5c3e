"""The E2B sandbox through the real `e2b` SDK, over real HTTP, against a local stand-in of E2B."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from cli.chaos_e2b import E2BPlanRun
from cli.chaos_e2b import passed as chaos_e2b_passed
from cli.e2b_standin import StandInServer
from cli.faultproxy import FaultProxy
from consumer.engine import Attempt, Checkpoint, NodeRecord, run_workflow
from consumer.sandbox.base import NodeError, SandboxBusy, SandboxInfraError, SandboxSpec
from consumer.sandbox.e2b import E2BSandbox, E2BSandboxProvider
from consumer.sandbox.local import LocalSandboxProvider
from shared.events import Event
from shared.settings import Settings
from shared.streams import EventType, Keys
from shared.workflow import Definition, Node, validate_definition
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    wait_for_events,
    wait_terminal,
    worker_env,
)


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInServer]:
    with StandInServer() as server:
        for name, value in server.sdk_environment().items():
            monkeypatch.setenv(name, value)
        yield server


@pytest.fixture
async def provider(standin: StandInServer) -> AsyncIterator[E2BSandboxProvider]:
    p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key", e2b_template="nova-nodes"))
    yield p
    await p.aclose()


def spec(**secrets: str) -> SandboxSpec:
    return SandboxSpec(execution_id=7, client="acme", executor="e2b", secrets=secrets)


async def test_runs_nodes_and_kills_the_sandbox_on_close(provider: E2BSandboxProvider, standin: StandInServer) -> None:
    sb = await provider.open(spec(IMAP_PASSWORD="pw"))
    [sandbox_id] = standin.state.created
    assert standin.state.envs[sandbox_id] == {"IMAP_PASSWORD": "pw"}
    result = await sb.run_action(
        "a", "import os\ncontext['n'] += len(os.environ['IMAP_PASSWORD'])\nprint('ok')", {"n": 1}, 10
    )
    assert result.context == {"n": 3} and result.stdout == "ok\n"
    decision = await sb.evaluate("d", "context['n'] == 3", result.context, 10)
    assert decision.decision is True
    with pytest.raises(NodeError) as info:
        await sb.run_action("bad", "x = 1\nraise KeyError('vendor')", {}, 10)
    assert (info.value.type, info.value.reason) == ("KeyError", "exception")
    assert 'File "<node bad>", line 2' in info.value.traceback
    with pytest.raises(NodeError) as info:
        await sb.run_action("spin", "while True: pass", {}, 0.5)
    assert info.value.reason == "timeout" and "0.5s" in info.value.message
    await sb.close()
    await sb.close()
    assert standin.state.killed == [sandbox_id] and sandbox_id not in standin.state.sandboxes
    assert any("runner.py --once" in c for c in standin.state.commands)


@pytest.mark.parametrize("step", ["create", "create_reply"])
async def test_a_create_answered_502_is_re_sent_with_the_same_key_and_makes_one_sandbox(
    provider: E2BSandboxProvider, standin: StandInServer, step: str
) -> None:
    # "create_reply": E2B made the sandbox, but its answer was lost (a gateway's 502): the re-send with
    # the same idempotency key must get that sandbox, not a second one.
    standin.state.fail[step] = 502
    standin.state.fail_times[step] = 2
    sb = await provider.open(spec())
    # Refused twice then made (3 asks); or made at once, its answer lost, and found by the first re-send (2).
    asks = 3 if step == "create" else 2
    assert len(standin.state.idempotency_keys) == asks and len(set(standin.state.idempotency_keys)) == 1
    assert standin.alive() == standin.state.created == [sb.sandbox.sandbox_id]
    await sb.close()
    assert standin.alive() == []


@pytest.mark.parametrize(("status", "fragment"), [(500, "could not create"), (503, "could not create")])
async def test_create_errors_are_infrastructure_errors(
    provider: E2BSandboxProvider, standin: StandInServer, status: int, fragment: str
) -> None:
    standin.state.fail["create"] = status
    with pytest.raises(SandboxInfraError, match=fragment):
        await provider.open(spec())


async def test_upload_error_is_infrastructure_and_the_sandbox_is_not_leaked(
    provider: E2BSandboxProvider, standin: StandInServer
) -> None:
    standin.state.fail["upload"] = 503
    with pytest.raises(SandboxInfraError, match="upload"):
        await provider.open(spec())
    assert standin.state.killed == standin.state.created != []


async def test_run_error_is_infrastructure(provider: E2BSandboxProvider, standin: StandInServer) -> None:
    sb = await provider.open(spec())
    standin.state.fail["run"] = "UNAVAILABLE"
    with pytest.raises(SandboxInfraError, match="could not run node 'a'"):
        await sb.run_action("a", "pass", {}, 5)
    await sb.close()


async def test_kill_error_does_not_fail_close(provider: E2BSandboxProvider, standin: StandInServer) -> None:
    sb = await provider.open(spec())
    standin.state.fail["kill"] = 500
    await sb.close()
    assert standin.state.killed == standin.state.created


async def test_worker_shutdown_kills_every_open_sandbox(provider: E2BSandboxProvider, standin: StandInServer) -> None:
    await provider.open(spec())
    await provider.open(spec())
    await provider.aclose()
    assert sorted(standin.state.killed) == sorted(standin.state.created) and len(standin.state.created) == 2


class _Hooks:
    async def node_started(
        self, step: int, node: Node, started_at: str, context: dict[str, Any], attempt: Attempt | None = None
    ) -> None:
        return None

    async def node_finished(self, record: NodeRecord, checkpoint: Checkpoint) -> None:
        return None


async def test_same_workflow_same_final_context_locally_and_on_e2b(provider: E2BSandboxProvider) -> None:
    definition = validate_definition({
        "nodes": [
            {"id": "s", "type": "start", "next": "total"},
            {"id": "total", "type": "action", "next": "big",
             "code": "context['total'] = sum(l['qty'] * l['price'] for l in context['lines'])"},
            {"id": "big", "type": "decision", "code": "context['total'] > 100", "on_true": "review", "on_false": "ok"},
            {"id": "review", "type": "action", "next": "e",
             "code": "import hashlib\ncontext['ref'] = hashlib.sha1(b'x').hexdigest()[:8]"},
            {"id": "ok", "type": "action", "code": "context['ref'] = None", "next": "e"},
            {"id": "e", "type": "end"},
        ]
    })  # fmt: skip
    local = LocalSandboxProvider(Settings(sandbox_pool_size=0))
    context = {"lines": [{"qty": 3, "price": 50.0}]}
    outcomes = []
    for open_sandbox in (local.open, provider.open):
        outcome = await run_workflow(
            definition, context, open_sandbox=open_sandbox, spec=spec(), hooks=_Hooks(), node_timeout=10
        )
        outcomes.append((outcome.status, outcome.final_context, outcome.nodes_executed))
    await local.aclose()
    assert outcomes[0] == outcomes[1] == ("success", {**context, "total": 150.0, "ref": "11f6ad8e"}, 5)


@pytest.mark.skipif(not os.environ.get("E2B_API_KEY"), reason="E2B_API_KEY is not set: the live E2B test is skipped")
async def test_live_e2b() -> None:
    live = E2BSandboxProvider(Settings())
    sb = await live.open(spec())
    try:
        assert (await sb.run_action("a", "context['x'] = 1", {}, 60)).context == {"x": 1}
    finally:
        await live.aclose()


# Each case of the E2B review: classified through the real SDK against a stand-in as strict as E2B.


async def test_unreachable_e2b_is_infrastructure(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.embedded import free_port

    monkeypatch.setenv("E2B_API_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens: refused
    p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key"))
    with pytest.raises(SandboxInfraError, match="could not create"):
        await p.open(spec())


async def test_bad_key_fails_fast_naming_the_key(standin: StandInServer) -> None:
    p = E2BSandboxProvider(Settings(e2b_api_key="wrong"))
    with pytest.raises(NodeError) as info:
        await p.open(spec())
    assert info.value.reason == "executor_unavailable" and "E2B_API_KEY" in info.value.message
    assert p.permanent_error is not None and standin.state.created == []


async def test_unknown_template_fails_fast_naming_it(standin: StandInServer) -> None:
    p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key", e2b_template="no-such"))
    with pytest.raises(NodeError) as info:
        await p.open(spec())
    assert info.value.reason == "executor_unavailable" and "'no-such'" in info.value.message


async def test_dropped_stream_reattaches_and_runs_the_node_once(
    provider: E2BSandboxProvider, standin: StandInServer
) -> None:
    sb = await provider.open(spec())
    standin.state.fail["drop"] = True
    standin.state.fail_times["drop"] = 1
    code = "import time\nopen('runs', 'a').write('x')\ntime.sleep(0.3)\ncontext['n'] = 1"
    result = await sb.run_action("a", code, {}, 10)
    assert result.context == {"n": 1}
    [box] = standin.state.sandboxes.values()
    assert (box.root / "runs").read_text() == "x"  # not run a second time
    assert sum("runner.py --once" in c for c in standin.state.commands) == 1
    await sb.close()


@pytest.mark.parametrize(("code", "reason"), [("import os\nos._exit(137)", "limit:memory"),
                                              ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
                                               "limit:memory"),
                                              ("import os\nos._exit(3)", "crashed"),
                                              ("import os\nos._exit(0)", "crashed")])  # fmt: skip
async def test_a_crashed_node_is_a_node_failure(provider: E2BSandboxProvider, code: str, reason: str) -> None:
    sb = await provider.open(spec())
    with pytest.raises(NodeError) as info:
        await sb.run_action("a", code, {}, 10)
    assert info.value.reason == reason
    await sb.close()


async def test_the_runner_memory_cap_sits_below_the_template_ram(standin: StandInServer) -> None:
    p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key", e2b_sandbox_memory_mb=512))
    sb = await p.open(spec())
    with pytest.raises(NodeError) as info:
        await sb.run_action("a", "x = bytearray(450 << 20)", {}, 10)
    assert info.value.reason == "limit:memory"
    await p.aclose()


async def test_a_vanished_sandbox_is_infrastructure(provider: E2BSandboxProvider, standin: StandInServer) -> None:
    sb = await provider.open(spec())
    standin.state.remove(standin.state.created[0])
    with pytest.raises(SandboxInfraError):
        await sb.run_action("a", "pass", {}, 5)
    await sb.close()


async def test_lifetime_follows_the_executions_deadline_clamped(standin: StandInServer) -> None:
    p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key", e2b_max_lifetime=1800, e2b_lifetime_margin=30))
    for timeout in (900.0, 7200.0, None):
        await p.open(SandboxSpec(execution_id=1, client="acme", executor="e2b", timeout=timeout))
    assert [b["timeout"] for b in standin.state.create_bodies] == [930, 1800, 630]
    await p.aclose()


async def test_a_sandbox_expires_at_its_lifetime_and_the_node_is_infrastructure(standin: StandInServer) -> None:
    p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key", e2b_lifetime_margin=0))
    sb = await p.open(SandboxSpec(execution_id=1, client="acme", executor="e2b", timeout=1))
    with pytest.raises(SandboxInfraError):
        await sb.run_action("a", "import time\ntime.sleep(5)", {}, 3)
    assert standin.state.expired == standin.state.created
    await p.aclose()


async def test_sandboxes_are_tagged_and_created_with_an_idempotency_key(
    provider: E2BSandboxProvider, standin: StandInServer
) -> None:
    await provider.open(spec())
    [body] = standin.state.create_bodies
    assert body["metadata"]["nova_execution_id"] == "7" and body["metadata"]["nova_worker"] == provider.worker
    assert body["metadata"]["nova_installation"] == "nova"
    assert len(standin.state.idempotency_keys) == 1


async def test_cancelled_during_create_the_sandbox_is_still_killed(
    provider: E2BSandboxProvider, standin: StandInServer
) -> None:
    task = asyncio.create_task(provider.open(spec()))
    for _ in range(1000):  # until E2B has the create in hand, then cancel mid-flight
        if standin.state.create_bodies or task.done():
            break
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await provider.aclose()
    assert standin.alive() == [] and standin.state.created != []


async def test_an_interrupted_kill_is_retried_at_shutdown(provider: E2BSandboxProvider, standin: StandInServer) -> None:
    sb = await provider.open(spec())
    standin.state.fail["kill"] = 500
    standin.state.fail_times["kill"] = 3
    await sb.close()
    assert standin.alive() != []
    await provider.aclose()
    assert standin.alive() == []


# Plan limits (case 2) and the reaper (case 5): the provider shares its limits through Redis.


def _e2b_settings(settings: Settings, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "e2b_api_key": SecretStr("e2b_standin_key"),
        "e2b_template": "nova-nodes",
        "e2b_rate_limit_wait": 0.05,
    }
    values.update(overrides)
    return settings.model_copy(update=values)


async def test_a_429_hands_the_run_back_and_frees_its_slot(standin: StandInServer, settings: Settings) -> None:
    # Limits set above the plan's (or a second installation on the key): E2B answers 429.
    standin.state.max_sandboxes = 1
    p = E2BSandboxProvider(_e2b_settings(settings, e2b_max_sandboxes=5, e2b_creates_per_second=0))
    await p.start()
    first = await p.open(spec())
    with pytest.raises(SandboxBusy) as info:
        await p.open(spec())
    # Handed back with a delay at once: neither waited for inline nor re-sent by the SDK, whose re-sends
    # would skip the shared create pacing.
    assert standin.state.rate_limited == 1 and "429" in str(info.value)
    assert 0.05 <= info.value.retry_after <= 0.05 * 1.5
    assert p.semaphore is not None and await p.semaphore.live_holders() == {first.holder}
    await first.close()
    sb = await p.open(spec())
    assert (await sb.run_action("a", "context['x'] = 1", {}, 10)).context == {"x": 1}
    await p.aclose()
    assert standin.alive() == []


async def test_a_long_wait_for_a_slot_hands_the_run_back(standin: StandInServer, settings: Settings) -> None:
    p = E2BSandboxProvider(_e2b_settings(settings, e2b_max_sandboxes=1, e2b_inline_wait=0.1))
    await p.start()
    first = await p.open(spec())
    with pytest.raises(SandboxBusy, match="NOVA_E2B_MAX_SANDBOXES=1"):
        await p.open(spec())
    assert len(standin.state.created) == 1  # E2B was never asked
    await first.close()
    await p.aclose()


async def test_a_short_wait_for_a_create_token_is_waited_inline(standin: StandInServer, settings: Settings) -> None:
    # 5 creates/s: the second token comes within 200 ms, well inside the inline wait.
    p = E2BSandboxProvider(_e2b_settings(settings, e2b_creates_per_second=5, e2b_inline_wait=30))
    await p.start()
    await p.open(spec())
    await p.open(spec())
    assert len(standin.state.created) == 2
    await p.aclose()


def _on(executor: str, code: str) -> dict[str, Any]:
    definition = linear(code)
    definition["nodes"][1]["executor"] = executor
    return definition


@pytest.mark.parametrize("limit", ["shared cap", "E2B's 429"])
async def test_runs_waiting_for_e2b_free_the_worker_for_other_work(
    standin: StandInServer,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    pool: Any,
    tmp_path: Path,
    shared_dir: Path,
    limit: str,
) -> None:
    # Three E2B runs, one sandbox to be had, a worker of concurrency 3. The sandbox's holder waits for
    # a gate; the other two must wait for it without holding the worker's slots: a local run queued
    # behind them finishes while they wait.
    if limit == "shared cap":
        cap = 1
    else:
        cap, standin.state.max_sandboxes = 5, 1  # NOVA's cap above the plan: E2B itself refuses
    s = _e2b_settings(
        settings, concurrency=3, e2b_max_sandboxes=cap, e2b_creates_per_second=0, e2b_inline_wait=0.2,
        e2b_rate_limit_wait=0.1,
    )  # fmt: skip
    gate = tmp_path / "gate"
    # A local node first, with a side effect: a run handed back resumes from its checkpoint, after it.
    effects = shared_dir / "effects.log"
    effects.touch()
    effects.chmod(0o666)
    before = f"open({str(effects)!r}, 'a').write(context['_nova']['task_id'] + '\\n')"
    wait = f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.02)"
    definition = linear(before, wait)
    definition["nodes"][1]["executor"], definition["nodes"][2]["executor"] = "local", "e2b"
    waiting = await create_workflow(redis, s, pool, definition)
    local = await create_workflow(redis, s, pool, _on("local", "context['local'] = True"))
    async with in_process_worker(s, sandbox_writable=str(shared_dir)):
        e2b_runs = [(await enqueue(redis, s, waiting)).task_id for _ in range(3)]
        # Both runs without a sandbox are handed back (a RETRY that spends no attempt)...
        handed_back = await wait_for_events(
            redis, s, lambda e: e.task_id in e2b_runs and e.type == EventType.RETRY, count=2, timeout=60
        )
        other = await enqueue(redis, s, local)
        # ...so the worker has slots for other work while they wait.
        done = await wait_terminal(redis, s, [other.task_id], timeout=60)
        assert done[other.task_id].type == EventType.SUCCEEDED
        statuses = [await redis.hget(keys.task(t), "status") for t in e2b_runs]
        assert not gate.exists() and "SUCCESS" not in statuses and "DEAD" not in statuses
        gate.touch()
        events = await wait_terminal(redis, s, e2b_runs, timeout=60)
    assert {e.type for e in events.values()} == {EventType.SUCCEEDED}
    assert await redis.xlen(s.dead_letter_stream) == 0
    every = [Event.from_entry(i, f) for i, f in await redis.xrange(s.results_stream)]
    retries = [e for e in every if e.task_id in e2b_runs and e.type == EventType.RETRY]
    assert len(retries) >= len(handed_back)
    assert {(e.data["attempt"], e.data["error"]["reason"]) for e in retries} == {(0, "waiting")}
    assert [await redis.hget(keys.task(t), "attempt") for t in e2b_runs] == ["0"] * 3
    assert standin.state.peak == 1 and standin.alive() == []
    assert sorted(effects.read_text().split()) == sorted(e2b_runs)  # each run's first node ran once


async def test_the_reaper_kills_the_sandboxes_of_a_worker_killed_with_sigkill(
    standin: StandInServer, settings: Settings, tmp_path: Path
) -> None:
    s = _e2b_settings(settings, visibility_timeout=0.5)
    script = tmp_path / "holder.py"
    script.write_text(
        "import asyncio, sys\n"
        "from consumer.sandbox.base import SandboxSpec\n"
        "from consumer.sandbox.e2b import E2BSandboxProvider\n"
        "from shared.settings import Settings\n"
        "async def main():\n"
        "    p = E2BSandboxProvider(Settings())\n"
        "    await p.start()\n"
        "    await p.open(SandboxSpec(execution_id=9, client='acme', executor='e2b'))\n"
        "    print('open', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    env = {**worker_env(s), **standin.sdk_environment(), "NOVA_VISIBILITY_TIMEOUT": "0.5",
           "NOVA_E2B_TEMPLATE": "nova-nodes", "PYTHONPATH": str(Path(__file__).parents[1])}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and await asyncio.wait_for(proc.stdout.readline(), 30) == b"open\n"
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown of any kind: the sandbox is left behind
        await proc.wait()
    [orphan] = standin.alive()
    survivor = E2BSandboxProvider(s)
    await survivor.start()
    mine = await survivor.open(spec())
    # Its slot expires one visibility timeout after its last refresh, as its runs would be reclaimed;
    # the survivor's periodic reap (once per visibility timeout) then kills the orphan, unasked.
    deadline = time.monotonic() + 30
    while standin.alive() != [mine.sandbox.sandbox_id]:
        assert time.monotonic() < deadline, standin.alive()
        await asyncio.sleep(0.05)
    assert orphan in standin.state.killed
    await survivor.aclose()
    assert standin.alive() == []


async def test_thirty_in_flight_against_twenty_sandboxes_all_succeed(
    standin: StandInServer, settings: Settings, redis: Redis, pool: Any
) -> None:
    # Scaled: the plan's 20 sandboxes, 3 workers x concurrency 10, creates 50/s instead of 1/s.
    standin.state.max_sandboxes = 20
    standin.state.creates_per_second = 50
    s = _e2b_settings(settings, concurrency=10, e2b_max_sandboxes=20, e2b_creates_per_second=40)
    workflow = await create_workflow(redis, s, pool, linear("import time\ntime.sleep(0.1)\ncontext['n'] = 1"))
    enqueued = [await enqueue(redis, s, workflow) for _ in range(40)]
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            await stack.enter_async_context(
                in_process_worker(s, providers={"e2b": E2BSandboxProvider(s)}, default_executor="e2b")
            )
        events = await wait_terminal(redis, s, [e.task_id for e in enqueued], timeout=60)
    assert {e.type for e in events.values()} == {EventType.SUCCEEDED}
    assert await redis.xlen(s.dead_letter_stream) == 0
    assert standin.state.peak <= 20 and len(standin.state.created) == 40
    assert standin.alive() == []


async def test_a_template_with_python_older_than_3_10_fails_fast(standin: StandInServer, tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho old 3.8.10\n")
    fake.chmod(0o755)
    standin.state.templates.add("old-python")
    standin.state.template_bin["old-python"] = fake.parent
    p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key", e2b_template="old-python"))
    with pytest.raises(NodeError) as info:
        await p.open(spec())
    assert info.value.reason == "executor_unavailable" and "3.8.10" in info.value.message
    assert standin.alive() == []


async def _health_until(api: httpx.AsyncClient, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """/health once `check` holds of it (workers report every quarter visibility timeout)."""
    deadline = time.monotonic() + 30
    while True:
        body: dict[str, Any] = (await api.get("/health")).json()
        if body.get("workers") and check(body):
            return body
        assert time.monotonic() < deadline, f"/health never showed it: {body}"
        await asyncio.sleep(0.05)


async def test_a_refused_key_shows_in_health_and_metrics_until_fixed(
    standin: StandInServer, settings: Settings, redis: Redis, pool: Any, api: httpx.AsyncClient
) -> None:
    workflow = await create_workflow(redis, settings, pool, _on("e2b", "context['x'] = 1"))
    async with in_process_worker(_e2b_settings(settings, e2b_api_key=SecretStr("wrong"))):
        # Known from the worker's start (its reaper lists sandboxes with the key), before any run needs E2B.
        body = await _health_until(api, lambda b: not b["workers"]["ok"])
        [problem] = body["workers"]["problems"]
        assert problem["executor"] == "e2b" and "E2B_API_KEY" in problem["error"]
        # The API itself serves on: a worker's key is no reason for a load balancer to drop it.
        assert body["status"] == "healthy" and body["workers"]["live"] == 1
        metrics = (await api.get("/metrics")).text
        assert f'nova_worker_executor_problem{{consumer="{problem["consumer"]}",executor="e2b"}} 1.0' in metrics
        failed = await enqueue(redis, settings, workflow)
        [event] = (await wait_terminal(redis, settings, [failed.task_id])).values()
        assert event.type == EventType.FAILED and event.data["error"]["reason"] == "executor_unavailable"
    # The key fixed (the worker restarted with it): the fault is gone with the old worker's report.
    async with in_process_worker(_e2b_settings(settings)):
        body = await _health_until(api, lambda b: b["workers"]["ok"] and b["workers"]["live"] == 1)
        assert body["workers"]["problems"] == []
        ok = await enqueue(redis, settings, workflow)
        [event] = (await wait_terminal(redis, settings, [ok.task_id])).values()
        assert event.type == EventType.SUCCEEDED
        metrics = (await api.get("/metrics")).text
        assert f'nova_worker_executor_problem{{consumer="{problem["consumer"]}"' not in metrics
        assert 'nova_worker_executor_problem{consumer="' in metrics and 'executor="e2b"} 0.0' in metrics
    assert standin.alive() == []


async def test_the_fault_clears_once_e2b_accepts_again(standin: StandInServer) -> None:
    p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key", e2b_template="nova-later"))
    with pytest.raises(NodeError):
        await p.open(spec())
    assert p.problem() is not None and "'nova-later'" in (p.problem() or "")
    standin.state.templates.add("nova-later")  # the operator builds the template
    await p.open(spec())
    assert p.problem() is None
    await p.aclose()


@pytest.mark.timeout(120)
async def test_the_e2b_plan_chaos_scenario_at_small_scale() -> None:
    # `nova chaos --scenario e2b-plan` runs the literal figure (200 executions, Hobby limits); here its
    # code runs scaled down: worker slots (2 x 3) above the plan's sandboxes (4).
    report = await E2BPlanRun(
        executions=12, workers=2, concurrency=3, plan_sandboxes=4, plan_creates_per_second=10, node_seconds=0.5,
        timeout=60,
    ).run()  # fmt: skip
    assert chaos_e2b_passed(report), report
    assert report["retries_spent"] == 0 and report["sandboxes_created"] == 12, report


# Review D: what node code can push into the worker through E2B, and what an E2B outage leaves behind.

# The node writes its own reply line on the runner's reply descriptor and ends its interpreter: the runner's
# context cap never runs.
_FORGED_REPLY = """
import os
fd = next(int(n) for n in os.listdir('/proc/self/fd')
          if 'reply-' in (os.readlink(f'/proc/self/fd/{n}') if os.path.exists(f'/proc/self/fd/{n}') else ''))
line = ('{"ok":true,"stdout":"","stderr":"","context":{"big":"' + 'x' * (MIB << 20) + '"}}\\n').encode()
view = memoryview(line)
while view:
    view = view[os.write(fd, view):]
os._exit(0)
"""


@pytest.mark.parametrize(("mib", "reason"), [(64, "limit:output"), (17, "limit:context")])
async def test_a_reply_over_the_limits_written_by_node_code_is_refused(
    provider: E2BSandboxProvider, mib: int, reason: str
) -> None:
    """The worker read a node's whole reply file into memory and took any context in it: node code that
    wrote its own reply past the runner's 16 MiB cap had a 64 MiB context accepted (the local sandbox
    re-checks sizes in the worker). Now a reply over the local sandbox's reply limit is refused before it is
    read ("limit:output"), and a context over the cap within it on receipt ("limit:context"), as locally."""
    sb = await provider.open(spec())
    try:
        with pytest.raises(NodeError) as info:
            result = await sb.run_action("big", _FORGED_REPLY.replace("MIB", str(mib)), {}, 60)
            pytest.fail(f"accepted a context of {len(result.context['big']) >> 20} MiB (the cap is 16)")
        assert info.value.reason == reason and "over the limit" in info.value.message
    finally:
        await sb.close()


# bash stayed the runner's parent holding the command's stderr stream, which node code (same user) opened
# through /proc and flooded: the runner's 1 MiB output cap never saw it.
_STDERR_FLOOD = """
import os
fd = os.open(f'/proc/{os.getppid()}/fd/2', os.O_WRONLY)
chunk = b'e' * (1 << 20)
for _ in range(400):
    os.write(fd, chunk)
context['done'] = True
"""


async def test_a_stderr_flood_through_the_command_stream_is_not_held_by_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command was `bash -l -c "python3 runner.py ... > reply"`: node code wrote 400 MiB on its shell's
    stderr, which the SDK's command handle kept, in the worker (it grew by 800 MiB). Now the runner replaces
    the shell (exec) with its output in files of the sandbox, and the worker keeps no stream output."""
    # The stand-in in a process of its own: only the worker's side is in this process. Its stderr (the
    # runner's parent's, now) goes nowhere.
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import json, time\nfrom cli.e2b_standin import StandInServer\n"
        "with StandInServer() as s:\n    print(json.dumps(s.sdk_environment()), flush=True)\n    time.sleep(600)\n",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        env = json.loads(await asyncio.wait_for(server.stdout.readline(), 30))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key", e2b_template="nova-nodes"))
        try:
            sb = await p.open(spec())
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
            with contextlib.suppress(NodeError):
                await sb.run_action("flood", _STDERR_FLOOD, {}, 60)
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10) - before
        finally:
            await p.aclose()
        assert grown < 100, f"the worker grew by {grown} MiB for one node's stderr (output cap 1 MiB)"
    finally:
        server.kill()
        await server.wait()


async def test_a_failed_kill_does_not_hold_an_e2b_slot_for_the_workers_lifetime(
    standin: StandInServer, settings: Settings
) -> None:
    """A sandbox whose every kill attempt failed stayed registered with its slot held and refreshed; the
    reaper skipped it as the worker's own and nothing tried the kill again, so after a moment of E2B 500s the
    slot stayed taken until the worker's shutdown, even once E2B had no such sandbox: every run of every
    worker sharing NOVA_E2B_MAX_SANDBOXES was handed back. Now the reaper retries the kill, and a sandbox
    killed or known gone (404) gives its slot back."""
    p = E2BSandboxProvider(_e2b_settings(settings, e2b_max_sandboxes=1, e2b_inline_wait=0.2, e2b_creates_per_second=0))
    await p.start()
    try:
        first = await p.open(spec())
        # E2B answers 500 to the kill for a moment (its three attempts), then is fine again.
        standin.state.fail["kill"] = 500
        standin.state.fail_times["kill"] = 3
        await first.close()
        # Still alive as far as anyone knows: its slot stays held (the cap bounds live sandboxes).
        with pytest.raises(SandboxBusy):
            await p.open(spec())
        # The sandbox is gone on E2B's side anyway (expired at its lifetime, or killed by hand).
        standin.state.remove(first.sandbox.sandbox_id)
        assert standin.alive() == []
        await p.reap()  # what the reaper does every visibility timeout
        try:
            second = await p.open(spec())
        except SandboxBusy as exc:
            pytest.fail(f"no E2B sandbox is alive, yet: {exc}")
        await second.close()
        # A kill that failed while the sandbox lived is done by the reaper's retry, which frees the slot.
        standin.state.fail_times["kill"] = 3
        third = await p.open(spec())
        await third.close()
        assert standin.alive() == [third.sandbox.sandbox_id]
        await p.reap()
        assert standin.alive() == []
        await (await p.open(spec())).close()
    finally:
        await p.aclose()
    assert standin.alive() == []


def one_action(code: str) -> Definition:
    """start → one action node `a` running `code` → end."""
    return validate_definition({
        "nodes": [
            {"id": "s", "type": "start", "next": "a"},
            {"id": "a", "type": "action", "next": "e", "code": code},
            {"id": "e", "type": "end"},
        ]
    })  # fmt: skip


async def test_a_big_context_over_a_slow_but_healthy_link_reaches_its_node(
    standin: StandInServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E2B's waits in a node call had one flat budget of 4 s, whatever the size of what went through: a
    12 MiB context (the cap is 16) over a 2 MiB/s link took 6 s to go up, so every attempt was taken for
    E2B's silence (an infrastructure error, retried, then dead-lettered) and the node never ran. A transfer
    is now given time in proportion to its size, and the engine's bound on the call grows with it."""
    proxy = await FaultProxy("127.0.0.1", standin.port).start()
    proxy.throttle(2 << 20)
    monkeypatch.setenv("E2B_SANDBOX_URL", f"http://127.0.0.1:{proxy.port}")
    p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key", e2b_template="nova-nodes"))
    definition = one_action("context['n'] = len(context.pop('blob'))")
    try:
        outcome = await run_workflow(
            definition, {"blob": "x" * (12 << 20)}, open_sandbox=p.open, spec=spec(), hooks=_Hooks(), node_timeout=60
        )
    finally:
        await p.aclose()
        await proxy.aclose()
    assert outcome.status == "success" and outcome.final_context["n"] == 12 << 20, outcome.error


async def test_a_request_larger_than_the_cap_is_the_nodes_failure_not_a_slow_upload(
    standin: StandInServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload was given time for whatever size it had, while the engine's bound on the call allows for a
    request within the caps: a context grown past them (an engine merge keeps the keys a node dropped) went
    up slowly until the engine's bound fired first and called it the node's timeout. A request over the caps
    is refused before it goes up, as the node's failure (its context over the limit), and any upload fits
    the engine's bound."""
    proxy = await FaultProxy("127.0.0.1", standin.port).start()
    monkeypatch.setenv("E2B_SANDBOX_URL", f"http://127.0.0.1:{proxy.port}")
    settings = Settings(e2b_api_key="e2b_standin_key", e2b_template="nova-nodes")
    p = E2BSandboxProvider(settings, max_context_bytes=64 << 10, max_output_bytes=16 << 10)
    definition = one_action("context['x'] = 1")

    async def open_then_slow(s: SandboxSpec) -> E2BSandbox:
        sandbox = await p.open(s)
        proxy.throttle(64 << 10)  # E2B all but silent while a request goes up
        return sandbox

    try:
        outcome = await run_workflow(
            definition,
            {"blob": "x" * (4 << 20)},
            open_sandbox=open_then_slow,
            spec=spec(),
            hooks=_Hooks(),
            node_timeout=1,
        )
    finally:
        await p.aclose()
        await proxy.aclose()
    assert outcome.status == "failure" and outcome.error is not None
    assert outcome.error["reason"] == "limit:context", outcome.error


@pytest.mark.parametrize("where", ["upload", "run"])
async def test_e2b_hanging_during_a_node_is_infrastructure_not_the_nodes_timeout(
    standin: StandInServer, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The engine bounds a node call at its time limit + 5 s, before E2B's own bound (+ 10 s), and the
    request's upload and the reply's download had no bound: E2B hanging while a node's request went up, or
    while it ran, was recorded as the node's timeout, a permanent failure, for a node that never ran or
    ended in time. Now E2B's waits are bounded inside the engine's margin and raised as SandboxInfraError
    (retried, then dead-lettered)."""
    # envd (the in-sandbox daemon) reached through a proxy that can stop every byte: E2B stalls.
    proxy = await FaultProxy("127.0.0.1", standin.port).start()
    monkeypatch.setenv("E2B_SANDBOX_URL", f"http://127.0.0.1:{proxy.port}")
    p = E2BSandboxProvider(Settings(e2b_api_key="e2b_standin_key", e2b_template="nova-nodes"))
    definition = one_action("import time\ntime.sleep(1)\ncontext['x'] = 1")

    async def stall_once_running() -> None:
        for _ in range(3000):  # until E2B has started the node, then stall it
            if any("runner.py --once" in c for c in standin.state.commands):
                break
            await asyncio.sleep(0.01)
        proxy.pause()

    async def open_then_stall(s: SandboxSpec) -> E2BSandbox:
        sandbox = await p.open(s)
        if where == "upload":
            proxy.pause()  # after the sandbox is made and its runner uploaded: the node's request hangs
        else:
            stalls.append(asyncio.create_task(stall_once_running()))  # the node's stream (and reply) hang
        return sandbox

    stalls: list[asyncio.Task[None]] = []

    try:
        # Stalled as the command's start is answered (the stand-in has it, its reply is on its way: the
        # SDK's request times out) or later, on its stream: E2B's silence either way.
        with pytest.raises(SandboxInfraError, match=r"E2B (did not answer|could not run node)"):
            outcome = await run_workflow(
                definition, {}, open_sandbox=open_then_stall, spec=spec(), hooks=_Hooks(), node_timeout=2
            )
            pytest.fail(f"the run ended as {outcome.status}: {outcome.error}")
    finally:
        for task in stalls:
            task.cancel()
        proxy.resume()
        await p.aclose()
        await proxy.aclose()
