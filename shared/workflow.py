"""The workflow graph format, ours and NOVA's side by side: the model, its validation, how to walk it.

A definition is ``{"nodes": [...], "edges": [...], "timeout"?: seconds, "concurrency"?: {"key", "limit"},
"priority"?: "high" | "normal" | "low"}``.
Any other top-level key (NOVA's ``name``, ``description``, ``model``, ``initial_context``...) and any
unknown node key (``label``, ``model``...) is kept and ignored. Nodes have an ``id`` and a ``type``
(start, action, decision, end); action and decision nodes carry Python ``code`` that reads and updates
``context``. ``concurrency`` caps how many runs sharing a key run at once (see Concurrency).
``priority`` is the lane its runs join unless an execute request names one (consumer/slots.py).

Where a node goes next:
- a start or action node: its ``next``, else its single out-edge (``{"from", "to", "condition"?}``; a
  single edge is followed whatever its condition, as in NOVA). An action whose two or more out-edges all
  carry a condition branches on ``context[<its id>]`` like a decision (NOVA's rule).
- a decision: the branch whose label matches its result. Branches are ``on_true``/``on_false`` and
  out-edges with a ``condition``, compared case-insensitively ("true"/"false", or a label such as
  "approve"). Its code is either one Python expression whose value is the result (ours), or statements
  that set ``context[<its id>]`` to a bool or a string (NOVA's).

Loops are allowed: the engine bounds a run (see consumer/engine.py). Validation refuses what cannot
run and only warns about what NOVA accepts and never runs (unreachable nodes, edges out of end nodes).

An action or decision may carry a ``retry`` policy for its own errors (ours; NOVA has none):
``{"attempts": 3, "backoff": {"initial": 1, "factor": 2, "max": 60, "jitter": true}, "on": ["ConnectionError"]}``.
The engine runs such a node again, alone and from the context it was given, when it fails with an
error named in ``on`` (its class or a base, qualified as ``imaplib.IMAP4.abort`` or bare); see RetryPolicy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from shared.streams import Lane, lane_of

MAX_NODES = 500
MAX_CODE_BYTES = 64 * 1024
# NOVA's AI executors: here they run the node's own code, as e2b does; there is no code generation.
AI_EXECUTORS = frozenset({"cached", "ai"})
BOOLEAN_LABELS = frozenset({"true", "false"})
# A node's retry policy: at most this many attempts, and waits of at most this many seconds between them
# (the execution's deadline bounds them too; a worker slot is held while waiting).
MAX_ATTEMPTS = 10
MAX_RETRY_WAIT = 3600.0
# Errors no retry follows, refused in `retry.on`. A node past a resource limit (memory, CPU, output,
# context size) hits it again with the same input, and costs its neighbours the resources each time;
# the engine's own verdicts (loop bounds, a decision without a branch) and a missing or refused executor
# do not change on a second run either.
NEVER_RETRIED = frozenset(
    {
        "MemoryError",
        "MemoryLimitExceeded",
        "CPUTimeLimitExceeded",
        "OutputLimitExceeded",
        "ContextTooLarge",
        "LoopLimitExceeded",
        "DecisionError",
        "ExecutorUnavailable",
        "E2BConfigurationError",
        "SandboxNotIsolated",
        "BadReply",
    }
)
# The causes (NodeError.reason) a retry may follow: the node's code raised, reported an error through
# NOVA's output protocol, ran past its own time limit, or its interpreter died. The others (limit:*,
# serialization, output, decision, max_visits, ...) are deterministic, whatever their type's name.
RETRYABLE_REASONS = frozenset({"exception", "reported", "timeout", "crashed"})
_ERROR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class NodeType(StrEnum):
    START = "start"
    ACTION = "action"
    DECISION = "decision"
    END = "end"


class Backoff(BaseModel):
    """The wait before attempt n+1: initial x factor^(n-1), at most `max`; with jitter, a random point in
    its upper half (so that nodes failing together do not come back together)."""

    model_config = ConfigDict(extra="forbid")

    initial: float = Field(default=1.0, ge=0, le=MAX_RETRY_WAIT)
    factor: float = Field(default=2.0, ge=1, le=10)
    max: float = Field(default=60.0, ge=0, le=MAX_RETRY_WAIT)
    jitter: bool = True


class RetryPolicy(BaseModel):
    """How a node's own failures are retried: `attempts` in all (the first run included), the `backoff`
    between them, and the error types that qualify (`on`)."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(ge=1, le=MAX_ATTEMPTS)
    backoff: Backoff = Field(default_factory=Backoff)
    on: list[Annotated[str, Field(max_length=200)]] = Field(min_length=1, max_length=50)

    def delay(self, failed: int) -> float:
        """Seconds to wait after the `failed`-th failed attempt (1-based) before the next one."""
        b = self.backoff
        ceiling = min(b.max, b.initial * b.factor ** (failed - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2) if b.jitter else ceiling

    def matches(self, error_type: str, bases: Iterable[str] = ()) -> bool:
        """Whether an error qualifies: `on` names its type or one of its classes (`bases`, as the runner
        reports them: module-qualified but for builtins), qualified or by the bare class name."""
        names = {error_type}
        for name in bases:
            names.add(name)
            names.add(name.rsplit(".", 1)[-1])
        return any(wanted in names for wanted in self.on)


class Node(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=200)
    type: NodeType
    code: str | None = Field(default=None, max_length=MAX_CODE_BYTES)
    label: str | None = None
    # NOVA's prompt for AI code generation; kept, never run (a node needs `code` here).
    prompt: str | None = None
    next: str | None = None
    on_true: str | None = None
    on_false: str | None = None
    # The ceiling is a setting (NOVA_MAX_NODE_TIMEOUT), checked by validate_definition with the node named.
    timeout: float | None = Field(default=None, gt=0, le=24 * 3600)
    executor: Literal["local", "e2b", "cached", "ai"] | None = None
    max_visits: int | None = Field(default=None, ge=1, le=100_000)
    retry: RetryPolicy | None = None
    name: str | None = None

    @property
    def sandbox_executor(self) -> str | None:
        """The sandbox kind that runs this node's code (None: the worker's default)."""
        return "e2b" if self.executor in AI_EXECUTORS else self.executor

    @property
    def is_expression_decision(self) -> bool:
        """A decision written as one expression (ours), not as statements that set its key (NOVA's)."""
        return self.type == NodeType.DECISION and is_expression(self.code or "")


@lru_cache(maxsize=4096)
def is_expression(code: str) -> bool:
    try:
        compile(code, "<decision>", "eval")
    except SyntaxError:
        return False
    return True


class Edge(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    source: str = Field(alias="from")
    target: str = Field(alias="to")
    condition: str | None = None

    @field_validator("condition", mode="before")
    @classmethod
    def _condition(cls, value: Any) -> Any:
        # One form for both dialects: NOVA writes "true"/"false"/"approve", ours may write JSON booleans.
        # Lower-cased, because a decision's result is (NOVA compares it lower-cased with the condition
        # as written, so "True" could never match there; here it does).
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return value.strip().lower() or None
        return value


# A placeholder of a concurrency key template: `{name}`, where name is `client` or a top-level
# initial-context field. Anything else between braces is refused by name (see _template_problem).
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Longest key a run may render: it names Redis keys and shows in every waiting task's status.
MAX_RENDERED_KEY = 1000


class ConcurrencyKeyError(ValueError):
    """A run whose context cannot fill its workflow's concurrency key (a field missing or not a scalar)."""


class Concurrency(BaseModel):
    """At most `limit` runs with the same rendered `key` at once, across every worker and workflow.

    `key` is a template: literal text and `{client}` (the run's client) or `{field}` (a top-level
    initial-context field), e.g. `{client}:{mailbox}`. It is only ever substituted, never evaluated."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=200)
    limit: StrictInt = Field(ge=1, le=10_000)

    @field_validator("key")
    @classmethod
    def _template(cls, value: str) -> str:
        problem = _template_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @property
    def fields(self) -> list[str]:
        """The placeholder names, in order (`client` included)."""
        return _PLACEHOLDER.findall(self.key)

    def render(self, client: str, context: dict[str, Any]) -> str:
        """The key of one run; ConcurrencyKeyError when its context lacks a named field."""

        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name == "client":
                return client
            if name not in context:
                raise ConcurrencyKeyError(
                    f"concurrency key '{self.key}' needs initial_context field '{name}', which this run lacks"
                )
            item = context[name]
            # Only scalars: an object or list has no one spelling, and null is as good as missing.
            if isinstance(item, bool):
                return "true" if item else "false"
            if isinstance(item, str | int | float):
                return str(item)
            kind = "null" if item is None else type(item).__name__
            raise ConcurrencyKeyError(
                f"concurrency key '{self.key}' needs initial_context field '{name}' to be a string, number "
                f"or boolean; it is {kind}"
            )

        rendered = _PLACEHOLDER.sub(value, self.key)
        if len(rendered) > MAX_RENDERED_KEY:
            raise ConcurrencyKeyError(
                f"concurrency key '{self.key}' renders to {len(rendered)} characters; the limit is {MAX_RENDERED_KEY}"
            )
        return rendered


def _template_problem(template: str) -> str | None:
    """What is wrong with a concurrency key template, naming the offending part; None when valid."""
    for match in _PLACEHOLDER.finditer(template):
        inner, whole = match.group(1), match.group(0)
        if _FIELD_NAME.fullmatch(inner):
            continue
        if not inner:
            return f"'{whole}' names no field: write '{{client}}' or '{{<initial_context field>}}'"
        if "!" in inner or ":" in inner:
            return f"'{whole}' has a conversion or format spec: only plain field names are allowed"
        if "." in inner:
            return f"'{whole}' reads an attribute: only top-level field names are allowed"
        if "[" in inner or "]" in inner:
            return f"'{whole}' indexes into a field: only top-level field names are allowed"
        return f"'{whole}' is not a field name (letters, digits and _, not starting with a digit)"
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        brace = "{" if "{" in rest else "}"
        return f"unmatched '{brace}' in '{template}': braces only surround a field name"
    return None


class Definition(BaseModel):
    model_config = ConfigDict(extra="allow")

    nodes: list[Node] = Field(min_length=1, max_length=MAX_NODES)
    edges: list[Edge] = Field(default_factory=list)
    timeout: float | None = Field(default=None, gt=0, le=24 * 3600)
    concurrency: Concurrency | None = None
    priority: Lane | None = None

    def node(self, node_id: str) -> Node:
        return self._index()[node_id]

    def _index(self) -> dict[str, Node]:
        index = self.__dict__.get("_node_index")
        if index is None:
            index = {n.id: n for n in self.nodes}
            self.__dict__["_node_index"] = index
        return index

    def runs_code(self) -> bool:
        """Whether any node runs code (an action or a decision): only those see the client's credentials.
        Kept once known, as the node index is (a run asks it each time)."""
        known = self.__dict__.get("_runs_code")
        if known is None:
            known = self.__dict__["_runs_code"] = any(n.type not in (NodeType.START, NodeType.END) for n in self.nodes)
        return bool(known)

    def out_edges(self, node_id: str) -> list[Edge]:
        index = self.__dict__.get("_edge_index")
        if index is None:
            index = {}
            for edge in self.edges:
                index.setdefault(edge.source, []).append(edge)
            self.__dict__["_edge_index"] = index
        return index.get(node_id, [])

    @property
    def start(self) -> Node:
        return next(n for n in self.nodes if n.type == NodeType.START)

    @property
    def uses_max_visits(self) -> bool:
        return any(n.max_visits is not None for n in self.nodes)

    def is_branching(self, node: Node) -> bool:
        """Whether the node picks its successor by a result (decisions, and NOVA's branching actions)."""
        if node.type == NodeType.DECISION:
            return True
        if node.type == NodeType.END or node.next:
            return False
        out = self.out_edges(node.id)
        return len(out) >= 2 and all(e.condition is not None for e in out)

    def branches(self, node: Node) -> list[tuple[str, str]]:
        """(label, target) pairs of a branching node, in the order they are tried."""
        pairs: list[tuple[str, str]] = []
        if node.type == NodeType.DECISION:
            if node.on_true:
                pairs.append(("true", node.on_true))
            if node.on_false:
                pairs.append(("false", node.on_false))
        pairs.extend((e.condition, e.target) for e in self.out_edges(node.id) if e.condition is not None)
        return pairs

    def has_labels(self, node: Node) -> bool:
        """Whether some branch is labelled with something other than true/false."""
        return any(label not in BOOLEAN_LABELS for label, _ in self.branches(node))

    def successor(self, node: Node) -> str | None:
        """The node after a non-branching node (None for an end node)."""
        if node.type == NodeType.END:
            return None
        if node.next:
            return node.next
        out = self.out_edges(node.id)
        return out[0].target if len(out) == 1 else None

    def branch(self, node: Node, outcome: bool | str) -> str | None:
        """The node a branching node leads to for its result (a bool, or a label compared case-insensitively)."""
        if isinstance(outcome, bool):
            label = "true" if outcome else "false"
        else:
            label = outcome.lower()
        for candidate, target in self.branches(node):
            if candidate == label:
                return target
        return None

    def targets(self, node: Node) -> list[str]:
        if self.is_branching(node):
            return list(dict.fromkeys(target for _, target in self.branches(node)))
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


def validate_definition(raw: dict[str, Any] | Definition, *, max_node_timeout: float | None = None) -> Definition:
    """Parse and check a definition; raises pydantic.ValidationError or InvalidDefinition.

    `max_node_timeout` (NOVA_MAX_NODE_TIMEOUT) refuses a node `timeout` above it; None skips that check,
    for workflows already stored (a lowered ceiling must not stop them from running).
    """
    definition = raw if isinstance(raw, Definition) else Definition.model_validate(raw)
    problems, _ = _analyse(definition, max_node_timeout)
    if problems:
        raise InvalidDefinition(problems)
    return definition


def graph_warnings(definition: Definition) -> list[DefinitionProblem]:
    """What a valid definition holds that will never run or is ignored, each naming its node."""
    return _analyse(definition, None)[1]


def _analyse(d: Definition, max_node_timeout: float | None) -> tuple[list[DefinitionProblem], list[DefinitionProblem]]:
    problems: list[DefinitionProblem] = []
    warnings: list[DefinitionProblem] = []
    ids: dict[str, Node] = {}
    for node in d.nodes:
        if node.id in ids:
            problems.append(DefinitionProblem(node=node.id, message=f"node '{node.id}' is defined twice"))
        ids[node.id] = node

    starts = [n for n in d.nodes if n.type == NodeType.START]
    if not starts:
        problems.append(DefinitionProblem(node=None, message="the workflow has no start node"))
        return problems, warnings
    if len(starts) > 1:
        names = ", ".join(f"'{n.id}'" for n in starts)
        problems.append(DefinitionProblem(node=starts[1].id, message=f"the workflow has several start nodes: {names}"))
    if not any(n.type == NodeType.END for n in d.nodes):
        problems.append(DefinitionProblem(node=None, message="the workflow has no end node"))

    references = list(_reference_problems(d, ids))
    problems.extend(references)
    for node in d.nodes:
        problems.extend(_content_problems(node, max_node_timeout))
        warnings.extend(_content_warnings(node))
    if references:
        return problems, warnings

    reachable = _reachable(d, starts[0].id)
    for node in d.nodes:
        if node.id not in reachable:
            # NOVA runs such a graph: the node never runs, so it is only worth a warning.
            kind = "end node" if node.type == NodeType.END else "node"
            warnings.append(DefinitionProblem(node=node.id, message=f"{kind} '{node.id}' is unreachable from start"))
        elif node.type == NodeType.END:
            if d.out_edges(node.id) or node.next:
                message = f"end node '{node.id}' has outgoing edges; they are ignored (a run stops at an end node)"
                warnings.append(DefinitionProblem(node=node.id, message=message))
        else:
            problems.extend(_structure_problems(d, node))
    if problems:
        return problems, warnings

    if not any(ids[n].type == NodeType.END for n in reachable):
        problems.append(DefinitionProblem(node=starts[0].id, message="no end node is reachable from start"))
    for component in _cycles(d, reachable):
        # Loops are bounded at run time; one no node can ever leave is a certain failure.
        exits = any(t not in component for n in component for t in d.targets(ids[n]))
        if not exits:
            first = sorted(component)[0]
            members = ", ".join(f"'{n}'" for n in sorted(component))
            problems.append(
                DefinitionProblem(node=first, message=f"node '{first}' is on a cycle ({members}) with no way out")
            )
    return problems, warnings


def _reference_problems(d: Definition, ids: dict[str, Node]) -> Iterable[DefinitionProblem]:
    for edge in d.edges:
        for ref in (edge.source, edge.target):
            if ref not in ids:
                message = f"edge {edge.source} -> {edge.target} names unknown node '{ref}'"
                yield DefinitionProblem(node=ref, message=message)
    for node in d.nodes:
        for attr in ("next", "on_true", "on_false"):
            ref = getattr(node, attr)
            if ref is not None and ref not in ids:
                yield DefinitionProblem(
                    node=node.id, message=f"node '{node.id}' has {attr} '{ref}', which is not a node"
                )


def _content_problems(node: Node, max_node_timeout: float | None) -> Iterable[DefinitionProblem]:
    """What is wrong with a node on its own, reachable or not (NOVA parses every node too)."""
    nid = node.id
    if max_node_timeout is not None and node.timeout is not None and node.timeout > max_node_timeout:
        message = (
            f"node '{nid}' has timeout {node.timeout:g}s, above the limit of {max_node_timeout:g}s "
            "(NOVA_MAX_NODE_TIMEOUT)"
        )
        yield DefinitionProblem(node=nid, message=message)
    if node.retry is not None:
        yield from _retry_problems(node, node.retry)
    if node.type not in (NodeType.ACTION, NodeType.DECISION):
        return
    if not node.code or not node.code.strip():
        if node.prompt or node.executor in AI_EXECUTORS:
            message = (
                f"node '{nid}' has only a prompt (executor '{node.executor or 'e2b'}'): AI code generation is "
                "not available here; give the node Python `code`"
            )
            yield DefinitionProblem(node=nid, message=message)
        else:
            yield DefinitionProblem(node=nid, message=f"{node.type.value} node '{nid}' has no code")
        return
    try:
        compile(node.code, f"<node {nid}>", "exec")
    except SyntaxError as exc:
        message = f"node '{nid}' code does not compile: {exc.msg} (line {exc.lineno})"
        yield DefinitionProblem(node=nid, message=message)


def _retry_problems(node: Node, policy: RetryPolicy) -> Iterable[DefinitionProblem]:
    nid = node.id
    if node.type not in (NodeType.ACTION, NodeType.DECISION):
        message = f"{node.type.value} node '{nid}' has a retry policy: only action and decision nodes run code to retry"
        yield DefinitionProblem(node=nid, message=message)
    if policy.backoff.max < policy.backoff.initial:
        message = (
            f"node '{nid}' has retry backoff max {policy.backoff.max:g}s below its initial {policy.backoff.initial:g}s"
        )
        yield DefinitionProblem(node=nid, message=message)
    for name in policy.on:
        if name in NEVER_RETRIED or name.startswith("limit:"):
            message = (
                f"node '{nid}' retries on '{name}', which is never retried: a node past a resource limit "
                "(memory, CPU, output, context) or refused by the engine fails the same way again"
            )
            yield DefinitionProblem(node=nid, message=message)
        elif not _ERROR_NAME.fullmatch(name):
            message = (
                f"node '{nid}' retries on {name!r}, which is not an exception type name "
                "(such as ConnectionError or imaplib.IMAP4.abort)"
            )
            yield DefinitionProblem(node=nid, message=message)


def _content_warnings(node: Node) -> Iterable[DefinitionProblem]:
    nid = node.id
    if node.retry is not None and node.retry.attempts == 1:
        message = f"node '{nid}' has a retry policy of 1 attempt: it is never retried"
        yield DefinitionProblem(node=nid, message=message)
    if node.type == NodeType.DECISION and node.code and not node.is_expression_decision and nid not in node.code:
        # NOVA's own fixtures set context['branch_decision'], which NOVA never reads: say so at create.
        message = (
            f"decision node '{nid}' is not an expression and its code never names '{nid}': it must set "
            f"context['{nid}'] to a bool or a string"
        )
        yield DefinitionProblem(node=nid, message=message)


def _structure_problems(d: Definition, node: Node) -> Iterable[DefinitionProblem]:
    """Whether a reachable start, action or decision node has somewhere definite to go."""
    nid = node.id
    out = d.out_edges(nid)
    if d.is_branching(node):
        yield from _branch_problems(d, node)
        return
    if node.next is not None:
        others = sorted({e.target for e in out if e.target != node.next})
        if others:
            edges = ", ".join(f"'{t}'" for t in others)
            yield DefinitionProblem(node=nid, message=f"node '{nid}' has next '{node.next}' and edges to {edges}")
        return
    if not out:
        yield DefinitionProblem(node=nid, message=f"node '{nid}' has no next node")
    elif len(out) > 1:
        targets = ", ".join(f"'{e.target}'" for e in out)
        yield DefinitionProblem(
            node=nid,
            message=f"node '{nid}' has several next nodes ({targets}); to branch on context['{nid}'], "
            "give every edge a condition",
        )


def _branch_problems(d: Definition, node: Node) -> Iterable[DefinitionProblem]:
    nid = node.id
    if node.type == NodeType.DECISION:
        for edge in d.out_edges(nid):
            if edge.condition is None:
                yield DefinitionProblem(
                    node=nid, message=f"decision node '{nid}' has an edge to '{edge.target}' without a condition"
                )
    seen: dict[str, str] = {}
    for label, target in d.branches(node):
        if seen.setdefault(label, target) != target:
            message = f"node '{nid}' has two branches for '{label}' ('{seen[label]}', '{target}')"
            yield DefinitionProblem(node=nid, message=message)
    if node.type == NodeType.DECISION and not any(label not in BOOLEAN_LABELS for label in seen):
        # A true/false decision needs both ways; one branching on labels needs only the labels it names.
        for label, attr in (("true", "on_true"), ("false", "on_false")):
            if label not in seen:
                yield DefinitionProblem(node=nid, message=f"decision node '{nid}' has no {attr} branch")


def _reachable(d: Definition, start: str) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for target in d.targets(d.node(todo.pop())):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _cycles(d: Definition, within: set[str]) -> list[set[str]]:
    """Strongly connected components among `within` that contain a cycle (Tarjan's algorithm, iterative)."""
    graph = {n.id: [t for t in d.targets(n) if t in within] for n in d.nodes if n.id in within}
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


def workflow_lane(definition: dict[str, Any]) -> Lane:
    """The lane a workflow's runs join by default: its stored definition's `priority` (validated when
    it was saved), normal when it names none."""
    return lane_of({"lane": definition.get("priority") or ""})
