"""The engine on its own: its rules (branching in both forms, loops and their bound, how node output
merges, NOVA's print protocol, timeouts, decision errors), a run's failure checkpoint, and a retry
resumed from it.

Node code runs in in-process doubles of the sandbox interface (the engine takes any opener): the real
node runner (consumer/sandbox/runner.py) called in this process, or scripted doubles. So these tests
need neither Redis nor PostgreSQL, nor a subprocess.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from consumer.engine import Attempt, Checkpoint, NodeRecord, Outcome, run_workflow
from consumer.sandbox import runner
from consumer.sandbox.base import NodeError, NodeResult, Sandbox, SandboxSpec
from consumer.sandbox.runner_client import RunnerSandbox
from shared.workflow import Node, validate_definition


class ScriptedSandbox:
    """Runs no code: each action node fails as many times as `failures[node_id]` says, then succeeds
    by recording its visit in the context."""

    def __init__(self, failures: dict[str, int]) -> None:
        self.failures = dict(failures)
        self.runs: list[str] = []

    async def run_action(self, node_id: str, code: str, context: dict[str, Any], timeout: float) -> NodeResult:
        self.runs.append(node_id)
        if self.failures.get(node_id, 0) > 0:
            self.failures[node_id] -= 1
            raise NodeError(type="ValueError", message=f"{node_id} failed")
        return NodeResult(context={**context, node_id: context.get(node_id, 0) + 1})

    async def evaluate(self, node_id: str, expression: str, context: dict[str, Any], timeout: float) -> NodeResult:
        raise AssertionError("no decision in these graphs")

    async def close(self) -> None:
        return None


class InProcessSandbox(RunnerSandbox):
    """The real node runner in this process: node code runs for real, with the runner's own output
    capture, JSON checks and globals kept between nodes, but no time limit (see TimedSandbox)."""

    def __init__(self) -> None:
        self.runner = runner.Runner(io.BytesIO(), io.BytesIO(), {})  # type: ignore[arg-type]
        self.calls: list[tuple[str, str, float]] = []

    async def _call(self, request: dict[str, Any], node_id: str, timeout: float) -> dict[str, Any]:
        self.calls.append((request["op"], node_id, timeout))
        # Through JSON both ways, as over the real protocol.
        reply = self.runner.run_node(json.loads(json.dumps(request)))
        encoded = reply.pop("context_json", None)
        if encoded is not None:
            reply["context"] = json.loads(encoded)
        return json.loads(json.dumps(reply))

    async def close(self) -> None:
        return None


class Recorder:
    def __init__(self) -> None:
        self.records: list[NodeRecord] = []
        self.checkpoint: Checkpoint | None = None

    async def node_started(
        self, step: int, node: Node, started_at: str, context: dict[str, Any], attempt: Attempt | None = None
    ) -> None:
        return None

    async def node_finished(self, record: NodeRecord, checkpoint: Checkpoint) -> None:
        self.records.append(record)
        # What the worker stores in the task hash; a retry resumes from the last one written.
        self.checkpoint = Checkpoint.from_json(checkpoint.as_json())

    @property
    def path(self) -> list[str]:
        return [r.node_id for r in self.records]


async def run(
    definition: dict[str, Any],
    sandbox: Sandbox,
    hooks: Recorder,
    resume: Checkpoint | None = None,
    *,
    context: dict[str, Any] | None = None,
    **options: Any,
) -> Outcome:
    async def open_sandbox(spec: SandboxSpec) -> Sandbox:
        return sandbox

    return await run_workflow(
        validate_definition(definition),
        context or {},
        open_sandbox=open_sandbox,
        spec=SandboxSpec(execution_id=1, client="acme"),
        hooks=hooks,
        resume=resume,
        **options,
    )


async def run_code(
    definition: dict[str, Any], context: dict[str, Any] | None = None, **options: Any
) -> tuple[Outcome, Recorder]:
    """Run with node code executed for real, in process."""
    hooks = Recorder()
    outcome = await run(definition, InProcessSandbox(), hooks, context=context, **options)
    return outcome, hooks


def nova(nodes: list[dict[str, Any]], edges: list[tuple[str, str] | tuple[str, str, str]]) -> dict[str, Any]:
    """A graph in NOVA's format: start and end added, edges as (from, to[, condition])."""
    return {
        "name": "test",
        "nodes": [{"id": "start", "type": "start"}, *nodes, {"id": "end", "type": "end"}],
        "edges": [{"from": e[0], "to": e[1], **({"condition": e[2]} if len(e) > 2 else {})} for e in edges],
    }


ONCE = {
    "nodes": [
        {"id": "start", "type": "start", "next": "charge"},
        {"id": "charge", "type": "action", "code": "pass", "max_visits": 1, "next": "end"},
        {"id": "end", "type": "end"},
    ],
    "edges": [],
}


async def test_retry_from_a_failed_node_with_max_visits_1_gets_its_visit() -> None:
    sandbox = ScriptedSandbox({"charge": 1})
    first = Recorder()
    failed = await run(ONCE, sandbox, first)
    assert failed.status == "failure" and failed.error is not None and failed.error["type"] == "ValueError"
    assert first.checkpoint is not None and first.checkpoint.next_node == "charge"

    retry = Recorder()
    outcome = await run(ONCE, sandbox, retry, resume=first.checkpoint)

    assert outcome.error is None and outcome.status == "success"
    assert outcome.final_context == {"charge": 1}
    assert sandbox.runs == ["charge", "charge"]
    assert [(r.step, r.node_id, r.status) for r in retry.records] == [(2, "charge", "success"), (3, "end", "success")]


LOOP = {
    "nodes": [
        {"id": "start", "type": "start", "next": "work"},
        {"id": "work", "type": "action", "code": "pass", "max_visits": 2, "next": "more"},
        {"id": "more", "type": "decision", "code": "again", "on_true": "work", "on_false": "end"},
        {"id": "end", "type": "end"},
    ],
    "edges": [],
}


class SecondVisitFails:
    """An action fails on its second run; decisions always loop back."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    async def run_action(self, node_id: str, code: str, context: dict[str, Any], timeout: float) -> NodeResult:
        self.runs.append(node_id)
        if self.runs.count(node_id) == 2:
            raise NodeError(type="ValueError", message="second visit failed")
        return NodeResult(context={**context, "visits": context.get("visits", 0) + 1})

    async def evaluate(self, node_id: str, expression: str, context: dict[str, Any], timeout: float) -> NodeResult:
        return NodeResult(context=context, decision=True)

    async def close(self) -> None:
        return None


async def test_retry_keeps_counting_the_visits_that_succeeded() -> None:
    # The second visit of `work` fails; its retry is that second visit, and the bound still stops a third.
    sandbox = SecondVisitFails()
    first = Recorder()
    failed = await run(LOOP, sandbox, first)
    assert failed.status == "failure" and failed.error is not None and failed.error["type"] == "ValueError"
    assert first.checkpoint is not None and first.checkpoint.next_node == "work"
    assert first.checkpoint.visits["work"] == 1

    outcome = await run(LOOP, sandbox, Recorder(), resume=first.checkpoint)

    assert outcome.status == "failure" and outcome.error is not None
    assert outcome.error["type"] == "LoopLimitExceeded" and outcome.error["node_id"] == "work"
    assert sandbox.runs == ["work", "work", "work"]
    assert outcome.final_context == {"visits": 2}


# ---- branching -------------------------------------------------------------------------------------

OURS = {
    "nodes": [
        {"id": "start", "type": "start", "next": "big"},
        {"id": "big", "type": "decision", "code": "context['amount'] > 100", "on_true": "manual", "on_false": "auto"},
        {"id": "manual", "type": "action", "code": "context['route'] = 'manual'", "next": "end"},
        {"id": "auto", "type": "action", "code": "context['route'] = 'auto'", "next": "end"},
        {"id": "end", "type": "end"},
    ],
    "edges": [],
}
# The same decision with its branches as edges whose conditions are JSON booleans.
OURS_AS_EDGES = {
    "nodes": [{**n, "on_true": None, "on_false": None} if n["id"] == "big" else n for n in OURS["nodes"]],
    "edges": [{"from": "big", "to": "manual", "condition": True}, {"from": "big", "to": "auto", "condition": False}],
}


@pytest.mark.parametrize("definition", [OURS, OURS_AS_EDGES], ids=["on_true-on_false", "edges"])
@pytest.mark.parametrize(("amount", "route"), [(500, "manual"), (5, "auto")])
async def test_expression_decision_takes_each_branch(definition: dict[str, Any], amount: int, route: str) -> None:
    outcome, hooks = await run_code(definition, {"amount": amount})
    assert outcome.status == "success"
    assert hooks.path == ["start", "big", route, "end"]
    assert outcome.final_context == {"amount": amount, "route": route}
    decision = hooks.records[1]
    assert decision.decision is (route == "manual") and decision.decision_result == str(route == "manual").lower()
    assert decision.next_node == route


TRIAGE = nova(
    [
        {"id": "score", "type": "action", "code": "context['score'] = len(context['reason'])"},
        {
            "id": "route",
            "type": "decision",
            "code": "context['seen_by'] = 'route'\ncontext['route'] = 'Refund' if context['score'] > 5 else 'REJECT'",
        },
        {"id": "refund", "type": "action", "code": "context['paid'] = True"},
        {"id": "reject", "type": "action", "code": "context['paid'] = False"},
    ],
    [
        ("start", "score"),
        ("score", "route"),
        ("route", "refund", "refund"),
        ("route", "reject", "reject"),
        ("refund", "end"),
        ("reject", "end"),
    ],
)


@pytest.mark.parametrize(("reason", "label", "paid"), [("damaged box", "refund", True), ("meh", "reject", False)])
async def test_nova_decision_branches_on_the_label_it_sets_and_keeps_its_changes(
    reason: str, label: str, paid: bool
) -> None:
    outcome, hooks = await run_code(TRIAGE, {"reason": reason})
    assert hooks.path == ["start", "score", "route", label, "end"]
    value = "Refund" if paid else "REJECT"
    assert outcome.final_context == {
        "reason": reason,
        "score": len(reason),
        "seen_by": "route",
        "route": value,
        "paid": paid,
    }
    decision = hooks.records[2]
    assert (decision.decision, decision.decision_result, decision.next_node) == (None, label, label)


async def test_nova_boolean_decision_and_a_branching_action() -> None:
    definition = nova(
        [
            {"id": "check", "type": "decision", "code": "context['check'] = context['n'] > 1"},
            # An action whose edges all carry conditions branches on context['<its id>'], as in NOVA.
            {"id": "sort", "type": "action", "code": "context['sort'] = 'odd' if context['n'] % 2 else 'even'"},
            {"id": "odd", "type": "action", "code": "context['kind'] = 'odd'"},
        ],
        [
            ("start", "check"),
            ("check", "sort", "true"),
            ("check", "end", "false"),
            ("sort", "odd", "odd"),
            ("sort", "end", "even"),
            ("odd", "end"),
        ],
    )
    outcome, hooks = await run_code(definition, {"n": 3})
    assert hooks.path == ["start", "check", "sort", "odd", "end"]
    assert outcome.final_context == {"n": 3, "check": True, "sort": "odd", "kind": "odd"}
    assert hooks.records[1].decision is True and hooks.records[2].decision_result == "odd"
    outcome, hooks = await run_code(definition, {"n": 0})
    assert hooks.path == ["start", "check", "end"] and outcome.final_context == {"n": 0, "check": False}


@pytest.mark.parametrize(
    ("code", "context", "taken"),
    [
        # As before labels existed: None and other values count by their truth.
        ("context.get('flag')", {}, "no"),
        ("context['items']", {"items": [1]}, "yes"),
        # A call that sets the decision's key decides as a NOVA decision would.
        ("context.update({'d': True})", {}, "yes"),
        ("print(json.dumps({'status': 'success', 'context_updates': {'d': False}}))", {}, "no"),
    ],
)
async def test_expression_decision_values(code: str, context: dict[str, Any], taken: str) -> None:
    definition = {
        "nodes": [
            {"id": "start", "type": "start", "next": "d"},
            {"id": "d", "type": "decision", "code": code, "on_true": "yes", "on_false": "no"},
            {"id": "yes", "type": "end"},
            {"id": "no", "type": "end"},
        ],
    }
    outcome, hooks = await run_code(definition, context)
    assert outcome.status == "success" and hooks.path == ["start", "d", taken]


async def test_expression_giving_a_string_picks_a_labelled_branch() -> None:
    definition = nova(
        [{"id": "kind", "type": "decision", "code": "context['doc']['kind']"}],
        [("start", "kind"), ("kind", "end", "invoice")],
    )
    definition["nodes"].append({"id": "other", "type": "end"})
    definition["edges"].append({"from": "kind", "to": "other", "condition": "receipt"})
    _, hooks = await run_code(definition, {"doc": {"kind": "Receipt"}})
    assert hooks.path == ["start", "kind", "other"] and hooks.records[1].decision_result == "receipt"


# ---- decision errors -------------------------------------------------------------------------------

DECIDE = nova(
    [{"id": "d", "type": "decision", "code": "CODE"}, {"id": "later", "type": "action", "code": "pass"}],
    [("start", "d"), ("d", "later", "yes"), ("d", "end", "No"), ("later", "end")],
)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            # NOVA's fixtures set branch_decision, which NOVA's engine never reads.
            "context['branch_decision'] = True",
            "DecisionNode d did not set 'd' in context. Available context keys: ['x', 'branch_decision']",
        ),
        (
            "context['branch_decision'] = True\ncontext['d'] = 1",
            "DecisionNode d set 'd' to unsupported type: int = 1. Expected bool or str.",
        ),
        (
            "context['branch_decision'] = True\ncontext['d'] = 'Maybe'",
            "No edge found for decision result 'maybe' from node d. Available conditions: ['yes', 'no']",
        ),
    ],
    ids=["sets-nothing", "bad-type", "no-edge"],
)
async def test_decision_errors_fail_the_workflow_at_the_decision(code: str, message: str) -> None:
    definition = {**DECIDE, "nodes": [n if n["id"] != "d" else {**n, "code": code} for n in DECIDE["nodes"]]}
    outcome, hooks = await run_code(definition, {"x": 1})
    assert outcome.status == "failure" and outcome.error is not None
    assert outcome.error["type"] == "DecisionError" and outcome.error["reason"] == "decision"
    assert outcome.error["node_id"] == "d" and outcome.error["message"] == message
    assert hooks.path == ["start", "d"] and hooks.records[-1].status == "failure"
    # The decision ran: its changes are in its record and the final context, as NOVA leaves them ...
    assert outcome.final_context["branch_decision"] is True
    assert hooks.records[-1].output_context == outcome.final_context
    # ... while a retry starts over at the decision, from the context it was given.
    assert hooks.checkpoint is not None
    assert (hooks.checkpoint.next_node, hooks.checkpoint.context) == ("d", {"x": 1})


# ---- loops -----------------------------------------------------------------------------------------


def counting_loop(**inc_options: Any) -> dict[str, Any]:
    """start -> inc -> again? (true: inc, false: end); 4 nodes, so NOVA's bound is 8 steps."""
    return nova(
        [
            {"id": "inc", "type": "action", "code": "context['n'] += 1", **inc_options},
            {"id": "again", "type": "decision", "code": "context['again'] = context['n'] < context['target']"},
        ],
        [("start", "inc"), ("inc", "again"), ("again", "inc", "true"), ("again", "end", "false")],
    )


async def test_decision_loop_runs_up_to_novas_bound() -> None:
    # Three turns: start, (inc, again) x 3, end = 8 steps, exactly 2 x 4 nodes.
    outcome, hooks = await run_code(counting_loop(), {"n": 0, "target": 3})
    assert outcome.status == "success" and outcome.nodes_executed == 8
    assert hooks.path == ["start", "inc", "again", "inc", "again", "inc", "again", "end"]
    assert outcome.final_context == {"n": 3, "target": 3, "again": False}


async def test_loop_past_novas_bound_fails_clearly() -> None:
    outcome, hooks = await run_code(counting_loop(), {"n": 0, "target": 4})
    assert outcome.status == "failure" and outcome.error is not None
    # Step 9 would be the fourth visit of `again`.
    assert outcome.error["type"] == "LoopLimitExceeded" and outcome.error["node_id"] == "again"
    assert "exceeded max iterations (8) entering node 'again'" in outcome.error["message"]
    assert "max_visits" in outcome.error["message"]
    assert outcome.nodes_executed == 8 and len(hooks.records) == 8
    assert outcome.final_context == {"n": 4, "target": 4, "again": True}


async def test_max_visits_lifts_novas_bound_and_sets_its_own() -> None:
    outcome, _ = await run_code(counting_loop(max_visits=10), {"n": 0, "target": 10})
    assert outcome.status == "success" and outcome.nodes_executed == 22
    outcome, _ = await run_code(counting_loop(max_visits=2), {"n": 0, "target": 10})
    assert outcome.status == "failure" and outcome.error is not None
    assert outcome.error["type"] == "LoopLimitExceeded" and outcome.error["reason"] == "max_visits"
    assert outcome.error["message"] == "node 'inc' entered more than 2 times (its max_visits)"


# ---- how node output merges ------------------------------------------------------------------------


def one_action(code: str) -> dict[str, Any]:
    return nova([{"id": "a", "type": "action", "code": code}], [("start", "a"), ("a", "end")])


PROTOCOL = "print(json.dumps({'status': 'success', 'context_updates': {'total': 5}, 'message': 'summed'}))"


@pytest.mark.parametrize(
    ("code", "final"),
    [
        # Keys a node sets are added or replaced; keys it deletes stay (NOVA's dict.update).
        ("del context['a']\ncontext['b'] = 2\ncontext['c'] = 3", {"a": 1, "b": 2, "c": 3}),
        # NOVA's protocol: only context_updates merge; what the code did to `context` is not kept.
        (f"context['direct'] = 1\n{PROTOCOL}", {"a": 1, "b": 1, "total": 5}),
        # The last line counts; bare {} / [] / null lines after it are skipped, as NOVA's executor did ...
        (f"{PROTOCOL}\nprint({{}})\nprint('[]')\nprint()", {"a": 1, "b": 1, "total": 5}),
        # ... and any other last line means the code's own context is the output.
        (f"context['direct'] = 1\n{PROTOCOL}\nprint('done')", {"a": 1, "b": 1, "direct": 1}),
        # A JSON line without context_updates is just output (NOVA merged it as if it were the context).
        ("context['direct'] = 1\nprint(json.dumps({'status': 'success', 'n': 5}))", {"a": 1, "b": 1, "direct": 1}),
    ],
    ids=["set-replace-delete", "protocol", "protocol-then-empty-json", "protocol-then-text", "plain-json"],
)
async def test_node_output_merges_as_nova(code: str, final: dict[str, Any]) -> None:
    outcome, hooks = await run_code(one_action(code), {"a": 1, "b": 1})
    assert outcome.status == "success" and outcome.final_context == final
    assert hooks.records[1].output_context == final


@pytest.mark.parametrize(
    ("code", "error_type", "message"),
    [
        (
            "print(json.dumps({'status': 'error', 'context_updates': {}, 'message': 'no PDF attached'}))",
            "CodeExecutionError",
            "Code execution error: no PDF attached",
        ),
        (
            "print(json.dumps({'status': 'success', 'context_updates': [1]}))",
            "TypeError",
            "node 'a' printed context_updates as list, not an object",
        ),
    ],
)
async def test_protocol_errors_fail_the_node(code: str, error_type: str, message: str) -> None:
    outcome, hooks = await run_code(one_action(code), {"a": 1})
    assert outcome.status == "failure" and outcome.error is not None
    assert (outcome.error["type"], outcome.error["message"], outcome.error["node_id"]) == (error_type, message, "a")
    assert outcome.final_context == {"a": 1}
    assert hooks.records[-1].status == "failure" and "context_updates" in hooks.records[-1].stdout


async def test_extra_context_is_seen_and_never_merged() -> None:
    def identity(step: int, node: Node, attempt: Attempt | None) -> dict[str, Any]:
        return {"_nova": {"step": step, "node_id": node.id}}

    # Even copied into a protocol object's updates, the extra keys are taken out again.
    code = "print(json.dumps({'context_updates': {'total': context['_nova']['step'], '_nova': 'copied'}}))"
    outcome, _ = await run_code(one_action(code), extra_context=identity)
    assert outcome.final_context == {"total": 2}
    outcome, _ = await run_code(one_action("context['seen'] = context['_nova']['step']"), extra_context=identity)
    assert outcome.final_context == {"seen": 2}


# ---- executors -------------------------------------------------------------------------------------


async def test_nova_executors_run_their_code_in_the_e2b_sandbox() -> None:
    nodes = [
        {"id": "plain", "type": "action", "code": "context['plain'] = 1"},
        {"id": "local", "type": "action", "code": "context['local'] = 1", "executor": "local"},
        {"id": "e2b", "type": "action", "code": "context['e2b'] = 1", "executor": "e2b"},
        {"id": "cached", "type": "action", "code": "context['cached'] = 1", "executor": "cached", "prompt": "x"},
        {"id": "ai", "type": "action", "code": "context['ai'] = 1", "executor": "ai"},
    ]
    ids = [n["id"] for n in nodes]
    definition = nova(nodes, list(zip(["start", *ids], [*ids, "end"], strict=True)))
    sandboxes: dict[str, InProcessSandbox] = {}

    async def open_sandbox(spec: SandboxSpec) -> Sandbox:
        return sandboxes.setdefault(spec.executor, InProcessSandbox())

    outcome = await run_workflow(
        validate_definition(definition),
        {},
        open_sandbox=open_sandbox,
        spec=SandboxSpec(execution_id=1, client="acme"),
        hooks=Recorder(),
    )
    assert outcome.final_context == dict.fromkeys(ids, 1)
    ran = {executor: [node for _, node, _ in s.calls] for executor, s in sandboxes.items()}
    assert ran == {"local": ["plain", "local"], "e2b": ["e2b", "cached", "ai"]}


async def test_executor_that_cannot_open_fails_the_node_once() -> None:
    from consumer.sandbox.base import UnavailableProvider

    unavailable = UnavailableProvider("e2b", "executor 'e2b' is not available: no key")
    local = InProcessSandbox()

    async def open_sandbox(spec: SandboxSpec) -> Sandbox:
        return local if spec.executor == "local" else await unavailable.open(spec)

    definition = nova(
        [
            {"id": "here", "type": "action", "code": "context['here'] = 1"},
            {"id": "there", "type": "action", "code": "context['there'] = 1", "executor": "e2b"},
        ],
        [("start", "here"), ("here", "there"), ("there", "end")],
    )
    hooks = Recorder()
    outcome = await run_workflow(
        validate_definition(definition),
        {},
        open_sandbox=open_sandbox,
        spec=SandboxSpec(execution_id=1, client="acme"),
        hooks=hooks,
    )
    assert outcome.status == "failure" and outcome.error is not None
    assert (outcome.error["node_id"], outcome.error["type"]) == ("there", "ExecutorUnavailable")
    assert outcome.error["message"] == "executor 'e2b' is not available: no key"
    assert hooks.path == ["start", "here", "there"] and outcome.final_context == {"here": 1}


# ---- timeouts --------------------------------------------------------------------------------------


class TimedSandbox:
    """Each action takes `delay[node_id]` seconds, and fails as a real sandbox does past its limit."""

    def __init__(self, delay: dict[str, float]) -> None:
        self.delay = delay
        self.limits: dict[str, float] = {}

    async def run_action(self, node_id: str, code: str, context: dict[str, Any], timeout: float) -> NodeResult:
        self.limits[node_id] = timeout
        delay = self.delay.get(node_id, 0.0)
        await asyncio.sleep(min(delay, timeout))
        if delay > timeout:
            raise NodeError(type="TimeoutError", message=f"node '{node_id}' exceeded {timeout:g}s", reason="timeout")
        return NodeResult(context={**context, node_id: True})

    async def evaluate(self, node_id: str, expression: str, context: dict[str, Any], timeout: float) -> NodeResult:
        raise AssertionError("no decision in these graphs")

    async def close(self) -> None:
        return None


TWO_ACTIONS = nova(
    [{"id": "a1", "type": "action", "code": "pass", "timeout": 5}, {"id": "a2", "type": "action", "code": "pass"}],
    [("start", "a1"), ("a1", "a2"), ("a2", "end")],
)


async def test_node_timeout_is_its_own_or_novas_default() -> None:
    sandbox = TimedSandbox({})
    outcome = await run(TWO_ACTIONS, sandbox, Recorder())
    assert outcome.status == "success" and sandbox.limits == {"a1": 5, "a2": 60}


async def test_node_past_its_time_limit_fails_the_workflow() -> None:
    sandbox = TimedSandbox({"a1": 6})
    hooks = Recorder()
    outcome = await run(
        {**TWO_ACTIONS, "nodes": [{**n, "timeout": 0.05} if n["id"] == "a1" else n for n in TWO_ACTIONS["nodes"]]},
        sandbox,
        hooks,
    )
    assert outcome.status == "failure" and outcome.error is not None
    assert (outcome.error["node_id"], outcome.error["reason"]) == ("a1", "timeout")
    assert hooks.path == ["start", "a1"]


async def test_execution_limit_caps_each_node_and_stops_the_run() -> None:
    # The workflow's own limit is shorter than a1's timeout: a1 gets only what is left of it.
    sandbox = TimedSandbox({"a1": 6})
    outcome = await run({**TWO_ACTIONS, "timeout": 0.2}, sandbox, Recorder())
    assert outcome.error is not None and (outcome.error["node_id"], outcome.error["reason"]) == ("a1", "timeout")
    assert sandbox.limits["a1"] <= 0.2

    class SlowHooks(Recorder):
        async def node_started(
            self, step: int, node: Node, started_at: str, context: dict[str, Any], attempt: Attempt | None = None
        ) -> None:
            if node.id == "a2":
                await asyncio.sleep(0.3)

    sandbox = TimedSandbox({})
    outcome = await run(TWO_ACTIONS, sandbox, SlowHooks(), execution_timeout=0.2)
    assert outcome.error is not None and outcome.error["node_id"] == "a2"
    assert outcome.error["message"] == "execution time limit reached before node 'a2'"
    assert "a2" not in sandbox.limits


# ---- node retries ----------------------------------------------------------------------------------

# Fails its first `fail` runs in this execution's interpreter (globals persist), changing the context first.
FLAKY = (
    "runs = runs + 1 if 'runs' in globals() else 1\n"
    "context['partial'] = runs\n"
    "if runs <= {fail}: raise ConnectionResetError(f'reset {{runs}}')\n"
    "del context['partial']\n"
    "context['runs'] = runs"
)


def retrying(code: str, attempts: int, on: list[str]) -> dict[str, Any]:
    definition = one_action(code)
    definition["nodes"][1]["retry"] = {"attempts": attempts, "backoff": {"initial": 0, "max": 0}, "on": on}
    return definition


async def test_retries_of_a_node_do_not_count_toward_the_loop_bound() -> None:
    # Three nodes allow 6 steps; five attempts of `a` take 7 and are still one visit.
    outcome, hooks = await run_code(retrying(FLAKY.format(fail=4), 5, ["OSError"]), {"x": 1})
    assert outcome.status == "success", outcome.error
    assert outcome.final_context == {"x": 1, "runs": 5} and outcome.nodes_executed == 7
    attempts = [(r.step, r.attempt, r.status) for r in hooks.records if r.node_id == "a"]
    assert attempts == [(2, 1, "failure"), (3, 2, "failure"), (4, 3, "failure"), (5, 4, "failure"), (6, 5, "success")]
    assert all(r.retry_at for r in hooks.records[1:5]) and hooks.records[5].retry_at is None


async def test_a_run_stopped_between_attempts_resumes_with_the_count_kept() -> None:
    class Crash(Exception):
        pass

    class CrashAfterSecondFailure(Recorder):
        async def node_finished(self, record: NodeRecord, checkpoint: Checkpoint) -> None:
            await super().node_finished(record, checkpoint)
            if record.attempt == 2 and record.retry_at:
                raise Crash

    hooks = CrashAfterSecondFailure()
    sandbox = InProcessSandbox()
    with pytest.raises(Crash):
        await run(retrying(FLAKY.format(fail=2), 4, ["ConnectionError"]), sandbox, hooks)
    resume = hooks.checkpoint
    assert resume is not None and resume.retry is not None
    assert (resume.step, resume.next_node, resume.retry.failed, resume.retry.first_step) == (3, "a", 2, 2)
    assert resume.context == {}  # the node's input, not what the failed attempts left
    rest = Recorder()
    outcome = await run(retrying(FLAKY.format(fail=2), 4, ["ConnectionError"]), sandbox, rest, resume)
    assert outcome.status == "success" and outcome.final_context == {"runs": 3}
    assert [(r.step, r.attempt) for r in rest.records] == [(4, 3), (5, None)]


async def test_errors_outside_the_policy_or_past_a_limit_are_not_retried() -> None:
    outcome, hooks = await run_code(retrying(FLAKY.format(fail=9), 3, ["TimeoutError"]))
    assert outcome.error is not None and (outcome.error["type"], outcome.error["attempt"]) == (
        "ConnectionResetError",
        1,
    )
    # A memory limit is never retried, even when a policy names a base of the error's type.
    outcome, hooks = await run_code(retrying("raise MemoryError()", 3, ["Exception"]))
    assert outcome.error is not None and outcome.error["reason"] == "limit:memory"
    assert [r.attempt for r in hooks.records if r.node_id == "a"] == [1]


async def test_a_decision_retries_its_own_error_but_not_a_missing_branch() -> None:
    flaky_decision = (
        "runs = runs + 1 if 'runs' in globals() else 1\n"
        "if runs == 1: raise TimeoutError('slow lookup')\n"
        "context['d'] = True"
    )
    graph = {
        "nodes": [
            {"id": "s", "type": "start", "next": "d"},
            {"id": "d", "type": "decision", "code": flaky_decision, "on_true": "e", "on_false": "e",
             "retry": {"attempts": 2, "backoff": {"initial": 0, "max": 0}, "on": ["TimeoutError"]}},
            {"id": "e", "type": "end"},
        ]
    }  # fmt: skip
    outcome, hooks = await run_code(graph)
    assert outcome.status == "success", outcome.error
    assert [(r.node_id, r.attempt, r.status) for r in hooks.records] == [
        ("s", None, "success"),
        ("d", 1, "failure"),
        ("d", 2, "success"),
        ("e", None, "success"),
    ]
    # A statement decision that sets nothing fails its branch choice: deterministic, never retried.
    no_branch = {**graph, "nodes": [graph["nodes"][0], {**graph["nodes"][1], "code": "x = 1"}, graph["nodes"][2]]}
    outcome, hooks = await run_code(no_branch)
    assert outcome.error is not None and outcome.error["type"] == "DecisionError"
    assert [r.attempt for r in hooks.records if r.node_id == "d"] == [1]
