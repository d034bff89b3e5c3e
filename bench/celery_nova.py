"""The peer NOVA users run: NOVA's Celery task shape, benchmark-only (the product never imports Celery).

One Celery task runs a whole workflow, as NOVA's `execute_workflow_task` does: it loads the workflow
from PostgreSQL, inserts an execution row (running), marks the task STARTED, walks the graph, writes
one chain-of-work row per node, then updates the execution row and returns NOVA's result dict. Each
action's and each decision's code runs in a fresh `python -c` interpreter, the context going in as
JSON on stdin and coming back as JSON on stdout: NOVA opens a fresh sandbox per node, and a fresh
local interpreter (without site-packages) is the cheapest stand-in for one (an E2B sandbox costs far
more).

The app is configured as NOVA's Celery deployment is (Redis broker and backend, JSON, late acks,
prefetch 1, track_started, result_extended, the `workflows` queue, 600 s limit). Its tables live
beside NOVA Streams' in the bench's database, under names of their own (`create_tables`).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bench.celery_app import celery_app

DATABASE_URL = os.environ.get("DATABASE_URL", "")

app = celery_app("bench_nova", task_track_started=True, result_extended=True, task_default_queue="workflows")

TABLES = """
CREATE TABLE IF NOT EXISTS bench_celery_workflows (
    id serial PRIMARY KEY, name text NOT NULL, graph_definition jsonb NOT NULL);
CREATE TABLE IF NOT EXISTS bench_celery_executions (
    id bigserial PRIMARY KEY, workflow_id int NOT NULL, status text NOT NULL, result jsonb, error text,
    started_at timestamptz, completed_at timestamptz);
CREATE TABLE IF NOT EXISTS bench_celery_chain (
    id bigserial PRIMARY KEY, execution_id bigint NOT NULL, node_id text NOT NULL, node_type text NOT NULL,
    code_executed text, input_context jsonb, output_result jsonb, execution_time double precision,
    status text NOT NULL, decision_result text, path_taken text, timestamp timestamptz NOT NULL);
"""

# What a fresh interpreter runs for one node: the context from stdin, the node's code against it, the
# context (and a decision's value) back on stdout. argv: kind ("action" or "decision"), code.
NODE_RUNNER = """
import json, sys
kind, code = sys.argv[1], sys.argv[2]
context = json.load(sys.stdin)
scope = {"context": context, "json": json}
if kind == "action":
    exec(code, scope)
    out = {"context": context}
else:
    out = {"context": context, "decision": bool(eval(code, scope))}
json.dump(out, sys.stdout)
"""


async def create_tables(conn: asyncpg.Connection) -> None:
    await conn.execute(TABLES)
    await conn.execute("TRUNCATE bench_celery_workflows, bench_celery_executions, bench_celery_chain RESTART IDENTITY")


class _Database:
    """One connection per worker process, on an event loop of its own (the task is synchronous, as
    NOVA's is; NOVA's engine runs under asyncio.run inside it). Opened in the pool's child process,
    never in the parent it forks from."""

    def __init__(self) -> None:
        self.pid = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conn: asyncpg.Connection | None = None

    def run(self, query: str, *args: Any) -> Any:
        if self.pid != os.getpid() or self.loop is None or self.conn is None:
            self.pid = os.getpid()
            self.loop = asyncio.new_event_loop()
            self.conn = self.loop.run_until_complete(asyncpg.connect(DATABASE_URL))
        return self.loop.run_until_complete(self.conn.fetchval(query, *args))


_db = _Database()


def _run_node(kind: str, code: str, context: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        # -I -S: no site-packages, no environment; the cheapest fresh interpreter, so that the peer is
        # not made slower than it need be (NOVA's E2B sandbox costs far more than this).
        [sys.executable, "-I", "-S", "-c", NODE_RUNNER, kind, code],
        input=json.dumps(context),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"node code failed: {done.stderr.strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def walk(definition: dict[str, Any], context: dict[str, Any], record: Any) -> tuple[dict[str, Any], list]:
    """Walk the graph from its start node, each action and decision in a fresh interpreter; `record` is
    called with each node's trace entry (NOVA persists one chain-of-work row per node)."""
    nodes = {node["id"]: node for node in definition["nodes"]}
    current: str | None = next(node["id"] for node in definition["nodes"] if node["type"] == "start")
    trace: list[dict[str, Any]] = []
    while current is not None:
        node = nodes[current]
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"node_id": node["id"], "node_type": node["type"], "input_context": dict(context)}
        nxt: str | None
        if node["type"] == "action":
            context = _run_node("action", node["code"], context)["context"]
            nxt = node["next"]
        elif node["type"] == "decision":
            out = _run_node("decision", node["code"], context)
            context = out["context"]
            nxt = node["on_true"] if out["decision"] else node["on_false"]
            entry["decision_result"] = "true" if out["decision"] else "false"
            entry["path_taken"] = nxt
        else:
            nxt = node.get("next")
        entry.update(
            code_executed=node.get("code"),
            output_result=context,
            execution_time=time.perf_counter() - t0,
            status="success",
        )
        record(entry)
        trace.append(entry)
        current = nxt
    return context, trace


@app.task(bind=True, name="execute_workflow_task")
def execute_workflow_task(self: Any, workflow_id: int, initial_context: dict[str, Any] | None = None) -> dict:
    definition = json.loads(_db.run("SELECT graph_definition FROM bench_celery_workflows WHERE id = $1", workflow_id))
    execution_id = _db.run(
        "INSERT INTO bench_celery_executions (workflow_id, status, started_at) VALUES ($1, 'running', $2) RETURNING id",
        workflow_id,
        datetime.now(UTC),
    )
    self.update_state(state="RUNNING", meta={"execution_id": execution_id, "workflow_id": workflow_id})

    def record(entry: dict[str, Any]) -> None:
        _db.run(
            "INSERT INTO bench_celery_chain (execution_id, node_id, node_type, code_executed, input_context,"
            " output_result, execution_time, status, decision_result, path_taken, timestamp)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            execution_id,
            entry["node_id"],
            entry["node_type"],
            entry["code_executed"],
            json.dumps(entry["input_context"]),
            json.dumps(entry["output_result"]),
            entry["execution_time"],
            entry["status"],
            entry.get("decision_result"),
            entry.get("path_taken"),
            datetime.now(UTC),
        )

    final, trace = walk(definition, dict(initial_context or {}), record)
    _db.run(
        "UPDATE bench_celery_executions SET status = 'completed', result = $2, completed_at = $3 WHERE id = $1",
        execution_id,
        json.dumps(final),
        datetime.now(UTC),
    )
    return {
        "execution_id": execution_id,
        "status": "success",
        "final_context": final,
        "execution_trace": trace,
        "nodes_executed": len(trace),
        "error": None,
    }
