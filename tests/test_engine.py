"""The engine on its own: a run, its failure checkpoint, and a retry resumed from it.

Node code runs in an in-process double of the sandbox interface (the engine takes any opener), so
these tests need neither Redis nor PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from consumer.engine import Checkpoint, NodeRecord, Outcome, run_workflow
from consumer.sandbox.base import NodeError, NodeResult, Sandbox, SandboxSpec
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


class Recorder:
    def __init__(self) -> None:
        self.records: list[NodeRecord] = []
        self.checkpoint: Checkpoint | None = None

    async def node_started(self, step: int, node: Node, started_at: str, context: dict[str, Any]) -> None:
        return None

    async def node_finished(self, record: NodeRecord, checkpoint: Checkpoint) -> None:
        self.records.append(record)
        # What the worker stores in the task hash; a retry resumes from the last one written.
        self.checkpoint = Checkpoint.from_json(checkpoint.as_json())


async def run(
    definition: dict[str, Any], sandbox: Sandbox, hooks: Recorder, resume: Checkpoint | None = None
) -> Outcome:
    async def open_sandbox(spec: SandboxSpec) -> Sandbox:
        return sandbox

    return await run_workflow(
        validate_definition(definition),
        {},
        open_sandbox=open_sandbox,
        spec=SandboxSpec(execution_id=1, client="acme"),
        hooks=hooks,
        resume=resume,
    )


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
