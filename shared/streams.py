"""Every Redis key, stream field and status name NOVA uses, defined once.

The README's "Streams and keys" section documents these for `redis-cli` users; keep the two in step.
Entries are flat field/value pairs of UTF-8 strings so that `XRANGE` output reads as it is; nested
values (contexts, results, errors) travel as one JSON field encoded with orjson.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson
from redis.crc import key_slot

# Re-exported: the lanes are part of the key layout.
from shared.lanes import LANES as LANES
from shared.lanes import Lane as Lane
from shared.lanes import lane_of as lane_of
from shared.settings import Settings

# The format of request entries, events and task hashes this code writes, and the newest it reads. An
# entry or hash without the `v` field is format 1 (written before formats were numbered). Raise it only
# for a change an older reader would get wrong: during a rolling deploy, old workers leave entries of a
# newer format to the new workers, and old projectors leave such events to the new projectors.
# Format 1 is the first numbered one and already includes node retry policies and their checkpoints
# (they shipped in the same release): no reader of `v` exists that lacks them.
FORMAT_VERSION = 1
VERSION_FIELD = "v"


def format_version(fields: dict[str, str]) -> int | None:
    """The format an entry or hash says it has (1 without the field); None when the field is not a
    positive integer (such an entry is malformed)."""
    value = fields.get(VERSION_FIELD)
    if value is None or value == "":
        return 1
    try:
        version = int(value)
    except ValueError:
        return None
    return version if version >= 1 else None


class TaskStatus(StrEnum):
    """Status of a task as `GET /tasks/{id}` reports it (Celery's vocabulary, which clients know)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DEAD = "DEAD"
    # Cancelled by an operator or its client (Celery's word for it): never starts, or stops for good.
    REVOKED = "REVOKED"


TERMINAL_STATUSES = frozenset({TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.DEAD, TaskStatus.REVOKED})


class EventType(StrEnum):
    """The `type` field of a results-stream entry."""

    QUEUED = "queued"
    STARTED = "started"
    NODE_STARTED = "node_started"
    NODE_FINISHED = "node_finished"
    RETRY = "retry"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"


TERMINAL_EVENTS = frozenset({EventType.SUCCEEDED, EventType.FAILED, EventType.DEAD, EventType.CANCELLED})


class ExecutionStatus(StrEnum):
    """Status of an execution as PostgreSQL records it and `GET /executions` reports it: NOVA's words
    (pending, running, completed, failed), plus ours where NOVA has none (retrying, dead)."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"


# The execution status an event moves an execution to (the `executions.status` column). Migration 0003
# rewrote rows projected with the earlier words (LEGACY_EXECUTION_STATUSES).
EXECUTION_STATUS_BY_EVENT: dict[EventType, ExecutionStatus] = {
    EventType.QUEUED: ExecutionStatus.PENDING,
    EventType.STARTED: ExecutionStatus.RUNNING,
    EventType.NODE_STARTED: ExecutionStatus.RUNNING,
    EventType.NODE_FINISHED: ExecutionStatus.RUNNING,
    EventType.RETRY: ExecutionStatus.RETRYING,
    EventType.SUCCEEDED: ExecutionStatus.COMPLETED,
    EventType.FAILED: ExecutionStatus.FAILED,
    EventType.DEAD: ExecutionStatus.DEAD,
    EventType.CANCELLED: ExecutionStatus.CANCELLED,
}

# The same statuses as the task hash says them (`GET /tasks`, Celery's words), for an execution read
# from Redis before PostgreSQL has it.
EXECUTION_STATUS_BY_TASK_STATUS: dict[TaskStatus, ExecutionStatus] = {
    TaskStatus.PENDING: ExecutionStatus.PENDING,
    TaskStatus.RUNNING: ExecutionStatus.RUNNING,
    TaskStatus.RETRY: ExecutionStatus.RETRYING,
    TaskStatus.SUCCESS: ExecutionStatus.COMPLETED,
    TaskStatus.FAILURE: ExecutionStatus.FAILED,
    TaskStatus.DEAD: ExecutionStatus.DEAD,
    TaskStatus.REVOKED: ExecutionStatus.CANCELLED,
}

# Words executions were recorded with before NOVA's: still accepted as filters, so that existing
# clients (and NOVA's own docs, which say `?status=success`) keep finding what they mean.
LEGACY_EXECUTION_STATUSES: dict[str, ExecutionStatus] = {
    "queued": ExecutionStatus.PENDING,
    "success": ExecutionStatus.COMPLETED,
    "failure": ExecutionStatus.FAILED,
}

# Executions that are not finished: a workflow with any of these cannot be deleted.
ACTIVE_EXECUTION_STATUSES = frozenset({ExecutionStatus.PENDING, ExecutionStatus.RUNNING, ExecutionStatus.RETRYING})


class RequestField(StrEnum):
    """Fields of a requests-stream entry (one execution request)."""

    TASK_ID = "task_id"
    EXECUTION_ID = "execution_id"
    WORKFLOW_ID = "workflow_id"
    WORKFLOW_NAME = "workflow_name"
    CLIENT = "client"
    ENQUEUED_AT = "enqueued_at"
    # JSON object: {"initial_context": {...}, "workflow_version": n} plus optional "replay_of" / "resume" keys.
    PAYLOAD = "payload"
    VERSION = VERSION_FIELD  # the entry's format (FORMAT_VERSION); absent: 1
    # A run that waited for a concurrency key: its first entry's place (shared/lua/concurrency_acquire.lua),
    # kept on the entries it comes back as, so that it keeps its turn.
    CONCURRENCY_ORDER = "ckey_order"
    # ... and its own workflow's limit for the key, which a release admits it against (every workflow
    # rendering the key shares its holders, each run within its own workflow's limit).
    CONCURRENCY_LIMIT = "ckey_limit"
    # The priority lane (`high` or `low`; absent: normal): whatever puts the request back onto a stream
    # (a retry, a resume, a concurrency slot) puts it back onto its lane's.
    LANE = "lane"


class EventField(StrEnum):
    """Fields of a results-stream entry (one status event)."""

    TYPE = "type"
    TASK_ID = "task_id"
    EXECUTION_ID = "execution_id"
    WORKFLOW_ID = "workflow_id"
    CLIENT = "client"
    TS = "ts"
    # JSON object whose keys depend on `type` (see shared/events.py).
    DATA = "data"
    VERSION = VERSION_FIELD  # the event's format (FORMAT_VERSION); absent: 1


class TaskField(StrEnum):
    """Fields of the task hash, the fresh state `GET /tasks/{id}` reads without PostgreSQL."""

    STATUS = "status"
    TASK_ID = "task_id"
    EXECUTION_ID = "execution_id"
    WORKFLOW_ID = "workflow_id"
    WORKFLOW_NAME = "workflow_name"
    CLIENT = "client"
    ENQUEUED_AT = "enqueued_at"
    STARTED_AT = "started_at"
    FINISHED_AT = "finished_at"
    CURRENT_NODE = "current_node"
    NODES_EXECUTED = "nodes_executed"
    ATTEMPT = "attempt"
    CONSUMER = "consumer"
    RESULT = "result"  # JSON, on SUCCESS
    ERROR = "error"  # JSON, on FAILURE / RETRY / DEAD
    CHECKPOINT = "checkpoint"  # JSON: where a re-delivered run resumes
    UPDATED_AT = "updated_at"
    # Bookkeeping of the atomic steps (shared/lua/): the request entry the task was enqueued as, and
    # the tokens that make a re-sent call (its reply lost) a no-op.
    ENTRY = "entry"
    TOKEN = "token"
    LAST_EVENT = "last_event"
    REOPEN_TOKEN = "reopen_token"
    REOPENED_FROM = "reopened_from"  # the status a retry re-opened (FAILURE or REVOKED)
    CANCEL_REASON = "cancel_reason"  # who cancelled and why, on REVOKED
    VERSION = VERSION_FIELD  # the format of the hash's fields (the checkpoint's above all); absent: 1
    WAITING_FOR = "waiting_for"  # the concurrency key a queued run waits for a slot of (status PENDING)
    LANE = "lane"  # the priority lane, when not normal
    # A node retry waiting for its backoff: the node, its attempt and when it runs again (status RETRY).
    NODE_RETRY = "node_retry"


class DeadLetterField(StrEnum):
    """Fields a dead-letter entry adds to the original request's fields."""

    REASON = "dlq_reason"
    ERROR = "dlq_error"
    ATTEMPTS = "dlq_attempts"
    DELIVERIES = "dlq_deliveries"
    ORIGINAL_ID = "dlq_original_id"
    DEAD_AT = "dlq_dead_at"


@dataclass(frozen=True)
class Keys:
    """Redis key names for one deployment (one shard of it), derived from settings.

    The layout is decided for Redis Cluster too, where every atomic step must touch one slot. On a
    single Redis with one shard (`tag` empty) the names are the documented ones. On a cluster, or with
    `NOVA_SHARDS` > 1, `Keys.shard()` gives shard n's names, each carrying the hash tag `{<prefix>:<n>}`:
    - the shard's streams (requests, results, dead letters), delayed retries, id sequence and the
      run-control keys its workers obey (pause flags, parked requests, the control channel);
    - each task's hash and event list, in the shard that holds its request and events (the task id
      says which: `shard_of_task`);
    - each client's in-flight counter, rate bucket and idempotency keys, in the client's shard
      (`shard_of_client`): a client's executions all go to one shard, so the enqueue step checks its
      limits and idempotency in one slot, exactly, across every API replica. Many clients spread the load.
    Workflow copies and the client list are read and written alone, so they need no tag; the webhook
    and schedule keys, which transactions write together, share the `home` tag on a cluster.
    """

    requests: str
    results: str
    dead_letter: str
    worker_group: str
    projector_group: str
    prefix: str
    tag: str = ""
    shard_index: int = 0
    shard_count: int = 1
    cluster: bool = False
    # The lane whose stream `requests` is (a reader's Keys); every other name is the shard's, shared
    # by its lanes.
    lane: Lane = Lane.NORMAL

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        """The home shard's keys (shard 0): all of them with one shard, the documented names on a single
        Redis. Code that touches a task or a client's executions asks `Layout` for their shard."""
        if settings.tagged:
            return cls.shard(settings, 0)
        return cls(
            requests=settings.requests_stream,
            results=settings.results_stream,
            dead_letter=settings.dead_letter_stream,
            worker_group=settings.worker_group,
            projector_group=settings.projector_group,
            prefix=settings.key_prefix,
        )

    @classmethod
    def shard(cls, settings: Settings, shard: int) -> Keys:
        """Shard `shard`'s keys: every name carries the shard's hash tag."""
        tag = f"{{{settings.key_prefix}:{shard}}}"
        return cls(
            requests=f"{settings.requests_stream}:{tag}",
            results=f"{settings.results_stream}:{tag}",
            dead_letter=f"{settings.dead_letter_stream}:{tag}",
            worker_group=settings.worker_group,
            projector_group=settings.projector_group,
            prefix=settings.key_prefix,
            tag=tag,
            shard_index=shard,
            shard_count=settings.shards,
            cluster=settings.cluster,
        )

    @staticmethod
    def shard_of_client(client: str, shards: int) -> int:
        """The shard that holds a client's executions and counters (stable across processes)."""
        return key_slot(client.encode()) % shards if shards > 1 else 0

    @staticmethod
    def shard_of_task(task_id: str, shards: int) -> int:
        """The shard that holds a task: new task ids carry it in their last 8 hex digits (`new_task_id`);
        any other id (one written by hand) is placed by its hash slot."""
        if shards <= 1:
            return 0
        tail = task_id[-8:]
        if len(tail) == 8 and all(c in "0123456789abcdef" for c in tail):
            return int(tail, 16) % shards
        return key_slot(task_id.encode()) % shards

    def new_task_id(self) -> str:
        """A random task id (32 hex digits, as before) that `shard_of_task` maps to this shard."""
        raw = random_id()
        if self.shard_count <= 1:
            return raw
        low = int(raw[-8:], 16)
        # The largest number of the form k * shards + shard that is <= low, or the smallest above it.
        low = low - (low - self.shard_index) % self.shard_count if low >= self.shard_index else self.shard_index
        return f"{raw[:-8]}{low:08x}"

    def placed_task_id(self, task_id: str) -> str:
        """A task id chosen by its caller (a schedule's tick), made to name this shard if it does not:
        the shard's index as 8 hex digits is appended (deterministic, so a repeat names the same task)."""
        if self.of_task(task_id) is self:
            return task_id
        return f"{task_id}-{self.shard_index:08x}"

    @property
    def absent(self) -> str:
        """What a script's optional KEYS slot gets when the caller has no key for it: '' on a single
        Redis; the shard's bare tag on a cluster, where every key of a script must share its slot."""
        return self.tag

    @property
    def home(self) -> str:
        """The prefix of deployment-wide keys that transactions write together (webhooks, schedules):
        `nova` on a single Redis, `nova:{nova}` on a cluster, so that they share one slot."""
        return f"{self.prefix}:{{{self.prefix}}}" if self.cluster else self.prefix

    def _name(self, *parts: str) -> str:
        return ":".join((self.prefix, self.tag, *parts) if self.tag else (self.prefix, *parts))

    @property
    def normal_requests(self) -> str:
        """The shard's normal-lane requests stream: what the steps that put a request back onto a stream
        are given (they pick its lane's stream from the request's `lane` field)."""
        return self.requests.removesuffix(f":{self.lane}") if self.lane != Lane.NORMAL else self.requests

    def in_lane(self, lane: str | None) -> Keys:
        """The keys of a reader of `lane`'s requests stream in this shard (None or '': normal). The name
        keeps the shard's hash tag, so on a cluster every lane of a shard shares its slot."""
        lane = Lane(lane or Lane.NORMAL)
        if lane == self.lane:
            return self
        base = self.normal_requests
        return replace(self, requests=base if lane == Lane.NORMAL else f"{base}:{lane}", lane=lane)

    @property
    def lanes(self) -> list[Keys]:
        """This shard's readers' keys, one per lane, highest first."""
        return [self.in_lane(lane) for lane in LANES]

    def sibling(self, shard: int) -> Keys:
        """Shard `shard`'s keys, from any shard's (in the same lane)."""
        if shard == self.shard_index or not self.tag:
            return self
        if self.lane != Lane.NORMAL:
            return self.in_lane(Lane.NORMAL).sibling(shard).in_lane(self.lane)
        tag = f"{{{self.prefix}:{shard}}}"

        def moved(name: str) -> str:
            return f"{name.removesuffix(':' + self.tag)}:{tag}"

        return replace(
            self,
            requests=moved(self.requests),
            results=moved(self.results),
            dead_letter=moved(self.dead_letter),
            tag=tag,
            shard_index=shard,
        )

    @property
    def all_shards(self) -> list[Keys]:
        return [self.sibling(n) for n in range(self.shard_count)]

    # A task's keys and a client's are named in the shard that holds them, whichever shard's `Keys`
    # is asked: the ids say which (`shard_of_task`, `shard_of_client`), so no caller has to.

    def of_task(self, task_id: str) -> Keys:
        return self.sibling(Keys.shard_of_task(task_id, self.shard_count))

    def of_client(self, client: str) -> Keys:
        return self.sibling(Keys.shard_of_client(client, self.shard_count))

    def of_execution(self, execution_id: int | str) -> Keys:
        """Execution ids are handed out per shard as n * shards + shard (shared/lua/enqueue.lua)."""
        try:
            return self.sibling(int(execution_id) % self.shard_count)
        except ValueError:
            return self

    def task(self, task_id: str) -> str:
        return self.of_task(task_id)._name("task", task_id)

    def task_events(self, task_id: str) -> str:
        """List of the task's results-stream entry ids, in order: replays one task without a scan."""
        return self.of_task(task_id)._name("task", task_id, "events")

    def inflight(self, client: str) -> str:
        """A client's count of accepted, not yet finished executions (the per-client cap)."""
        return self.of_client(client)._name("inflight", client)

    def rate_bucket(self, client: str) -> str:
        """A client's token bucket (the per-client rate limit), shared by every API replica."""
        return self.of_client(client)._name("ratelimit", client)

    def workflow(self, workflow_id: int) -> str:
        """The workflow's current version and state (JSON, without its definition)."""
        return f"{self.prefix}:workflow:{workflow_id}"

    def workflow_version(self, workflow_id: int, version: int) -> str:
        """One stored version of a workflow with its definition (JSON; never changes once written)."""
        return f"{self.prefix}:workflow:{workflow_id}:v{version}"

    def execution(self, execution_id: int | str) -> str:
        """The task id of an execution, so that it can be read from Redis before PostgreSQL has it.
        (With an empty id: this shard's prefix of these keys, which the enqueue step completes.)"""
        keys = self.of_execution(execution_id) if execution_id != "" else self
        return keys._name("execution", str(execution_id))

    def session(self, digest: str) -> str:
        """A dashboard session (JSON: who signed in, with which key's digest, its CSRF token), expiring with
        it; named by the SHA-256 of the cookie's value, so that reading Redis gives no usable cookie."""
        return f"{self.prefix}:session:{digest}"

    @property
    def clients(self) -> str:
        """Set of client slugs known to exist (a copy of PostgreSQL's clients, filled on lookup)."""
        return f"{self.prefix}:clients"

    def idempotency(self, client: str, key: str) -> str:
        return self.of_client(client)._name("idem", client, key)

    @property
    def execution_seq(self) -> str:
        return self._name("seq", "execution")

    @property
    def projector_dead_letter(self) -> str:
        """Events the projector read but cannot write, kept for an operator (never trimmed by NOVA)."""
        return self._name("projector", "dlq")

    @property
    def control(self) -> str:
        """Hash of run-control flags: `queue` (paused), `workflow:{id}` (paused), `drain` (workers take
        nothing new). Read by workers on each delivery, so a flag holds from the moment it is set."""
        return self._name("control")

    @property
    def control_channel(self) -> str:
        """Pub/sub channel of run-control pushes (a cancelled task id, a changed flag): how a worker
        learns of a cancel within a moment rather than at its next heartbeat."""
        return self._name("control", "push")

    @property
    def drained(self) -> str:
        """Hash of the workers that have stopped reading for a drain: consumer -> runs it still holds."""
        return self._name("control", "drained")

    def parked(self, scope: str) -> str:
        """Sorted set of requests parked while their scope (`queue`, `workflow:{id}`) is paused, scored
        by their original entry time, so that resume starts them in order."""
        return self._name("parked", scope)

    def newer_format(self, version: int) -> str:
        """Sorted set of requests a worker left for workers that read format `version` (it only knows
        older ones), scored like parked requests; those workers move them back onto the stream."""
        return self.parked(f"format:{version}")

    def concurrency_holders(self, key: str) -> str:
        """A concurrency key's counting semaphore (shared/lua/semaphore.lua's layout): sorted set of
        holder (task id) -> deadline in ms, refreshed by the holder's worker's heartbeat. In the shard's
        slot, beside the requests stream its waiters go back to: on a cluster a key is counted per shard
        (a key naming `{client}` stays whole, a client's runs all going to one shard)."""
        return self._name("ckey", key, "holders")

    def concurrency_waiting(self, key: str) -> str:
        """Sorted set of the task ids waiting for a slot of a concurrency key, scored by entry order."""
        return self._name("ckey", key, "waiting")

    def concurrency_parked(self, key: str) -> str:
        """Hash of the waiting tasks' requests: task id -> JSON of the request's fields."""
        return self._name("ckey", key, "parked")

    @property
    def concurrency_index(self) -> str:
        """Hash of the concurrency keys that have waiters -> their limit: what the promote loop looks at
        to hand a slot freed by expiry (a crashed holder) to the next waiter."""
        return self._name("ckeys")

    @property
    def builtin_schedules(self) -> str:
        """Sorted set of the built-in schedules (the retention cleanup) scored by their next tick in ms.
        Kept apart from operators' schedules, which the scheduler drops when their record is gone.
        Deployment-wide: under `home`, beside the operators' schedules (one claim for every shard)."""
        return f"{self.home}:schedules:builtin"

    @property
    def cleanup_last(self) -> str:
        """JSON of the last retention cleanup: its tick, who ran it, when, and what it deleted."""
        return f"{self.home}:cleanup:last"

    @property
    def delayed(self) -> str:
        """Sorted set of requests waiting for a retry, scored by due time in ms."""
        return self._name("delayed")

    @property
    def worker_reports(self) -> str:
        """Hash of what each worker reports of itself (its executors' lasting faults, its load):
        consumer -> JSON, rewritten at each heartbeat interval (shared/lua/worker_report.lua). One per
        worker process, whatever the shards; under `home`, so that on a cluster it shares its slot with
        the deadlines, as the script writing both needs."""
        return f"{self.home}:workers"

    @property
    def worker_report_deadlines(self) -> str:
        """Sorted set: consumer -> when its report goes stale (Redis ms), one visibility timeout after it
        was written; a dead worker's report is dropped then."""
        return f"{self.home}:workers:deadlines"


@dataclass(frozen=True)
class Layout:
    """Every shard's keys, and which shard holds a client's executions, a task or an execution.

    The requests streams a worker reads are `streams`: every shard's, in each lane.
    """

    shards: tuple[Keys, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Layout:
        return cls(tuple(Keys.from_settings(settings).all_shards))

    @property
    def home(self) -> Keys:
        return self.shards[0]

    @property
    def streams(self) -> list[Keys]:
        """One `Keys` per requests stream: each shard's lanes, highest lane first."""
        return [lane for shard in self.shards for lane in shard.lanes]

    def of_client(self, client: str) -> Keys:
        return self.home.of_client(client)

    def of_task(self, task_id: str) -> Keys:
        return self.home.of_task(task_id)

    def of_execution(self, execution_id: int | str) -> Keys:
        return self.home.of_execution(execution_id)


# The text of the current second, kept: a run stamps about a dozen times a second-long span, and
# formatting the date each time was a measurable share of a worker's CPU per execution.
_second: tuple[int, str] = (-1, "")
# The last stamp made, with its millisecond: a busy worker makes a dozen per run, thousands per second,
# mostly within a millisecond of the one before. One tuple, so that a reader never pairs one's millisecond
# with another's text.
_last_stamp: tuple[int, str] = (-1, "")


def random_id() -> str:
    """128 random bits as 32 hex digits (a task id, a request id): what uuid4().hex gave, in a third
    of its time (no UUID object is made), which is paid twice per enqueue request."""
    return os.urandom(16).hex()


def now_iso() -> str:
    """UTC now as ISO-8601 with milliseconds and `Z` (2026-12-02T15:30:00.123Z)."""
    global _second, _last_stamp
    ms = int(time.time() * 1000)
    last = _last_stamp
    if ms == last[0]:
        return last[1]
    whole, fraction = divmod(ms, 1000)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    stamp = f"{_second[1]}.{fraction:03d}Z"
    _last_stamp = (ms, stamp)
    return stamp


# Timestamps parsed lately (parse_iso): the events of a run share a few, and the projector parses each
# event's several. Emptied when full: a dict lookup, not an LRU's bookkeeping.
_PARSED: dict[str, datetime] = {}
_PARSED_KEPT = 4096


def parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = _PARSED.get(value)
    if parsed is None:
        # Python 3.11 reads the `Z` suffix itself.
        parsed = datetime.fromisoformat(value)
        if len(_PARSED) >= _PARSED_KEPT:
            _PARSED.clear()
        _PARSED[value] = parsed
    return parsed


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(value: str | bytes | None) -> Any:
    if value is None or value == "" or value == b"":
        return None
    return orjson.loads(value)


def decode_fields(fields: dict[Any, Any]) -> dict[str, str]:
    """Stream and hash replies as str->str, whether or not the client decodes responses."""
    out: dict[str, str] = {}
    for k, v in fields.items():
        # Already text from a client that decodes responses (every client of ours): kept as it is.
        key = k if type(k) is str else k.decode() if isinstance(k, bytes) else str(k)
        out[key] = v if type(v) is str else v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return out


def pairs(mapping: dict[str, str]) -> list[str]:
    """A dict as the flat field/value list Redis commands (and the scripts' ARGV) take, and stream replies
    give (field, value, field, value, ...)."""
    return [x for kv in mapping.items() for x in kv]


def fields_of(flat: list[str]) -> dict[str, str]:
    """A flat field/value list by name, as pairs() made it (a later field of the same name wins)."""
    it = iter(flat)
    return dict(zip(it, it, strict=False))  # one iterator, taken two at a time


def entry_id_parts(entry_id: str) -> tuple[int, int]:
    """A stream id's (milliseconds, sequence): stream ids order events totally."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def printable(value: str) -> str:
    """A string read from Redis, with bytes that are not UTF-8 (decoded as lone surrogates by the
    client's surrogateescape) shown as \\x escapes: safe to log and to encode as JSON."""
    return value.encode(errors="surrogateescape").decode(errors="backslashreplace")
