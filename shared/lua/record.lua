-- Record a run's status events and its task's new state; a terminal event also acknowledges the
-- request and releases the client's in-flight slot.
--
-- Why a script: a task has exactly one terminal state. If it is terminal already (another delivery
-- finished first), nothing is written and the delivery is only acknowledged; a terminal event is
-- never written without the ack, nor the ack without the event. A run that lost its entry to another
-- worker writes nothing (its checkpoint would overwrite the new owner's). Several events per call
-- let a run record a node's end and the next node's start in one round trip.
-- Safe to run twice: each call carries a token; the same token again answers as the first call did.
-- A first delivery's first write may come without a read of the task before it (a round trip less per
-- run): it then says what it assumed, and is written only if the task is still as enqueued.
local task_key = KEYS[1]
local results_stream = KEYS[2]
local requests_stream = KEYS[3]
local task_events_key = KEYS[4]
local inflight_key = KEYS[5]
local control_key = KEYS[6]   -- the pause flags (read only for an assumed first run)

local entry = ARGV[1]       -- the request entry this run holds ('' for none: no ownership check)
local group = ARGV[2]       -- the workers' group
local consumer = ARGV[3]    -- this run's worker
local task_ttl = tonumber(ARGV[4])   -- seconds a finished task is kept (0: for ever)
local terminal = ARGV[5] == '1'
local token = ARGV[6]       -- unique per call
local events = cjson.decode(ARGV[7])  -- JSON: the events, each a flat list of field/value pairs
local fields = cjson.decode(ARGV[8])  -- JSON: the task's new fields, a flat list of field/value pairs
-- (Two JSON arguments rather than one argument per item: packing ~140 arguments per call was a tenth
-- of a worker's CPU per execution.)
local first_run = ARGV[9]   -- '' for none; else the run's 'workflow:{id}' field in the control hash,
                            -- and the events assume a first run: see fresh() below
local readable = tonumber(ARGV[10])  -- the newest format of task hash this worker reads
-- '' or absent: each event of ARGV[7] is its whole entry. Else JSON: the values every event shares
-- (task_id, execution_id, workflow_id, client, v: Scripts.record's `of_run` in shared/scripts.py), and each
-- event of ARGV[7] is only its own {type, ts, data}; each entry is written with every field, in the
-- order shared/events.py gives them. (Sent whole, a run's events repeat the shared ones: ~40% of the bytes.)
local shared = ARGV[11]
if shared == nil or shared == '' then shared = nil else shared = cjson.decode(shared) end
-- '' or absent: no check. Else '=' and the re-open token of the request this run holds ('' for a request
-- of no re-open): a task re-opened since (a retry of a cancelled run) is no longer this run's, though not
-- terminal and its entry still this worker's (a cancel whose push the worker missed).
local reopen = ARGV[12]

-- Reply: {outcome, last event id or '', current status}
local WRITTEN, FINISHED, NOT_OWNER, STALE = 1, 0, -1, 2

local function blank(value)
  return not value or value == ''
end

-- Whether the task is as enqueued and may start: what a worker that read it first would have found
-- before writing the same events (status PENDING, attempt 0, never started, no checkpoint, not
-- re-opened, a hash format it reads), and neither its workflow nor the queue is paused.
local function fresh(status)
  local t = redis.call('HMGET', task_key, 'attempt', 'started_at', 'checkpoint', 'reopened_from', 'v')
  local version = t[5]
  local readable_version = blank(version) or (string.match(version, '^%d+$') and tonumber(version) >= 1
    and tonumber(version) <= readable)
  local flags = redis.call('HMGET', control_key, 'queue', first_run)
  return status == 'PENDING' and (blank(t[1]) or t[1] == '0') and blank(t[2]) and blank(t[3]) and blank(t[4])
    and readable_version and not flags[1] and not flags[2]
end

local state = redis.call('HMGET', task_key, 'status', 'token', 'last_event', 'reopen_token')
if state[2] == token then
  return {WRITTEN, state[3] or '', state[1] or ''}
end
-- Only a task that was re-opened has a token to compare: a request carrying one into a task without (a
-- dead letter of a retry, replayed as a new execution) is that task's own.
local replaced = reopen ~= nil and reopen ~= '' and not blank(state[4]) and string.sub(reopen, 2) ~= state[4]
if is_terminal(state[1]) or replaced then
  -- Done, or superseded: the re-opened task has a request of its own.
  if entry ~= '' then redis.call('XACK', requests_stream, group, entry) end
  return {FINISHED, '', state[1] or ''}
end
if entry ~= '' and not owns(requests_stream, group, entry, consumer) then
  return {NOT_OWNER, '', state[1] or ''}
end
if first_run ~= '' and not fresh(state[1]) then
  -- Retried, resumed, re-opened or paused: the worker reads the task and runs it as it is.
  return {STALE, '', state[1] or ''}
end
local id = ''
for _, event in ipairs(events) do
  if shared then
    event = {'type', event[1], 'task_id', shared[1], 'execution_id', shared[2], 'workflow_id', shared[3],
      'client', shared[4], 'ts', event[2], 'data', event[3], 'v', shared[5]}
  end
  id = append_event(results_stream, task_events_key, event)
end
fields[#fields + 1] = 'token'; fields[#fields + 1] = token
fields[#fields + 1] = 'last_event'; fields[#fields + 1] = id
redis.call('HSET', task_key, unpack(fields))
if terminal then
  if entry ~= '' then redis.call('XACK', requests_stream, group, entry) end
  if task_ttl > 0 then
    redis.call('EXPIRE', task_key, task_ttl)
    redis.call('EXPIRE', task_events_key, task_ttl)
  end
  if redis.call('DECR', inflight_key) <= 0 then redis.call('DEL', inflight_key) end
end
return {WRITTEN, id, redis.call('HGET', task_key, 'status') or ''}
