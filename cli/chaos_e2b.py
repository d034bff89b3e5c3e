"""`nova chaos --scenario e2b-plan`: E2B's plan limits, honoured by workers that ask for more.

The issue's figure as a command rather than a test (it takes minutes): its own Redis and PostgreSQL,
the local E2B stand-in (cli/e2b_standin.py) holding to a plan's limits (Hobby: 20 sandboxes at once,
1 create/s, answered with 429 past them), the API, and worker processes whose slots together exceed
the plan (3 x concurrency 10 = 30 > 20). Every execution runs one node on E2B that takes
`node_seconds`, so both limits bind. It prints one JSON line: every execution must succeed, none be
dead-lettered or lost, the stand-in must never have held more sandboxes than the plan, and none may be
left once the run ends. It also reports the creates per second E2B saw, how often runs were handed
back to wait (no retry spent) and how many retries were spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from cli.e2b_standin import StandInServer
from cli.embedded import PostgresServer, RedisServer, free_port
from shared.connections import create_redis
from shared.db import migrate_url
from shared.settings import Settings
from shared.streams import TERMINAL_STATUSES, Keys, loads


@dataclass
class E2BPlanRun:
    executions: int = 200
    workers: int = 3
    concurrency: int = 10
    # The plan (E2B Hobby), enforced by the stand-in with 429s and configured on the workers.
    plan_sandboxes: int = 20
    plan_creates_per_second: float = 1.0
    # What the workers are set to (NOVA_E2B_CREATES_PER_SECOND): by default the README's advice, a tenth
    # below the plan's.
    creates_per_second: float | None = None
    node_seconds: float = 20.0
    timeout: float = 1800.0
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nova-chaos-e2b-")))

    def __post_init__(self) -> None:
        self.redis_server = RedisServer(self.log_dir / "redis")
        # The children run with NOVA's defaults (their environment has no NOVA_ variables but ours).
        self.keys = Keys.from_settings(Settings())
        self.pg = PostgresServer(self.log_dir / "postgres", durable=False)
        self.port = free_port()
        self.admin_key = secrets.token_urlsafe(24)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def paced_at(self) -> float:
        return self.creates_per_second if self.creates_per_second is not None else self.plan_creates_per_second * 0.9

    def env(self, standin: StandInServer) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVA_", "E2B_"))}
        env.update(
            standin.sdk_environment(),
            REDIS_URL=self.redis_server.url,
            DATABASE_URL=self.pg.url,
            PORT=str(self.port),
            NOVA_HOST="127.0.0.1",
            NOVA_ADMIN_KEY=self.admin_key,
            NOVA_LOG_LEVEL="WARNING",
            NOVA_CONCURRENCY=str(self.concurrency),
            NOVA_DEFAULT_EXECUTOR="e2b",
            NOVA_E2B_TEMPLATE="nova-nodes",
            NOVA_E2B_MAX_SANDBOXES=str(self.plan_sandboxes),
            NOVA_E2B_CREATES_PER_SECOND=str(self.paced_at),
            NOVA_EXECUTION_TIMEOUT=str(max(600.0, self.node_seconds * 4)),
            NOVA_NODE_TIMEOUT=str(self.node_seconds + 60),
            NOVA_MAX_NODE_TIMEOUT=str(max(300.0, self.node_seconds + 60)),
        )
        return env

    def spawn(self, name: str, role: str, env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        try:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cli.main", role],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.redis_server.start()
        self.pg.start()
        await migrate_url(self.pg.url)
        redis = create_redis(Settings(redis_url=self.redis_server.url))
        with StandInServer() as standin:
            standin.state.max_sandboxes = self.plan_sandboxes
            standin.state.creates_per_second = self.plan_creates_per_second
            env = self.env(standin)
            try:
                self.spawn("api", "api", env)
                for i in range(self.workers):
                    self.spawn(f"worker{i}", "worker", env)
                base = f"http://127.0.0.1:{self.port}"
                headers = {"Authorization": f"Bearer {self.admin_key}"}
                async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as http:
                    await _wait_healthy(http)
                    workflow_id = await self._workflow(http)
                    submitted_at = time.monotonic()
                    task_ids = await self._submit(http, workflow_id)
                    statuses = await self._wait_terminal(redis, task_ids)
                    finished_at = time.monotonic()
                retries = await _retries(redis, self.keys, set(task_ids))
                dead_letters = int(await redis.xlen(self.keys.dead_letter))
            finally:
                await redis.aclose()
                await asyncio.to_thread(self.stop_all)
                self.pg.stop()
                self.redis_server.stop()
            # After the workers' shutdown: whatever the stand-in still runs was leaked.
            left = standin.alive()
            state = standin.state
        counts = Counter(statuses.values())
        times = sorted(state.create_times)
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        return {
            "scenario": "e2b-plan",
            "executions": self.executions,
            "workers": self.workers,
            "concurrency": self.concurrency,
            "plan": {"sandboxes": self.plan_sandboxes, "creates_per_second": self.plan_creates_per_second},
            "paced_at_creates_per_second": self.paced_at,
            "node_seconds": self.node_seconds,
            "succeeded": counts.get("SUCCESS", 0),
            "failed": counts.get("FAILURE", 0),
            "dead": counts.get("DEAD", 0),
            "dead_letters": dead_letters,
            "lost": sum(1 for s in statuses.values() if s not in TERMINAL_STATUSES),
            "peak_sandboxes": state.peak,
            "sandboxes_created": len(state.created),
            "sandboxes_left": len(left),
            "creates_per_second_observed": round((len(times) - 1) / span, 3) if span else None,
            "max_creates_in_any_second": _max_in_window(times, 1.0),
            "e2b_429s": state.rate_limited,
            "handed_back": retries["waiting"],
            "retries_spent": retries["transient"],
            "executions_wall_time_s": round(finished_at - submitted_at, 1),
            "wall_time_s": round(time.monotonic() - started, 1),
            "log_dir": str(self.log_dir),
        }

    async def _workflow(self, http: httpx.AsyncClient) -> int:
        code = f"import time\ntime.sleep({self.node_seconds!r})\ncontext['done'] = True"
        definition = {
            "nodes": [
                {"id": "start", "type": "start", "next": "work"},
                {"id": "work", "type": "action", "executor": "e2b", "code": code, "next": "end"},
                {"id": "end", "type": "end"},
            ]
        }
        response = await http.post(
            "/workflows", json={"name": f"e2b-plan-{uuid.uuid4().hex[:6]}", "definition": definition}
        )
        response.raise_for_status()
        return int(response.json()["id"])

    async def _submit(self, http: httpx.AsyncClient, workflow_id: int) -> list[str]:
        async def one() -> str:
            key = uuid.uuid4().hex
            while True:
                try:
                    response = await http.post(
                        f"/workflows/{workflow_id}/execute", json={}, headers={"Idempotency-Key": key}
                    )
                except httpx.HTTPError:
                    await asyncio.sleep(0.2)
                    continue
                if response.status_code == 202:
                    return str(response.json()["task_id"])
                await asyncio.sleep(0.2)

        gate = asyncio.Semaphore(16)

        async def bounded() -> str:
            async with gate:
                return await one()

        return list(await asyncio.gather(*(bounded() for _ in range(self.executions))))

    async def _wait_terminal(self, redis: Redis, task_ids: list[str]) -> dict[str, str | None]:
        deadline = time.monotonic() + self.timeout
        statuses: dict[str, str | None] = {}
        while time.monotonic() < deadline:
            pipe = redis.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hget(self.keys.task(task_id), "status")
            statuses = dict(zip(task_ids, await pipe.execute(), strict=True))
            if all(s in TERMINAL_STATUSES for s in statuses.values()):
                break
            await asyncio.sleep(1.0)
        return statuses


async def _wait_healthy(http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/health")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("the API did not become healthy")


async def _retries(redis: Redis, keys: Keys, task_ids: set[str]) -> Counter[str]:
    """RETRY events of these tasks by their error's reason: "waiting" (handed back, no retry spent) or
    "transient" (a retry spent)."""
    reasons: Counter[str] = Counter()
    cursor = "-"
    while batch := await redis.xrange(keys.results, min=cursor, max="+", count=1000):
        for _, fields in batch:
            if fields.get("type") == "retry" and fields.get("task_id") in task_ids:
                data = loads(fields.get("data")) or {}
                reasons[str((data.get("error") or {}).get("reason"))] += 1
        cursor = f"({batch[-1][0]}"
    return reasons


def _max_in_window(times: list[float], window: float) -> int:
    """The most events in any `window`-second span (half-open) of sorted `times`."""
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def passed(report: dict[str, Any]) -> bool:
    return (
        report["succeeded"] == report["executions"]
        and report["dead"] == 0
        and report["dead_letters"] == 0
        and report["lost"] == 0
        and report["sandboxes_left"] == 0
        and report["peak_sandboxes"] <= report["plan"]["sandboxes"]
    )
