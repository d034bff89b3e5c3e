"""Projects results-stream events into PostgreSQL (executions and the chain of node runs).

It is a consumer group of its own on the results stream, so it can run inside every worker process
(the default) or alone as `nova projector`. Writes are idempotent upserts keyed by the event's stream
id: a row takes a column from an event only if that event is newer than the last one applied to the
row, so replaying an event, or applying two in either order, leaves the same row. Each batch is one
transaction and is acknowledged only after it commits; while PostgreSQL is down the events simply
wait in the stream.

Batches are pipelined: while one is being written, the next is read and parsed (a lone projector
waited on PostgreSQL with nothing else to do, and fell behind its own worker). A batch is written only
once the previous one has committed and been acknowledged, or has failed: then nothing more is written
until the entries still pending are read again. A read that comes back full doubles the next one, up
to BATCH_GROWTH times `projector_batch`: a projector behind its stream pays its per-batch round trips
(each a turn of the worker's busy event loop) for more events at once, and one that keeps up reads
small batches again.

Every event read is either written or kept: an entry that is not an event, an event PostgreSQL
refuses, or one that claims an execution id already stored for another task is logged and moved,
with its reason, to the projector's dead-letter stream (`{prefix}:projector:dlq`) in the same Redis
transaction that acknowledges it. Rows are written in key order, so concurrent projectors lock
shared rows in the same order; a deadlock or serialization failure is retried.

An event of a format newer than this projector reads (written by a newer release during a rolling
deploy) is neither written nor dead-lettered: it is left pending in the group, marked idle for a
visibility timeout at once, so that the next reclaim of any projector may take it over, and a newer one
projects it under its own stream id (the upserts' order is kept). Meanwhile the results stream is not
trimmed past it, and the group goes on reading what follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.backoff import Backoff, linger, sleep_or_stop
from shared.connections import (
    REDIS_UNAVAILABLE,
    NotConfigured,
    autoclaim,
    ensure_groups,
    is_missing_group,
    is_moved_away,
    read_group,
)
from shared.db import LazyPool
from shared.events import Event
from shared.settings import Settings
from shared.streams import (
    EXECUTION_STATUS_BY_EVENT,
    DeadLetterField,
    EventType,
    Keys,
    Layout,
    decode_fields,
    entry_id_parts,
    fields_of,
    format_version,
    now_iso,
    parse_iso,
)
from shared.streams import pairs as flat_fields

log = logging.getLogger(__name__)

# How long an idle read waits for new events. A stop waits for the read in flight (cancelling it would
# leave what Redis delivered to it pending until a reclaim), so this bounds how long a stopping worker
# waits on an idle projector: a quarter second, at four cheap reads a second per idle shard.
IDLE_BLOCK_MS = 250

# How many times `projector_batch` a projector behind its stream reads at once (see the module's doc).
BATCH_GROWTH = 8

# Columns taken from the newest event win; "first" columns keep the first value seen.
_NEWER = "(EXCLUDED.last_event_ms, EXCLUDED.last_event_seq) > (e.last_event_ms, e.last_event_seq)"

UPSERT_EXECUTION = f"""
INSERT INTO executions AS e (
    id, task_id, workflow_id, workflow_name, client_slug, status, initial_context, final_context,
    error, nodes_executed, current_node, attempt, consumer, enqueued_at, started_at, finished_at,
    updated_at, last_event_ms, last_event_seq, workflow_version)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, COALESCE($10, 0), $11, COALESCE($12, 0), $13, $14, $15, $16,
        $17, $18, $19, $20)
ON CONFLICT (id) DO UPDATE SET
    workflow_name   = COALESCE(e.workflow_name, EXCLUDED.workflow_name),
    workflow_version = COALESCE(e.workflow_version, EXCLUDED.workflow_version),
    initial_context = COALESCE(e.initial_context, EXCLUDED.initial_context),
    enqueued_at     = COALESCE(e.enqueued_at, EXCLUDED.enqueued_at),
    started_at      = COALESCE(e.started_at, EXCLUDED.started_at),
    status          = CASE WHEN {_NEWER} THEN EXCLUDED.status ELSE e.status END,
    final_context   = CASE WHEN {_NEWER} AND $8::jsonb IS NOT NULL THEN EXCLUDED.final_context ELSE e.final_context END,
    error           = CASE WHEN {_NEWER} AND $9::jsonb IS NOT NULL THEN EXCLUDED.error ELSE e.error END,
    nodes_executed  = CASE WHEN {_NEWER} AND $10::int IS NOT NULL THEN EXCLUDED.nodes_executed ELSE e.nodes_executed END,
    current_node    = CASE WHEN {_NEWER} AND $11::text IS NOT NULL THEN EXCLUDED.current_node ELSE e.current_node END,
    attempt         = CASE WHEN {_NEWER} AND $12::int IS NOT NULL THEN EXCLUDED.attempt ELSE e.attempt END,
    consumer        = CASE WHEN {_NEWER} AND $13::text IS NOT NULL THEN EXCLUDED.consumer ELSE e.consumer END,
    finished_at     = CASE WHEN {_NEWER} AND $16::timestamptz IS NOT NULL THEN EXCLUDED.finished_at ELSE e.finished_at END,
    updated_at      = CASE WHEN {_NEWER} THEN EXCLUDED.updated_at ELSE e.updated_at END,
    last_event_ms   = CASE WHEN {_NEWER} THEN EXCLUDED.last_event_ms ELSE e.last_event_ms END,
    last_event_seq  = CASE WHEN {_NEWER} THEN EXCLUDED.last_event_seq ELSE e.last_event_seq END
WHERE e.task_id = EXCLUDED.task_id
"""  # noqa: E501

# Several events of one execution in a batch, folded into one row (see _folded): written only where every
# one of them is newer than the row's last event, which is the case in which one upsert of the fold ends as
# their upserts one by one would (the fold's oldest event id is its $21, $22). Anywhere else (an event the
# row is newer than, which only a redelivered or reclaimed event can be) nothing is written, and the
# events go one by one.
UPSERT_FOLDED_EXECUTION = UPSERT_EXECUTION + "  AND ($21::bigint, $22::bigint) > (e.last_event_ms, e.last_event_seq)\n"

_NODE_NEWER = "(EXCLUDED.last_event_ms, EXCLUDED.last_event_seq) > (n.last_event_ms, n.last_event_seq)"
_OLDER_NEWER = "($22::bigint, $23::bigint) > (n.last_event_ms, n.last_event_seq)"

# A node_started event resets the row (a node re-run after a crash shows as running again); a
# node_finished event fills in its outcome. The input context and start time of the run are kept.
# Each attempt of a node with a retry policy is a step, hence a row, of its own (attempt numbers it).
#
# Two events of one node run (one step of one execution) in a batch go as one row, folded: the newer
# one's row ($1..$19), then the older one's input context, start time and stream id ($20..$23), when
# that is all the older one holds (_folds_into); any other event is the fold of itself with itself. The
# row ends as the two upserts one after the other would leave it, whatever the stored row's last event:
# the newer event's columns win where it is newer than the row, and the two columns that keep a value
# met before (input context, start time) take the first one that is not NULL in the order the two
# upserts would have met them, which depends on which of the two events the stored row is newer than. A
# node's started and finished events mostly share a batch: this halves the rows a run writes.
UPSERT_NODE_RUN = f"""
INSERT INTO node_runs AS n (
    execution_id, step, node_id, node_type, status, input_context, output_context, stdout, stderr,
    decision, next_node, error, started_at, finished_at, duration_ms, last_event_ms, last_event_seq,
    attempt, max_attempts)
VALUES ($1, $2, $3, $4, $5, COALESCE($6::jsonb, $20::jsonb), $7, $8, $9, $10, $11, $12,
        COALESCE($13::timestamptz, $21::timestamptz), $14, $15, $16, $17, $18, $19)
ON CONFLICT (execution_id, step) DO UPDATE SET
    node_id        = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.node_id ELSE n.node_id END,
    node_type      = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.node_type ELSE n.node_type END,
    status         = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.status ELSE n.status END,
    input_context  = CASE WHEN {_OLDER_NEWER} THEN COALESCE(EXCLUDED.input_context, n.input_context)
                          WHEN {_NODE_NEWER} THEN COALESCE($6::jsonb, n.input_context, $20::jsonb)
                          ELSE COALESCE(n.input_context, $20::jsonb, $6::jsonb) END,
    started_at     = CASE WHEN {_OLDER_NEWER} THEN COALESCE(EXCLUDED.started_at, n.started_at)
                          WHEN {_NODE_NEWER} THEN COALESCE($13::timestamptz, n.started_at, $21::timestamptz)
                          ELSE COALESCE(n.started_at, $21::timestamptz, $13::timestamptz) END,
    output_context = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.output_context ELSE n.output_context END,
    stdout         = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.stdout ELSE n.stdout END,
    stderr         = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.stderr ELSE n.stderr END,
    decision       = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.decision ELSE n.decision END,
    next_node      = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.next_node ELSE n.next_node END,
    error          = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.error ELSE n.error END,
    finished_at    = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.finished_at ELSE n.finished_at END,
    duration_ms    = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.duration_ms ELSE n.duration_ms END,
    attempt        = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.attempt ELSE n.attempt END,
    max_attempts   = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.max_attempts ELSE n.max_attempts END,
    last_event_ms  = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.last_event_ms ELSE n.last_event_ms END,
    last_event_seq = CASE WHEN {_NODE_NEWER} THEN EXCLUDED.last_event_seq ELSE n.last_event_seq END
"""

UPSERT_CLIENT = "INSERT INTO clients (slug, name) VALUES ($1, $1) ON CONFLICT (slug) DO NOTHING"

# Errors that say "this event cannot be stored" (bad data, a broken constraint, a value past a limit),
# as opposed to PostgreSQL being unavailable or the schema being wrong, which must stop the projector
# until fixed rather than send every event to the dead-letter stream.
EVENT_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError)

# Deadlocks and serialization failures: the transaction was rolled back and may simply run again.
RETRIES_ON_ROLLBACK = 5


@dataclass(frozen=True)
class Refusal:
    """A results-stream entry the projector will not write, and why."""

    entry_id: str
    reason: str  # "malformed" | "rejected" | "execution_id_reused"
    detail: str


@dataclass
class Batch:
    """A batch read and parsed: the events to write, the entries refused before writing, the events
    left pending for a newer projector, and every entry acknowledged once the events are committed."""

    entries: list[tuple[str, list[str]]]  # each entry's fields as read_group gives them
    events: list[Event]
    refused: list[Refusal]
    newer: list[str]


def pg_safe(value: Any) -> Any:
    """`value` with every U+0000 in its strings (dict keys too, at any depth) replaced by U+FFFD.

    PostgreSQL's text and jsonb cannot hold U+0000, while JSON, Python and Redis can: any client may
    send one, and text extracted from PDFs often carries them. Only the PostgreSQL copy is changed;
    the results stream and the task hash keep the exact value. Two keys that differ only by U+0000
    versus U+FFFD collapse into one in PostgreSQL (the later wins).
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {pg_safe(k): pg_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [pg_safe(v) for v in value]
    return value


# What each event type says of its execution beyond what every event says (see execution_row): the
# row's columns 6 to 15 (initial context, final context, error, nodes executed, current node, attempt,
# consumer, enqueued, started and finished at), read from the event's data. One straight function per
# type, rather than a test per column of which types carry it: half the time, for the several events of
# every run.
def _queued(d: dict[str, Any]) -> tuple[Any, ...]:
    enqueued = parse_iso(d.get("enqueued_at"))
    return d.get("initial_context"), None, None, d.get("nodes_executed"), None, None, None, enqueued, None, None


def _started(d: dict[str, Any]) -> tuple[Any, ...]:
    started = parse_iso(d.get("started_at"))
    return None, None, None, d.get("nodes_executed"), None, d.get("attempt"), d.get("consumer"), None, started, None


def _node_started(d: dict[str, Any]) -> tuple[Any, ...]:
    return None, None, None, d.get("nodes_executed"), d.get("node_id"), None, None, None, None, None


def _node_finished(d: dict[str, Any]) -> tuple[Any, ...]:
    # The nodes executed so far: this node's step.
    return None, None, None, d.get("step"), None, None, None, None, None, None


def _retry(d: dict[str, Any]) -> tuple[Any, ...]:
    return None, None, d.get("error"), d.get("nodes_executed"), None, d.get("attempt"), None, None, None, None


def _succeeded(d: dict[str, Any]) -> tuple[Any, ...]:
    finished = parse_iso(d.get("finished_at"))
    return None, d.get("final_context"), None, d.get("nodes_executed"), None, None, None, None, None, finished


def _failed(d: dict[str, Any]) -> tuple[Any, ...]:
    finished = parse_iso(d.get("finished_at"))
    final = d.get("final_context")
    return None, final, d.get("error"), d.get("nodes_executed"), None, None, None, None, None, finished


def _ended(d: dict[str, Any]) -> tuple[Any, ...]:
    """Dead or cancelled: an error and an end, no final context."""
    finished = parse_iso(d.get("finished_at"))
    return None, None, d.get("error"), d.get("nodes_executed"), None, None, None, None, None, finished


_EXECUTION_COLUMNS = {
    EventType.QUEUED: _queued,
    EventType.STARTED: _started,
    EventType.NODE_STARTED: _node_started,
    EventType.NODE_FINISHED: _node_finished,
    EventType.RETRY: _retry,
    EventType.SUCCEEDED: _succeeded,
    EventType.FAILED: _failed,
    EventType.DEAD: _ended,
    EventType.CANCELLED: _ended,
}
assert set(_EXECUTION_COLUMNS) == set(EventType), "an event type without its execution columns"


def execution_row(event: Event, ms_seq: tuple[int, int] | None = None) -> tuple[Any, ...]:
    """UPSERT_EXECUTION's row for an event. `ms_seq`: the event's id as entry_id_parts gives it, if the
    caller has it already."""
    d = event.data
    ms, seq = ms_seq or entry_id_parts(event.id)
    t = event.type
    return (
        event.execution_id,
        event.task_id,
        event.workflow_id,
        d.get("workflow_name"),
        event.client,
        EXECUTION_STATUS_BY_EVENT[t],
        *_EXECUTION_COLUMNS[t](d),
        parse_iso(event.ts),
        ms,
        seq,
        d.get("workflow_version") if t is EventType.QUEUED else None,
    )


_NODE_EVENTS = (EventType.NODE_STARTED, EventType.NODE_FINISHED)


def node_run_row(event: Event, ms_seq: tuple[int, int] | None = None) -> tuple[Any, ...]:
    """`ms_seq` as execution_row's."""
    d = event.data
    ms, seq = ms_seq or entry_id_parts(event.id)
    started = event.type == EventType.NODE_STARTED
    return (
        event.execution_id,
        int(d["step"]),
        d["node_id"],
        d["node_type"],
        "running" if started else d.get("status", "success"),
        d.get("input_context") if started else None,
        None if started else d.get("output_context"),
        None if started else d.get("stdout"),
        None if started else d.get("stderr"),
        None if started else d.get("decision"),
        None if started else d.get("next_node"),
        None if started else d.get("error"),
        parse_iso(d.get("started_at")),
        None if started else parse_iso(d.get("finished_at")),
        None if started else d.get("duration_ms"),
        ms,
        seq,
        d.get("attempt"),
        d.get("max_attempts"),
    )


async def apply_events(conn: asyncpg.Connection, events: list[Event]) -> list[Refusal]:
    """Write a batch of events in one transaction: clients, then executions, then node runs.

    Returns the events not written: those whose rows cannot be built from their content, and those
    naming an execution id that PostgreSQL already holds for another task (Redis lost its data and
    handed the id out again). The latter are never merged into the stored row. Raises what
    PostgreSQL raises for the batch as a whole (EVENT_REFUSED for content it will not store).
    """
    refused: list[Refusal] = []
    executions: list[tuple[tuple[Any, ...], Event]] = []
    node_runs: list[tuple[tuple[Any, ...], Event]] = []
    for event in events:
        try:
            ms_seq = entry_id_parts(event.id)
            row = execution_row(event, ms_seq)
            node = node_run_row(event, ms_seq) if event.type in _NODE_EVENTS else None
            # The scan for U+0000 walks every context: skipped when the entry's text shows there is none.
            if not event.nul_free:
                row = pg_safe_row(row)
                node = None if node is None else pg_safe_row(node)
        except Exception as exc:
            # Building rows is pure computation: any failure is this event's content, never the system.
            refused.append(Refusal(event.id, "malformed", f"{type(exc).__name__}: {exc}"))
            continue
        executions.append((row, event))
        if node is not None:
            node_runs.append((node, event))
    # Key order, not stream order: two projectors whose batches share rows take their row locks in
    # the same order and cannot deadlock each other. Events of one row stay in stream order (the id
    # is the row's tiebreaker), though the upserts would converge in any order.
    # (Each row holds its event's id, as last_event_ms and last_event_seq.)
    executions.sort(key=lambda pair: (pair[0][0], pair[0][17], pair[0][18]))
    node_runs.sort(key=lambda pair: (pair[0][0], pair[0][1], pair[0][15], pair[0][16]))
    async with conn.transaction():
        clients = sorted({row[4] for row, _ in executions})
        if clients:
            await conn.executemany(UPSERT_CLIENT, [(c,) for c in clients])
        if executions:
            folds = _folds(executions)
            await conn.executemany(UPSERT_FOLDED_EXECUTION, [fold.row for fold in folds])
            # The upsert leaves a row stored for another task untouched; find the events it refused.
            # Every id of the batch has a row now, locked by this transaction, so this read is exact.
            # Whether this transaction wrote a row is its xmin: the row's last event alone cannot tell,
            # as a fold whose newest event was stored before (read again with older ones never written,
            # after a reclaim) ends with the same last event whether it was written or refused.
            stored = {
                r[0]: (r[1], r[2])
                for r in await conn.fetch(
                    "SELECT id, task_id, xmin::text::bigint = txid_current() % 4294967296 FROM executions"
                    " WHERE id = ANY($1::bigint[])",
                    sorted({fold.row[0] for fold in folds}),
                )
            }
            one_by_one: list[tuple[Any, ...]] = []
            for fold in folds:
                task_id, written = stored.get(fold.row[0], (None, False))
                if task_id != fold.row[1]:
                    refused.extend(
                        Refusal(
                            event.id,
                            "execution_id_reused",
                            f"execution {fold.row[0]} is stored for task {task_id}, not {fold.row[1]}",
                        )
                        for _, event in fold.pairs
                    )
                elif not written:
                    # The row had an event as new as the fold's oldest (see UPSERT_FOLDED_EXECUTION).
                    one_by_one.extend(row for row, _ in fold.pairs)
            if one_by_one:
                await conn.executemany(UPSERT_EXECUTION, one_by_one)
        skip = {r.entry_id for r in refused}
        rows = [row for row, event in node_runs if event.id not in skip]
        if rows:
            await conn.executemany(UPSERT_NODE_RUN, _node_folds(rows))
    return refused


@dataclass
class _Fold:
    """The events of one execution and task in a batch (in stream order), and the one row they fold into."""

    pairs: list[tuple[tuple[Any, ...], Event]]
    row: tuple[Any, ...]


# Columns of an execution row (execution_row) by how several events fold into one: the first event's (the
# row's identity, and what only an insert writes); the first value that is not NULL (the columns the upsert
# COALESCEs with the stored one); the newest event's (status and the event's position); and the newest
# value that is not NULL (the columns the upsert takes only from a newer event that has one).
_FIRST_ROW = (0, 1, 2, 4)
_FIRST_VALUE = (3, 6, 13, 14, 19)
_NEWEST_ROW = (5, 16, 17, 18)
_NEWEST_VALUE = (7, 8, 9, 10, 11, 12, 15)


def _folds(executions: list[tuple[tuple[Any, ...], Event]]) -> list[_Fold]:
    """The batch's execution rows (in key order, each execution's in stream order) folded per execution
    and task: a run's events mostly arrive in one batch, and one upsert of their fold does what theirs
    did one by one (when every one is newer than the stored row: UPSERT_FOLDED_EXECUTION). Each fold's
    row is execution_row's, then the stream id of its oldest event."""
    groups: dict[tuple[Any, Any], list[tuple[tuple[Any, ...], Event]]] = {}
    for pair in executions:
        groups.setdefault((pair[0][0], pair[0][1]), []).append(pair)
    folds = []
    for pairs in groups.values():
        first = pairs[0][0]
        if len(pairs) == 1:
            folds.append(_Fold(pairs, (*first, first[17], first[18])))
            continue
        row = list(first)
        for later, _ in pairs[1:]:
            for i in _FIRST_VALUE:
                if row[i] is None:
                    row[i] = later[i]
            for i in _NEWEST_VALUE:
                if later[i] is not None:
                    row[i] = later[i]
            for i in _NEWEST_ROW:
                row[i] = later[i]
        folds.append(_Fold(pairs, (*row, first[17], first[18])))
    # Key order (see apply_events), then the fold's first event: the first of two tasks to claim an id
    # (Redis lost its data) inserts the row, as its event would have alone.
    folds.sort(key=lambda fold: (fold.row[0], fold.row[20], fold.row[21]))
    return folds


# Columns of a node-run row (node_run_row) a fold does not send for its older event: its status (a
# node_started event's is "running") and outcome, which a node_started event leaves empty, and its node
# and attempt, which must then be the newer one's.
_OUTCOME = (6, 7, 8, 9, 10, 11, 13, 14)
_SAME = (2, 3, 17, 18)


def _folds_into(older: tuple[Any, ...], newer: tuple[Any, ...]) -> bool:
    """Whether two node-run rows go as one fold: the same step, and nothing of the older one but what the
    fold sends (its input context, start time and id), as a node_started event holds. Otherwise a value
    of the older event PostgreSQL would refuse (an attempt that is not a number, a status of null) would
    go unseen, and the event be written in part rather than dead-lettered."""
    if newer[0] != older[0] or newer[1] != older[1] or older[4] != "running":
        return False
    if any(older[i] is not None for i in _OUTCOME):
        return False
    # Equal and of one type: 1 and True are equal, but only one is an integer to PostgreSQL.
    return all(type(older[i]) is type(newer[i]) and older[i] == newer[i] for i in _SAME)


def _node_folds(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """UPSERT_NODE_RUN's rows for node-run rows in key order (each step's in stream order): each step's
    node_started event folded with the event after it (see _folds_into), and any other row folded with
    itself."""
    folds: list[tuple[Any, ...]] = []
    i, n = 0, len(rows)
    while i < n:
        older = rows[i]
        newer = rows[i + 1] if i + 1 < n else None
        if newer is not None and _folds_into(older, newer):
            i += 2
        else:
            newer = older
            i += 1
        folds.append((*newer, older[5], older[12], older[15], older[16]))
    return folds


def pg_safe_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(pg_safe(v) for v in row)


class Projector:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        pool: asyncpg.Pool | LazyPool | None,
        *,
        consumer: str,
        keys: Keys | None = None,
    ) -> None:
        """`pool` may be an open pool, a LazyPool (opened when PostgreSQL answers), or None: the
        projector then opens its own from the settings, and closes it when it stops. `keys` names the
        shard whose results stream it reads (the home shard by default); one projector per shard."""
        self.settings = settings
        self.redis = redis
        self._own_pool = pool is None
        self.pool = pool
        self.keys = keys or Keys.from_settings(settings)
        self.dead_letters = self.keys.projector_dead_letter
        self.consumer = consumer
        self.projected = 0
        self.refused = 0
        # Events of a newer format left pending for a newer projector (counted each time seen).
        self.left_to_newer = 0
        self._reclaim_cursor = "0-0"
        # The batch being written while the next is read (None: none).
        self._writing: asyncio.Task[None] | None = None
        # Entries the next read of new ones asks for, and whether the last read of new ones got as many.
        self._count = settings.projector_batch
        self._full = False

    async def _db(self) -> asyncpg.Pool:
        if self.pool is None:
            if not self.settings.database_url:
                raise NotConfigured("DATABASE_URL is not set (or run `nova dev`, which starts an embedded PostgreSQL)")
            self.pool = LazyPool(self.settings.database_url)
        return await self.pool.get() if isinstance(self.pool, LazyPool) else self.pool

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._loop(stop)
        finally:
            if self._own_pool and isinstance(self.pool, LazyPool):
                await self.pool.close()

    async def _loop(self, stop: asyncio.Event) -> None:
        try:
            await self._passes(stop)
            # A stop lets the batch in flight commit and be acknowledged.
            await self._quiesce()
        finally:
            # Cancelled: so is the batch in flight (rolled back, its entries left pending).
            if self._writing is not None:
                self._writing.cancel()
                await asyncio.wait([self._writing])
                self._writing = None

    async def _passes(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        # Our own pending entries first (a previous life of this consumer name), then new ones.
        cursor = "0"
        next_reclaim = 0.0
        while not stop.is_set():
            try:
                # Events a dead projector read but never wrote: taken over on a timer, not only
                # when idle, so a busy stream does not keep them waiting.
                if time.monotonic() >= next_reclaim:
                    await self._settle()
                    await self._reclaim_stale()
                    next_reclaim = time.monotonic() + self.settings.visibility_timeout / 2
                entries = await self._next_batch(cursor)
                if cursor != ">" and not entries:
                    # Our pending entries are all re-read (the cursor walks past them after each
                    # batch): on to new ones. Testing only for "0" here left the loop re-reading an
                    # empty history forever after any PostgreSQL error.
                    cursor = ">"
                    continue
                if entries:
                    # Parsed while the previous batch is still being written; written once it is done.
                    batch = self._prepare(entries)
                    if await self._settle():
                        backoff.reset()
                    self._writing = asyncio.create_task(self._write_batch(batch), name="projector batch")
                    if cursor != ">":
                        cursor = entries[-1][0]
                    elif not self._full:
                        await linger(self.settings.results_linger_ms, stop)
                else:
                    await self._settle()
                    backoff.reset()
            except asyncio.CancelledError:
                raise
            # Before ResponseError: a replica's refusal of writes (READONLY) is one, and an outage.
            except (*REDIS_UNAVAILABLE, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                await self._quiesce()
                delay = backoff.next_delay()
                log.warning("projector waiting %.1fs: %s", delay, exc)
                # Unacknowledged entries stay pending for this consumer; re-read them from the start.
                cursor = "0"
                await sleep_or_stop(delay, stop)
            except ResponseError as exc:
                await self._quiesce()
                cursor = "0"
                if is_moved_away(exc):
                    continue
                if not is_missing_group(exc):
                    raise
                # Redis may be gone again (a failover), or the cluster client may fail under us: the
                # next pass tries once more (an error raised here would escape the loop).
                try:
                    await ensure_groups(self.redis, self.keys)
                except Exception as exc:
                    log.warning("projector: consumer groups not created yet (%r)", exc)
            except Exception:
                # The projector runs inside each worker: nothing it meets may end the worker (seen:
                # asyncpg's InternalClientError on a connection broken by a PostgreSQL restart).
                # Drop the pool's connections, wait, and read the unacknowledged entries again.
                await self._quiesce()
                delay = backoff.next_delay()
                log.exception("projector failed unexpectedly; retrying in %.1fs", delay)
                await self._expire_connections()
                cursor = "0"
                await sleep_or_stop(delay, stop)

    async def _settle(self) -> bool:
        """Wait for the batch being written, raising its error; True if there was one and it is written."""
        task, self._writing = self._writing, None
        if task is None:
            return False
        await task
        return True

    async def _quiesce(self) -> None:
        """Wait for the batch being written, whatever its outcome, before the pending entries are read
        again: each of its entries is then acknowledged or pending, never also being written."""
        try:
            await self._settle()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The error that brought us here, or one from the same cause, is handled by the caller.
            log.warning("projector batch not written: %r", exc)

    async def _expire_connections(self) -> None:
        pool = self.pool.current if isinstance(self.pool, LazyPool) else self.pool
        if pool is not None:
            await pool.expire_connections()

    async def _next_batch(self, cursor: str) -> list[tuple[str, list[str]]]:
        base = self.settings.projector_batch
        count = self._count if cursor == ">" else base
        entries = await read_group(
            self.redis,
            self.keys.projector_group,
            self.consumer,
            self.keys.results,
            cursor,
            count=count,
            block_ms=IDLE_BLOCK_MS if cursor == ">" else None,
        )
        if cursor == ">":
            # Full: more are waiting, and twice as many are read next. Not: back towards the base. (New
            # entries cannot have been deleted: all of them are here.)
            self._full = len(entries) >= count
            self._count = min(2 * count, base * BATCH_GROWTH) if self._full else max(base, count // 2)
        return entries

    async def _reclaim_stale(self) -> None:
        """Take over events a dead projector consumer read but never acknowledged."""
        idle_ms = int(self.settings.visibility_timeout * 1000)
        # Resume the scan where it stopped: events left to a newer projector stay pending, and a scan
        # from the start each time would find only them while stale events behind them waited.
        self._reclaim_cursor, claimed = await autoclaim(
            self.redis,
            self.keys.results,
            self.keys.projector_group,
            self.consumer,
            idle_ms,
            start=self._reclaim_cursor,
            count=self.settings.projector_batch,
        )
        if claimed:
            log.info("projector reclaimed %d stale event(s)", len(claimed))
            await self._project([(entry_id, flat_fields(decode_fields(f))) for entry_id, f in claimed])

    async def _project(self, entries: list[tuple[str, list[str]]]) -> None:
        await self._write_batch(self._prepare(entries))

    def _prepare(self, entries: list[tuple[str, list[str]]]) -> Batch:
        events: list[Event] = []
        refused: list[Refusal] = []
        newer: list[str] = []
        readable = self.settings.readable_format
        for entry_id, pairs in entries:
            try:
                # An event as event_fields made it, in this format: every event a worker writes.
                event = Event.from_pairs(entry_id, pairs)
                if event is None:
                    fields = fields_of(pairs)
                    version = format_version(fields)
                    if version is None:
                        reason = "field v (the format version) is not a positive integer"
                        refused.append(Refusal(entry_id, "malformed", reason))
                        continue
                    if version > readable:
                        newer.append(entry_id)
                        continue
                    event = Event.from_fields(entry_id, fields)
            except (KeyError, ValueError, TypeError) as exc:
                refused.append(Refusal(entry_id, "malformed", f"not an event: {type(exc).__name__}: {exc}"))
                continue
            events.append(event)
        if newer:
            left = set(newer)
            entries = [(i, f) for i, f in entries if i not in left]
        return Batch(entries, events, refused, newer)

    async def _write_batch(self, batch: Batch) -> None:
        """Commit a batch's events, then dead-letter its refused entries and acknowledge the rest."""
        pool = await self._db()
        refused = batch.refused + await self._write_retrying(pool, batch.events)
        if batch.newer:
            await self._leave_to_newer(batch.newer)
        if batch.entries:
            await self._dead_letter_and_ack(batch.entries, refused)
        self.refused += len(refused)
        self.projected += len(batch.entries) - len(refused)

    async def _write_retrying(self, pool: asyncpg.Pool, events: list[Event]) -> list[Refusal]:
        for attempt in range(1, RETRIES_ON_ROLLBACK + 1):
            try:
                async with pool.acquire() as conn:
                    return await self._write(conn, events)
            except asyncpg.TransactionRollbackError as exc:
                # Rows are written in key order, so this is rare; the rollback undid the batch.
                if attempt == RETRIES_ON_ROLLBACK:
                    raise
                log.warning("projector batch rolled back (%s); writing it again", exc)
        raise AssertionError("unreachable")

    async def _leave_to_newer(self, entry_ids: list[str]) -> None:
        """Leave events of a newer format pending, idle enough for any projector's next reclaim: a newer
        one projects them; this one (or another old one) only passes them on again."""
        idle_ms = int(self.settings.visibility_timeout * 1000)
        # JUSTID: the delivery count is not raised; IDLE: claimable at once, not a timeout later.
        await self.redis.execute_command(
            "XCLAIM",
            self.keys.results,
            self.keys.projector_group,
            self.consumer,
            0,
            *entry_ids,
            "IDLE",
            idle_ms,
            "JUSTID",
        )
        self.left_to_newer += len(entry_ids)
        log.info(
            "%d event(s) of a format newer than %d left pending for a newer projector",
            len(entry_ids),
            self.settings.readable_format,
        )

    async def _write(self, conn: asyncpg.Connection, events: list[Event]) -> list[Refusal]:
        try:
            return await apply_events(conn, events)
        except EVENT_REFUSED:
            pass
        # Something in the batch cannot be stored: write the events one by one to find it, so the
        # others still land. Anything else (PostgreSQL gone, a schema problem) propagates: the batch
        # stays pending and is read again.
        refused: list[Refusal] = []
        for event in events:
            try:
                refused += await apply_events(conn, [event])
            except EVENT_REFUSED as exc:
                refused.append(Refusal(event.id, "rejected", f"{type(exc).__name__}: {exc}"))
        return refused

    async def _dead_letter_and_ack(self, entries: list[tuple[str, list[str]]], refused: list[Refusal]) -> None:
        """Keep the refused entries in the projector's dead-letter stream and acknowledge the batch,
        atomically: an entry leaves the pending list only once it is either written or kept."""
        by_id = dict(entries)
        dead_at = now_iso()
        async with self.redis.pipeline(transaction=True) as pipe:
            for refusal in refused:
                log.error(
                    "results entry %s cannot be projected (%s): %s; kept in %s",
                    refusal.entry_id,
                    refusal.reason,
                    refusal.detail,
                    self.dead_letters,
                )
                letter = {
                    **fields_of(by_id.get(refusal.entry_id) or []),
                    DeadLetterField.REASON: refusal.reason,
                    DeadLetterField.ERROR: refusal.detail,
                    DeadLetterField.ORIGINAL_ID: refusal.entry_id,
                    DeadLetterField.DEAD_AT: dead_at,
                }
                pipe.xadd(self.dead_letters, letter)  # type: ignore[arg-type]
            pipe.xack(self.keys.results, self.keys.projector_group, *[i for i, _ in entries])
            await pipe.execute()


async def serve_projector(settings: Settings, *, stop: asyncio.Event) -> None:
    """Run only the projector (`nova projector`), for deployments that separate it from workers."""
    from shared.connections import create_redis, prepare

    redis = create_redis(settings)
    with contextlib.suppress(*REDIS_UNAVAILABLE):
        await prepare(redis)
    consumer = settings.new_consumer_name()
    pool = LazyPool(settings.database_url) if settings.database_url else None
    try:
        shards = Layout.from_settings(settings).shards
        for keys in shards:
            await ensure_groups(redis, keys)
        # One projector per shard's results stream, sharing one pool.
        await asyncio.gather(
            *(Projector(settings, redis, pool, consumer=consumer, keys=keys).run(stop) for keys in shards)
        )
    finally:
        if pool is not None:
            await pool.close()
        await redis.aclose()
