"""`nova chaos`: the delivery guarantees checked end to end while things break.

Starts its own Redis (AOF on) and PostgreSQL, the API and several worker processes, submits a mix of
executions over HTTP (succeeding, failing, and one poison entry per hundred written straight into the
stream), and meanwhile SIGKILLs a random worker every few seconds (restarting it), restarts Redis once
and stops PostgreSQL for a while. Then it waits for every accepted execution to end and prints one
JSON line: lost (accepted, no terminal state) and duplicated (more than one terminal event, or node-run
records that do not match the run) must both be 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
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

import asyncpg
import httpx
from redis.asyncio import Redis

from shared.connections import create_redis
from shared.db import migrate_url
from shared.embedded import PostgresServer, RedisServer, free_port
from shared.settings import Settings
from shared.streams import TERMINAL_STATUSES, Keys

SUCCEEDING = {
    "nodes": [
        {"id": "start", "type": "start", "next": "parse"},
        {"id": "parse", "type": "action", "code": "context['total'] = sum(context['items'])", "next": "check"},
        {"id": "check", "type": "decision", "code": "context['total'] > 10", "on_true": "big", "on_false": "small"},
        {
            "id": "big",
            "type": "action",
            "code": "import time\ntime.sleep(0.05)\ncontext['route'] = 'big'",
            "next": "end",
        },
        {"id": "small", "type": "action", "code": "context['route'] = 'small'", "next": "end"},
        {"id": "end", "type": "end"},
    ]
}
FAILING = {
    "nodes": [
        {"id": "start", "type": "start", "next": "boom"},
        {"id": "boom", "type": "action", "code": "raise RuntimeError('bad input')", "next": "end"},
        {"id": "end", "type": "end"},
    ]
}


@dataclass
class Chaos:
    executions: int = 2000
    workers: int = 3
    kill_every: float = 3.0
    postgres_outage: float = 10.0
    seed: int = 0
    timeout: float = 600.0
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nova-chaos-")))

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.redis_server = RedisServer(self.log_dir / "redis", appendonly=True)
        self.pg = PostgresServer(self.log_dir / "postgres", durable=False)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kills = 0
        self.admin_key = secrets.token_urlsafe(24)

    # ---- processes -----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOVA_")}
        env.update(
            REDIS_URL=self.redis_server.url,
            DATABASE_URL=self.pg.url,
            PORT=str(self.port),
            NOVA_HOST="127.0.0.1",
            NOVA_VISIBILITY_TIMEOUT="2",
            NOVA_CONCURRENCY="8",
            NOVA_RETRY_BACKOFF="0.1",
            NOVA_RETRY_BACKOFF_MAX="1",
            NOVA_MAX_DELIVERIES="10",
            NOVA_SANDBOX_POOL_SIZE="2",
            NOVA_LOG_LEVEL="WARNING",
            NOVA_ADMIN_KEY=self.admin_key,
        )
        return env

    def spawn(self, name: str, *args: str) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        try:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *args],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def kill9(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.kills += 1

    def stop_all(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9(name)

    # ---- the run -------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.redis_server.start()
        self.pg.start()
        await migrate_url(self.pg.url)
        self.spawn("api", "api")
        for i in range(self.workers):
            self.spawn(f"worker{i}", "worker")
        base = f"http://127.0.0.1:{self.port}"
        redis = create_redis(Settings(redis_url=self.redis_server.url))
        try:
            headers = {"Authorization": f"Bearer {self.admin_key}"}
            async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as http:
                await self._wait_healthy(http)
                ok_id = await self._create(http, "chaos-succeeding", SUCCEEDING)
                bad_id = await self._create(http, "chaos-failing", FAILING)
                done = asyncio.Event()
                saboteur = asyncio.create_task(self._sabotage(done))
                accepted, poison = await self._submit(http, redis, ok_id, bad_id)
                done.set()
                await saboteur
                report = await self._verify(redis, accepted, poison)
        finally:
            await redis.aclose()
            self.stop_all()
            self.pg.stop()
            self.redis_server.stop()
        report["wall_time_s"] = round(time.monotonic() - started, 1)
        report["worker_kills"] = self.kills
        return report

    async def _wait_healthy(self, http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/health")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError("the API did not become healthy")

    async def _create(self, http: httpx.AsyncClient, name: str, definition: dict[str, Any]) -> int:
        response = await http.post("/workflows", json={"name": name, "definition": definition})
        response.raise_for_status()
        return int(response.json()["id"])

    async def _submit(
        self, http: httpx.AsyncClient, redis: Redis, ok_id: int, bad_id: int
    ) -> tuple[dict[str, str], int]:
        """Submit every execution (retrying 503s with the same Idempotency-Key); returns task id -> kind."""
        accepted: dict[str, str] = {}
        poison = 0
        semaphore = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            nonlocal poison
            kind = "fail" if i % 10 == 9 else "ok"
            body = {"client_slug": f"client-{i % 5}", "initial_context": {"items": [i % 20, 1]}}
            key = uuid.uuid4().hex
            async with semaphore:
                if i % 100 == 50:
                    # Poison: garbage written straight to the stream, as a buggy producer would.
                    while True:
                        try:
                            await redis.xadd("nova:requests", {"task_id": f"poison-{i}", "payload": "{oops"})
                            poison += 1
                            break
                        except Exception:
                            await asyncio.sleep(0.2)
                for _ in range(200):
                    try:
                        response = await http.post(
                            f"/workflows/{bad_id if kind == 'fail' else ok_id}/execute",
                            json=body,
                            headers={"Idempotency-Key": key},
                        )
                    except httpx.HTTPError:
                        await asyncio.sleep(0.2)
                        continue
                    if response.status_code == 202:
                        accepted[response.json()["task_id"]] = kind
                        return
                    await asyncio.sleep(float(response.headers.get("Retry-After", "0.2")) / 5)

        await asyncio.gather(*(one(i) for i in range(self.executions)))
        return accepted, poison

    async def _sabotage(self, done: asyncio.Event) -> None:
        """Kill workers throughout; one Redis restart and one PostgreSQL outage along the way."""
        t0 = time.monotonic()
        redis_restarted = pg_stopped = False
        while not done.is_set() or time.monotonic() - t0 < 8:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.sleep(self.kill_every), self.kill_every + 1)
            victim = f"worker{self.rng.randrange(self.workers)}"
            self.kill9(victim)
            self.spawn(victim, "worker")
            elapsed = time.monotonic() - t0
            if not redis_restarted and elapsed > 2 * self.kill_every:
                await asyncio.to_thread(self.redis_server.stop)
                await asyncio.to_thread(self.redis_server.start)
                redis_restarted = True
            if not pg_stopped and elapsed > 3 * self.kill_every:
                await asyncio.to_thread(self.pg.stop)
                await asyncio.sleep(self.postgres_outage)
                await asyncio.to_thread(self.pg.start)
                pg_stopped = True
            if done.is_set() and redis_restarted and pg_stopped:
                break

    async def _verify(self, redis: Redis, accepted: dict[str, str], poison: int) -> dict[str, Any]:
        keys = Keys.from_settings(Settings(redis_url=self.redis_server.url))
        ids = list(accepted)
        deadline = time.monotonic() + self.timeout
        statuses: dict[str, str | None] = {}
        while time.monotonic() < deadline:
            pipe = redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hget(keys.task(task_id), "status")
            statuses = dict(zip(ids, await pipe.execute(), strict=True))
            if all(s in TERMINAL_STATUSES for s in statuses.values()):
                break
            await asyncio.sleep(0.5)
        terminal_events: Counter[str] = Counter()
        async for entry_id, fields in _scan(redis, "nova:results"):
            del entry_id
            if fields.get("type") in ("succeeded", "failed", "dead"):
                terminal_events[fields.get("task_id", "")] += 1
        rows = await self._projected(ids)
        counts = Counter(statuses.values())
        dlq_poison = len([1 async for _, f in _scan(redis, "nova:dlq") if f.get("dlq_reason") == "malformed"])
        duplicated = sum(1 for t in ids if terminal_events[t] > 1) + rows["bad_chains"]
        lost = sum(1 for t in ids if statuses.get(t) not in TERMINAL_STATUSES or terminal_events[t] == 0)
        return {
            "submitted": self.executions,
            "accepted": len(ids),
            "succeeded": counts.get("SUCCESS", 0),
            "failed": counts.get("FAILURE", 0),
            "dead": counts.get("DEAD", 0),
            "poison_dead_lettered": f"{dlq_poison}/{poison}",
            "lost": lost + (poison - dlq_poison) + rows["missing"],
            "duplicated": duplicated,
            "duplicated_terminal_events": sum(1 for t in ids if terminal_events[t] > 1),
            "chains_not_matching_runs": rows["bad_chains"],
            "projected": rows["projected"],
        }

    async def _projector_caught_up(self, deadline: float) -> None:
        """Every event projected: the chain check must not race the last batches."""
        redis = create_redis(Settings(redis_url=self.redis_server.url))
        try:
            while time.monotonic() < deadline:
                groups = {g["name"]: g for g in await redis.xinfo_groups("nova:results")}
                group = groups.get("nova-projector")
                if group is not None:
                    unread = await redis.xrange("nova:results", min=f"({group['last-delivered-id']}", max="+", count=1)
                    if group["pending"] == 0 and not unread:
                        return
                await asyncio.sleep(0.2)
        finally:
            await redis.aclose()

    async def _projected(self, ids: list[str]) -> dict[str, int]:
        """Every accepted execution recorded once in PostgreSQL, with a chain matching its run."""
        conn = await asyncpg.connect(self.pg.url)
        try:
            deadline = time.monotonic() + 120
            while True:
                projected = await conn.fetchval(
                    "SELECT count(*) FROM executions WHERE task_id = ANY($1::text[])"
                    " AND status IN ('success', 'failure', 'dead')",
                    ids,
                )
                if projected == len(ids) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            await self._projector_caught_up(deadline)
            bad_chains = await conn.fetchval(
                """SELECT count(*) FROM executions e
                   WHERE e.task_id = ANY($1::text[]) AND e.status IN ('success', 'failure')
                     AND e.nodes_executed <> (SELECT count(*) FROM node_runs n WHERE n.execution_id = e.id)""",
                ids,
            )
        finally:
            await conn.close()
        return {"projected": projected, "missing": len(ids) - projected, "bad_chains": bad_chains}


async def _scan(redis: Redis, stream: str):
    cursor = "-"
    while True:
        batch = await redis.xrange(stream, min=cursor, max="+", count=1000)
        if not batch:
            return
        for entry_id, fields in batch:
            yield entry_id, fields
        cursor = f"({batch[-1][0]}"


def main(executions: int, workers: int, seed: int) -> int:
    report = asyncio.run(Chaos(executions=executions, workers=workers, seed=seed).run())
    print(json.dumps(report))
    return 0 if report["lost"] == 0 and report["duplicated"] == 0 else 1
