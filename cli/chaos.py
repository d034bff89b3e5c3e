"""`nova chaos`: the delivery guarantees checked end to end while things break.

Starts its own Redis (AOF on) and PostgreSQL, the API and several worker processes, submits a mix of
executions over HTTP (succeeding, failing, and one poison entry per hundred written straight into the
stream), and meanwhile SIGKILLs a random worker every few seconds (restarting it), restarts Redis once
and stops PostgreSQL for a while. Then it waits for every accepted execution to end and prints one
JSON line: lost (accepted, no terminal state) and duplicated (more than one terminal event, or node-run
records that do not match the run) must both be 0.

Three more faults, each on by default and each with its own switch:

* long nodes: some executions run a node that sleeps longer than the visibility timeout, so only the
  heartbeat keeps other workers from reclaiming them mid-node. The node appends a line to a file when
  it starts; `node_started_twice` counts nodes started again when the worker running the previous start
  had not been killed by this run (a restart after a SIGKILL is the at-least-once guarantee at work,
  anything else is a node running twice for no reason).
* lost replies: workers reach Redis through a fault proxy (cli/faultproxy.py) that throws away a small
  fraction of Redis's replies after the commands ran and closes the connection; redis-py retries, so
  every atomic step must be safe to run twice.
* bad bytes: one request entry per hundred carries bytes that are not UTF-8. It must end in the
  dead-letter stream with a readable reason (`bad_bytes_dead_lettered`) while everything else completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from cli.embedded import PostgresServer, RedisServer, free_port
from cli.faultproxy import FaultProxy
from shared.connections import create_redis
from shared.db import migrate_url
from shared.settings import Settings
from shared.streams import TERMINAL_STATUSES, Keys, TaskField

# The worker's line when its watchdog gives its runs up (consumer/worker.py), as `nova` logs it.
_GAVE_UP = re.compile(
    r"(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) worker\[(?P<pid>\d+)\] \w+ [\w.]+: no heartbeat reached Redis"
)

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


def long_workflow(starts_path: Path, seconds: float) -> dict[str, Any]:
    """start -> nap -> end, where nap records its start in `starts_path`, then sleeps `seconds`.

    The worker is named in `_nova` (its consumer name, host-pid-random): the report takes its pid to tell
    a restart after a SIGKILL from a second start under a worker that was still alive. (Sandboxes have
    their own PID namespace: os.getppid() there is not the worker.)
    """
    nap = "\n".join(
        [
            "import json, os, time",
            "me = context['_nova']",
            "pid = int(me['worker'].rsplit('-', 2)[1])",
            "line = {'task': me['task_id'], 'step': me['step'], 'worker': pid, 't': time.time()}",
            f"with open({str(starts_path)!r}, 'a') as f:",
            "    f.write(json.dumps(line) + '\\n')",
            f"time.sleep({seconds!r})",
            "context['napped'] = True",
        ]
    )
    return {
        "nodes": [
            {"id": "start", "type": "start", "next": "nap"},
            {"id": "nap", "type": "action", "code": nap, "next": "end"},
            {"id": "end", "type": "end"},
        ]
    }


# Not UTF-8 in any reading: a lenient decoder still finds no JSON here, so the entry must be dead-lettered.
BAD_BYTES = b"\xff\xfe{\x80"

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
    # Long nodes: one execution in `long_every` sleeps `long_node_seconds` in one node (the workers'
    # visibility timeout is 2 s).
    long_nodes: bool = True
    long_node_seconds: float = 5.0
    long_every: int = 50
    # Lost replies: the fraction of Redis's replies to workers that the fault proxy throws away.
    lost_replies: bool = True
    drop_probability: float = 0.01
    # Bad bytes: one request entry per hundred with non-UTF-8 bytes, written straight into the stream.
    bad_bytes: bool = True

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.redis_server = RedisServer(self.log_dir / "redis", appendonly=True)
        self.pg = PostgresServer(self.log_dir / "postgres", durable=False)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kills = 0
        # Workers that exited without being killed: a crash the report should not hide.
        self.unasked_exits = 0
        # pid -> wall-clock time of its SIGKILL (compared with the times the long nodes write).
        self.killed_at: dict[int, float] = {}
        self.admin_key = secrets.token_urlsafe(24)
        self.proxy: FaultProxy | None = None
        # Sandboxes may run under their own unprivileged uids: the file they append to must be
        # reachable and writable by any uid, so it lives in a folder of its own.
        starts_dir = Path(tempfile.mkdtemp(prefix="nova-chaos-starts-"))
        starts_dir.chmod(0o755)
        self.starts_path = starts_dir / "node-starts.jsonl"
        self.starts_path.touch()
        self.starts_path.chmod(0o666)

    # ---- processes -----------------------------------------------------------------------------

    def env(self, role: str = "api") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOVA_")}
        # Only workers go through the fault proxy: the API's own resilience is not what is measured.
        redis_url = self.proxy.url if role == "worker" and self.proxy is not None else self.redis_server.url
        env.update(
            REDIS_URL=redis_url,
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
            # The long nodes log their starts here; sandboxes see the rest of the host read-only.
            NOVA_SANDBOX_WRITABLE=str(self.starts_path.parent),
        )
        return env

    def spawn(self, name: str, *args: str) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        try:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *args],
                env=self.env(args[0] if args else "api"),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def kill9(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            self.unasked_exits += 1
        # Noted before the signal: any later start of a node it ran is explained by this kill.
        self.killed_at[proc.pid] = time.time()
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
        if self.lost_replies:
            # In this process's event loop: forwarding must never wait on anything slow here.
            self.proxy = await FaultProxy(
                "127.0.0.1", self.redis_server.port, seed=self.seed, credentials=self.redis_server.credentials
            ).start()
            self.proxy.drop_replies(probability=self.drop_probability)
        self.spawn("api", "api")
        for i in range(self.workers):
            self.spawn(f"worker{i}", "worker")
        base = f"http://127.0.0.1:{self.port}"
        redis = create_redis(Settings(redis_url=self.redis_server.url))
        try:
            headers = {"Authorization": f"Bearer {self.admin_key}"}
            async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as http:
                await self._wait_healthy(http)
                for i in range(5):
                    # The clients the executions run as (see _submit).
                    created = await http.post("/clients", json={"slug": f"client-{i}", "name": f"Client {i}"})
                    created.raise_for_status()
                ok_id = await self._create(http, "chaos-succeeding", SUCCEEDING)
                bad_id = await self._create(http, "chaos-failing", FAILING)
                long_id = None
                if self.long_nodes:
                    workflow = long_workflow(self.starts_path, self.long_node_seconds)
                    long_id = await self._create(http, "chaos-long", workflow)
                done = asyncio.Event()
                saboteur = asyncio.create_task(self._sabotage(done))
                accepted, poison, bad = await self._submit(http, redis, ok_id, bad_id, long_id)
                done.set()
                await saboteur
                report = await self._verify(redis, accepted, poison, bad)
            self.unasked_exits += sum(1 for p in self.procs.values() if p.poll() is not None)
        finally:
            await redis.aclose()
            # In a thread: workers finishing their shutdown still talk to Redis through the proxy,
            # which runs in this event loop.
            await asyncio.to_thread(self.stop_all)
            if self.proxy is not None:
                await self.proxy.aclose()
            self.pg.stop()
            self.redis_server.stop()
        report["wall_time_s"] = round(time.monotonic() - started, 1)
        report["worker_kills"] = self.kills
        report["worker_exits_unasked"] = self.unasked_exits
        if self.proxy is not None:
            report["replies_dropped"] = self.proxy.replies_dropped
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
        self, http: httpx.AsyncClient, redis: Redis, ok_id: int, bad_id: int, long_id: int | None
    ) -> tuple[dict[str, str], int, set[str]]:
        """Submit every execution (retrying 503s with the same Idempotency-Key).

        Returns task id -> kind of the accepted ones, the number of poison entries, and the task ids
        of the bad-bytes entries.
        """
        accepted: dict[str, str] = {}
        poison = 0
        bad: set[str] = set()
        semaphore = asyncio.Semaphore(16)
        workflow_ids = {"ok": ok_id, "fail": bad_id, "long": long_id or ok_id}

        async def one(i: int) -> None:
            nonlocal poison
            kind = "fail" if i % 10 == 9 else "ok"
            if kind == "ok" and long_id is not None and i % self.long_every == 3:
                kind = "long"
            body = {"client_slug": f"client-{i % 5}", "initial_context": {"items": [i % 20, 1]}}
            key = uuid.uuid4().hex
            async with semaphore:
                if i % 100 == 50:
                    # Poison: garbage written straight to the stream, as a buggy producer would.
                    await _xadd_until_written(redis, {"task_id": f"poison-{i}", "payload": "{oops"})
                    poison += 1
                if self.bad_bytes and i % 100 == 25:
                    # Complete in form, but with bytes no UTF-8 decoder accepts: a producer in another
                    # language writing binary into a field.
                    task_id = f"bad-bytes-{i}"
                    fields: dict[str | bytes, str | bytes] = {
                        "task_id": task_id,
                        "execution_id": str(10**12 + i),
                        "workflow_id": str(ok_id),
                        "workflow_name": "chaos-succeeding",
                        "client": f"client-{i % 5}",
                        "enqueued_at": "2024-01-01T00:00:00Z",
                        "payload": BAD_BYTES,
                    }
                    await _xadd_until_written(redis, fields)
                    bad.add(task_id)
                for _ in range(200):
                    try:
                        response = await http.post(
                            f"/workflows/{workflow_ids[kind]}/execute",
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
        return accepted, poison, bad

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

    async def _verify(self, redis: Redis, accepted: dict[str, str], poison: int, bad: set[str]) -> dict[str, Any]:
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
        # Every event carries its own timestamp and data, so two entries equal in every field are one
        # write that happened twice (a step re-run after its reply was lost), never two real events.
        events: Counter[tuple[tuple[str, str], ...]] = Counter()
        async for entry_id, fields in _scan(redis, "nova:results"):
            del entry_id
            events[tuple(sorted(fields.items()))] += 1
            if fields.get("type") in ("succeeded", "failed", "dead"):
                terminal_events[fields.get("task_id", "")] += 1
        rows = await self._projected(ids)
        counts = Counter(statuses.values())
        dlq_poison, bad_dead = await self._dead_letters(bad)
        duplicated = sum(1 for t in ids if terminal_events[t] > 1) + rows["bad_chains"]
        lost = sum(1 for t in ids if statuses.get(t) not in TERMINAL_STATUSES or terminal_events[t] == 0)
        long_ids = [t for t, kind in accepted.items() if kind == "long"]
        twice, restarts = self._node_starts()
        report: dict[str, Any] = {
            "submitted": self.executions,
            "accepted": len(ids),
            "succeeded": counts.get("SUCCESS", 0),
            "failed": counts.get("FAILURE", 0),
            "dead": counts.get("DEAD", 0),
            "poison_dead_lettered": f"{dlq_poison}/{poison}",
            # A request written into the stream that never ends anywhere is lost like any other.
            "lost": lost + (poison - dlq_poison) + (len(bad) - bad_dead) + rows["missing"],
            "duplicated": duplicated,
            "duplicated_terminal_events": sum(1 for t in ids if terminal_events[t] > 1),
            "chains_not_matching_runs": rows["bad_chains"],
            "events_written_twice": sum(n - 1 for n in events.values() if n > 1),
            "projected": rows["projected"],
            # What ended otherwise than its workflow must (succeed, or fail at its node): the first few,
            # with their errors, so that a count off by one says why.
            "unexpected": await self._unexpected(redis, keys, accepted, statuses),
        }
        if self.long_nodes:
            report["long_succeeded"] = f"{sum(1 for t in long_ids if statuses.get(t) == 'SUCCESS')}/{len(long_ids)}"
            report["node_started_twice"] = twice
            report["node_restarts_after_kill"] = restarts
        if self.bad_bytes:
            report["bad_bytes_dead_lettered"] = f"{bad_dead}/{len(bad)}"
        return report

    async def _unexpected(
        self, redis: Redis, keys: Keys, accepted: dict[str, str], statuses: dict[str, str | None]
    ) -> list[dict[str, Any]]:
        wrong = [t for t, kind in accepted.items() if statuses.get(t) != ("FAILURE" if kind == "fail" else "SUCCESS")][
            :5
        ]
        found = []
        for task_id in wrong:
            error = await redis.hget(keys.task(task_id), TaskField.ERROR)
            found.append(
                {"task_id": task_id, "kind": accepted[task_id], "status": statuses.get(task_id), "error": error}
            )
        return found

    async def _dead_letters(self, bad: set[str]) -> tuple[int, int]:
        """Poison entries dead-lettered as malformed, and bad-bytes entries dead-lettered with a readable reason.

        Read without decoding: a dead letter may carry the original's undecodable bytes, and the
        check must see them rather than crash on them.
        """
        raw = Redis.from_url(self.redis_server.url)
        poison = 0
        bad_dead: set[str] = set()
        try:
            async for _, fields in _scan(raw, "nova:dlq"):
                reason = _text(fields.get(b"dlq_reason"))
                if reason == "malformed" and (_text(fields.get(b"task_id")) or "").startswith("poison-"):
                    poison += 1
                task_id = _text(fields.get(b"task_id"))
                # Readable: the reason and the error both decode as UTF-8 and say something.
                if task_id in bad and reason and _text(fields.get(b"dlq_error")):
                    bad_dead.add(task_id)
        finally:
            await raw.aclose()
        return poison, len(bad_dead)

    def _node_starts(self) -> tuple[int, int]:
        """(nodes started again with nothing to explain it, restarts explained by a kill or by runs given up
        in a Redis outage)."""
        starts: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for line in self.starts_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                start = json.loads(line)
                starts.setdefault((start["task"], start["step"]), []).append(start)
        gave_up = self._runs_given_up()
        twice = restarts = 0
        for runs in starts.values():
            unexplained = False
            # File order is start order: O_APPEND writes land one after the other.
            for earlier, later in itertools.pairwise(runs):
                killed = self.killed_at.get(earlier["worker"])
                # A worker whose heartbeat could not reach Redis for half the visibility timeout (the Redis
                # restart, or lost replies on a loaded machine) gives its runs up before anyone can take
                # them over, and logs it: the node starts again, as after a SIGKILL.
                outage = any(earlier["t"] <= t <= later["t"] for t in gave_up.get(earlier["worker"], ()))
                if (killed is not None and killed <= later["t"]) or outage:
                    restarts += 1
                else:
                    unexplained = True
            twice += unexplained
        return twice, restarts

    def _runs_given_up(self) -> dict[int, list[float]]:
        """Worker pid -> when it gave its runs up for a silent heartbeat (from the workers' logs)."""
        found: dict[int, list[float]] = {}
        for log_path in self.log_dir.glob("worker*.log"):
            for line in log_path.read_text(errors="replace").splitlines():
                match = _GAVE_UP.match(line)
                if match:
                    at = datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    found.setdefault(int(match["pid"]), []).append(at)
        return found

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
            deadline = time.monotonic() + min(120.0, self.timeout)
            while True:
                projected = await conn.fetchval(
                    "SELECT count(*) FROM executions WHERE task_id = ANY($1::text[])"
                    " AND status IN ('completed', 'failed', 'dead')",
                    ids,
                )
                if projected == len(ids) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            await self._projector_caught_up(deadline)
            bad_chains = await conn.fetchval(
                """SELECT count(*) FROM executions e
                   WHERE e.task_id = ANY($1::text[]) AND e.status IN ('completed', 'failed')
                     AND e.nodes_executed <> (SELECT count(*) FROM node_runs n WHERE n.execution_id = e.id)""",
                ids,
            )
        finally:
            await conn.close()
        return {"projected": projected, "missing": len(ids) - projected, "bad_chains": bad_chains}


async def _scan(redis: Redis, stream: str) -> AsyncIterator[tuple[Any, dict[Any, Any]]]:
    cursor: str = "-"
    while True:
        batch = await redis.xrange(stream, min=cursor, max="+", count=1000)
        if not batch:
            return
        for entry_id, fields in batch:
            yield entry_id, fields
        last = batch[-1][0]
        cursor = f"({last.decode() if isinstance(last, bytes) else last}"


async def _xadd_until_written(redis: Redis, fields: Mapping[Any, Any]) -> None:
    # Written straight to the stream, past the API; retried through the Redis restart.
    while True:
        try:
            await redis.xadd("nova:requests", dict(fields))
            return
        except Exception:
            await asyncio.sleep(0.2)


def _text(value: bytes | None) -> str | None:
    """A field read without decoding, as text; None when absent or not UTF-8."""
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


def passed(report: dict[str, Any]) -> bool:
    """Nothing lost, nothing duplicated, and each optional check that ran came out clean."""
    complete = all(
        done == total
        for key in ("poison_dead_lettered", "bad_bytes_dead_lettered")
        if key in report
        for done, total in [report[key].split("/")]
    )
    return (
        report["lost"] == 0
        and report["duplicated"] == 0
        and report["events_written_twice"] == 0
        and report.get("node_started_twice", 0) == 0
        and complete
    )


def main(
    executions: int,
    workers: int,
    seed: int,
    *,
    long_nodes: bool = True,
    lost_replies: bool = True,
    bad_bytes: bool = True,
    drop_probability: float = 0.01,
) -> int:
    chaos = Chaos(
        executions=executions,
        workers=workers,
        seed=seed,
        long_nodes=long_nodes,
        lost_replies=lost_replies,
        bad_bytes=bad_bytes,
        drop_probability=drop_probability,
    )
    report = asyncio.run(chaos.run())
    print(json.dumps(report))
    return 0 if passed(report) else 1
