"""Workflows written in NOVA's format run through the real pipeline (requests stream, worker, local
sandbox, results stream, PostgreSQL) with NOVA's results: the path of nodes and the final context.

The workflows are our own, shaped as NOVA's fixtures are (a whole file with name, description, nodes,
edges; `executor: "e2b"` on the nodes, which run in the local sandbox through NOVA_E2B_FALLBACK=local).
The engine's rules are tested one by one in tests/test_engine.py; here a few of them meet real servers.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from redis.asyncio import Redis

from cli.dev import e2b_fallback_env
from consumer.sandbox.base import AliasProvider, UnavailableProvider
from consumer.sandbox.e2b import E2BSandboxProvider
from consumer.worker import default_providers
from shared.events import Event
from shared.settings import Settings
from shared.streams import EXECUTION_STATUS_BY_EVENT, EventType
from shared.workflow import graph_warnings, validate_definition
from tests.support import create_workflow, enqueue, in_process_worker, wait_projected, wait_terminal


def nova_file(name: str, nodes: list[dict[str, Any]], edges: list[tuple[str, ...]]) -> dict[str, Any]:
    """A NOVA fixture file, sent whole as the graph definition, as NOVA's loader scripts do."""
    return {
        "name": name,
        "description": f"{name}, in NOVA's format",
        "model": "not-used-here",
        "initial_context": {"never": "read by the engine, as in NOVA"},
        "nodes": [{"id": "start", "type": "start", "label": "Start"}, *nodes, {"id": "end", "type": "end"}],
        "edges": [{"from": e[0], "to": e[1], **({"condition": e[2]} if len(e) > 2 else {})} for e in edges],
    }


# Pages through a paginated source: a decision loop with no max_visits (NOVA's bound: 2 x 5 nodes).
PAGINATE = nova_file(
    "Paginate",
    [
        {
            "id": "fetch_page",
            "type": "action",
            "label": "Fetch one page",
            "executor": "e2b",
            "timeout": 10,
            "code": "context['page'] += 1\ncontext['rows'] = context['rows'] + [context['page'] * 10]",
        },
        {
            "id": "more_pages",
            "type": "decision",
            "code": "context['more_pages'] = context['page'] < context['pages']",
        },
        {"id": "sum_rows", "type": "action", "executor": "e2b", "code": "context['total'] = sum(context['rows'])"},
    ],
    [
        ("start", "fetch_page"),
        ("fetch_page", "more_pages"),
        ("more_pages", "fetch_page", "true"),
        ("more_pages", "sum_rows", "false"),
        ("sum_rows", "end"),
    ],
)

# Routes a support ticket by a label the decision sets.
ROUTE_TICKET = nova_file(
    "Route ticket",
    [
        {
            "id": "classify",
            "type": "decision",
            "executor": "e2b",
            "code": (
                "text = context['subject'].lower()\n"
                "if 'refund' in text:\n"
                "    context['classify'] = 'Billing'\n"
                "elif 'crash' in text:\n"
                "    context['classify'] = 'BUG'\n"
                "else:\n"
                "    context['classify'] = 'other'\n"
                "context['classified'] = True"
            ),
        },
        {"id": "billing", "type": "action", "executor": "e2b", "code": "context['queue'] = 'finance'"},
        {"id": "bug", "type": "action", "executor": "e2b", "code": "context['queue'] = 'engineering'"},
        {"id": "other", "type": "action", "executor": "e2b", "code": "context['queue'] = 'front-desk'"},
    ],
    [
        ("start", "classify"),
        ("classify", "billing", "billing"),
        ("classify", "bug", "bug"),
        ("classify", "other", "other"),
        ("billing", "end"),
        ("bug", "end"),
        ("other", "end"),
    ],
)

# Nodes that answer with NOVA's executor protocol: a JSON object as their last printed line.
PROTOCOL = nova_file(
    "Protocol",
    [
        {
            "id": "parse",
            "type": "action",
            "executor": "cached",
            "prompt": "kept, never run: the node's code runs",
            "code": (
                "amount = float(context['raw'].replace(',', '.'))\n"
                "context['scratch'] = 'not kept: the protocol object is the output'\n"
                "print('parsing', context['raw'])\n"
                "print(json.dumps({'status': 'success', 'context_updates': {'amount': amount}, 'message': 'ok'}))"
            ),
        },
        {
            "id": "check",
            "type": "action",
            "executor": "e2b",
            "code": (
                "ok = context['amount'] < 1000\n"
                "message = 'amount accepted' if ok else 'amount over the limit'\n"
                "print(json.dumps({'status': 'success' if ok else 'error', 'context_updates': {'checked': ok},"
                " 'message': message}))"
            ),
        },
    ],
    [("start", "parse"), ("parse", "check"), ("check", "end")],
)

# Shaped as NOVA's own invoice fixtures: its decision sets 'branch_decision', which NOVA never reads.
BRANCH_DECISION = nova_file(
    "Branch decision",
    [
        {"id": "read", "type": "action", "executor": "e2b", "code": "context['has_pdf'] = True"},
        {"id": "has_pdf_decision", "type": "decision", "code": "context['branch_decision'] = context['has_pdf']"},
        {"id": "extract", "type": "action", "executor": "e2b", "code": "context['text'] = 'x'"},
    ],
    [
        ("start", "read"),
        ("read", "has_pdf_decision"),
        ("has_pdf_decision", "extract", "true"),
        ("has_pdf_decision", "end", "false"),
        ("extract", "end"),
    ],
)


async def node_path(redis: Redis, settings: Settings, task_id: str) -> list[tuple[str, str]]:
    """(node, status) of every node the task ran, in order, from its node_finished events."""
    entries = await redis.xrange(settings.results_stream)
    events = [Event.from_entry(entry_id, fields) for entry_id, fields in entries]
    return [
        (e.data["node_id"], e.data["status"])
        for e in events
        if e.task_id == task_id and e.type == EventType.NODE_FINISHED
    ]


async def test_nova_workflows_run_with_novas_paths_and_contexts(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    workflows = {}
    for definition in (PAGINATE, ROUTE_TICKET, PROTOCOL, BRANCH_DECISION):
        validate_definition(definition, max_node_timeout=settings.max_node_timeout)
        workflows[definition["name"]] = await create_workflow(redis, settings, pool, definition, definition["name"])
    runs = {
        "paginate": (workflows["Paginate"], {"page": 0, "pages": 3, "rows": []}),
        "billing": (workflows["Route ticket"], {"subject": "Refund for order 12"}),
        "bug": (workflows["Route ticket"], {"subject": "App CRASH on login"}),
        "protocol": (workflows["Protocol"], {"raw": "12,50"}),
        "protocol-error": (workflows["Protocol"], {"raw": "4000"}),
        "branch-decision": (workflows["Branch decision"], {}),
    }
    async with in_process_worker(settings, e2b_api_key=None, e2b_fallback="local"):
        tasks = {name: await enqueue(redis, settings, wf, context) for name, (wf, context) in runs.items()}
        done = await wait_terminal(redis, settings, [t.task_id for t in tasks.values()])
        # The projection (run by the worker) takes label decisions (no true/false) and failed decisions alike.
        succeeded = [tasks[n].execution_id for n in ("paginate", "billing", "bug", "protocol")]
        failures = [tasks[n].execution_id for n in ("protocol-error", "branch-decision")]
        await wait_projected(pool, succeeded, {EXECUTION_STATUS_BY_EVENT[EventType.SUCCEEDED]})
        await wait_projected(pool, failures, {EXECUTION_STATUS_BY_EVENT[EventType.FAILED]})
    end = {name: done[task.task_id] for name, task in tasks.items()}
    paths = {name: await node_path(redis, settings, task.task_id) for name, task in tasks.items()}

    # A decision loop: three pages, then out through the false edge, within 2 x 5 steps.
    assert [n for n, _ in paths["paginate"]] == [
        "start",
        *["fetch_page", "more_pages"] * 3,
        "sum_rows",
        "end",
    ]
    assert end["paginate"].type == EventType.SUCCEEDED
    assert end["paginate"].data["final_context"] == {
        "page": 3,
        "pages": 3,
        "rows": [10, 20, 30],
        "more_pages": False,
        "total": 60,
    }

    # String labels, matched lower-cased; the decision's other changes are kept.
    assert [n for n, _ in paths["billing"]] == ["start", "classify", "billing", "end"]
    assert end["billing"].data["final_context"] == {
        "subject": "Refund for order 12",
        "classify": "Billing",
        "classified": True,
        "queue": "finance",
    }
    assert [n for n, _ in paths["bug"]] == ["start", "classify", "bug", "end"]
    assert end["bug"].data["final_context"]["queue"] == "engineering"

    # The print protocol: only context_updates merge.
    assert [n for n, _ in paths["protocol"]] == ["start", "parse", "check", "end"]
    assert end["protocol"].data["final_context"] == {"raw": "12,50", "amount": 12.5, "checked": True}

    # status "error" fails its node with its message, once: no retry, no dead letter.
    assert paths["protocol-error"] == [("start", "success"), ("parse", "success"), ("check", "failure")]
    failed = end["protocol-error"]
    assert failed.type == EventType.FAILED
    assert failed.data["error"]["node_id"] == "check"
    assert failed.data["error"]["message"] == "Code execution error: amount over the limit"
    assert failed.data["final_context"] == {"raw": "4000", "amount": 4000.0}

    # NOVA fails this workflow at its decision with this message; so do we, without NOVA's retries.
    assert paths["branch-decision"] == [("start", "success"), ("read", "success"), ("has_pdf_decision", "failure")]
    error = end["branch-decision"].data["error"]
    assert error["node_id"] == "has_pdf_decision" and error["type"] == "DecisionError"
    assert error["message"] == (
        "DecisionNode has_pdf_decision did not set 'has_pdf_decision' in context. "
        "Available context keys: ['has_pdf', 'branch_decision']"
    )
    # ... and says so when the workflow is created.
    assert [w.node for w in graph_warnings(validate_definition(BRANCH_DECISION))] == ["has_pdf_decision"]

    row = await pool.fetchrow(
        "SELECT decision, next_node FROM node_runs WHERE execution_id = $1 AND node_id = 'classify'",
        tasks["billing"].execution_id,
    )
    assert (row["decision"], row["next_node"]) == (None, "billing")


async def test_e2b_node_without_key_or_fallback_fails_at_once(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, PROTOCOL, "Protocol")
    async with in_process_worker(settings, e2b_api_key=None, e2b_fallback=None):
        task = await enqueue(redis, settings, wf, {"raw": "1"})
        done = await wait_terminal(redis, settings, [task.task_id])
    failed = done[task.task_id]
    assert failed.type == EventType.FAILED
    error = failed.data["error"]
    assert (error["node_id"], error["type"]) == ("parse", "ExecutorUnavailable")
    assert "E2B_API_KEY" in error["message"] and "NOVA_E2B_FALLBACK=local" in error["message"]
    entries = await redis.xrange(settings.results_stream)
    types = [Event.from_entry(i, f).type for i, f in entries if Event.from_entry(i, f).task_id == task.task_id]
    assert EventType.RETRY not in types and EventType.DEAD not in types
    assert await redis.xlen(settings.dead_letter_stream) == 0


def test_e2b_provider_follows_the_key_then_the_fallback() -> None:
    with_key = default_providers(Settings(e2b_api_key="k"))
    assert isinstance(with_key["e2b"], E2BSandboxProvider)
    fallback = default_providers(Settings(e2b_api_key=None, e2b_fallback="local"))
    assert isinstance(fallback["e2b"], AliasProvider) and fallback["e2b"].target is fallback["local"]
    neither = default_providers(Settings(e2b_api_key=None, e2b_fallback=""))
    assert isinstance(neither["e2b"], UnavailableProvider)
    # The variable is read case-insensitively, and "none"/"off"/empty mean no fallback.
    assert (
        Settings(e2b_fallback=" Local ").e2b_fallback == "local" and Settings(e2b_fallback="off").e2b_fallback is None
    )


def test_nova_dev_sets_the_fallback_and_says_so() -> None:
    env, note = e2b_fallback_env(Settings(e2b_api_key=None), {})
    assert env == {"NOVA_E2B_FALLBACK": "local"} and note is not None and "NOVA_E2B_FALLBACK=local" in note
    # An explicit choice, or a key, is left alone.
    assert e2b_fallback_env(Settings(e2b_api_key=None, e2b_fallback=None), {"NOVA_E2B_FALLBACK": ""})[0] == {}
    assert e2b_fallback_env(Settings(e2b_api_key="k"), {}) == ({}, None)
