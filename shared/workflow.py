"""NOVA's workflow graph format: the model, its validation, and how to walk it.

A definition is ``{"nodes": [...], "edges": [...], "timeout"?: seconds}``. Nodes have an ``id`` and a
``type`` (start, action, decision, end). Action nodes carry Python ``code`` that reads and updates
``context``; decision nodes carry a Python boolean expression in ``code`` and branch to ``on_true`` /
``on_false``. The successor of a start or action node is its ``next`` or its single outgoing edge;
a decision's branches may also be given as edges with ``"condition": true|false``.

Cycles are refused unless bounded: some node on every cycle must set ``max_visits``; the engine
fails the execution when a node is entered more often than that.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_NODES = 500
MAX_CODE_BYTES = 64 * 1024


class NodeType(StrEnum):
    START = "start"
    ACTION = "action"
    DECISION = "decision"
    END = "end"


class Node(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=200)
    type: NodeType
    code: str | None = Field(default=None, max_length=MAX_CODE_BYTES)
    next: str | None = None
    on_true: str | None = None
    on_false: str | None = None
    timeout: float | None = Field(default=None, gt=0, le=24 * 3600)
    executor: Literal["local", "e2b"] | None = None
    max_visits: int | None = Field(default=None, ge=1, le=100_000)
    name: str | None = None


class Edge(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    source: str = Field(alias="from")
    target: str = Field(alias="to")
    condition: bool | None = None

    @field_validator("condition", mode="before")
    @classmethod
    def _condition(cls, value: Any) -> Any:
        # NOVA's editor writes conditions as the strings "true"/"false".
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        return value


class Definition(BaseModel):
    model_config = ConfigDict(extra="allow")

    nodes: list[Node] = Field(min_length=1, max_length=MAX_NODES)
    edges: list[Edge] = Field(default_factory=list)
    timeout: float | None = Field(default=None, gt=0, le=24 * 3600)

    def node(self, node_id: str) -> Node:
        return self._index()[node_id]

    def _index(self) -> dict[str, Node]:
        index = self.__dict__.get("_node_index")
        if index is None:
            index = {n.id: n for n in self.nodes}
            self.__dict__["_node_index"] = index
        return index

    @property
    def start(self) -> Node:
        return next(n for n in self.nodes if n.type == NodeType.START)

    def successor(self, node: Node) -> str | None:
        """The node after a start or action node (None for an end node)."""
        if node.type == NodeType.END:
            return None
        if node.next:
            return node.next
        out = [e.target for e in self.edges if e.source == node.id and e.condition is None]
        return out[0] if len(out) == 1 else None

    def branch(self, node: Node, outcome: bool) -> str | None:
        """The node a decision leads to for its outcome."""
        direct = node.on_true if outcome else node.on_false
        if direct:
            return direct
        out = [e.target for e in self.edges if e.source == node.id and e.condition is outcome]
        return out[0] if len(out) == 1 else None

    def targets(self, node: Node) -> list[str]:
        if node.type == NodeType.DECISION:
            return [t for t in (self.branch(node, True), self.branch(node, False)) if t]
        nxt = self.successor(node)
        return [nxt] if nxt else []


class DefinitionProblem(BaseModel):
    node: str | None
    message: str


class InvalidDefinition(ValueError):
    """A definition that parses but is not a runnable graph; each problem names its node."""

    def __init__(self, problems: list[DefinitionProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(p.message for p in problems))


def validate_definition(raw: dict[str, Any] | Definition) -> Definition:
    """Parse and check a definition; raises pydantic.ValidationError or InvalidDefinition."""
    definition = raw if isinstance(raw, Definition) else Definition.model_validate(raw)
    problems = list(_graph_problems(definition))
    if problems:
        raise InvalidDefinition(problems)
    return definition


def _graph_problems(d: Definition) -> Iterable[DefinitionProblem]:
    ids: dict[str, Node] = {}
    for node in d.nodes:
        if node.id in ids:
            yield DefinitionProblem(node=node.id, message=f"node '{node.id}' is defined twice")
        ids[node.id] = node

    starts = [n for n in d.nodes if n.type == NodeType.START]
    if not starts:
        yield DefinitionProblem(node=None, message="the workflow has no start node")
        return
    if len(starts) > 1:
        names = ", ".join(f"'{n.id}'" for n in starts)
        yield DefinitionProblem(node=starts[1].id, message=f"the workflow has several start nodes: {names}")
    if not any(n.type == NodeType.END for n in d.nodes):
        yield DefinitionProblem(node=None, message="the workflow has no end node")

    bad = False
    for edge in d.edges:
        for ref in (edge.source, edge.target):
            if ref not in ids:
                bad = True
                message = f"edge {edge.source} -> {edge.target} names unknown node '{ref}'"
                yield DefinitionProblem(node=ref, message=message)

    for node in d.nodes:
        for problem in _node_problems(d, node, ids):
            bad = True
            yield problem
    if bad:
        return

    reachable = _reachable(d, starts[0].id)
    for node in d.nodes:
        if node.id not in reachable:
            kind = "end node" if node.type == NodeType.END else "node"
            yield DefinitionProblem(node=node.id, message=f"{kind} '{node.id}' is unreachable from start")
    if not any(ids[n].type == NodeType.END for n in reachable):
        yield DefinitionProblem(node=starts[0].id, message="no end node is reachable from start")

    for component in _cycles(d):
        if not any(ids[n].max_visits for n in component):
            first = sorted(component)[0]
            members = ", ".join(f"'{n}'" for n in sorted(component))
            yield DefinitionProblem(
                node=first,
                message=f"node '{first}' is on a cycle ({members}) with no bound: set max_visits on one of them",
            )


def _node_problems(d: Definition, node: Node, ids: dict[str, Node]) -> Iterable[DefinitionProblem]:
    nid = node.id
    for attr in ("next", "on_true", "on_false"):
        ref = getattr(node, attr)
        if ref is not None and ref not in ids:
            yield DefinitionProblem(node=nid, message=f"node '{nid}' has {attr} '{ref}', which is not a node")
    if node.type == NodeType.END:
        if any(e.source == nid for e in d.edges) or node.next:
            yield DefinitionProblem(node=nid, message=f"end node '{nid}' must not have outgoing edges")
        return
    if node.type == NodeType.ACTION:
        if not node.code or not node.code.strip():
            yield DefinitionProblem(node=nid, message=f"action node '{nid}' has no code")
        else:
            yield from _compile_problem(nid, node.code, "exec")
    if node.type == NodeType.DECISION:
        if not node.code or not node.code.strip():
            yield DefinitionProblem(node=nid, message=f"decision node '{nid}' has no code (a boolean expression)")
        else:
            yield from _compile_problem(nid, node.code, "eval")
        for outcome, attr in ((True, "on_true"), (False, "on_false")):
            if d.branch(node, outcome) is None:
                yield DefinitionProblem(node=nid, message=f"decision node '{nid}' has no {attr} branch")
        return
    if node.next is None:
        out = [e for e in d.edges if e.source == nid and e.condition is None]
        if not out:
            yield DefinitionProblem(node=nid, message=f"node '{nid}' has no next node")
        elif len(out) > 1:
            targets = ", ".join(f"'{e.target}'" for e in out)
            yield DefinitionProblem(node=nid, message=f"node '{nid}' has several next nodes ({targets})")


def _compile_problem(nid: str, code: str, mode: str) -> Iterable[DefinitionProblem]:
    try:
        compile(code, f"<node {nid}>", mode)
    except SyntaxError as exc:
        what = "expression" if mode == "eval" else "code"
        message = f"node '{nid}' {what} does not compile: {exc.msg} (line {exc.lineno})"
        yield DefinitionProblem(node=nid, message=message)


def _reachable(d: Definition, start: str) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for target in d.targets(d.node(todo.pop())):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _cycles(d: Definition) -> list[set[str]]:
    """Strongly connected components that contain a cycle (Tarjan's algorithm, iterative)."""
    graph = {n.id: d.targets(n) for n in d.nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            targets = graph[v]
            if i < len(targets):
                work.append((v, i + 1))
                w = targets[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                component: set[str] = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1 or v in graph[v]:
                    result.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return result
