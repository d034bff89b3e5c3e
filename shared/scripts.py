"""The few multi-key Redis steps that must be atomic, each one Lua script (EVALSHA, Redis >= 6.2).

Why Lua rather than MULTI: each step reads before it writes (an idempotency key, a terminal status)
and must decide inside the server, so that two API replicas or two workers racing on the same task
cannot both win. Every script is covered by a race test in tests/test_scripts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from shared.streams import Keys, TaskStatus

# Enqueue one execution request.
# KEYS: 1 requests stream, 2 results stream, 3 execution id sequence, 4 task hash, 5 idempotency key or "",
#       6 the task's event-id list, 7 the client's in-flight counter, 8 the client's rate bucket
# ARGV: 1 task_id, 2 workflow_id, 3 workflow_name, 4 client, 5 enqueued_at, 6 payload JSON,
#       7 queued event data JSON, 8 results maxlen, 9 idempotency ttl seconds,
#       10 most executions the client may have in flight (0: no cap),
#       11 executions per second the client may start (0: no limit), 12 its burst
# Returns {task_id, execution_id, request entry id or "", outcome}: outcome 1 newly enqueued, 0 an
# idempotent repeat, 2 refused at the in-flight cap (execution id slot: the in-flight count), 3 refused
# by the rate limit (execution id slot: milliseconds until a token frees).
# Admission (rate, cap) and the enqueue are one step, so a refused request leaves no trace and an
# accepted one is counted exactly once, whichever API replica took it.
# Why one script: the task hash (so GET /tasks answers PENDING at once), the request entry and the
# queued event appear together or not at all, and an idempotency key maps to exactly one task.
ENQUEUE = """
if KEYS[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    local sep = string.find(existing, ' ', 1, true)
    return {string.sub(existing, 1, sep - 1), string.sub(existing, sep + 1), '', 0}
  end
end
local inflight = tonumber(redis.call('GET', KEYS[7]) or '0')
if tonumber(ARGV[10]) > 0 and inflight >= tonumber(ARGV[10]) then
  return {'', tostring(inflight), '', 2}
end
local rate, burst = tonumber(ARGV[11]), tonumber(ARGV[12])
if rate > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local state = redis.call('HMGET', KEYS[8], 'tokens', 'at')
  local tokens = math.min(burst, (tonumber(state[1]) or burst) + (now - (tonumber(state[2]) or now)) * rate / 1000)
  if tokens < 1 then
    redis.call('HSET', KEYS[8], 'tokens', tostring(tokens), 'at', now)
    return {'', tostring(math.ceil((1 - tokens) * 1000 / rate)), '', 3}
  end
  redis.call('HSET', KEYS[8], 'tokens', tostring(tokens - 1), 'at', now)
  redis.call('PEXPIRE', KEYS[8], math.ceil(burst * 1000 / rate) + 1000)
end
redis.call('INCR', KEYS[7])
local exec_id = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[4],
  'status', 'PENDING', 'task_id', ARGV[1], 'execution_id', exec_id, 'workflow_id', ARGV[2],
  'workflow_name', ARGV[3], 'client', ARGV[4], 'enqueued_at', ARGV[5], 'attempt', '0',
  'updated_at', ARGV[5])
local entry = redis.call('XADD', KEYS[1], '*',
  'task_id', ARGV[1], 'execution_id', exec_id, 'workflow_id', ARGV[2], 'workflow_name', ARGV[3],
  'client', ARGV[4], 'enqueued_at', ARGV[5], 'payload', ARGV[6])
local event_id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*',
  'type', 'queued', 'task_id', ARGV[1], 'execution_id', exec_id, 'workflow_id', ARGV[2],
  'client', ARGV[4], 'ts', ARGV[5], 'data', ARGV[7])
redis.call('RPUSH', KEYS[6], event_id)
if KEYS[5] ~= '' then
  -- "task_id execution_id": a repeat is answered from this key alone.
  redis.call('SET', KEYS[5], ARGV[1] .. ' ' .. exec_id, 'EX', ARGV[9])
end
return {ARGV[1], tostring(exec_id), entry, 1}
"""

# Record status events and the task's new state; terminal events also acknowledge the request.
# KEYS: 1 task hash, 2 results stream, 3 requests stream, 4 the task's event-id list,
#       5 the client's in-flight counter (decremented with the terminal event)
# ARGV: 1 results maxlen, 2 request entry id ("" if none; acked only with a terminal event, or when
#       the task is already terminal), 3 worker group, 4 task ttl (0: none), 5 1 if terminal else 0,
#       6 number of events k, then k times: the event's item count (2n) and its field/value pairs,
#       then the task hash's field/value pairs.
# Returns {written (1/0), last event entry id or "", current status}.
# Why a script: a task has exactly one terminal state. If it is terminal already (another worker
# finished a reclaimed copy first), nothing is written and the delivery is only acknowledged; and a
# terminal event is never written without the ack, nor the ack without the event. Several events
# per call let a run record a node's end and the next node's start in one round trip.
RECORD = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'SUCCESS' or status == 'FAILURE' or status == 'DEAD' then
  if ARGV[2] ~= '' then redis.call('XACK', KEYS[3], ARGV[3], ARGV[2]) end
  return {0, '', status}
end
local pos = 7
local id = ''
for _ = 1, tonumber(ARGV[6]) do
  local n = tonumber(ARGV[pos])
  local event = {}
  for i = pos + 1, pos + n do event[#event + 1] = ARGV[i] end
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(event))
  redis.call('RPUSH', KEYS[4], id)
  pos = pos + n + 1
end
local fields = {}
for i = pos, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if ARGV[5] == '1' then
  if ARGV[2] ~= '' then redis.call('XACK', KEYS[3], ARGV[3], ARGV[2]) end
  if tonumber(ARGV[4]) > 0 then
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    redis.call('EXPIRE', KEYS[4], ARGV[4])
  end
  if redis.call('DECR', KEYS[5]) <= 0 then redis.call('DEL', KEYS[5]) end
end
return {1, id, redis.call('HGET', KEYS[1], 'status') or ''}
"""

# Raise the execution id sequence to at least ARGV[1] (after a Redis flush or restore, PostgreSQL
# may know larger ids than Redis does; ids must never be handed out twice).
# KEYS: 1 sequence key. Returns the sequence's value.
RAISE_SEQUENCE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if floor > current then
  redis.call('SET', KEYS[1], floor)
  return floor
end
return current
"""


# Park a run that hit a transient error until its retry is due, freeing the worker's slot.
# KEYS: 1 task hash, 2 results stream, 3 requests stream, 4 delayed-retries sorted set, 5 event-id list
# ARGV: 1 results maxlen, 2 request entry id, 3 worker group, 4 due time (ms), 5 member (JSON of the
#       request's fields), 6 number of event items (2n), then event items, then task hash items.
# Returns 1, or 0 when the task was already terminal (then the entry is only acknowledged).
# Why a script: the retry event, the parked request and the ack of the old entry happen together,
# so the request is never in neither place (lost) nor in both (run twice).
RETRY_LATER = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'SUCCESS' or status == 'FAILURE' or status == 'DEAD' then
  redis.call('XACK', KEYS[3], ARGV[3], ARGV[2])
  return 0
end
local n = tonumber(ARGV[6])
local event = {}
for i = 7, 6 + n do event[#event + 1] = ARGV[i] end
redis.call('RPUSH', KEYS[5], redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(event)))
local fields = {}
for i = 7 + n, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
redis.call('XACK', KEYS[3], ARGV[3], ARGV[2])
return 1
"""

# Move retries that are due back onto the requests stream.
# KEYS: 1 delayed-retries sorted set, 2 requests stream. ARGV: 1 now (ms), 2 most to move.
# Returns how many moved. Atomic per call, so two workers promoting at once move each retry once.
PROMOTE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local fields = cjson.decode(member)
  local flat = {}
  for k, v in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = tostring(v) end
  redis.call('XADD', KEYS[2], '*', unpack(flat))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# Move a request to the dead-letter stream; if it belongs to a live task, end that task as DEAD.
# KEYS: 1 dead-letter stream, 2 requests stream, 3 task hash ("" if none), 4 results stream,
#       5 the task's event-id list ("" if none), 6 the client's in-flight counter ("" if none)
# ARGV: 1 worker group, 2 request entry id, 3 results maxlen, 4 task ttl,
#       5 number of dead-letter items (2n), then those, 6+n.. number of event items (2m) then those,
#       then the task hash items.
# Returns {1 if a DEAD event was written else 0, dead-letter entry id}.
# Why a script: the dead letter is written if and only if the request is acknowledged, and a task
# that already reached a terminal state is not given a second one.
DEAD_LETTER = """
local n = tonumber(ARGV[5])
local letter = {}
for i = 6, 5 + n do letter[#letter + 1] = ARGV[i] end
local dlq_id = redis.call('XADD', KEYS[1], '*', unpack(letter))
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
if KEYS[3] == '' then return {0, dlq_id} end
local status = redis.call('HGET', KEYS[3], 'status')
if status == 'SUCCESS' or status == 'FAILURE' or status == 'DEAD' then return {0, dlq_id} end
local m = tonumber(ARGV[6 + n])
local event = {}
for i = 7 + n, 6 + n + m do event[#event + 1] = ARGV[i] end
if m > 0 then
  redis.call('RPUSH', KEYS[5], redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', unpack(event)))
end
local fields = {}
for i = 7 + n + m, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then
  redis.call('HSET', KEYS[3], unpack(fields))
  if tonumber(ARGV[4]) > 0 then
    redis.call('EXPIRE', KEYS[3], ARGV[4])
    redis.call('EXPIRE', KEYS[5], ARGV[4])
  end
end
if KEYS[6] ~= '' and redis.call('DECR', KEYS[6]) <= 0 then redis.call('DEL', KEYS[6]) end
return {1, dlq_id}
"""

# Keep this consumer's in-flight entries fresh so that no other worker reclaims a healthy run.
# KEYS: 1 requests stream. ARGV: 1 group, 2 consumer, 3 most pending to look at, 4.. entry ids.
# Returns the ids still owned (and now refreshed); an id missing from the reply was taken over.
# Why a script: XCLAIM alone would also steal back an entry another worker has reclaimed meanwhile;
# checking ownership and claiming in one step cannot.
HEARTBEAT = """
local mine = {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[3]), ARGV[2])) do
  mine[p[1]] = true
end
local keep = {}
for i = 4, #ARGV do if mine[ARGV[i]] then keep[#keep + 1] = ARGV[i] end end
if #keep > 0 then redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(keep), 'JUSTID') end
return keep
"""

# Remove a consumer from a group only if it owns no pending entry.
# KEYS: 1 stream. ARGV: 1 group, 2 consumer. Returns 1 if removed.
# Why a script: XGROUP DELCONSUMER discards the consumer's pending entries; checking and deleting
# in one step means an entry it claimed a moment ago is never silently dropped.
REMOVE_IDLE_CONSUMER = """
local owned = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #owned > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Re-open a FAILURE so that it runs again from its failed node (POST /executions/{id}/retry).
# KEYS: 1 task hash, 2 requests stream, 3 results stream, 4 the task's event-id list,
#       5 the client's in-flight counter
# ARGV: 1 results maxlen, 2 number of event items (2n), then the event, then the request's fields.
# Returns the status the task had: the retry happened only if it was FAILURE.
# Why a script: two operators retrying at once must start one run, not two.
REOPEN = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'FAILURE' then return status or '' end
local n = tonumber(ARGV[2])
local event = {}
for i = 3, 2 + n do event[#event + 1] = ARGV[i] end
local request = {}
for i = 3 + n, #ARGV do request[#request + 1] = ARGV[i] end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') + 1
redis.call('HSET', KEYS[1], 'status', 'RETRY', 'attempt', attempt)
redis.call('HDEL', KEYS[1], 'finished_at', 'result')
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[4])
redis.call('RPUSH', KEYS[4], redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', unpack(event)))
redis.call('XADD', KEYS[2], '*', unpack(request))
redis.call('INCR', KEYS[5])
return status
"""


class AtCapacity(Exception):
    """The client already has its maximum number of executions in flight."""

    def __init__(self, client: str, inflight: int, cap: int) -> None:
        super().__init__(f"client '{client}' has {inflight} executions in flight (limit {cap})")
        self.client, self.inflight, self.cap = client, inflight, cap


class RateLimited(Exception):
    """The client is starting executions faster than its rate."""

    def __init__(self, client: str, wait_ms: int, rate: float) -> None:
        super().__init__(f"client '{client}' is over its rate of {rate:g} executions/s")
        self.client, self.wait_ms, self.rate = client, wait_ms, rate


@dataclass
class EnqueueResult:
    task_id: str
    execution_id: int
    entry_id: str | None
    created: bool


@dataclass
class RecordResult:
    written: bool
    event_id: str | None
    status: str


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Scripts:
    """The atomic steps bound to one Redis client (scripts load lazily through EVALSHA)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._enqueue = redis.register_script(ENQUEUE)
        self._record = redis.register_script(RECORD)
        self._raise_sequence = redis.register_script(RAISE_SEQUENCE)
        self._retry_later = redis.register_script(RETRY_LATER)
        self._promote_due = redis.register_script(PROMOTE_DUE)
        self._dead_letter = redis.register_script(DEAD_LETTER)
        self._heartbeat = redis.register_script(HEARTBEAT)
        self._remove_idle_consumer = redis.register_script(REMOVE_IDLE_CONSUMER)
        self._reopen = redis.register_script(REOPEN)

    async def enqueue(
        self,
        *,
        task_id: str,
        workflow_id: int,
        workflow_name: str,
        client: str,
        enqueued_at: str,
        payload: str,
        queued_data: str,
        results_maxlen: int,
        idempotency_key: str | None = None,
        idempotency_ttl: int = 24 * 3600,
        max_inflight: int = 0,
        rate: float = 0,
        burst: int = 1,
    ) -> EnqueueResult:
        idem = self.keys.idempotency(client, idempotency_key) if idempotency_key else ""
        reply = await self._enqueue(
            keys=[
                self.keys.requests,
                self.keys.results,
                self.keys.execution_seq,
                self.keys.task(task_id),
                idem,
                self.keys.task_events(task_id),
                self.keys.inflight(client),
                f"{self.keys.prefix}:ratelimit:{client}",
            ],
            args=[
                task_id,
                workflow_id,
                workflow_name,
                client,
                enqueued_at,
                payload,
                queued_data,
                results_maxlen,
                idempotency_ttl,
                max_inflight,
                rate,
                burst,
            ],
        )
        existing_task, exec_id, entry, outcome = (_s(x) for x in reply)
        if outcome == "2":
            raise AtCapacity(client, int(exec_id), max_inflight)
        if outcome == "3":
            raise RateLimited(client, int(exec_id), rate)
        return EnqueueResult(
            task_id=existing_task,
            execution_id=int(exec_id) if exec_id else 0,
            entry_id=entry or None,
            created=outcome == "1",
        )

    async def record(
        self,
        *,
        task_id: str,
        client: str,
        events: list[dict[str, str]],
        task_fields: dict[str, str],
        terminal: bool,
        ack_entry_id: str | None,
        results_maxlen: int,
        task_ttl: int,
    ) -> RecordResult:
        event_items: list[Any] = []
        for event in events:
            event_items.append(len(event) * 2)
            event_items.extend(x for kv in event.items() for x in kv)
        task_items: list[str] = [x for kv in task_fields.items() for x in kv]
        reply = await self._record(
            keys=[
                self.keys.task(task_id),
                self.keys.results,
                self.keys.requests,
                self.keys.task_events(task_id),
                self.keys.inflight(client),
            ],
            args=[
                results_maxlen,
                ack_entry_id or "",
                self.keys.worker_group,
                task_ttl,
                "1" if terminal else "0",
                len(events),
                *event_items,
                *task_items,
            ],
        )
        written, event_id, status = (_s(x) for x in reply)
        return RecordResult(written=written == "1", event_id=event_id or None, status=status)

    async def raise_sequence(self, floor: int) -> int:
        return int(await self._raise_sequence(keys=[self.keys.execution_seq], args=[floor]))

    async def retry_later(
        self,
        *,
        task_id: str,
        entry_id: str,
        request: dict[str, str],
        due_ms: int,
        event: dict[str, str],
        task_fields: dict[str, str],
        results_maxlen: int,
    ) -> bool:
        event_items = [x for kv in event.items() for x in kv]
        task_items = [x for kv in task_fields.items() for x in kv]
        reply = await self._retry_later(
            keys=[
                self.keys.task(task_id),
                self.keys.results,
                self.keys.requests,
                self.keys.delayed,
                self.keys.task_events(task_id),
            ],
            args=[
                results_maxlen,
                entry_id,
                self.keys.worker_group,
                due_ms,
                orjson.dumps(request).decode(),
                len(event_items),
                *event_items,
                *task_items,
            ],
        )
        return _s(reply) == "1"

    async def promote_due(self, now_ms: int, limit: int = 100) -> int:
        return int(await self._promote_due(keys=[self.keys.delayed, self.keys.requests], args=[now_ms, limit]))

    async def dead_letter(
        self,
        *,
        entry_id: str,
        letter: dict[str, str],
        task_id: str | None,
        client: str | None = None,
        event: dict[str, str] | None,
        task_fields: dict[str, str] | None,
        results_maxlen: int,
        task_ttl: int,
    ) -> tuple[bool, str]:
        letter_items = [x for kv in letter.items() for x in kv]
        event_items = [x for kv in (event or {}).items() for x in kv]
        task_items = [x for kv in (task_fields or {}).items() for x in kv]
        reply = await self._dead_letter(
            keys=[
                self.keys.dead_letter,
                self.keys.requests,
                self.keys.task(task_id) if task_id else "",
                self.keys.results,
                self.keys.task_events(task_id) if task_id else "",
                self.keys.inflight(client) if task_id and client else "",
            ],
            args=[
                self.keys.worker_group,
                entry_id,
                results_maxlen,
                task_ttl,
                len(letter_items),
                *letter_items,
                len(event_items),
                *event_items,
                *task_items,
            ],
        )
        written, dlq_id = (_s(x) for x in reply)
        return written == "1", dlq_id

    async def reopen(
        self, *, task_id: str, client: str, event: dict[str, str], request: dict[str, str], results_maxlen: int
    ) -> str:
        event_items = [x for kv in event.items() for x in kv]
        request_items = [x for kv in request.items() for x in kv]
        reply = await self._reopen(
            keys=[
                self.keys.task(task_id),
                self.keys.requests,
                self.keys.results,
                self.keys.task_events(task_id),
                self.keys.inflight(client),
            ],
            args=[results_maxlen, len(event_items), *event_items, *request_items],
        )
        return _s(reply)

    async def remove_consumer_if_idle(self, stream: str, group: str, consumer: str) -> bool:
        return int(await self._remove_idle_consumer(keys=[stream], args=[group, consumer])) == 1

    async def heartbeat(self, consumer: str, entry_ids: list[str]) -> set[str]:
        if not entry_ids:
            return set()
        reply = await self._heartbeat(
            keys=[self.keys.requests],
            args=[self.keys.worker_group, consumer, max(len(entry_ids) * 2, 100), *entry_ids],
        )
        return {_s(x) for x in reply}


TERMINAL = {TaskStatus.SUCCESS.value, TaskStatus.FAILURE.value, TaskStatus.DEAD.value}
