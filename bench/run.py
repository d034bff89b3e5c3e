"""`make bench`: NOVA Streams against the Redis ceiling and Celery, same machine, same run.

    python -m bench.run [--quick]

Starts its own Redis and PostgreSQL, runs each scenario in real processes (API, workers, Celery
workers, a separate load-generator process), and writes bench/results/latest.json and latest.md.
Every figure is the median of the repetitions, with min and max. A scenario that fails is reported
with its error and the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from bench import cost
from bench.loadgen import merged_percentile, percentile
from cli.embedded import APP_USER, PostgresServer, RedisServer, free_port
from shared.control import RunControl
from shared.db import create_pool, migrate_url
from shared.enqueue import NewExecution, enqueue_execution
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import Keys, now_iso

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ADMIN = "bench-admin-key"
AUTH = f"Authorization: Bearer {ADMIN}"
# Listener processes holding the SSE subscribers between them: one process parsing 1,000 streams was
# itself saturated, and its queueing counted as the server's latency.
SSE_LISTENERS = 4
# application_name of the projector whose serial capacity the cost model measures.
PROJECTOR_ALONE = "bench-projector-alone"

START_END = {"nodes": [{"id": "s", "type": "start", "next": "e"}, {"id": "e", "type": "end"}]}


def chain(n: int, code: str = "context['i'] = context.get('i', 0) + 1") -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"id": "s", "type": "start", "next": "a1"}]
    nodes += [
        {"id": f"a{i}", "type": "action", "code": code, "next": f"a{i + 1}" if i < n else "e"} for i in range(1, n + 1)
    ]
    nodes.append({"id": "e", "type": "end"})
    return {"nodes": nodes}


# NOVA-shaped: start, three actions, a decision, one of two branch actions, end (issue 13).
NOVA_SHAPED: dict[str, Any] = {
    "nodes": [
        {"id": "s", "type": "start", "next": "a1"},
        {"id": "a1", "type": "action", "code": "context['items'] = [12, 30, 75]", "next": "a2"},
        {"id": "a2", "type": "action", "code": "context['total'] = sum(context['items'])", "next": "a3"},
        {"id": "a3", "type": "action", "code": "context['vendor'] = json.dumps({'n': 'acme'})", "next": "d"},
        {"id": "d", "type": "decision", "code": "context['total'] > 100", "on_true": "b1", "on_false": "b2"},
        {"id": "b1", "type": "action", "code": "context['route'] = 'manual'", "next": "e"},
        {"id": "b2", "type": "action", "code": "context['route'] = 'auto'", "next": "e"},
        {"id": "e", "type": "end"},
    ]
}


def figure(samples: list[float], unit: str, goal: float | None = None, higher: bool = True) -> dict[str, Any]:
    median = statistics.median(samples)
    met = None if goal is None else (median >= goal if higher else median <= goal)
    return {
        "median": round(median, 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
        "n": len(samples),
        "unit": unit,
        "goal": goal,
        "met": met,
    }


class Bench:
    def __init__(self, quick: bool, only: set[str] | None = None) -> None:
        self.quick = quick
        self.only = only
        self.reps = 3
        self.tmp = Path(tempfile.mkdtemp(prefix="nova-bench-"))
        self.redis_server = RedisServer(self.tmp / "redis")
        self.pg = PostgresServer(self.tmp / "pg")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.figures: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    # ---- processes -----------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOVA_")}
        env.update(
            REDIS_URL=self.redis_server.url,
            DATABASE_URL=self.pg.url,
            NOVA_ADMIN_KEY=ADMIN,
            NOVA_LOG_LEVEL="WARNING",
            NOVA_CLIENT_RATE="1000000",
            NOVA_CLIENT_BURST="1000000",
            NOVA_CLIENT_MAX_INFLIGHT="0",
            BENCH_CELERY_REDIS=self.redis_server.url.replace("/0", "/1"),
        )
        env.update(extra)
        return env

    def spawn(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            list(args),
            env=self.env(**env),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / f"proc{len(self.procs)}.log", "wb"),
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def nova(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        return self.spawn(sys.executable, "-m", "cli.main", *args, **env)

    async def api(self, **env: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = self.nova("api", PORT=str(port), NOVA_HOST="127.0.0.1", **env)
        base = f"http://127.0.0.1:{port}"
        await self._wait_http(f"{base}/health")
        return proc, base

    async def _wait_http(self, url: str) -> None:
        async with httpx.AsyncClient() as http:
            for _ in range(600):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url)).status_code < 500:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{url} did not come up")

    def loadgen(self, *args: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode:
            # Its traceback says why; CalledProcessError alone would not.
            raise RuntimeError(f"loadgen {args[0]} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    async def flush_redis(self) -> None:
        """Empty every database of the bench's Redis (NOVA's and Celery's). FLUSHALL is an admin command:
        NOVA's own login (redis_server.url) may not run it."""
        admin = Redis.from_url(self.redis_server.admin_url)
        await admin.flushall()
        await admin.aclose()

    async def reset(self) -> None:
        """Redis emptied and PostgreSQL's tables truncated: what a scenario starts from."""
        await self.flush_redis()
        conn = await asyncpg.connect(self.pg.url)
        try:
            await conn.execute("TRUNCATE executions, node_runs, workflows, clients CASCADE")
        finally:
            await conn.close()

    async def fresh(self) -> tuple[Redis, asyncpg.Pool]:
        """reset(), and a Redis client and a PostgreSQL pool for the scenario, which closes them (a pool
        left open would try to keep its connections after the bench stops PostgreSQL)."""
        await self.reset()
        return Redis.from_url(self.redis_server.url, decode_responses=True), await create_pool(self.pg.url)

    async def workflow(self, base: str, definition: dict[str, Any]) -> int:
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
            # The client the scenarios execute as (409: it exists already).
            client = await http.post("/clients", json={"slug": "bench", "name": "Bench"})
            if client.status_code != 409:
                client.raise_for_status()
            # Workflow names are unique: one per call.
            name = f"bench-{uuid.uuid4().hex[:8]}"
            response = await http.post("/workflows", json={"name": name, "graph_definition": definition})
            response.raise_for_status()
            return int(response.json()["id"])

    # ---- scenarios -----------------------------------------------------------------------------

    def redis_ceiling(self) -> None:
        binary = shutil.which("redis-benchmark")
        n = "50000" if self.quick else "200000"
        samples = []
        for _ in range(self.reps):
            if binary:
                out = subprocess.run(
                    [
                        binary,
                        "-p",
                        str(self.redis_server.port),
                        # The embedded Redis asks for a login; NOVA's user, as the workers have.
                        "--user",
                        APP_USER,
                        "-a",
                        self.redis_server.app_password,
                        "-n",
                        n,
                        "-P",
                        "16",
                        "-c",
                        "50",
                        "-q",
                        "XADD",
                        "bench:ceiling",
                        "MAXLEN",
                        "~",
                        "100000",
                        "*",
                        "field",
                        "value",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=120,
                )
                samples.append(float(out.stdout.split(":")[-1].split()[0]))
            else:
                samples.append(asyncio.run(self._pipelined_xadd(int(n))))
        self.figures["redis_xadd_ceiling"] = figure(samples, "ops/s")
        self.figures["redis_xadd_ceiling"]["source"] = "redis-benchmark" if binary else "pipelined redis-py loop"

    async def _pipelined_xadd(self, n: int) -> float:
        """Without redis-benchmark: XADDs in pipelines of 16 over 50 connections, like its options above."""
        redis = Redis.from_url(self.redis_server.url, max_connections=64)
        per_client = n // 50

        async def client() -> None:
            for _ in range(0, per_client, 16):
                pipe = redis.pipeline(transaction=False)
                for _ in range(16):
                    pipe.xadd("bench:ceiling", {"field": "value"}, maxlen=100_000, approximate=True)
                await pipe.execute()

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(50)))
        elapsed = time.perf_counter() - t0
        await redis.aclose()
        return per_client * 50 / elapsed

    async def enqueue_http(self) -> None:
        await self.reset()
        proc, base = await self.api()
        try:
            wf = await self.workflow(base, START_END)
            body = json.dumps({"client_slug": "bench", "initial_context": {"invoice": 1}})
            seconds = "3" if self.quick else "5"
            runs = [
                self.loadgen("post", f"{base}/workflows/{wf}/execute", body, "64", seconds, AUTH)
                for _ in range(self.reps)
            ]
        finally:
            self.stop(proc)
        assert all(set(r["statuses"]) == {"202"} for r in runs), runs
        self.figures["enqueue_http_rps"] = figure([r["rps"] for r in runs], "req/s", 3000)
        # No goal: a closed loop slows its arrivals down when the API stalls, and under-samples the stall;
        # the p99 goal is enqueue_open's (issue 17).
        self.figures["enqueue_http_p99"] = figure([r["p99_ms"] for r in runs], "ms")

    async def enqueue_open(self) -> None:
        """Enqueue latency at a fixed arrival rate (an open loop, see bench/loadgen.py): the closed loop
        above slows its arrivals down whenever the server stalls, so its tail hides the stalls. At the
        goal's 3,000 req/s, and at 500 req/s, where a machine that cannot keep up with 3,000 still shows
        the tail that stalls (not queueing for the CPU) make. Beside them, the API's CPU per request
        (its process, from /proc) and the generator's own."""
        await self.reset()
        proc, base = await self.api()
        seconds = "3" if self.quick else "10"
        try:
            wf = await self.workflow(base, START_END)
            body = json.dumps({"client_slug": "bench", "initial_context": {"invoice": 1}})
            url = f"{base}/workflows/{wf}/execute"
            # Warm-up (imports on first use, connection pools, caches): not measured.
            self.loadgen("open", url, body, "3000", "1", "64", AUTH)
            for name, rate, goal in (("enqueue_open", 3000, 15.0), ("enqueue_open_500", 500, None)):
                runs = []
                for _ in range(self.reps):
                    before = cost.tree_cpu_seconds([proc.pid])
                    run = self.loadgen("open", url, body, str(rate), seconds, "64", AUTH)
                    spent = cost.tree_cpu_seconds([proc.pid]) - before
                    run["api_cpu_ms_per_request"] = spent * 1000 / max(1, run["requests"])
                    runs.append(run)
                self._open_figures(name, rate, goal, runs)
        finally:
            self.stop(proc)

    def _open_figures(self, name: str, rate: int, goal: float | None, runs: list[dict[str, Any]]) -> None:
        # Errors (connections lost, answers that never came) are a figure: an overloaded machine has them.
        assert all(set(r["statuses"]) <= {"202"} for r in runs), runs
        f = self.figures
        f[f"{name}_p99"] = figure([r["p99_ms"] for r in runs], "ms", goal, higher=False)
        f[f"{name}_p50"] = figure([r["p50_ms"] for r in runs], "ms")
        f[f"{name}_max"] = figure([r["max_ms"] for r in runs], "ms")
        # Kept up: the answers came at the arrival rate (within 2%: the last arrivals' answers come after).
        f[f"{name}_rps"] = figure([r["rps"] for r in runs], "req/s", rate * 0.98)
        f[f"{name}_rps"]["loop"] = runs[0]["loop"]
        # Requests that found all 64 connections busy at their intended time (they waited, and it counts).
        f[f"{name}_late"] = figure([r["late"] for r in runs], "requests")
        # How late the requests went out (part of their latency): the generator's timers (whole milliseconds)
        # and its scheduling on a busy machine, and for a late request its wait for a free connection.
        f[f"{name}_send_lag_p99"] = figure([r["send_lag_p99_ms"] for r in runs], "ms")
        f[f"{name}_errors"] = figure([r["errors"] for r in runs], "requests", 0, higher=False)
        f[f"{name}_api_cpu_ms"] = figure([r["api_cpu_ms_per_request"] for r in runs], "ms/req")
        f[f"{name}_loadgen_cpu_ms"] = figure([r["cpu_ms_per_request"] for r in runs], "ms/req")

    async def celery_api(self) -> tuple[subprocess.Popen[bytes], str]:
        """The Celery peer's HTTP API (bench/celery_api.py) in a process of its own, and its base URL."""
        port = free_port()
        proc = self.spawn(
            sys.executable, "-m", "uvicorn", "bench.celery_api:app",
            "--port", str(port), "--log-level", "warning", "--no-access-log",
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            await self._wait_http(f"{base}/docs")
        except BaseException:
            self.stop(proc)
            raise
        return proc, base

    async def enqueue_celery(self) -> None:
        await self.reset()
        proc, base = await self.celery_api()
        try:
            body = json.dumps({"initial_context": {"invoice": 1}})
            seconds = "3" if self.quick else "5"
            runs = [self.loadgen("post", f"{base}/workflows/1/execute", body, "64", seconds) for _ in range(self.reps)]
        finally:
            self.stop(proc)
        self.figures["celery_enqueue_http_rps"] = figure([r["rps"] for r in runs], "req/s")
        self.figures["celery_enqueue_http_p99"] = figure([r["p99_ms"] for r in runs], "ms")

    async def _preload(self, redis: Redis, wf_id: int, n: int) -> list[str]:
        """Enqueue `n` executions straight into Redis (as the API would, through the one enqueue function)."""
        scripts = Scripts(redis, Keys.from_settings(Settings()))

        async def floor() -> int:
            return 0  # fresh() empties the executions table before each scenario

        ids = []
        for start in range(0, n, 50):
            batch = []
            for _ in range(start, min(n, start + 50)):
                task_id = uuid.uuid4().hex
                ids.append(task_id)
                # Versioned, as the API enqueues: the workflows here are new, at version 1.
                execution = NewExecution(
                    workflow_id=wf_id,
                    workflow_name="bench",
                    client="bench",
                    initial_context={},
                    task_id=task_id,
                    workflow_version=1,
                )
                batch.append(enqueue_execution(scripts, execution, floor=floor))
            await asyncio.gather(*batch)
        return ids

    async def fresh_with(self, definition: dict[str, Any]) -> tuple[Redis, asyncpg.Pool, int]:
        """Fresh servers with one workflow created through the API (stopped again): Redis, pool, its id."""
        redis, pool = await self.fresh()
        api, base = await self.api()
        try:
            wf = await self.workflow(base, definition)
        finally:
            self.stop(api)
        return redis, pool, wf

    async def consumer_throughput(self, processes: int, definition: dict[str, Any], n: int) -> tuple[float, float]:
        """Executions per second until all are terminal in Redis, and until all are projected to PostgreSQL."""
        redis, pool, wf = await self.fresh_with(definition)
        await self._preload(redis, wf, n)
        t0 = time.perf_counter()
        workers = [self.nova("worker", NOVA_CONCURRENCY="64", NOVA_SANDBOX_POOL_SIZE="8") for _ in range(processes)]
        terminal_at = None
        try:
            while True:
                projected = await pool.fetchval("SELECT count(*) FROM executions WHERE status = 'completed'")
                if terminal_at is None:
                    pending = await redis.xpending("nova:requests", "nova-workers")
                    group = (await redis.xinfo_groups("nova:requests"))[0]
                    undelivered = await redis.xrange("nova:requests", min=f"({group['last-delivered-id']}", count=1)
                    if not pending["pending"] and not undelivered:
                        terminal_at = time.perf_counter()
                if projected >= n:
                    break
                if time.perf_counter() - t0 > 600:
                    raise TimeoutError(f"only {projected} of {n} projected")
                await asyncio.sleep(0.05)
            done_at = time.perf_counter()
        finally:
            for w in workers:
                self.stop(w)
            await pool.close()
            await redis.aclose()
        return n / ((terminal_at or done_at) - t0), n / (done_at - t0)

    async def throughput(self) -> None:
        n = 5000 if self.quick else 20000
        one = [await self.consumer_throughput(1, START_END, n) for _ in range(self.reps)]
        self.figures["consumer_1proc_exec_s"] = figure([p for _, p in one], "exec/s", 2000)
        self.figures["consumer_1proc_exec_s_redis_only"] = figure([t for t, _ in one], "exec/s")
        two = [await self.consumer_throughput(2, START_END, n) for _ in range(self.reps)]
        self.figures["consumer_2proc_exec_s"] = figure([p for _, p in two], "exec/s")
        ratio = self.figures["consumer_2proc_exec_s"]["median"] / self.figures["consumer_1proc_exec_s"]["median"]
        # No goal: two processes share two cores with Redis, PostgreSQL and the projectors here (issue 17).
        self.figures["consumer_2proc_scaling"] = figure([ratio], "x")
        m = 300 if self.quick else 1000
        action = [await self.consumer_throughput(1, chain(1, "context['ok'] = 1"), m) for _ in range(self.reps)]
        self.figures["consumer_1proc_action_exec_s"] = figure([p for _, p in action], "exec/s", 500)

    async def celery_throughput(self) -> None:
        n = 5000 if self.quick else 20000
        best: dict[str, Any] | None = None
        for pool_name, concurrency in (("prefork", "2"), ("threads", "16")):
            samples = []
            for _ in range(self.reps):
                await self.flush_redis()
                redis = Redis.from_url(self.env()["BENCH_CELERY_REDIS"], decode_responses=True)
                code = f"from bench.celery_app import noop\nfor i in range({n}): noop.apply_async(args=[{{}}])"
                subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=self.env(), check=True, timeout=600)
                t0 = time.perf_counter()
                worker = self.spawn(
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench.celery_app",
                    "worker",
                    "--pool",
                    pool_name,
                    "-c",
                    concurrency,
                    "--loglevel",
                    "WARNING",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                )
                try:
                    while True:
                        done = 0
                        async for _ in redis.scan_iter("celery-task-meta-*", count=5000):
                            done += 1
                        if done >= n:
                            break
                        if time.perf_counter() - t0 > 600:
                            raise TimeoutError(f"celery finished {done} of {n}")
                        await asyncio.sleep(0.2)
                    samples.append(n / (time.perf_counter() - t0))
                finally:
                    self.stop(worker)
                    await redis.aclose()
            result = figure(samples, "exec/s")
            result["pool"] = pool_name
            self.figures[f"celery_{pool_name}_exec_s"] = result
            if best is None or result["median"] > best["median"]:
                best = result
        assert best is not None
        self.figures["celery_best_exec_s"] = best

    async def round_trip(self) -> None:
        await self.reset()
        api, base = await self.api()
        worker = self.nova("worker", NOVA_CONCURRENCY="8")
        try:
            wf = await self.workflow(base, START_END)
            n = 100 if self.quick else 300
            samples = []
            async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
                # The first runs count for nothing: the worker may still be starting (about a second,
                # which was the quick run's p99), and caches warm.
                for i in range(n + 10):
                    t0 = time.perf_counter()
                    task = (await http.post(f"/workflows/{wf}/execute", json={"client_slug": "bench"})).json()
                    while (await http.get(f"/tasks/{task['task_id']}")).json()["status"] != "SUCCESS":
                        pass
                    if i >= 10:
                        samples.append((time.perf_counter() - t0) * 1000)
        finally:
            self.stop(worker)
            self.stop(api)
        samples.sort()
        self.figures["round_trip_p50"] = figure([samples[len(samples) // 2]], "ms", 3, higher=False)
        self.figures["round_trip_p99"] = figure([percentile(samples, 0.99)], "ms", 10, higher=False)

    async def chain40(self) -> None:
        await self.reset()
        api, base = await self.api()
        worker = self.nova("worker", NOVA_CONCURRENCY="4", NOVA_SANDBOX_POOL_SIZE="4")
        try:
            wf = await self.workflow(base, chain(40))
            per_node = []
            async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
                for _ in range(5 if self.quick else 15):
                    t0 = time.perf_counter()
                    task = (await http.post(f"/workflows/{wf}/execute", json={"client_slug": "bench"})).json()
                    while (await http.get(f"/tasks/{task['task_id']}")).json()["status"] not in ("SUCCESS", "FAILURE"):
                        await asyncio.sleep(0.001)
                    per_node.append((time.perf_counter() - t0) * 1000 / 40)
        finally:
            self.stop(worker)
            self.stop(api)
        self.figures["chain40_ms_per_node"] = figure(per_node, "ms", 2, higher=False)

    async def sse_fanout(self) -> None:
        """Events written to the results stream, fanned out by one API process to 1,000 `GET /events`
        subscribers held by several listener processes (bench/loadgen.py sse). Latency runs from the
        event's write (its entry id's time, Redis's clock, whole ms) to its receipt (the kernel's receive
        time on the subscriber's socket; `read` figures: the listener's read); the listeners report their
        own CPU so a reader can see they were not saturated, and the API's CPU over the fan-out window,
        per event and subscriber, says what one delivery costs the server."""
        redis, pool = await self.fresh()
        await pool.close()
        # All subscribers use the admin key: the per-key cap on open streams must allow them.
        api, base = await self.api(NOVA_SSE_MAX_CONNECTIONS_PER_KEY="5000")
        # 1,000 subscribers in the quick run too: the goal is stated at 1,000, and it costs seconds. The p99
        # is the tail of the slowest events' fan-outs: with only a few events one stall of the shared
        # machine would be all of it.
        subscribers, events = (1000, 30) if self.quick else (1000, 60)
        processes = SSE_LISTENERS
        listeners: list[subprocess.Popen[str]] = []
        try:
            for n in range(processes):
                share = subscribers // processes + (1 if n < subscribers % processes else 0)
                listeners.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bench.loadgen", "sse", f"{base}/events", str(share), str(events), AUTH],
                        cwd=ROOT,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            for listener in listeners:
                assert listener.stdout is not None
                ready = json.loads(await asyncio.to_thread(listener.stdout.readline))
                assert not ready["errors"], ready
            api_user0, api_system0 = cost.user_system_seconds(api.pid)
            t0 = time.perf_counter()
            for i in range(events):
                fields = {
                    "type": "queued",
                    "task_id": f"fan{i}",
                    "execution_id": "1",
                    "workflow_id": "1",
                    "client": "bench",
                    "ts": now_iso(),
                    "data": "{}",
                }
                await redis.xadd("nova:results", fields)
                await asyncio.sleep(0.1)
            outs = []
            for listener in listeners:
                assert listener.stdout is not None
                line = await asyncio.wait_for(asyncio.to_thread(listener.stdout.readline), 120)
                outs.append(json.loads(line))
            # Read before the listeners let go: the API's clean-up of 1,000 streams is not fan-out.
            api_user, api_system = cost.user_system_seconds(api.pid)
            api_user, api_system = api_user - api_user0, api_system - api_system0
            api_cpu, window = api_user + api_system, time.perf_counter() - t0
        finally:
            for listener in listeners:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    listener.communicate("\n", timeout=30)
                if listener.poll() is None:
                    listener.kill()
            self.stop(api)
            await redis.aclose()
        received = sum(o["received"] for o in outs)
        assert received == subscribers * events and not any(o["errors"] for o in outs), [
            {k: v for k, v in o.items() if not k.endswith("_hist")} for o in outs
        ]
        # Receipt is the kernel's receive time on the subscriber's socket: the listeners' own scheduling
        # (they share the two cores) is no part of it. The read figures add it, as an application sees.
        arrived = [o["arrived_hist"] for o in outs]
        read = [o["read_hist"] for o in outs]
        self.figures["sse_fanout_subscribers"] = figure([subscribers], "clients")
        self.figures["sse_fanout_p99"] = figure([merged_percentile(arrived, 0.99)], "ms", 50, higher=False)
        self.figures["sse_fanout_p50"] = figure([merged_percentile(arrived, 0.50)], "ms")
        self.figures["sse_fanout_max"] = figure([max(o["max_ms"] for o in outs)], "ms")
        self.figures["sse_fanout_read_p99"] = figure([merged_percentile(read, 0.99)], "ms")
        self.figures["sse_fanout_read_p50"] = figure([merged_percentile(read, 0.50)], "ms")
        # Per listener process, CPU / wall over the window from all subscribed to the last event.
        self.figures["sse_fanout_listener_utilisation"] = figure([o["utilisation"] for o in outs], "cpu/wall")
        self.figures["sse_fanout_listener_cpu_per_delivery"] = figure([o["cpu_us_per_event"] for o in outs], "us")
        self.figures["sse_fanout_api_cpu_per_delivery"] = figure([api_cpu * 1e6 / received], "us")
        # Apart: the server's Python per delivery, and the kernel's (mostly the socket write, which on
        # loopback also runs the receiving side's TCP path).
        self.figures["sse_fanout_api_user_cpu_per_delivery"] = figure([api_user * 1e6 / received], "us")
        self.figures["sse_fanout_api_system_cpu_per_delivery"] = figure([api_system * 1e6 / received], "us")
        self.figures["sse_fanout_api_cpu_per_event"] = figure([api_cpu * 1000 / events], "ms")
        self.figures["sse_fanout_api_utilisation"] = figure([api_cpu / window], "cpu/wall")

    async def sandbox_overhead(self) -> None:
        """A trivial node's cost through the local sandbox: warm (pooled interpreter) and cold (started for it)."""
        from consumer.sandbox.base import SandboxSpec
        from consumer.sandbox.local import LocalSandboxProvider

        n = 200 if self.quick else 1000
        provider = LocalSandboxProvider(Settings(sandbox_pool_size=0))
        sandbox = await provider.open(SandboxSpec(execution_id=1, client="bench"))
        warm = []
        for i in range(n):
            t0 = time.perf_counter()
            await sandbox.run_action("n", "context['i'] = context.get('i', 0) + 1", {"i": i}, 10)
            warm.append((time.perf_counter() - t0) * 1000)
        await sandbox.close()
        cold = []
        for i in range(20 if self.quick else 50):
            t0 = time.perf_counter()
            fresh = await provider.open(SandboxSpec(execution_id=i, client="bench"))
            await fresh.run_action("n", "pass", {}, 10)
            cold.append((time.perf_counter() - t0) * 1000)
            await fresh.close()
        await provider.aclose()
        warm.sort()
        cold.sort()
        self.figures["node_warm_p50"] = figure([warm[len(warm) // 2]], "ms", 3, higher=False)
        self.figures["node_warm_p99"] = figure([percentile(warm, 0.99)], "ms")
        self.figures["node_cold_p50"] = figure([cold[len(cold) // 2]], "ms")
        self.figures["node_cold_p99"] = figure([percentile(cold, 0.99)], "ms")

    async def _worker_cpu(self, worker: subprocess.Popen[bytes]) -> float:
        """CPU ms of a worker and of every process it uses: its live descendants (zygote, sandboxes) and
        those they reaped; from /proc (bench/cost.py)."""
        return cost.tree_cpu_seconds([worker.pid]) * 1000

    async def _cpu_per_execution(self, definition: dict[str, Any], n: int, **env: str) -> tuple[float, float]:
        """(gross, net) CPU ms per execution: net leaves out what the idle worker spends in the same time
        (its blocking reads, heartbeats and timers), measured just before."""
        redis, pool, wf = await self.fresh_with(definition)
        worker = self.nova("worker", NOVA_CONCURRENCY="4", NOVA_SANDBOX_POOL_SIZE="2", **env)
        try:
            # Warm: the worker, its zygote and pool up, every code path run once.
            await self._preload(redis, wf, 10)
            await self._until_projected(pool, 10)
            await asyncio.sleep(0.5)
            idle_t0, idle_before = time.monotonic(), await self._worker_cpu(worker)
            await asyncio.sleep(3)
            idle_rate = (await self._worker_cpu(worker) - idle_before) / (time.monotonic() - idle_t0)
            t0, before = time.monotonic(), await self._worker_cpu(worker)
            await self._preload(redis, wf, n)
            await self._until_projected(pool, 10 + n)
            await asyncio.sleep(0.5)  # the last sandboxes closed and reaped
            t1, after = time.monotonic(), await self._worker_cpu(worker)
        finally:
            self.stop(worker)
            await pool.close()
            await redis.aclose()
        # The enqueue (done by this process, as the API would) is not counted: only the worker's side.
        return (after - before) / n, (after - before - idle_rate * (t1 - t0)) / n

    async def sandbox_cpu(self) -> None:
        """Issue 13's goals: CPU per execution with the fork server, with and without isolation, and the
        NOVA-shaped idle round trip. Needs root for isolation (else the isolated figures say what ran)."""
        from consumer.sandbox.local import LocalSandboxProvider

        launcher = LocalSandboxProvider(Settings(sandbox_pool_size=0)).launcher
        n = 100 if self.quick else 300
        one = chain(1, "context['ok'] = 1")
        shapes = [("one_action", one, 5.0), ("nova_shaped", NOVA_SHAPED, 8.0)]
        # The same pipeline without any node code (no sandbox at all): what the worker spends per execution
        # on Redis, the results stream and the projection to PostgreSQL, whatever the sandbox.
        self.figures["cpu_ms_per_exec_start_end_no_sandbox"] = figure(
            [net for _, net in [await self._cpu_per_execution(START_END, n) for _ in range(self.reps)]], "ms"
        )
        if os.environ.get("BENCH_SHAPES"):
            shapes = [shape for shape in shapes if shape[0] in os.environ["BENCH_SHAPES"].split(",")]
        for name, definition, goal in shapes:
            for mode, env, g in (("isolated", {}, goal), ("no_isolation", {"NOVA_SANDBOX_LAUNCH": "plain"}, None)):
                env = {**env, "NOVA_SANDBOX_INSECURE": "1"} if mode == "no_isolation" else env
                runs = [await self._cpu_per_execution(definition, n, **env) for _ in range(self.reps)]
                unit = f"ms ({launcher})" if mode == "isolated" else "ms (fork server, no isolation)"
                self.figures[f"cpu_ms_per_exec_{name}_{mode}"] = figure([net for _, net in runs], unit, g, higher=False)
                self.figures[f"cpu_ms_per_exec_{name}_{mode}_gross"] = figure([gross for gross, _ in runs], unit)
            iso = self.figures[f"cpu_ms_per_exec_{name}_isolated"]["median"]
            plain = self.figures[f"cpu_ms_per_exec_{name}_no_isolation"]["median"]
            self.figures[f"cpu_ms_per_exec_{name}_isolation_share"] = figure([iso - plain], "ms")
        await self._nova_round_trip()

    async def _nova_round_trip(self) -> None:
        """The idle round trip of a NOVA-shaped execution, from the POST to the client's knowing its end:
        by polling GET /tasks/{id} (every millisecond, as NOVA's clients poll, only faster), and by
        following the task's event stream (GET /tasks/{id}/events, which closes after its end event).
        The client is bench/loadgen.py's, in a process of its own: on two cores a client that spends
        more per poll than the API answering it takes its CPU from the run it waits for (its CPU per
        request is reported)."""
        await self.reset()
        api, base = await self.api()
        worker = self.nova("worker", NOVA_CONCURRENCY="4", NOVA_SANDBOX_POOL_SIZE="2")
        try:
            wf = await self.workflow(base, NOVA_SHAPED)
            runs = 2 * (30 if self.quick else 110)
            body = json.dumps({"client_slug": "bench"})
            result = self.loadgen("roundtrip", base, f"/workflows/{wf}/execute", body, str(runs), "10", AUTH)
        finally:
            self.stop(worker)
            self.stop(api)
        for name, samples in (
            ("nova_shaped_round_trip", result["polled_ms"]),
            ("nova_shaped_round_trip_sse", result["followed_ms"]),
        ):
            samples.sort()
            self.figures[f"{name}_p50"] = figure([samples[len(samples) // 2]], "ms", 15, higher=False)
            self.figures[f"{name}_p99"] = figure([percentile(samples, 0.99)], "ms")
        self.figures["nova_shaped_round_trip_client_cpu_ms"] = figure([result["cpu_ms_per_request"]], "ms/request")

    # ---- NOVA's own Celery task against ours, on the NOVA-shaped workflow --------------------------

    async def nova_peer(self) -> None:
        """The peer NOVA users run (bench/celery_nova.py: one Celery task walks the whole graph, each action
        and decision in a fresh `python -c`) beside ours, on NOVA_SHAPED, same worker concurrency (4), in one
        run: executions/s of a backlog from the first enqueue to the last result seen, the worker's CPU per
        execution (its whole process tree), and the idle round trip through each one's API (enqueue to
        result seen). Ours runs with the NOVA-shaped scenario's local sandbox settings (pool of 2)."""
        from consumer.sandbox.local import LocalSandboxProvider

        iso = LocalSandboxProvider(Settings(sandbox_pool_size=0)).isolation
        mode = (
            f"local sandbox: {'namespaces' if iso.namespaces else 'no namespaces (' + iso.namespaces_why + ')'}, "
            f"{'separate uids' if iso.separate_uids else 'shared uid'}, "
            f"{'cgroups' if iso.cgroups else 'no cgroups (' + iso.cgroups_why + ')'}, network {iso.network}"
        )
        n = 60 if self.quick else 200
        ours: list[tuple[float, float, float]] = []
        peer: list[tuple[float, float]] = []
        # Alternated, so that a burst of load from the machine's other users falls on both sides alike.
        for _ in range(self.reps):
            ours.append(await self._ours_backlog(NOVA_SHAPED, n))
            peer.append(await self._celery_nova_backlog(NOVA_SHAPED, n))
        launcher = LocalSandboxProvider(Settings(sandbox_pool_size=0)).launcher
        self.figures["nova_peer_ours_exec_s"] = figure([r for r, _, _ in ours], "exec/s")
        self.figures["nova_peer_ours_exec_s"]["sandbox"] = f"{launcher}; {mode}"
        self.figures["nova_peer_ours_exec_s_projected"] = figure([p for _, p, _ in ours], "exec/s")
        self.figures["nova_peer_celery_exec_s"] = figure([r for r, _ in peer], "exec/s")
        self.figures["nova_peer_celery_exec_s"]["sandbox"] = "a fresh `python -c` per action and decision"
        self.figures["nova_peer_ours_worker_cpu_ms"] = figure([c for _, _, c in ours], "ms/exec")
        self.figures["nova_peer_celery_worker_cpu_ms"] = figure([c for _, c in peer], "ms/exec")
        ours_rt = await self._ours_round_trips(NOVA_SHAPED)
        peer_rt = await self._celery_nova_round_trips(NOVA_SHAPED)
        for side, samples in (("ours", ours_rt), ("celery", peer_rt)):
            samples.sort()
            self.figures[f"nova_peer_{side}_round_trip_p50"] = figure([samples[len(samples) // 2]], "ms")
            self.figures[f"nova_peer_{side}_round_trip_p99"] = figure([percentile(samples, 0.99)], "ms")
        f = self.figures
        f["nova_peer_exec_s_vs_celery"] = figure(
            [f["nova_peer_ours_exec_s"]["median"] / f["nova_peer_celery_exec_s"]["median"]], "x"
        )
        f["nova_peer_round_trip_p50_vs_celery"] = figure(
            [f["nova_peer_celery_round_trip_p50"]["median"] / f["nova_peer_ours_round_trip_p50"]["median"]], "x"
        )

    async def _ours_backlog(self, definition: dict[str, Any], n: int) -> tuple[float, float, float]:
        """(exec/s to every result in Redis, exec/s to every execution projected, worker CPU ms per execution)
        for a backlog of `n` enqueued at once onto a warm worker."""
        redis, pool, wf = await self.fresh_with(definition)
        worker = self.nova("worker", NOVA_CONCURRENCY="4", NOVA_SANDBOX_POOL_SIZE="2")
        try:
            warm = 8
            await self._preload(redis, wf, warm)
            await self._until_projected(pool, warm)
            await asyncio.sleep(0.5)
            cpu0, t0 = cost.tree_cpu_seconds([worker.pid]), time.perf_counter()
            await self._preload(redis, wf, n)
            await self._until_acknowledged(redis)
            seen = time.perf_counter()
            await self._until_projected(pool, warm + n)
            projected = time.perf_counter()
            cpu = cost.tree_cpu_seconds([worker.pid]) - cpu0
        finally:
            self.stop(worker)
            await pool.close()
            await redis.aclose()
        return n / (seen - t0), n / (projected - t0), cpu * 1000 / n

    async def _celery_nova_setup(self, definition: dict[str, Any]) -> tuple[Redis, int, subprocess.Popen[bytes]]:
        """An empty Celery database, the peer's tables with the workflow in them, and a warm prefork worker
        of concurrency 4."""
        from bench import celery_nova

        url = self.env()["BENCH_CELERY_REDIS"]
        celery_nova.app.conf.update(broker_url=url, result_backend=url)
        await self.flush_redis()
        redis = Redis.from_url(url, decode_responses=True)
        conn = await asyncpg.connect(self.pg.url)
        try:
            await celery_nova.create_tables(conn)
            wf = await conn.fetchval(
                "INSERT INTO bench_celery_workflows (name, graph_definition) VALUES ('bench', $1) RETURNING id",
                json.dumps(definition),
            )
        finally:
            await conn.close()
        worker = self.spawn(
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_nova",
            "worker",
            "--pool",
            "prefork",
            "-c",
            "4",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        )
        # Warm: every pool process has its database connection and has run the task once.
        await self._celery_results(redis, [self._celery_submit(wf) for _ in range(8)])
        return redis, wf, worker

    def _celery_submit(self, wf: int) -> str:
        from bench import celery_nova

        return str(celery_nova.execute_workflow_task.apply_async(args=[wf, {}]).id)

    async def _celery_results(self, redis: Redis, ids: list[str]) -> None:
        """Wait until every task's result is in Celery's backend (STARTED and RUNNING are not results)."""
        deadline = time.perf_counter() + 600
        keys = [f"celery-task-meta-{i}" for i in ids]
        while True:
            metas = await redis.mget(keys)
            if all(m is not None and json.loads(m)["status"] in ("SUCCESS", "FAILURE") for m in metas):
                failed = sum(json.loads(m)["status"] == "FAILURE" for m in metas)
                if failed:
                    raise RuntimeError(f"{failed} of the Celery peer's executions failed")
                return
            if time.perf_counter() > deadline:
                raise TimeoutError("the Celery peer did not finish")
            await asyncio.sleep(0.05)

    async def _celery_nova_backlog(self, definition: dict[str, Any], n: int) -> tuple[float, float]:
        """(exec/s to every result in the backend, worker CPU ms per execution) for a backlog of `n`."""
        redis, wf, worker = await self._celery_nova_setup(definition)
        try:
            await asyncio.sleep(0.5)
            cpu0, t0 = cost.tree_cpu_seconds([worker.pid]), time.perf_counter()
            ids = [self._celery_submit(wf) for _ in range(n)]
            await self._celery_results(redis, ids)
            elapsed = time.perf_counter() - t0
            cpu = cost.tree_cpu_seconds([worker.pid]) - cpu0
        finally:
            self.stop(worker)
            await redis.aclose()
        return n / elapsed, cpu * 1000 / n

    async def _round_trips(self, http: httpx.AsyncClient, execute: str, task: str) -> list[float]:
        """Idle round trips, one at a time: POST `execute`, then poll `task` until a result is seen."""
        samples = []
        for i in range(40 if self.quick else 120):
            await asyncio.sleep(0.05)  # idle: a warm pool refilled, nothing else running
            t0 = time.perf_counter()
            task_id = (await http.post(execute, json={"client_slug": "bench"})).json()["task_id"]
            while (await http.get(task.format(task_id))).json()["status"] not in ("SUCCESS", "FAILURE"):
                await asyncio.sleep(0.001)
            if i >= 5:  # the first few warm the API's and worker's caches
                samples.append((time.perf_counter() - t0) * 1000)
        return samples

    async def _ours_round_trips(self, definition: dict[str, Any]) -> list[float]:
        redis, pool = await self.fresh()
        await pool.close()
        await redis.aclose()
        api, base = await self.api()
        worker = self.nova("worker", NOVA_CONCURRENCY="4", NOVA_SANDBOX_POOL_SIZE="2")
        try:
            wf = await self.workflow(base, definition)
            async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
                return await self._round_trips(http, f"/workflows/{wf}/execute", "/tasks/{}")
        finally:
            self.stop(worker)
            self.stop(api)

    async def _celery_nova_round_trips(self, definition: dict[str, Any]) -> list[float]:
        redis, wf, worker = await self._celery_nova_setup(definition)
        api, base = await self.celery_api()
        try:
            async with httpx.AsyncClient(base_url=base) as http:
                return await self._round_trips(http, f"/nova/workflows/{wf}/execute", "/nova/tasks/{}")
        finally:
            self.stop(api)
            self.stop(worker)
            await redis.aclose()

    async def memory(self) -> None:
        redis, pool, wf = await self.fresh_with(START_END)
        n = 10000 if self.quick else 100000
        worker = self.nova("worker", NOVA_CONCURRENCY="50")
        try:
            warm = 2000
            await self._preload(redis, wf, warm)
            await self._until_acknowledged(redis)
            start_rss = _rss_mb(worker.pid)
            for chunk in range(0, n, 20000):
                await self._preload(redis, wf, min(20000, n - chunk))
                await self._until_acknowledged(redis)
            end_rss = _rss_mb(worker.pid)
        finally:
            self.stop(worker)
            await pool.close()
            await redis.aclose()
        self.figures["worker_rss_start_mb"] = figure([start_rss], "MB", 120, higher=False)
        self.figures["worker_rss_end_mb"] = figure([end_rss], "MB", 120, higher=False)
        self.figures["worker_rss_executions"] = figure([n], "executions")

    # ---- the cost model ------------------------------------------------------------------------

    def _pg_pid(self) -> int:
        return int((self.pg.pgdata / "postmaster.pid").read_text().split()[0])

    async def _drain(self, http: httpx.AsyncClient, on: bool) -> None:
        (await (http.post if on else http.delete)("/queue/drain")).raise_for_status()

    async def _until_projected(
        self, pool: asyncpg.Pool, n: int, status: str | None = "completed", every: float = 0.05
    ) -> None:
        """Until `n` executions are in PostgreSQL with this status (None: with any), polled each `every` s."""
        query = "SELECT count(*) FROM executions" + ("" if status is None else " WHERE status = $1")
        args = () if status is None else (status,)
        deadline = time.perf_counter() + 600
        while await pool.fetchval(query, *args) < n:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"fewer than {n} executions projected")
            await asyncio.sleep(every)

    async def _until_acknowledged(self, redis: Redis, every: float = 0.1) -> float:
        """Until the workers' group has read and acknowledged every request (each `every` s); returns when."""
        keys = Keys.from_settings(Settings())
        deadline = time.perf_counter() + 600
        while True:
            pending = await redis.xpending(keys.requests, keys.worker_group)
            group = next(g for g in await redis.xinfo_groups(keys.requests) if g["name"] == keys.worker_group)
            undelivered = await redis.xrange(keys.requests, min=f"({group['last-delivered-id']}", count=1)
            if not pending["pending"] and not undelivered:
                return time.perf_counter()
            if time.perf_counter() > deadline:
                raise TimeoutError("the workers never caught up with the backlog")
            await asyncio.sleep(every)

    async def _cost_of(self, definition: dict[str, Any], n: int, concurrency: str) -> tuple[dict, dict]:
        """CPU ms per execution by role in two phases of one run: the API enqueueing `n` requests while
        the workers are drained (nothing consumed), then the worker running them to PostgreSQL while
        the API idles. Each phase's readings cover every process of every role."""
        await self.reset()
        pool = await create_pool(self.pg.url)
        api, base = await self.api()
        worker = self.nova("worker", NOVA_CONCURRENCY=concurrency, NOVA_SANDBOX_POOL_SIZE="8")
        clock = cost.RoleClock(
            {"api": [api.pid], "worker": [worker.pid], "redis": [self.redis_server.proc.pid], "pg": [self._pg_pid()]}
        )
        try:
            async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
                wf = await self.workflow(base, definition)
                await self._drain(http, True)
                # Warm both up (imports, connections, the sandbox pool) before the first reading.
                await http.post(f"/workflows/{wf}/execute", json={"client_slug": "bench"})
                await self._drain(http, False)
                await self._until_projected(pool, 1)
                await self._drain(http, True)
                await asyncio.sleep(1.0)
                before = clock.read()
                body = json.dumps({"client_slug": "bench", "initial_context": {"invoice": 1}})
                sent = 0
                while sent < n:
                    run = self.loadgen("post", f"{base}/workflows/{wf}/execute", body, "16", "1", AUTH)
                    assert set(run["statuses"]) == {"202"}, run
                    sent += run["requests"]
                # The queued events projected before the reading: their cost is the enqueue's, not the run's.
                await self._until_projected(pool, sent + 1, status=None)
                enqueued = clock.read()
                await self._drain(http, False)
                await self._until_projected(pool, sent + 1)
                done = clock.read()
        finally:
            self.stop(worker)
            self.stop(api)
            await pool.close()
        return cost.per_execution_ms(before, enqueued, sent), cost.per_execution_ms(enqueued, done, sent)

    async def _projector_alone(self, n: int) -> dict[str, float]:
        """The projector's serial capacity: a `nova projector` process alone writing the run events of `n`
        no-op executions to PostgreSQL, timed from when it may start on them until all are there. A
        worker without a projector runs them first, while the projector (warm, connected, the queued
        events already written) is paused, so the runs are in neither its time nor its CPU.

        Its batches are serial (each waits on PostgreSQL, then on the projector's loop), so the time
        its and its PostgreSQL backends' threads waited for a core while runnable (schedstat) adds to
        the wall time and is taken out of it: what is left is its time on a machine of its own, as the
        costs are (a little less: the next batch's read overlaps the write, and a wait then is counted)."""
        redis, pool, control, wf = await self._drained_start_end()
        # Named, so that PostgreSQL's backends serving it can be told from the others.
        projector = self.nova("projector", DATABASE_URL=f"{self.pg.url}?application_name={PROJECTOR_ALONE}")
        worker = self.nova("worker", NOVA_CONCURRENCY="64", NOVA_SANDBOX_POOL_SIZE="8", NOVA_RUN_PROJECTOR="false")
        clock = cost.RoleClock({"projector": [projector.pid], "pg": [self._pg_pid()]})
        try:
            await self._preload(redis, wf, n)
            await self._until_projected(pool, n, status=None)
            os.kill(projector.pid, signal.SIGSTOP)
            await control.drain(False)
            await self._until_acknowledged(redis)
            self.stop(worker)
            # The chain: the projector's process and its backends (not PostgreSQL's other processes).
            backends = await pool.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", PROJECTOR_ALONE)
            chain = [projector.pid, *(b["pid"] for b in backends)]
            before, waited_before = clock.read(), cost.scheduled_seconds(chain)[1]
            t0 = time.perf_counter()
            os.kill(projector.pid, signal.SIGCONT)
            # Watched in Redis, not PostgreSQL: a poll of PostgreSQL would be one more of its threads
            # waiting for a core, and PostgreSQL's wait is taken out of the time.
            await self._until_projector_acknowledged(redis)
            wall = time.perf_counter() - t0
            after, waited = clock.read(), cost.scheduled_seconds(chain)[1] - waited_before
            await self._until_projected(pool, n)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(projector.pid, signal.SIGCONT)
            self.stop(worker)
            self.stop(projector)
            await pool.close()
            await redis.aclose()
        own_machine = n / (wall - waited)
        return {"exec_s": n / wall, "own_machine_exec_s": own_machine, **cost.per_execution_ms(before, after, n)}

    async def _until_projector_acknowledged(self, redis: Redis) -> None:
        """Until the projectors' group has read and acknowledged every entry of the results stream."""
        keys = Keys.from_settings(Settings())
        deadline = time.perf_counter() + 600
        while True:
            last = (await redis.xinfo_stream(keys.results))["last-generated-id"]
            group = next(g for g in await redis.xinfo_groups(keys.results) if g["name"] == keys.projector_group)
            if group["last-delivered-id"] == last and not group["pending"]:
                return
            if time.perf_counter() > deadline:
                raise TimeoutError("the projector never caught up with the results stream")
            await asyncio.sleep(0.005)

    async def _drained_start_end(self) -> tuple[Redis, asyncpg.Pool, RunControl, int]:
        """Fresh servers with the start-to-end workflow created (through the API, stopped again) and the
        queue drained, so that workers started next take nothing until it is resumed."""
        redis, pool = await self.fresh()
        api, base = await self.api()
        control = RunControl(redis, Keys.from_settings(Settings()), task_ttl=3600)
        try:
            wf = await self.workflow(base, START_END)
        finally:
            self.stop(api)
        await control.drain(True)
        return redis, pool, control, wf

    async def _saturated_run(self, processes: int, n: int) -> dict[str, Any]:
        """A measured run: `processes` warm, drained workers may read a backlog of `n`, timed until all
        are projected (start-up and the enqueueing are not in it). Beside the executions/s: what the
        projection may take from it (the other runnable threads on the machine meanwhile) and what
        checks it (each role's CPU per execution; how much of the time each worker was runnable, and
        its share of a core while it was)."""
        redis, pool, control, wf = await self._drained_start_end()
        # Set up as the cost run's workers are (_cost_of).
        workers = [self.nova("worker", NOVA_CONCURRENCY="64", NOVA_SANDBOX_POOL_SIZE="8") for _ in range(processes)]
        clock = cost.RoleClock(
            {"worker": [w.pid for w in workers], "redis": [self.redis_server.proc.pid], "pg": [self._pg_pid()]}
        )
        own = [pid for pids in clock.roles.values() for pid in pids]
        worker_pids = [w.pid for w in workers]

        def read() -> tuple[dict[str, float], tuple[float, float], tuple[float, float]]:
            return clock.read(), cost.scheduled_seconds(own), cost.scheduled_seconds(worker_pids)

        try:
            await asyncio.sleep(2.0)  # up, connected and drained before the backlog appears
            await self._preload(redis, wf, n)
            # The backlog's queued events projected too: the run is the executions alone.
            await self._until_projected(pool, n, status=None)
            before, own_before, workers_before = read()
            t0 = time.perf_counter()
            with cost.RunQueue() as queue:
                await control.drain(False)
                # When the runs themselves are done (every entry read and acknowledged), apart from when
                # PostgreSQL has them all: which of the two bounds the measured rate.
                runs_done = asyncio.create_task(self._until_acknowledged(redis, every=0.005))
                await self._until_projected(pool, n)
                wall = time.perf_counter() - t0
                runs_wall = await runs_done - t0
            after, own_after, workers_after = read()
        finally:
            for w in workers:
                self.stop(w)
            await pool.close()
            await redis.aclose()
        ran, queued = (a - b for a, b in zip(workers_after, workers_before, strict=True))
        own_runnable = (sum(own_after) - sum(own_before)) / wall
        return {
            "exec_s": n / wall,
            "runs_exec_s": n / runs_wall,
            "competing": cost.competing_threads(queue.mean, own_runnable),
            "cpu_ms": cost.per_execution_ms(before, after, n),
            "worker_runnable": (ran + queued) / wall / processes,
            "worker_share": ran / (ran + queued),
        }

    async def cost_model(self) -> None:
        """Issue 17's cost model: CPU per execution per role, the capacity it implies, and its
        projection of 1 and 2 worker processes against measured runs on this machine.

        Each repetition takes its costs, its projector's capacity and its measured runs one after the
        other, and each measured run is projected from its own repetition's costs: this machine's speed
        drifts by up to 2x within minutes, and a projection from costs taken minutes before its
        measurement compares two speeds, not the model with the system."""
        n = 2000 if self.quick else 6000
        costs: list[tuple[dict, dict]] = []
        alone: list[dict[str, float]] = []
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        projected: dict[int, list[float]] = {1: [], 2: []}
        cores = os.cpu_count() or 1
        for _ in range(self.reps):
            enqueue_costs, consume_costs = await self._cost_of(START_END, n, "64")
            costs.append((enqueue_costs, consume_costs))
            alone.append(await self._projector_alone(n))
            for processes in (1, 2):
                run = await self._saturated_run(processes, n)
                runs[processes].append(run)
                projected[processes].append(
                    cost.projected_throughput(
                        _measured_roles(consume_costs),
                        processes,
                        cores,
                        run["competing"],
                        alone[-1]["own_machine_exec_s"],
                    )
                )
        enqueue = _median_by_role([e for e, _ in costs])
        consume = _median_by_role([c for _, c in costs])
        for role in enqueue:
            self.figures[f"cpu_enqueue_{role}_ms"] = figure([e[role] for e, _ in costs], "ms/exec")
        for role in consume:
            goal = 0.25 if role == "worker" else None
            samples = [c[role] for _, c in costs]
            self.figures[f"cpu_noop_{role}_ms"] = figure(samples, "ms/exec", goal, higher=False)
        _, nova = await self._cost_of(NOVA_SHAPED, 60 if self.quick else 200, "8")
        for role, ms in nova.items():
            self.figures[f"cpu_nova_{role}_ms"] = figure([ms], "ms/exec")
        total = {role: enqueue[role] + consume[role] for role in consume}
        for name, value in cost.capacity(total).items():
            self.figures[f"capacity_{name}"] = figure([value], "x" if name == "workers_per_redis" else "exec/s")
        projector_exec_s = statistics.median(a["own_machine_exec_s"] for a in alone)
        self.figures["projector_alone_exec_s"] = figure([a["exec_s"] for a in alone], "exec/s")
        self.figures["projector_alone_own_machine_exec_s"] = figure([a["own_machine_exec_s"] for a in alone], "exec/s")
        self.figures["cpu_projector_alone_ms"] = figure([a["projector"] for a in alone], "ms/exec")
        self.figures["cpu_projector_alone_pg_ms"] = figure([a["pg"] for a in alone], "ms/exec")
        consume_only = _measured_roles(consume)
        for processes in (1, 2):
            self.figures[f"projected_{processes}proc_own_machine_exec_s"] = figure(
                [cost.projected_throughput(consume_only, processes, cores, projector_exec_s=projector_exec_s)], "exec/s"
            )
            f, group = f"{processes}proc", runs[processes]
            measured = [r["exec_s"] for r in group]
            self.figures[f"competing_threads_{f}"] = figure([r["competing"] for r in group], "threads")
            self.figures[f"projected_{f}_exec_s"] = figure(projected[processes], "exec/s")
            self.figures[f"measured_{f}_exec_s"] = figure(measured, "exec/s")
            # The runs alone (acknowledged in Redis), not waiting for their projection into PostgreSQL.
            self.figures[f"measured_{f}_runs_exec_s"] = figure([r["runs_exec_s"] for r in group], "exec/s")
            errors = [abs(p - m) / m * 100 for p, m in zip(projected[processes], measured, strict=True)]
            self.figures[f"projection_error_{f}"] = figure(errors, "%", 25, higher=False)
            self.figures[f"measured_{f}_worker_runnable"] = figure([r["worker_runnable"] for r in group], "of the time")
            self.figures[f"measured_{f}_worker_core_share"] = figure([r["worker_share"] for r in group], "of a core")
            for role in consume_only:
                self.figures[f"measured_{f}_cpu_{role}_ms"] = figure([r["cpu_ms"][role] for r in group], "ms/exec")

    # ---- the run -------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        reference = [reference_cpu_ms() for _ in range(5)]
        self.redis_server.start()
        self.pg.start()
        await migrate_url(self.pg.url)
        scenarios: list[tuple[str, Callable[[], Any]]] = [
            ("redis_ceiling", self.redis_ceiling),
            ("enqueue_http", self.enqueue_http),
            ("enqueue_open", self.enqueue_open),
            ("enqueue_celery", self.enqueue_celery),
            ("throughput", self.throughput),
            ("celery_throughput", self.celery_throughput),
            ("round_trip", self.round_trip),
            ("chain40", self.chain40),
            ("sse_fanout", self.sse_fanout),
            ("memory", self.memory),
            ("sandbox_overhead", self.sandbox_overhead),
            ("cost_model", self.cost_model),
            ("sandbox_cpu", self.sandbox_cpu),
            ("nova_peer", self.nova_peer),
        ]
        try:
            for name, scenario in scenarios:
                if self.only and name not in self.only:
                    continue
                t0 = time.perf_counter()
                try:
                    result = scenario()
                    if asyncio.iscoroutine(result):
                        await result
                except Exception as exc:
                    self.errors[name] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                print(f"{name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    self.stop(proc)
            self.pg.stop()
            self.redis_server.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)
        reference += [reference_cpu_ms() for _ in range(5)]
        # At the start and at the end: how fast this machine was for the run's figures.
        self.figures["machine_reference_cpu_ms"] = figure(reference, "ms")
        self._ratios()
        return {
            "machine": _machine(self.redis_server, self.pg),
            "quick": self.quick,
            "wall_time_s": round(time.perf_counter() - started, 1),
            "figures": self.figures,
            "errors": self.errors,
        }

    def _ratios(self) -> None:
        f = self.figures

        def ratio(a: str, b: str, name: str, goal: float | None) -> None:
            if a in f and b in f and f[b]["median"]:
                f[name] = figure([f[a]["median"] / f[b]["median"]], "x", goal)

        ratio("enqueue_http_rps", "celery_enqueue_http_rps", "enqueue_vs_celery", 3)
        # No goal: it follows from the worker's CPU per no-op execution, cost_model's goal (issue 17).
        ratio("consumer_1proc_exec_s", "celery_best_exec_s", "consumer_vs_celery", None)
        ratio("enqueue_http_rps", "redis_xadd_ceiling", "enqueue_vs_redis_ceiling", None)
        ratio("consumer_1proc_exec_s", "redis_xadd_ceiling", "consumer_vs_redis_ceiling", None)


def _median_by_role(runs: list[dict[str, float]]) -> dict[str, float]:
    return {role: statistics.median(run[role] for run in runs) for role in runs[0]}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measured_roles(costs: dict[str, float]) -> dict[str, float]:
    """The roles of a measured run (no API in it): what it is projected from, taken from a cost run's
    consume phase, never from the measured run itself."""
    return {role: costs[role] for role in ("worker", "redis", "pg")}


def reference_cpu_ms() -> float:
    """CPU milliseconds this process takes for a fixed piece of pure Python (a loop of additions).

    Machines of one kind differ, and one machine's speed drifts with what its neighbours do: the same code
    measured 0.35 and 0.91 ms of worker CPU per no-op execution on two machines of this kind. Each run
    states this reference beside its figures, so that CPU figures of two runs compare by their ratio to it."""
    started = time.process_time()
    total = 0
    for i in range(2_000_000):
        total += i
    return (time.process_time() - started) * 1000


def _machine(redis_server: RedisServer, pg: PostgresServer) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "cores": os.cpu_count(),
        # The machine may be shared: wall-clock figures (round trips) mean little under a high load.
        "load_average_at_end": [round(v, 1) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_server": redis_server.version(),
        "postgres": subprocess.run(
            [str(pg.bindir / "postgres"), "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "packages": {p: installed(p) for p in ("redis", "fastapi", "uvicorn", "asyncpg", "celery")},
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cores']} cores (load average {m.get('load_average_at_end')}), Python {m['python']}, "
        f"Redis {m['redis_server']}, {m['postgres']}"
        f"{' (quick run)' if report['quick'] else ''}.",
        "",
        "| figure | median | min | max | unit | goal | met |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for name, f in report["figures"].items():
        goal = (
            ""
            if f["goal"] is None
            else f"{'≥' if name.endswith(('rps', 'exec_s', 'scaling', 'celery')) else '≤'} {f['goal']}"
        )
        met = {True: "yes", False: "**no**", None: ""}[f["met"]]
        lines.append(f"| {name} | {f['median']} | {f['min']} | {f['max']} | {f['unit']} | {goal} | {met} |")
    for name, error in report["errors"].items():
        lines.append(f"\nScenario `{name}` failed: {error}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a subset that runs in about a minute")
    parser.add_argument("--only", nargs="*", help="run only these scenarios (by name)")
    args = parser.parse_args()
    report = asyncio.run(Bench(args.quick, set(args.only or [])).run())
    RESULTS.mkdir(parents=True, exist_ok=True)
    # A partial run (--only) has its own files: it must not replace the whole run's.
    stem = "latest" if not args.only else "only-" + "-".join(sorted(args.only))
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
