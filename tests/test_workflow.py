"""The graph format: what is accepted, what is refused, and that each refusal names its node."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shared.workflow import InvalidDefinition, NodeType, validate_definition


def graph(*nodes: dict[str, Any], edges: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"nodes": list(nodes), "edges": edges or []}


START = {"id": "start", "type": "start", "next": "work"}
WORK = {"id": "work", "type": "action", "code": "context['x'] = 1", "next": "end"}
END = {"id": "end", "type": "end"}


def problems(raw: dict[str, Any]) -> list[tuple[str | None, str]]:
    with pytest.raises(InvalidDefinition) as info:
        validate_definition(raw)
    return [(p.node, p.message) for p in info.value.problems]


def test_linear_graph_is_valid_and_walkable() -> None:
    d = validate_definition(graph(START, WORK, END))
    assert d.start.id == "start"
    assert d.successor(d.node("start")) == "work"
    assert d.successor(d.node("work")) == "end"
    assert d.successor(d.node("end")) is None


def test_edges_and_string_conditions_drive_a_decision() -> None:
    d = validate_definition(
        graph(
            {"id": "s", "type": "start"},
            {"id": "check", "type": "decision", "code": "context['amount'] > 10"},
            {"id": "big", "type": "end"},
            {"id": "small", "type": "end"},
            edges=[
                {"from": "s", "to": "check"},
                {"from": "check", "to": "big", "condition": "true"},
                {"from": "check", "to": "small", "condition": False},
            ],
        )
    )
    check = d.node("check")
    assert check.type == NodeType.DECISION
    assert d.branch(check, True) == "big"
    assert d.branch(check, False) == "small"


def test_unknown_reference_names_the_node() -> None:
    found = problems(graph(START, {**WORK, "next": "nowhere"}, END))
    assert ("work", "node 'work' has next 'nowhere', which is not a node") in found


def test_edge_to_unknown_node_names_it() -> None:
    found = problems(graph({"id": "start", "type": "start"}, END, edges=[{"from": "start", "to": "ghost"}]))
    assert any(node == "ghost" and "unknown node 'ghost'" in msg for node, msg in found)


def test_no_start() -> None:
    assert problems(graph(WORK, END)) == [(None, "the workflow has no start node")]


def test_unreachable_end_is_named() -> None:
    found = problems(graph(START, WORK, END, {"id": "orphan_end", "type": "end"}))
    assert ("orphan_end", "end node 'orphan_end' is unreachable from start") in found


def test_no_reachable_end() -> None:
    loop = {"id": "work", "type": "action", "code": "pass", "next": "work", "max_visits": 3}
    found = problems(graph(START, loop, END))
    assert ("start", "no end node is reachable from start") in found


def test_unbounded_cycle_is_refused_and_named() -> None:
    found = problems(
        graph(
            START,
            {"id": "work", "type": "action", "code": "context['n'] = context.get('n', 0) + 1", "next": "again"},
            {"id": "again", "type": "decision", "code": "context['n'] < 3", "on_true": "work", "on_false": "end"},
            END,
        )
    )
    assert len(found) == 1
    node, message = found[0]
    assert node == "again"
    assert "cycle" in message and "'work'" in message and "max_visits" in message


def test_bounded_cycle_is_accepted() -> None:
    validate_definition(
        graph(
            START,
            {"id": "work", "type": "action", "code": "pass", "next": "again", "max_visits": 5},
            {"id": "again", "type": "decision", "code": "True", "on_true": "work", "on_false": "end"},
            END,
        )
    )


def test_decision_without_branch() -> None:
    found = problems(graph(START, {"id": "work", "type": "decision", "code": "True", "on_true": "end"}, END))
    assert ("work", "decision node 'work' has no on_false branch") in found


def test_syntax_errors_are_caught_at_definition_time() -> None:
    found = problems(graph(START, {**WORK, "code": "def broken(:"}, END))
    assert found[0][0] == "work" and "does not compile" in found[0][1]
    found = problems(
        graph(START, {"id": "work", "type": "decision", "code": "x = 1", "on_true": "end", "on_false": "end"}, END)
    )
    assert found[0][0] == "work" and "expression does not compile" in found[0][1]


def test_action_without_next_and_duplicate_ids() -> None:
    found = problems(graph(START, {**WORK, "next": None}, END, {"id": "end", "type": "end"}))
    messages = [m for _, m in found]
    assert "node 'work' has no next node" in messages
    assert "node 'end' is defined twice" in messages


def test_action_with_two_next_edges_is_ambiguous() -> None:
    found = problems(
        graph(
            {"id": "start", "type": "start", "next": "work"},
            {"id": "work", "type": "action", "code": "pass"},
            END,
            {"id": "end2", "type": "end"},
            edges=[{"from": "work", "to": "end"}, {"from": "work", "to": "end2"}],
        )
    )
    assert any(n == "work" and "several next nodes" in m for n, m in found)


@pytest.mark.parametrize(
    "raw",
    [
        {"nodes": []},
        {"nodes": [{"id": "a", "type": "teleport"}]},
        {"nodes": [{"type": "start"}]},
        {"nodes": "start"},
        {"nodes": [{"id": "a", "type": "action", "code": "pass", "timeout": -1}]},
    ],
)
def test_shape_errors_are_pydantic_errors(raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        validate_definition(raw)
