"""The graph format: what is accepted, what is refused, and that each refusal names its node."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shared.settings import Settings
from shared.workflow import InvalidDefinition, NodeType, graph_warnings, validate_definition


def graph(*nodes: dict[str, Any], edges: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"nodes": list(nodes), "edges": edges or []}


START = {"id": "start", "type": "start", "next": "work"}
WORK = {"id": "work", "type": "action", "code": "context['x'] = 1", "next": "end"}
END = {"id": "end", "type": "end"}


def problems(raw: dict[str, Any], max_node_timeout: float | None = None) -> list[tuple[str | None, str]]:
    with pytest.raises(InvalidDefinition) as info:
        validate_definition(raw, max_node_timeout=max_node_timeout)
    return [(p.node, p.message) for p in info.value.problems]


def warnings(raw: dict[str, Any]) -> list[tuple[str | None, str]]:
    return [(p.node, p.message) for p in graph_warnings(validate_definition(raw))]


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
    # Issue 12: NOVA runs a graph with unreachable nodes, so this is a warning now, not a refusal.
    found = warnings(graph(START, WORK, END, {"id": "orphan_end", "type": "end"}))
    assert ("orphan_end", "end node 'orphan_end' is unreachable from start") in found


def test_no_reachable_end() -> None:
    loop = {"id": "work", "type": "action", "code": "pass", "next": "work", "max_visits": 3}
    found = problems(graph(START, loop, END))
    assert ("start", "no end node is reachable from start") in found


def test_cycle_through_a_decision_is_accepted_without_max_visits() -> None:
    # Issue 12: such a loop is bounded at run time (NOVA's 2 x node count steps), no longer refused.
    d = validate_definition(
        graph(
            START,
            {"id": "work", "type": "action", "code": "context['n'] = context.get('n', 0) + 1", "next": "again"},
            {"id": "again", "type": "decision", "code": "context['n'] < 3", "on_true": "work", "on_false": "end"},
            END,
        )
    )
    assert d.targets(d.node("again")) == ["work", "end"]
    assert graph_warnings(d) == []


def test_cycle_with_no_way_out_is_refused_and_named() -> None:
    found = problems(
        graph(
            {"id": "start", "type": "start", "next": "check"},
            {"id": "check", "type": "decision", "code": "context['go']", "on_true": "spin", "on_false": "end"},
            {"id": "spin", "type": "action", "code": "pass", "next": "turn", "max_visits": 3},
            {"id": "turn", "type": "action", "code": "pass", "next": "spin"},
            END,
        )
    )
    assert found == [("spin", "node 'spin' is on a cycle ('spin', 'turn') with no way out")]


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
    # Issue 12: a decision may now be statements (NOVA's form), so "x = 1" compiles; a broken one does not.
    found = problems(
        graph(
            START,
            {"id": "work", "type": "decision", "code": "context['x'] >", "on_true": "end", "on_false": "end"},
            END,
        )
    )
    assert found[0][0] == "work" and "code does not compile" in found[0][1]


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


# ---- NOVA's format beside ours ------------------------------------------------------------------------

NOVA_GRAPH: dict[str, Any] = {
    "name": "Refund triage",
    "description": "NOVA-style: a loader sends the whole file as graph_definition",
    "model": "some-model",
    "initial_context": {"ignored": True},
    "nodes": [
        {"id": "start", "type": "start", "label": "Start"},
        {
            "id": "score",
            "type": "action",
            "label": "Score",
            "code": "context['score'] = 3",
            "executor": "e2b",
            "timeout": 20,
            "model": "unused",
        },
        {"id": "route", "type": "decision", "code": "context['route'] = 'Refund'", "executor": "e2b"},
        {"id": "refund", "type": "action", "code": "context['paid'] = True", "executor": "cached"},
        {"id": "reject", "type": "action", "code": "pass", "executor": "ai"},
        {"id": "end", "type": "end"},
    ],
    "edges": [
        {"from": "start", "to": "score"},
        {"from": "score", "to": "route"},
        {"from": "route", "to": "refund", "condition": "refund"},
        {"from": "route", "to": "reject", "condition": "Reject"},
        {"from": "refund", "to": "end"},
        {"from": "reject", "to": "end"},
    ],
}


def test_nova_graph_is_accepted_and_keeps_unknown_keys() -> None:
    d = validate_definition(NOVA_GRAPH)
    dumped = d.model_dump(by_alias=True)
    assert dumped["name"] == "Refund triage" and dumped["initial_context"] == {"ignored": True}
    assert dumped["model"] == "some-model"
    score = d.node("score")
    assert score.label == "Score" and score.timeout == 20 and dumped["nodes"][1]["model"] == "unused"
    route = d.node("route")
    assert d.is_branching(route) and not route.is_expression_decision
    # Labels compare case-insensitively, whichever side wrote capitals.
    assert d.branch(route, "REFUND") == "refund" and d.branch(route, "reject") == "reject"
    assert d.branch(route, True) is None
    # NOVA's AI executors run their own code in the e2b sandbox.
    assert [d.node(n).sandbox_executor for n in ("score", "refund", "reject")] == ["e2b", "e2b", "e2b"]
    assert graph_warnings(d) == []


def test_orphan_node_without_edges_is_a_warning() -> None:
    orphan = {"id": "orphan", "type": "action", "code": "x = 2", "executor": "e2b"}
    found = warnings({**NOVA_GRAPH, "nodes": [*NOVA_GRAPH["nodes"], orphan]})
    assert found == [("orphan", "node 'orphan' is unreachable from start")]


def test_prompt_only_ai_node_is_refused_naming_it() -> None:
    ask = {"id": "ask", "type": "action", "executor": "cached", "prompt": "Sum the invoice lines", "next": "end"}
    found = problems(graph({"id": "start", "type": "start", "next": "ask"}, ask, END))
    assert len(found) == 1 and found[0][0] == "ask"
    assert "'ask'" in found[0][1] and "AI code generation is not available here" in found[0][1]
    # The same for a decision, and for an "ai" node given only a prompt.
    decide = {"id": "ask", "type": "decision", "executor": "ai", "prompt": "Big?", "on_true": "end", "on_false": "end"}
    assert "AI code generation is not available here" in problems(graph(START | {"next": "ask"}, decide, END))[0][1]


def test_node_timeout_above_the_ceiling_is_refused_naming_the_node() -> None:
    defaults = Settings.model_fields
    assert defaults["node_timeout"].default == 60 and defaults["max_node_timeout"].default == 300
    slow = {**WORK, "timeout": 301}
    found = problems(graph(START, slow, END), max_node_timeout=300)
    assert found == [("work", "node 'work' has timeout 301s, above the limit of 300s (NOVA_MAX_NODE_TIMEOUT)")]
    validate_definition(graph(START, {**WORK, "timeout": 300}, END), max_node_timeout=300)
    # Without a ceiling (workflows already stored, run by a worker) the node keeps its timeout.
    assert validate_definition(graph(START, slow, END)).node("work").timeout == 301


def test_no_end_is_still_refused() -> None:
    found = problems(graph(START, {**WORK, "next": None}, edges=[]))
    assert (None, "the workflow has no end node") in found


def test_decision_branches_on_labels_or_on_both_booleans() -> None:
    # Labels only: no true/false branch needed.
    validate_definition(
        graph(
            {"id": "s", "type": "start", "next": "pick"},
            {"id": "pick", "type": "decision", "code": "context['pick'] = 'a'"},
            {"id": "e", "type": "end"},
            edges=[{"from": "pick", "to": "e", "condition": "a"}],
        )
    )
    # A true/false decision given as NOVA edges needs both ways.
    found = problems(
        graph(
            {"id": "s", "type": "start", "next": "pick"},
            {"id": "pick", "type": "decision", "code": "context['pick'] = True"},
            {"id": "e", "type": "end"},
            edges=[{"from": "pick", "to": "e", "condition": "true"}],
        )
    )
    assert found == [("pick", "decision node 'pick' has no on_false branch")]


def test_decision_edge_without_condition_and_conflicting_branches_are_refused() -> None:
    found = problems(
        graph(
            {"id": "s", "type": "start", "next": "d"},
            {"id": "d", "type": "decision", "code": "True", "on_true": "e"},
            {"id": "e", "type": "end"},
            {"id": "e2", "type": "end"},
            edges=[{"from": "d", "to": "e2"}, {"from": "d", "to": "e2", "condition": "TRUE"}],
        )
    )
    assert ("d", "decision node 'd' has an edge to 'e2' without a condition") in found
    assert ("d", "node 'd' has two branches for 'true' ('e', 'e2')") in found


def test_action_edges_follow_nova() -> None:
    d = validate_definition(
        graph(
            {"id": "s", "type": "start"},
            {"id": "a", "type": "action", "code": "context['a'] = 'left'"},
            {"id": "left", "type": "end"},
            {"id": "right", "type": "end"},
            edges=[
                # A single edge is followed whatever its condition.
                {"from": "s", "to": "a", "condition": "false"},
                # Conditions on every edge: the action branches on context['a'].
                {"from": "a", "to": "left", "condition": "left"},
                {"from": "a", "to": "right", "condition": "right"},
            ],
        )
    )
    assert d.successor(d.node("s")) == "a" and not d.is_branching(d.node("s"))
    assert d.is_branching(d.node("a")) and d.targets(d.node("a")) == ["left", "right"]


def test_next_that_disagrees_with_the_edges_is_refused() -> None:
    found = problems(graph(START, WORK, END, {"id": "other", "type": "end"}, edges=[{"from": "work", "to": "other"}]))
    assert ("work", "node 'work' has next 'end' and edges to 'other'") in found


def test_edges_out_of_an_end_node_are_a_warning() -> None:
    found = warnings(graph(START, WORK, END, edges=[{"from": "end", "to": "work"}]))
    assert found == [("end", "end node 'end' has outgoing edges; they are ignored (a run stops at an end node)")]


def test_nova_decision_that_never_names_its_key_is_warned_about() -> None:
    # NOVA's own fixtures set context['branch_decision'], which its engine never reads.
    decide = {
        "id": "has_pdf",
        "type": "decision",
        "code": "context['branch_decision'] = True",
        "on_true": "end",
        "on_false": "end",
    }
    found = warnings(graph(START | {"next": "has_pdf"}, decide, END))
    assert len(found) == 1 and found[0][0] == "has_pdf" and "context['has_pdf']" in found[0][1]
